"""Multi-process training and evaluation of the bundle (``torchrun``; used by ``configs/multi_gpu.json``).

- :func:`init_distributed` / :func:`finalize_distributed`: the process group (nccl on CUDA, gloo on
  CPU, chosen from the device), and this process's device (``cuda:<LOCAL_RANK>`` or the CPU).
- :class:`SyncGradients`: an ignite handler that averages the gradients over the processes after
  ``backward`` (MONAI's ``SupervisedTrainer``: the segmentors and the regressor). monai-cft's
  own trainers average their gradients themselves (:mod:`monai_cft.utils.distributed`).
- :func:`rank_handlers`: every handler on rank 0 (validation, checkpoints, logging, TensorBoard);
  on the other ranks only those that must run everywhere (:class:`SyncGradients`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from torch import nn

from monai_cft.utils.distributed import broadcast_parameters, rank, sync_gradients, world_size

__all__ = ["distributed_device", "init_distributed", "finalize_distributed", "SyncGradients", "rank_handlers"]


def distributed_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU (``LOCAL_RANK`` is set by torchrun)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device | str | None = None, timeout_minutes: float = 60.0) -> int:
    """Join the default process group of a ``torchrun`` launch (idempotent); return the world size.

    The backend is nccl for a CUDA device and gloo otherwise. Raises ``RuntimeError`` naming the
    missing variables when the process was not started by torchrun (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``).
    """
    if dist.is_initialized():
        return dist.get_world_size()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"multi_gpu.json needs a torchrun launch (environment {missing} not set): run "
            "`torchrun --standalone --nnodes=1 --nproc_per_node=N -m monai.bundle run ...`."
        )
    device = torch.device(device) if device is not None else distributed_device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=float(timeout_minutes)))
    return dist.get_world_size()


def finalize_distributed() -> None:
    """Wait for every process, then leave the process group (no-op outside one)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class SyncGradients:
    """Average ``network``'s gradients over the processes after each ``backward`` (no-op in one process).

    Attach to MONAI's ``SupervisedTrainer`` (it fires ``IterationEvents.BACKWARD_COMPLETED`` between
    ``loss.backward()`` and ``optimizer.step()``); at the start of the run the parameters are
    broadcast from rank 0 so that every process starts from the same weights. It runs on every
    rank (``all_ranks = True``, kept by :func:`rank_handlers`).

    Args:
        network: the trained module (``None``: the engine's ``network``).
    """

    all_ranks = True

    def __init__(self, network: nn.Module | None = None) -> None:
        self.network = network

    def _module(self, engine: Engine) -> nn.Module:
        net = self.network if self.network is not None else getattr(engine, "network", None)
        if not isinstance(net, nn.Module):
            raise TypeError(f"SyncGradients needs a network (an nn.Module), got {type(net).__name__}.")
        return net

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: broadcast_parameters(self._module(e)))
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda e: sync_gradients(self._module(e).parameters()))


def rank_handlers(handlers: Sequence[Any] | None) -> list[Any]:
    """The handlers this process runs: all of them on rank 0; elsewhere only those every rank must run.

    Those are :class:`SyncGradients` (any handler with ``all_ranks = True``) and MONAI's
    ``ValidationHandler``: the validation is distributed too (each rank evaluates its shard of the
    validation set and the metrics are all-reduced, so every rank must take part), while its
    checkpoint, logging and TensorBoard handlers run on rank 0 only.
    """
    from monai.handlers import ValidationHandler

    handlers = list(handlers or [])
    if rank() == 0 or world_size() == 1:
        return handlers
    return [h for h in handlers if getattr(h, "all_ranks", False) or isinstance(h, ValidationHandler)]
