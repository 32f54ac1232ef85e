"""Ignite engines that train and validate the deep structural causal model (DSCM).

:class:`DSCMTrainer` is a ``monai.engines.Trainer`` with its own ``_iteration``: one batch
``{"image": (B, 1, *spatial) in [-1, 1], "variables": (B, V) physical units}`` trains

- the **attribute mechanisms** (conditional normalizing flows): negative log-likelihood of the
  normalized parents, ``flow_nll = -mean_b log p(pa_b)`` in nats per sample (summed over the V
  variables);
- the **image mechanism** (hierarchical VAE): negative ELBO per image element,
  ``nll + beta * kl`` with a linear beta warm-up (and the HVAE's own free-bits floor on the KL
  when it was built with ``free_bits > 0``).

The two share no parameters (the HVAE is conditioned on the *observed* parents), so they have
their own optimizers, learning-rate warm-ups, gradient clipping and skipping. An exponential moving
average (EMA) of the whole DeepSCM is updated after every iteration in which at least one update
was applied; the EMA model is what is validated and saved.

:class:`DSCMEvaluator` is a ``monai.engines.Evaluator`` computing, on the EMA model, the validation
negative ELBO (nats per pixel), its NLL and KL parts, the flows' NLL and the reconstruction error
``mean |x - loc(abduct(x))|`` in the network's [-1, 1] units and in HU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines import Evaluator, Trainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow
from torch import nn
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel

from monai_cft.constants import HU_WINDOW
from monai_cft.engines.common import (
    ModelEMA,
    autocast,
    check_count,
    linear_warmup,
    lower_is_better,
    step_or_skip,
)
from monai_cft.transforms.intensity import HUWindow
from monai_cft.utils.tensors import as_plain_tensor, to_plain_tensor
from monai_cft.utils.distributed import all_ranks, broadcast_parameters

__all__ = ["DSCMTrainer", "DSCMEvaluator", "SampleMean", "dscm_optimizers", "SCHEDULES"]

#: training schedules of :class:`DSCMTrainer`.
SCHEDULES = ("joint", "flows_first")


def _parts(network: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(hvae, mechanisms, normalizer)`` of a DeepSCM (or of the module an EMA wraps)."""
    if isinstance(network, AveragedModel):
        network = network.module
    missing = [n for n in ("hvae", "mechanisms", "normalizer") if not hasattr(network, n)]
    if missing:
        raise TypeError(
            f"expected a monai_cft.networks.dscm.DeepSCM (with hvae, mechanisms and normalizer), "
            f"got {type(network).__name__} lacking {missing}."
        )
    return network.hvae, network.mechanisms, network.normalizer


