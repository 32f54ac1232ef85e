"""Counterfactual fine-tuning (CFT) of a deep structural causal model's image mechanism.

:class:`CFTTrainer` fine-tunes the hierarchical VAE of a pretrained :class:`~monai_cft.networks.dscm.DeepSCM`
so that its counterfactuals obey the interventions, as measured by a frozen guidance network
(Reg-CFT: a parent regressor; Seg-CFT / Pos-Seg-CFT: a segmentor whose soft masks are summed per
structure, globally or inside each region), while the factual ELBO stays at its pretrained level.

Per iteration (one batch ``x`` (B, C, *spatial) in [-1, 1] with physical parents ``pa`` (B, V)):

1. one encoder/decoder pass ``hvae(x, pa_norm, return_latents=True)`` gives the factual negative
   ELBO ``nelbo`` (per image element) *and* the abducted latents and factual likelihood parameters;
2. for each sample ONE variable is chosen uniformly and given a target drawn uniformly from its
   observed [min, max] (``intervention_sampling="uniform"``, the paper's protocol) or the value of
   another sample of the batch (``"permute"``);
3. the counterfactual parents follow through the frozen attribute flows
   (``dscm.counterfactual_parents``) and ``x_cf = dscm.predict_counterfactual(...)``;
4. the guidance loss ``aux`` scores ``x_cf`` against ALL counterfactual parents (the intervened
   variable must change, the others must stay put);
5. the constrained-ELBO objective (causal-gen's Lagrangian with damping)::

       loss = aux - (lambda - damping * sg(eps - nelbo)) * (eps - nelbo)

   is minimised in the HVAE's weights and *maximised* in the Lagrange multiplier ``lambda``
   (AdamW with ``maximize=True``, clamped at >= 0). ``eps`` is the pretrained model's mean
   negative ELBO measured on training batches when the run starts (or given).

The update is skipped when the loss is not finite or the HVAE's gradient norm (before clipping at
``grad_clip``) is ``>= grad_skip``. The EMA of the HVAE's weights is what :meth:`CFTTrainer.export`
saves. Interrupted runs resume from ``<checkpoint_dir>/cft_<mode>_state.pt`` (model, EMA,
optimizers, Lagrange multiplier, ELBO target, iteration), a plain state dict written atomically.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from torch import nn
from torch.optim import Optimizer

from monai_cft.constants import check_cft_mode
from monai_cft.engines.common import (
    ModelEMA,
    PrepareBatchKeys,
    autocast,
    check_count,
    clip_and_check,
    linear_warmup,
)
from monai_cft.engines.constraint import ConstrainedELBO
from monai_cft.engines.guidance import check_guidance_for_mode
from monai_cft.engines.resume import ExactResumeMixin
from monai_cft.utils.checkpoint import load_torch_file, save_checkpoint
from monai_cft.utils.distributed import (
    all_ranks,
    all_reduce_mean,
    batch_rand_like,
    batch_randint,
    broadcast_parameters,
    is_main_process,
    sync_gradients,
    world_size,
)

__all__ = ["INTERVENTION_SAMPLING", "ConstrainedELBO", "CFTTrainer"]

#: how intervention targets are drawn during fine-tuning.
INTERVENTION_SAMPLING: tuple[str, ...] = ("uniform", "permute")

_STATE_VERSION = 2
#: consecutive skipped updates after which the trainer warns that training has stalled.
_STALL_WARNING = 20


def _module_prefix(parent: nn.Module, child: nn.Module) -> str:
    for name, module in parent.named_modules():
        if module is child:
            return f"{name}." if name else ""
    raise ValueError("the HVAE is not a sub-module of the DSCM.")


class CFTTrainer(ExactResumeMixin, Trainer):
    """MONAI trainer for counterfactual fine-tuning (see the module docstring for the objective).

    Args:
        device: torch device.
        max_epochs: epochs over ``train_data_loader``.
        train_data_loader: batches of dicts with ``image_key`` ((B, C, *spatial), [-1, 1]) and
            ``parents_key`` ((B, V) physical units, the DSCM's variable order).
        dscm: the pretrained :class:`~monai_cft.networks.dscm.DeepSCM` (``hvae``, ``mechanisms``,
            ``normalizer``); its HVAE is trained in place, everything else is frozen.
        mode: one of :data:`monai_cft.constants.CFT_MODES`, the label recorded in the checkpoints. ``"none"`` trains
            nothing (:meth:`run` returns at once and :meth:`export` writes the pretrained weights:
            the No-CFT baseline).
        guidance_loss: what the mode fine-tunes with, built by
            :func:`monai_cft.engines.guidance.build_guidance_loss` (``None`` for ``"none"``, required
            otherwise): any module with ``from_parents(x_cf, parents_cf_norm, low, high)`` (the CFT
            term given the normalized counterfactual parents and the normalizer's ranges) and
            ``check_parents(num_variables)``, such as a
            :class:`~monai_cft.losses.RegressorGuidanceLoss` or a
            :class:`~monai_cft.losses.SegmentorGuidanceLoss`. The trainer never branches on the mode.
            With reduction ``"none"`` the per-variable terms are logged and reduced as the mean over
            the batch of the sum over variables.
        optimizer: optimizer of the HVAE's parameters (exactly those); default ``AdamW(lr, betas=(0.9, 0.9),
            weight_decay)``.
        lr, betas, weight_decay: of the default optimizer.
        lr_warmup_steps: linear learning-rate warm-up over this many (non-skipped) updates
            (:func:`~monai_cft.engines.common.linear_warmup`); 0 = constant.
        lagrange_lr: learning rate of the Lagrange multiplier's AdamW (gradient ascent).
        lagrange_init, damping: see :class:`ConstrainedELBO`.
        elbo_target: ``eps`` (nats per image element); ``None`` measures it when the run starts as
            the pretrained model's mean negative ELBO (``beta = 1``) over ``elbo_target_batches``
            training batches.
        elbo_slack: nats per image element added to the *measured* target (``eps = pretrained
            nELBO + slack``): the room the guidance may spend before the constraint pushes back.
            With no slack, batch-to-batch noise of the measured ELBO (~0.03 nats) alone drives the
            multiplier and the damping term, which then outweigh the guidance (docs/cft.md).
        one_sided_damping: damp only ELBO violations (:class:`ConstrainedELBO` ``one_sided``).
        ema_decay: decay of the EMA of the HVAE's weights.
        grad_clip, grad_skip: gradient-norm clipping and skip thresholds (causal-gen: 350 / 500;
            ``None`` or ``inf`` disables either). See docs/cft.md on the skip deadlock the damping
            term can cause with these defaults.
        intervention_sampling: ``"uniform"`` (target uniform in the variable's observed
            [min, max]) or ``"permute"`` (the variable's value in another sample of the batch).
        noise_temperature: multiplies the abducted pixel noise of ``x_cf`` (1 = exact counterfactual).
        checkpoint_dir: folder of the resume state ``cft_<mode>_state.pt`` (``None``: no resume state).
        checkpoint_interval: save the resume state every this many iterations (and at the end).
        snapshot_interval: also keep the HVAE's EMA weights at iteration 0 and every this many
            iterations (and at the end) in ``<checkpoint_dir>/cft_<mode>_snapshots/`` (:meth:`save_snapshot`),
            for the gap-closure and slope curves of the evaluation; ``None``: no snapshots.
        resume: load the resume state when the run starts, if the file exists.
        image_key, parents_key: batch keys.
        epoch_length, non_blocking, train_handlers, key_train_metric, additional_metrics: as
            :class:`monai.engines.SupervisedTrainer`.
        amp: bfloat16 autocast on CUDA (see :func:`monai_cft.engines.common.autocast`).

    ``engine.state.output`` of every iteration is a dict of floats: ``loss``, ``aux``, ``nelbo``,
    ``eps``, ``lambda``, ``grad_norm``, ``skipped`` and, when the guidance loss returns
    per-variable terms aligned with the variables, ``aux_intervened`` / ``aux_others`` (batch means
    of the intervened variable's term and of the sum of the others).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        dscm: nn.Module,
        mode: str,
        guidance_loss: nn.Module | None = None,
        optimizer: Optimizer | None = None,
        lr: float = 1e-4,
        lr_warmup_steps: int = 0,
        betas: Sequence[float] = (0.9, 0.9),
        weight_decay: float = 0.01,
        lagrange_lr: float = 1e-2,
        lagrange_init: float = 0.0,
        damping: float = 100.0,
        elbo_target: float | None = None,
        elbo_target_batches: int = 16,
        elbo_slack: float = 0.0,
        one_sided_damping: bool = False,
        ema_decay: float = 0.999,
        grad_clip: float | None = 350.0,
        grad_skip: float | None = 500.0,
        intervention_sampling: str = "uniform",
        noise_temperature: float = 1.0,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_interval: int = 100,
        snapshot_interval: int | None = None,
        resume: bool = True,
        image_key: str = "image",
        parents_key: str = "variables",
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable | None = None,
        train_handlers: Sequence | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        amp: bool = False,
    ) -> None:
        self.mode = check_cft_mode(mode)
        if intervention_sampling not in INTERVENTION_SAMPLING:
            raise ValueError(
                f"intervention_sampling must be one of {list(INTERVENTION_SAMPLING)}, got {intervention_sampling!r}."
            )
        for name in ("hvae", "mechanisms", "normalizer"):
            if not hasattr(dscm, name):
                raise TypeError(f"dscm must be a DeepSCM with a {name!r} attribute, got {type(dscm).__name__}.")
        if int(elbo_target_batches) < 1:
            raise ValueError(f"elbo_target_batches must be >= 1, got {elbo_target_batches}.")
        if int(checkpoint_interval) < 1:
            raise ValueError(f"checkpoint_interval must be >= 1, got {checkpoint_interval}.")
        if not (math.isfinite(noise_temperature) and noise_temperature >= 0):
            raise ValueError(f"noise_temperature must be finite and >= 0, got {noise_temperature}.")
        max_epochs = check_count(max_epochs, "max_epochs")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch or PrepareBatchKeys(image_key, parents_key, dtype=torch.float32),
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=None,
            amp=False,  # bfloat16 autocast needs no GradScaler (see engines.common)
            decollate=False,
        )
        self.use_autocast = bool(amp)
        self.dscm = dscm.to(self.state.device)
        self.hvae: nn.Module = dscm.hvae
        self.num_variables = len(dscm.normalizer.names)
        self.guidance_loss = self._check_guidance(guidance_loss)
        if self.guidance_loss is not None:
            self.guidance_loss.to(self.state.device)

        broadcast_parameters(self.dscm)  # data-parallel: every process starts from rank 0's weights
        # which parameters train (the HVAE) and which are frozen (everything else)
        self.dscm.requires_grad_(False)
        self.hvae.requires_grad_(True)
        self._set_modes()
        trainable = list(self.hvae.parameters())
        if optimizer is None:
            optimizer = torch.optim.AdamW(trainable, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        else:
            given = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if given != {id(p) for p in trainable}:
                raise ValueError(
                    "the CFT optimizer must hold exactly the HVAE's parameters (flows, normalizer and "
                    "guidance networks stay frozen)."
                )
        self.optimizer = optimizer
        self.lr_scheduler = linear_warmup(optimizer, lr_warmup_steps)
        self.constraint = ConstrainedELBO(damping, lagrange_init, elbo_target, one_sided_damping).to(self.state.device)
        self.lagrange_optimizer = torch.optim.AdamW(
            [self.constraint.lmbda], lr=lagrange_lr, betas=tuple(betas), weight_decay=0.0, maximize=True
        )
        self.ema = ModelEMA(self.hvae, decay=ema_decay)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.grad_skip = None if grad_skip is None else float(grad_skip)
        self.intervention_sampling = intervention_sampling
        if intervention_sampling != "uniform" and world_size() > 1:
            raise ValueError(f"intervention_sampling {intervention_sampling!r} permutes parents within a batch, which "
                             f"{world_size()} processes cannot share; use 'uniform' for data-parallel fine-tuning.")
        self.noise_temperature = float(noise_temperature)
        self.elbo_target_batches = int(elbo_target_batches)
        if not math.isfinite(float(elbo_slack)) or float(elbo_slack) < 0:
            raise ValueError(f"elbo_slack must be a finite value >= 0 nats per element, got {elbo_slack!r}.")
        self.elbo_slack = float(elbo_slack)
        self.checkpoint_interval = int(checkpoint_interval)
        self.state_path = None if checkpoint_dir is None else Path(checkpoint_dir) / f"cft_{self.mode}_state.pt"
        if snapshot_interval is not None and (isinstance(snapshot_interval, bool) or int(snapshot_interval) < 1):
            raise ValueError(f"snapshot_interval must be a number of updates >= 1 or None, got {snapshot_interval!r}.")
        self.snapshot_interval = None if snapshot_interval is None else int(snapshot_interval)
        self.snapshot_dir = None if checkpoint_dir is None else Path(checkpoint_dir) / f"cft_{self.mode}_snapshots"
        self.resume = bool(resume)
        self._consecutive_skips = 0
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")

        # exact resume: the RNG state at each epoch's start (it fixes the epoch's shuffle) and at each save
        self._epoch_rng: torch.Tensor | None = None
        self._resume_rng: dict[str, Any] | None = None
        self._resume_skip = 0
        self.add_event_handler(Events.EPOCH_STARTED, self._on_epoch_started)
        self.add_event_handler(Events.GET_BATCH_STARTED, self._on_get_batch_started)
        # handler order on STARTED: resume first, then the ELBO target (restored or measured)
        self.add_event_handler(Events.STARTED, self._on_started)
        if self.state_path is not None:
            self.add_event_handler(Events.ITERATION_COMPLETED(every=self.checkpoint_interval), self._save_state)
            self.add_event_handler(Events.COMPLETED, self._save_state)
        if self.snapshot_interval is not None and self.snapshot_dir is not None:
            self.add_event_handler(Events.ITERATION_COMPLETED(every=self.snapshot_interval), self.save_snapshot)
            self.add_event_handler(Events.COMPLETED, self.save_snapshot)
        if train_handlers:
            self._register_handlers(train_handlers)

    # ------------------------------------------------------------------ set-up helpers
    def _check_guidance(self, loss: nn.Module | None) -> nn.Module | None:
        check_guidance_for_mode(self.mode, loss)  # the loss defines what the mode does
        if loss is None:
            return None
        for attr in ("from_parents", "check_parents"):
            if not callable(getattr(loss, attr, None)):
                raise TypeError(f"the guidance loss must have a {attr}() method (a RegressorGuidanceLoss or "
                                f"SegmentorGuidanceLoss), got {type(loss).__name__}.")
        loss.check_parents(self.num_variables)
        return loss

    def _set_modes(self) -> None:
        """HVAE in train mode; flows, normalizer and guidance network in eval mode."""
        self.dscm.eval()
        self.hvae.train()
        if self.guidance_loss is not None:
            self.guidance_loss.eval()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the CFT optimizer updates: every HVAE parameter (encoder, decoder, likelihood).

        The Lagrange multiplier ``constraint.lmbda`` is trained separately by gradient ascent.
        """
        prefix = _module_prefix(self.dscm, self.hvae)
        return {f"dscm.{prefix}{n}": p for n, p in self.hvae.named_parameters()}

    def frozen_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters that never change: the attribute flows (any non-HVAE DSCM part) and the guidance network."""
        trained = {id(p) for p in self.hvae.parameters()}
        out = {f"dscm.{n}": p for n, p in self.dscm.named_parameters() if id(p) not in trained}
        if self.guidance_loss is not None:
            out.update({f"guidance_loss.{n}": p for n, p in self.guidance_loss.named_parameters()})
        return out

    # ------------------------------------------------------------------ ELBO target and resume
    def _on_started(self, engine: Engine) -> None:
        if self.resume and self.state_path is not None and self.state_path.is_file():
            self.load_state(self.state_path)
        if not self.constraint.has_target:
            measured = self.measure_elbo_target()
            eps = measured + self.elbo_slack
            self.constraint.set_target(eps)
            self.logger.info(f"CFT ELBO target eps = {eps:.5f} nats per element (pretrained model {measured:.5f} "
                             f"+ slack {self.elbo_slack:g}).")
        if self.snapshot_interval is not None and self.snapshot_dir is not None and int(self.state.iteration) == 0:
            for old in self.snapshot_dir.glob("iter_*.pt") if is_main_process() else ():
                old.unlink()  # a fresh run: no snapshot of an earlier one survives
            self.save_snapshot()  # the pretrained model: the start of the curves

    @torch.no_grad()
    def measure_elbo_target(self, num_batches: int | None = None) -> float:
        """Mean negative ELBO (``beta = 1``, nats per image element) of the current HVAE on training batches.

        Uses the first ``num_batches`` (default ``elbo_target_batches``) batches of a fresh pass
        over the training loader; the HVAE is evaluated in eval mode without gradients.
        """
        n = self.elbo_target_batches if num_batches is None else int(num_batches)
        was_training = self.hvae.training
        self.hvae.eval()
        total, count = 0.0, 0
        try:
            for i, batch in enumerate(self.data_loader):
                if i >= n:
                    break
                x, pa = self.prepare_batch(batch, self.state.device, self.non_blocking)
                with autocast(self.state.device, self.use_autocast):
                    nelbo = self.hvae(x, self.dscm.normalizer.normalize(pa))["elbo"]
                total += float(nelbo) * x.shape[0]
                count += x.shape[0]
        finally:
            self.hvae.train(was_training)
        # data-parallel: the mean over every process's batches (the ratio of the means is the ratio of the sums)
        total, count = (float(v) for v in all_reduce_mean(torch.tensor([total, float(count)], dtype=torch.float64)))
        if count == 0:
            raise ValueError("cannot measure the ELBO target: the training loader yielded no batch.")
        return total / count

    def save_snapshot(self, engine: Engine | None = None) -> Path | None:
        """Write the HVAE's EMA weights at this iteration to ``<checkpoint_dir>/cft_<mode>_snapshots/iter_<n>.pt``.

        ``{"model": HVAE EMA state dict, "meta": {"kind": "cft_snapshot", "cft_mode", "iteration"}}``
        (plain tensors, ``weights_only``-loadable); iteration 0 is the pretrained model. The
        evaluation turns the snapshots into gap closure and slope against updates.
        """
        if self.snapshot_dir is None or not is_main_process():
            return None
        it = int(self.state.iteration)
        return save_checkpoint(self.snapshot_dir / f"iter_{it:06d}.pt", self.ema.module.state_dict(),
                               {"kind": "cft_snapshot", "cft_mode": self.mode, "iteration": it})

    # ------------------------------------------------------------------ exact resume
    def state_for_resume(self) -> dict[str, Any]:
        """Everything needed to continue an interrupted run, as a plain (``weights_only``-loadable) dict.

        Besides the weights, optimizers, constraint and iteration, the torch / numpy / Python random
        states at the save and torch's at the start of the epoch (which fixes the data loader's
        shuffle), so that a resumed run on the CPU equals the uninterrupted one bit for bit.
        """
        return {
            "rng": self._rng_state(),
            "version": _STATE_VERSION,
            "meta": {"cft_mode": self.mode, "variables": list(self.dscm.normalizer.names)},
            "hvae": self.hvae.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "lagrange_optimizer": self.lagrange_optimizer.state_dict(),
            "constraint": self.constraint.state_dict(),
            "engine": {k: int(v) for k, v in self.state_dict().items() if v is not None},
        }

    def _save_state(self, engine: Engine | None = None) -> None:
        from monai_cft.utils.io import atomic_path

        if not is_main_process():
            return
        with atomic_path(self.state_path) as tmp:
            torch.save(self.state_for_resume(), tmp)

    def load_state(self, path: str | os.PathLike) -> None:
        """Restore a state written by an earlier run of the same mode (model, EMA, optimizers, lambda, eps, iteration).

        Raises:
            ValueError: the file belongs to another mode or other variables.
        """
        state = load_torch_file(path, self.state.device, what="resume state")
        meta = state.get("meta", {}) if isinstance(state, dict) else {}
        if meta.get("cft_mode") != self.mode:
            raise ValueError(
                f"resume state {str(path)!r} is from cft_mode {meta.get('cft_mode')!r}, this run is {self.mode!r}; "
                "use another checkpoint_dir or delete the file."
            )
        if list(meta.get("variables", [])) != list(self.dscm.normalizer.names):
            raise ValueError(
                f"resume state {str(path)!r} has variables {meta.get('variables')}, "
                f"the DSCM has {list(self.dscm.normalizer.names)}."
            )
        from monai_cft.utils.checkpoint import check_finite

        for key in ("hvae", "ema"):
            check_finite(state[key], f"resume state {str(path)!r} (delete it to restart the fine-tuning)", key)
        self.hvae.load_state_dict(state["hvae"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.lagrange_optimizer.load_state_dict(state["lagrange_optimizer"])
        self.constraint.load_state_dict(state["constraint"])
        max_epochs = self.state.max_epochs
        engine_state = dict(state["engine"])
        engine_state["max_epochs"] = max(int(engine_state.get("max_epochs", 1)), 1)
        self.load_state_dict(engine_state)
        self.state.max_epochs = max_epochs
        rng = state.get("rng")
        length = int(engine_state.get("epoch_length") or 0)
        if rng is not None:  # version 1 states carry none: the run resumes, but not bit for bit
            self._resume_rng = rng
            self._resume_skip = int(self.state.iteration) % length if length > 0 else 0
        self.logger.info(f"resumed CFT ({self.mode}) from {path} at iteration {self.state.iteration}.")

    # ------------------------------------------------------------------ training
    def run(self) -> None:  # type: ignore[override]
        """Fine-tune (``mode="none"``: nothing to train, returns at once)."""
        if self.guidance_loss is None:
            self.logger.info("cft_mode 'none': no fine-tuning; export() writes the pretrained DSCM.")
            return
        super().run()

    def sample_interventions(self, parents_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one intervention per sample: which variable (uniform) and its target (normalized units).

        Args:
            parents_norm: (B, V) factual parents, normalized.

        Returns:
            ``(mask, values)``: (B, V) bool with exactly one True per row and (B, V) target values
            (normalized; only the masked entries matter).
        """
        b, v = parents_norm.shape
        idx = batch_randint(v, b, device=parents_norm.device)
        mask = torch.nn.functional.one_hot(idx, v).bool()
        if self.intervention_sampling == "uniform":
            # uniform in the observed [min, max] of each variable = uniform in [-1, 1] once normalized
            values = 2.0 * batch_rand_like(parents_norm) - 1.0
        else:  # a permutation within the batch: only one process (checked in __init__)
            values = parents_norm[torch.randperm(b, device=parents_norm.device)]
        return mask, values

    def _note_skip(self, nelbo: float, grad_norm: float) -> None:
        """Count consecutive skipped updates and warn once when training has stalled."""
        self._consecutive_skips += 1
        if self._consecutive_skips == _STALL_WARNING:
            self.logger.warning(
                f"{_STALL_WARNING} consecutive CFT updates skipped (grad norm {grad_norm:.4g} >= grad_skip "
                f"{self.grad_skip} or non-finite loss; nelbo {nelbo:.4f} vs eps {float(self.constraint.eps):.4f}): "
                "once the ELBO has drifted from eps the damping term keeps the gradient large and no update "
                "can bring it back. Lower the learning rate or the damping, or raise grad_skip."
            )

    def _guidance(self, x_cf: torch.Tensor, parents_cf_norm: torch.Tensor) -> torch.Tensor:
        norm = self.dscm.normalizer
        return self.guidance_loss.from_parents(x_cf, parents_cf_norm, norm.low, norm.high)

    def _iteration(self, engine: CFTTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        x, pa = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        engine._set_modes()
        dscm = engine.dscm
        pa_norm = dscm.normalizer.normalize(pa)
        engine.state.batch = {"image": x, "parents": pa}
        with autocast(engine.state.device, engine.use_autocast):
            fact = engine.hvae(x, pa_norm, return_latents=True)
            nelbo = fact["elbo"].float()
            with torch.no_grad():
                mask, values = engine.sample_interventions(pa_norm)
                pa_cf = dscm.counterfactual_parents(pa_norm, mask, values)
            x_cf = dscm.predict_counterfactual(
                x, fact["latents"], fact["loc"], fact["scale"], pa_cf, engine.noise_temperature
            )
            terms = engine._guidance(x_cf, pa_cf)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        aux = terms.float() if terms.ndim == 0 else terms.float().sum(1).mean()
        loss = engine.constraint(aux, nelbo)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        engine.optimizer.zero_grad(set_to_none=True)
        engine.lagrange_optimizer.zero_grad(set_to_none=True)
        skipped, grad_norm = True, float("nan")
        if all_ranks(torch.isfinite(loss)):
            loss.backward()
            grad_norm, skipped = clip_and_check(engine.hvae.parameters(), engine.grad_clip, engine.grad_skip)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if not skipped:
            engine.optimizer.step()
            engine.lr_scheduler.step()
            sync_gradients([engine.constraint.lmbda])
            engine.lagrange_optimizer.step()
            engine.constraint.clamp_()
            engine.ema.update(engine.hvae)
            engine._consecutive_skips = 0
        else:
            engine._note_skip(float(nelbo.detach()), grad_norm)
        engine.optimizer.zero_grad(set_to_none=True)
        engine.lagrange_optimizer.zero_grad(set_to_none=True)

        out = {
            "loss": float(loss.detach()),
            "aux": float(aux.detach()),
            "nelbo": float(nelbo.detach()),
            "eps": float(engine.constraint.eps),
            "lambda": float(engine.constraint.lmbda.detach()),
            "grad_norm": grad_norm,
            "skipped": bool(skipped),
        }
        if terms.ndim == 2 and terms.shape[1] == mask.shape[1]:
            t = terms.detach().float()
            out["aux_intervened"] = float(t[mask].mean())
            out["aux_others"] = float(t.masked_fill(mask, 0.0).sum(1).mean())
        engine.state.output = out
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out

    # ------------------------------------------------------------------ export
    def dscm_state_dict(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """The DSCM's state dict with the HVAE's EMA weights (``use_ema``) or its current weights."""
        state = dict(self.dscm.state_dict())
        if use_ema:
            prefix = _module_prefix(self.dscm, self.hvae)
            for k, v in self.ema.module.state_dict().items():
                state[prefix + k] = v
        return state

    def export(self, path: str | os.PathLike, meta: Mapping[str, Any] | None = None, use_ema: bool = True) -> Path:
        """Save the fine-tuned DSCM (EMA weights) as ``{"model": state_dict, "meta": ...}`` (atomic).

        ``meta`` (typically the pretrained checkpoint's meta) is extended with ``kind="dscm"``,
        ``cft_mode``, the ELBO target, the final Lagrange multiplier and the iteration count.
        """

        out = dict(meta or {})
        out.update(
            kind="dscm",
            cft_mode=self.mode,
            cft={
                "iterations": int(self.state.iteration),
                "elbo_target": float(self.constraint.eps) if self.constraint.has_target else None,
                "lagrange_multiplier": float(self.constraint.lmbda.detach()),
                "intervention_sampling": self.intervention_sampling,
                "guidance": None if self.guidance_loss is None else type(self.guidance_loss).__name__,
            },
        )
        if not is_main_process():  # data-parallel: rank 0 writes, the weights are the same on every rank
            return Path(path)
        return save_checkpoint(path, self.dscm_state_dict(use_ema), out)
