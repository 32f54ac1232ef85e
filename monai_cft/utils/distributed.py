"""Data-parallel training across processes (``torchrun``), as no-ops in a single process.

monai-cft's own trainers (:class:`~monai_cft.engines.dscm_trainer.DSCMTrainer`,
:class:`~monai_cft.engines.cft_trainer.CFTTrainer`) call sub-modules and several optimizers
directly (the HVAE, the flows, the Lagrange multiplier), not one ``forward``, so they are made
data-parallel here rather than by wrapping the model in ``DistributedDataParallel``: after
``backward`` the gradients are averaged over the processes (:func:`sync_gradients`, one flat
all-reduce, what DDP's reducer does), a skip decision is taken on the averaged gradients, and
batch statistics that enter the loss non-linearly (the damping of the constrained ELBO) are
averaged first (:func:`all_reduce_mean`). The stock MONAI trainers (segmentors, regressor) get
the same averaging from the :class:`~monai_cft.engines.handlers.SyncGradients` handler.

Random draws with a batch dimension (posterior samples of the HVAE, dequantisation noise of the
flows, the CFT interventions) use :func:`batch_randn_like` / :func:`batch_rand_like` /
:func:`batch_randint`: with ``W`` processes every process draws the values of the *global* batch
(``W * B`` rows, the same random stream on every rank) and keeps the rows ``rank::W``, which are
its own samples when the data come from ``DistributedSampler`` (rank ``r`` holds the global
positions ``r, r + W, ...`` of each batch). So ``W`` processes with per-process batch ``B`` follow
the trajectory of one process with batch ``W * B``, up to floating-point rounding, as long as
every rank makes the same random draws (``set_determinism`` with one seed, no random transforms,
no validation between the steps compared: validation on rank 0 advances only rank 0's stream).

Outside ``torch.distributed`` (or with one process) every function is the plain single-process
operation, bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "world_size",
    "rank",
    "is_main_process",
    "all_reduce_mean",
    "all_ranks",
    "sync_gradients",
    "broadcast_parameters",
    "batch_randn_like",
    "batch_rand_like",
    "batch_randint",
    "global_batch",
    "shard_rows",
    "all_reduce_sum_",
]


def world_size() -> int:
    """Number of processes of the default group (1 outside ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 outside ``torch.distributed``)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Whether this process writes files and logs (rank 0)."""
    return rank() == 0


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the processes (a new tensor; ``value`` itself with one process)."""
    if world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the processes, in place (no-op with one process)."""
    if world_size() == 1:
        return
    device = _device()
    for t in tensors:
        if t.device == device:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:  # e.g. CPU accumulators with nccl
            moved = t.to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            t.copy_(moved)


def all_ranks(flag: bool | torch.Tensor) -> bool:
    """Whether ``flag`` is true on every process (e.g. "the loss is finite": all ranks skip together)."""
    ok = bool(flag)
    if world_size() == 1:
        return ok
    t = torch.tensor([0.0 if ok else 1.0], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) == 0.0


def _device() -> torch.device:
    """The device of the default group's collectives (CUDA for nccl)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync_gradients(parameters: Iterable[torch.Tensor]) -> None:
    """Average the ``.grad`` of ``parameters`` over the processes, in place (one flat all-reduce per dtype).

    Every rank must pass the same parameters in the same order; parameters without a gradient are
    left alone (the same on every rank, as every rank runs the same graph).
    """
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size()
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every process (identical starting weights)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src)


#: size of the global batch of which this process holds the rows ``rank::world`` (see :func:`global_batch`)
_GLOBAL_BATCH: contextvars.ContextVar[int | None] = contextvars.ContextVar("monai_cft_global_batch", default=None)


@contextlib.contextmanager
def global_batch(size: int) -> Iterator[None]:
    """Within this context the batch draws treat the local batch as the rows ``rank::world`` of a global
    batch of ``size`` rows (for shards of unequal size, e.g. the last batch of a distributed evaluation).

    Without it, a local batch of ``B`` rows is taken as rank ``r``'s share of a global batch of
    ``world * B`` rows (``DistributedSampler`` with ``even_divisible=True``).
    """
    token = _GLOBAL_BATCH.set(int(size))
    try:
        yield
    finally:
        _GLOBAL_BATCH.reset(token)


def shard_rows(start: int, stop: int) -> torch.Tensor:
    """The rows ``start .. stop-1`` of a global batch that this process holds: ``arange(start, stop)[rank::world]``."""
    return torch.arange(int(start), int(stop))[rank() :: world_size()]


def _global_rows(draw, shape: Sequence[int]) -> torch.Tensor:
    w = world_size()
    if w == 1:
        return draw(tuple(shape))
    total = _GLOBAL_BATCH.get()
    total = w * int(shape[0]) if total is None else total
    if len(range(rank(), total, w)) != int(shape[0]):
        raise ValueError(f"a local batch of {shape[0]} rows is not rank {rank()}'s share of a global batch of {total} "
                         f"over {w} processes.")
    full = draw((total, *shape[1:]))
    return full[rank() :: w].contiguous()


def batch_randn_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.randn_like(t)`` for a tensor whose first dimension is the batch (see the module docstring)."""
    if world_size() == 1:
        return torch.randn_like(t)
    return _global_rows(lambda s: torch.randn(s, dtype=t.dtype, device=t.device), t.shape)


def batch_rand_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.rand_like(t)`` for a tensor whose first dimension is the batch."""
    if world_size() == 1:
        return torch.rand_like(t)
    return _global_rows(lambda s: torch.rand(s, dtype=t.dtype, device=t.device), t.shape)


def batch_randint(high: int, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.randint(high, (batch,))``: one integer in ``[0, high)`` per sample of the batch."""
    if world_size() == 1:
        return torch.randint(high, (batch,), device=device)
    return _global_rows(lambda s: torch.randint(high, s, device=device), (batch,))