def dscm_optimizers(
    network: nn.Module,
    lr: float = 1e-3,
    betas: Sequence[float] = (0.9, 0.9),
    weight_decay: float = 0.01,
    flow_lr: float = 1e-3,
    flow_weight_decay: float = 0.0,
) -> tuple[Optimizer, Optimizer]:
    """Default optimizers: AdamW for the HVAE (causal-gen's lr 1e-3, betas (0.9, 0.9), weight decay
    0.01) and AdamW for the flows (lr 1e-3, no weight decay)."""
    hvae, mechanisms, _ = _parts(network)
    opt = torch.optim.AdamW(hvae.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    flow_params = list(mechanisms.parameters())
    if not flow_params:
        raise ValueError("the DeepSCM's mechanisms have no trainable parameters.")
    flow_opt = torch.optim.AdamW(flow_params, lr=flow_lr, weight_decay=flow_weight_decay)
    return opt, flow_opt


def _batch_inputs(
    batchdata: Any, image_key: str, parents_key: str, device: torch.device, non_blocking: bool, to_kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batchdata, dict):
        raise TypeError(f"a DSCM batch must be a dict with {image_key!r} and {parents_key!r}, got {type(batchdata).__name__}.")
    missing = [k for k in (image_key, parents_key) if k not in batchdata]
    if missing:
        raise KeyError(f"batch has no key(s) {missing}; available keys: {sorted(batchdata)}.")
    x = as_plain_tensor(batchdata[image_key]).to(device=device, non_blocking=non_blocking, **to_kwargs)
    v = to_plain_tensor(batchdata[parents_key])
    v = v.to(device=device, non_blocking=non_blocking, dtype=torch.float32)
    if v.ndim != 2 or v.shape[0] != x.shape[0]:
        raise ValueError(f"{parents_key!r} must be (B, V) with B = {x.shape[0]}, got shape {tuple(v.shape)}.")
    return x.float(), v


class DSCMTrainer(Trainer):
    """Train a ``monai_cft.networks.dscm.DeepSCM``: attribute flows and hierarchical VAE.

    Every iteration reads ``batch[image_key]`` (B, C, *spatial) scaled to [-1, 1] and
    ``batch[parents_key]`` (B, V) in physical units, maps the parents to [-1, 1] with the model's
    own ``normalizer`` (the observed training ranges), and, depending on ``schedule``:

    - ``"joint"`` (default): updates the flows and the HVAE every iteration;
    - ``"flows_first"``: epochs ``1..flow_epochs`` train only the flows (cheap: no image pass),
      the remaining epochs only the HVAE (the flows' NLL is still reported).

    For each part: loss not finite, or gradient norm (before clipping) ``>= grad_skip`` or not
    finite -> the update is skipped and counted in ``engine.state.skipped_updates`` (HVAE) /
    ``engine.state.flow_skipped_updates`` (flows); otherwise the gradients are clipped to
    ``grad_clip`` and the optimizer steps. Learning rates warm up linearly over
    ``lr_warmup_steps`` applied updates (skipped ones do not count), beta over
    ``beta_warmup_steps`` HVAE iterations. The EMA model (``self.ema.module``) is updated after
    every iteration with an applied update.

    ``engine.state.output`` is a dict of floats: ``loss`` (what was minimized: the HVAE's negative
    ELBO per image element with beta and free bits, plus the flows' NLL per sample, for the parts
    trained this iteration), ``elbo`` (the true negative ELBO ``nll + kl``, nats per element),
    ``nll``, ``kl``, ``flow_nll`` (nats per sample), ``grad_norm``, ``flow_grad_norm``, ``beta``,
    ``lr``, ``skipped`` (1.0 if an update was skipped). HVAE entries are ``nan`` during the
    flows-only epochs.

    Args:
        device: torch device.
        max_epochs: number of epochs.
        train_data_loader: loader of dict batches.
        network: the DeepSCM (attributes ``hvae``, ``mechanisms``, ``normalizer``).
        optimizer: optimizer of the HVAE's parameters (default: :func:`dscm_optimizers`).
        flow_optimizer: optimizer of the mechanisms' parameters (default: :func:`dscm_optimizers`).
        epoch_length: iterations per epoch (default: ``len(train_data_loader)``).
        image_key, parents_key: batch keys of the image and the physical parents.
        schedule: ``"joint"`` or ``"flows_first"``.
        flow_epochs: epochs of flow-only training for ``"flows_first"`` (``1 <= flow_epochs < max_epochs``).
        beta: final KL weight; ``beta_warmup_steps``: HVAE iterations of the linear warm-up from 0.
        ema: an existing :class:`~monai_cft.engines.common.ModelEMA` of ``network`` (share it with
            the evaluator); default: one is created with ``ema_decay``.
        ema_decay: decay of the created EMA (with the decay warm-up of :class:`ModelEMA`).
        grad_clip, grad_skip: HVAE gradient-norm clip and skip thresholds (causal-gen: 350 / 500).
        flow_grad_clip, flow_grad_skip: the same for the flows (default 100 / ``None`` = only
            non-finite norms skip).
        lr_warmup_steps: linear learning-rate warm-up length in updates (0: none), both optimizers.
        amp: bfloat16 autocast of the HVAE on CUDA (ignored elsewhere; see ``engines.common``).
        non_blocking, to_kwargs: passed to ``Tensor.to`` for the image.
        train_handlers: Ignite/MONAI handlers attached to the trainer (after its own state is set up).
        key_train_metric, additional_metrics, metric_cmp_fn, event_names, event_to_attr:
            as ``monai.engines.Trainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: Optimizer | None = None,
        flow_optimizer: Optimizer | None = None,
        epoch_length: int | None = None,
        image_key: str = "image",
        parents_key: str = "variables",
        schedule: str = "joint",
        flow_epochs: int = 0,
        beta: float = 1.0,
        beta_warmup_steps: int = 0,
        ema: ModelEMA | None = None,
        ema_decay: float = 0.999,
        grad_clip: float | None = 350.0,
        grad_skip: float | None = 500.0,
        flow_grad_clip: float | None = 100.0,
        flow_grad_skip: float | None = None,
        lr_warmup_steps: int = 100,
        amp: bool = False,
        non_blocking: bool = False,
        to_kwargs: dict | None = None,
        train_handlers: Sequence | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = lower_is_better,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
        max_epochs = check_count(max_epochs, "max_epochs")
        if schedule == "flows_first" and not 1 <= int(flow_epochs) < int(max_epochs):
            raise ValueError(
                f"schedule 'flows_first' needs 1 <= flow_epochs < max_epochs, got flow_epochs={flow_epochs} "
                f"and max_epochs={max_epochs}."
            )
        if beta < 0 or beta_warmup_steps < 0:
            raise ValueError(f"beta and beta_warmup_steps must be >= 0, got {beta} and {beta_warmup_steps}.")
        hvae, mechanisms, _ = _parts(network)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=None,
            amp=False,  # bfloat16 autocast is handled here; MONAI's float16 GradScaler is not wanted
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=False,
            to_kwargs=to_kwargs,
        )
        self.network = network.to(self.state.device)
        if optimizer is None or flow_optimizer is None:
            default_opt, default_flow_opt = dscm_optimizers(network)
            optimizer = optimizer if optimizer is not None else default_opt
            flow_optimizer = flow_optimizer if flow_optimizer is not None else default_flow_opt
        self.optimizer = optimizer
        self.flow_optimizer = flow_optimizer
        self.hvae_parameters = [p for p in hvae.parameters() if p.requires_grad]
        self.flow_parameters = [p for p in mechanisms.parameters() if p.requires_grad]
        self.lr_schedulers = {
            "hvae": linear_warmup(optimizer, lr_warmup_steps),
            "flows": linear_warmup(flow_optimizer, lr_warmup_steps),
        }
        self.ema = ema if ema is not None else ModelEMA(network, decay=ema_decay)
        if self.ema.module is network:
            raise ValueError("ema must hold a copy of the network, not the network itself.")
        broadcast_parameters(network)  # data-parallel: every process starts from rank 0's weights
        broadcast_parameters(self.ema)
        self.image_key, self.parents_key = image_key, parents_key
        self.schedule, self.flow_epochs = schedule, int(flow_epochs)
        self.beta, self.beta_warmup_steps = float(beta), int(beta_warmup_steps)
        self.grad_clip, self.grad_skip = grad_clip, grad_skip
        self.flow_grad_clip, self.flow_grad_skip = flow_grad_clip, flow_grad_skip
        self.amp = bool(amp)
        self.state.skipped_updates = 0
        self.state.flow_skipped_updates = 0
        self.state.hvae_steps = 0
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    def run(self) -> None:  # type: ignore[override]
        """Run training (no float16 ``GradScaler``: see the AMP policy in ``engines.common``)."""
        self.scaler = None
        Workflow.run(self)

    def current_beta(self) -> float:
        """KL weight of the next HVAE iteration (linear warm-up from 0 to ``beta``)."""
        from monai_cft.networks.hvae import beta_schedule

        return beta_schedule(self.state.hvae_steps, self.beta_warmup_steps, self.beta)

    def _phase(self, epoch: int) -> tuple[bool, bool]:
        """``(train_flows, train_hvae)`` for a (1-based) epoch."""
        if self.schedule == "joint":
            return True, True
        flows = epoch <= self.flow_epochs
        return flows, not flows

    def _iteration(self, engine: DSCMTrainer, batchdata: dict[str, Any]) -> dict[str, float]:
        if batchdata is None:
            raise ValueError("must provide batch data for the current iteration.")
        x, v = _batch_inputs(
            batchdata, engine.image_key, engine.parents_key, engine.state.device, engine.non_blocking, engine.to_kwargs
        )
        hvae, mechanisms, normalizer = _parts(engine.network)
        pa = normalizer.normalize(v)
        train_flows, train_hvae = engine._phase(engine.state.epoch)
        engine.network.train()
        nan = float("nan")
        out = {"loss": 0.0, "elbo": nan, "nll": nan, "kl": nan, "flow_nll": nan, "grad_norm": nan,
               "flow_grad_norm": nan, "beta": nan, "lr": engine.optimizer.param_groups[0]["lr"], "skipped": 0.0}
        updated = False

        # attribute mechanisms (float32: tiny, and log-densities are precision sensitive)
        if train_flows:
            engine.flow_optimizer.zero_grad(set_to_none=True)
            flow_nll = -mechanisms.log_prob(pa).mean()
            out["flow_nll"] = float(flow_nll.detach())
            if all_ranks(torch.isfinite(flow_nll)):
                flow_nll.backward()
                norm, skipped = step_or_skip(
                    engine.flow_optimizer, engine.flow_parameters, engine.flow_grad_clip, engine.flow_grad_skip
                )
                out["flow_grad_norm"] = norm
            else:
                engine.flow_optimizer.zero_grad(set_to_none=True)
                skipped = True
            if skipped:
                engine.state.flow_skipped_updates += 1
                out["skipped"] = 1.0
            else:
                engine.lr_schedulers["flows"].step()
                updated = True
                out["loss"] += out["flow_nll"]
        else:
            with torch.no_grad():
                out["flow_nll"] = float(-mechanisms.log_prob(pa).mean())

        # image mechanism
        if train_hvae:
            beta = engine.current_beta()
            engine.optimizer.zero_grad(set_to_none=True)
            with autocast(engine.state.device, engine.amp):
                res = hvae(x, pa, beta=beta)
            loss = res["elbo"].float()
            out.update(beta=beta, nll=float(res["nll"].detach()), kl=float(res["kl"].detach()))
            out["elbo"] = out["nll"] + out["kl"]
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            if all_ranks(torch.isfinite(loss)):
                loss.backward()
                engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
                norm, skipped = step_or_skip(engine.optimizer, engine.hvae_parameters, engine.grad_clip, engine.grad_skip)
                out["grad_norm"] = norm
            else:
                engine.optimizer.zero_grad(set_to_none=True)
                skipped = True
            engine.state.hvae_steps += 1
            if skipped:
                engine.state.skipped_updates += 1
                out["skipped"] = 1.0
            else:
                engine.lr_schedulers["hvae"].step()
                updated = True
                out["loss"] += float(loss.detach())

        if updated:
            engine.ema.update(engine.network)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out


class DSCMEvaluator(Evaluator):
    """Validate a DeepSCM (normally the EMA copy): ELBO, reconstruction error and the flows' NLL.

    ``engine.state.output`` per batch is a dict of (B,) tensors: ``elbo`` (negative ELBO
    ``nll + kl`` at beta 1, nats per image element; the HVAE reports batch means, which are
    repeated per sample so that averaging over the epoch weights every image equally), ``nll``,
    ``kl``, ``flow_nll`` (nats per sample), ``recon_l1`` (mean ``|x - loc|`` over the image, in the
    [-1, 1] network units, where ``loc`` is the likelihood mean decoded from the posterior latents
    of ``x``) and ``recon_l1_hu`` (the same in Hounsfield units: ``recon_l1 * (hu_max - hu_min) / 2``).

    The default metrics (:class:`SampleMean` over the epoch) are ``val_elbo`` (the key metric, lower
    is better), ``val_nll``, ``val_kl``, ``val_flow_nll``, ``val_recon_l1``, ``val_recon_l1_hu``.

    Args:
        device: torch device.
        val_data_loader: loader of dict batches (``image_key``, ``parents_key``).
        network: the DeepSCM to evaluate, or a ``ModelEMA`` / ``AveragedModel`` of it (its
            ``.module`` is used).
        epoch_length: iterations per evaluation (default: ``len(val_data_loader)``).
        image_key, parents_key: batch keys.
        hu_window: ``(hu_min, hu_max)`` mapped to [-1, 1] by the preprocessing (default
            ``monai_cft.constants.HU_WINDOW``).
        key_val_metric, additional_metrics: replace the default metrics (see above).
        metric_cmp_fn: default :func:`lower_is_better`.
        val_handlers: handlers attached to the evaluator (e.g. a checkpoint saver).
        amp: bfloat16 autocast on CUDA.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Any,
        network: nn.Module,
        epoch_length: int | None = None,
        image_key: str = "image",
        parents_key: str = "variables",
        hu_window: Sequence[float] | None = None,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = lower_is_better,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        non_blocking: bool = False,
        to_kwargs: dict | None = None,
    ) -> None:
        if key_val_metric is None:
            key_val_metric = {"val_elbo": SampleMean("elbo")}
            if additional_metrics is None:
                additional_metrics = {
                    f"val_{k}": SampleMean(k) for k in ("nll", "kl", "flow_nll", "recon_l1", "recon_l1_hu")
                }
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            val_handlers=None,
            amp=False,
            decollate=False,
            to_kwargs=to_kwargs,
        )
        if isinstance(network, AveragedModel):
            network = network.module
        _parts(network)
        self.network = network
        self.hu_per_unit = HUWindow(HU_WINDOW if hu_window is None else hu_window).hu_per_unit
        self.image_key, self.parents_key = image_key, parents_key
        self.amp = bool(amp)
        if val_handlers is not None:
            self._register_handlers(val_handlers)

    def _iteration(self, engine: DSCMEvaluator, batchdata: dict[str, Any]) -> dict[str, torch.Tensor]:
        if batchdata is None:
            raise ValueError("must provide batch data for the current iteration.")
        x, v = _batch_inputs(
            batchdata, engine.image_key, engine.parents_key, engine.state.device, engine.non_blocking, engine.to_kwargs
        )
        hvae, mechanisms, normalizer = _parts(engine.network)
        engine.network.eval()
        with torch.no_grad():
            # validation cases may lie outside the training ranges: extrapolate (with a warning)
            pa = normalizer.normalize(v, allow_extrapolation=True)
            flow_nll = -mechanisms.log_prob(pa).float()
            with autocast(engine.state.device, engine.amp):
                res = hvae(x, pa, beta=1.0, return_latents=True)
            loc = res["loc"].float().clamp(-1.0, 1.0)
            recon = (x - loc).abs().flatten(1).mean(1)
            batch = x.shape[0]
            nll = res["nll"].float().expand(batch)
            kl = res["kl"].float().expand(batch)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return {
            "elbo": nll + kl,
            "nll": nll,
            "kl": kl,
            "flow_nll": flow_nll,
            "recon_l1": recon,
            "recon_l1_hu": recon * engine.hu_per_unit,
        }


class SampleMean(Metric):
    """Ignite metric: mean of ``output[key]`` over every sample of the epoch (the output is a (B,) tensor).

    Ignite's ``Average`` treats a 1-D tensor as *one* sample with B features, hence this metric.
    """

    def __init__(self, key: str, device: str | torch.device = "cpu") -> None:
        self.key = key
        super().__init__(output_transform=lambda output: output[key], device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = 0

    @reinit__is_reduced
    def update(self, output: torch.Tensor) -> None:
        values = torch.as_tensor(output).detach().reshape(-1)
        self._sum += values.to(device=self._device, dtype=torch.float64).sum()
        self._count += values.numel()

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if self._count == 0:
            raise NotComputableError(f"SampleMean({self.key!r}) needs at least one sample.")
        return float(self._sum) / self._count
