"""Ignite handlers of the monai-cft bundle.

- :class:`CheckpointWriter`: saves ``{"model": state_dict, "meta": {...}}`` (see
  ``monai_cft.utils.checkpoint``) when the engine's key metric improves, at the end of a run, or
  every N epochs.
- :class:`DSCMImageLogger`: every N epochs writes a TensorBoard image of fixed validation images,
  their reconstructions and prior samples with the same parents, from the (EMA) DeepSCM.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.optim.swa_utils import AveragedModel

from monai_cft.utils.checkpoint import save_checkpoint, to_primitive

__all__ = ["CheckpointWriter", "DSCMImageLogger", "image_grid"]

_WHEN = ("best", "completed", "epoch")


class CheckpointWriter:
    """Write a network's weights and meta with :func:`monai_cft.utils.checkpoint.save_checkpoint`.

    Args:
        network: the module to save (a ``ModelEMA`` / ``AveragedModel`` saves its ``.module``, i.e.
            the averaged weights under the plain model's keys).
        path: the checkpoint file (overwritten atomically on every save).
        meta: primitives describing the weights (``kind``, ``preset``, ``variables``, ``ranges``,
            ``cft_mode``, ...); the writer adds ``epoch`` and, when the engine has a key metric,
            ``metric_name`` and ``metric``.
        when: ``"best"``: after an epoch in which the engine's key metric reached a new best
            (MONAI's ``state.best_metric_epoch``; attach to the evaluator); ``"completed"``: when the
            run completes (attach to the trainer); ``"epoch"``: every ``interval`` epochs.
        interval: epochs between saves for ``when="epoch"``.

    Example (bundle config)::

        {"_target_": "monai_cft.engines.handlers.CheckpointWriter", "network": "@ema",
         "path": "$@ckpt_dir + '/dscm.pt'", "meta": "@checkpoint_meta", "when": "best"}
    """

    def __init__(self, network: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any], when: str = "best",
                 interval: int = 1) -> None:
        if when not in _WHEN:
            raise ValueError(f"when must be one of {_WHEN}, got {when!r}.")
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
        self.network = network
        self.path = os.fspath(path)
        self.meta = to_primitive(dict(meta))
        if "kind" not in self.meta:
            raise ValueError(f"checkpoint meta must name its 'kind', got keys {sorted(self.meta)}.")
        self.when = when
        self.interval = int(interval)
        self.saved = 0

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (EPOCH_COMPLETED, or COMPLETED for ``when="completed"``)."""
        if self.when == "completed":
            engine.add_event_handler(Events.COMPLETED, self)
        elif self.when == "epoch":
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        else:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        state = engine.state
        if self.when == "best":
            if getattr(state, "key_metric_name", None) is None:
                raise ValueError("CheckpointWriter(when='best') needs an engine with a key metric.")
            if state.best_metric_epoch != state.epoch:
                return
        meta = dict(self.meta, epoch=int(state.epoch))
        name = getattr(state, "key_metric_name", None)
        if name is not None and name in state.metrics:
            value = state.metrics[name]
            meta.update(metric_name=name, metric=float(value) if torch.is_tensor(value) or isinstance(value, (int, float)) else None)
        module = self.network.module if isinstance(self.network, AveragedModel) else self.network
        save_checkpoint(self.path, module, meta)
        self.saved += 1


def image_grid(columns: Iterable[torch.Tensor]) -> torch.Tensor:
    """Tile 2D image batches into one (1, B * H, n * W) image in [0, 1].

    Args:
        columns: n tensors (B, 1, H, W) with values in [-1, 1] (e.g. images, reconstructions,
            samples); each becomes one column, the batch runs down the rows.
    """
    cols = []
    for c in columns:
        if c.ndim != 4 or c.shape[1] != 1:
            raise ValueError(f"image_grid expects (B, 1, H, W) batches, got shape {tuple(c.shape)}.")
        cols.append(torch.cat(list(c.detach().float().cpu()), dim=1))  # (1, B*H, W)
    return ((torch.cat(cols, dim=2) + 1.0) / 2.0).clamp(0.0, 1.0)


class DSCMImageLogger:
    """Log images, reconstructions and prior samples of a DeepSCM to TensorBoard every ``interval`` epochs.

    The first ``num_images`` cases of the first batch of ``data_loader`` are kept fixed, so the
    images show the model's progress. Reconstructions are the likelihood means decoded from the
    posterior latents (``hvae.forward(..., return_latents=True)["loc"]``); samples are
    ``hvae.sample(parents, temperature)`` with the cases' own (normalized) parents. 3D volumes log
    their middle slice along the first spatial axis.

    Args:
        network: the DeepSCM, or its ``ModelEMA`` (the averaged copy is used).
        data_loader: validation loader of dict batches.
        log_dir: TensorBoard folder (a ``SummaryWriter`` is created there), or pass ``summary_writer``.
        interval: epochs between logs; also logs when the run completes.
        num_images: cases shown.
        temperature: prior temperature of the samples.
        image_key, parents_key: batch keys.
        tag: TensorBoard tag.
    """

    def __init__(self, network: nn.Module, data_loader: Any, log_dir: str | None = None, summary_writer: Any = None,
                 interval: int = 1, num_images: int = 4, temperature: float = 0.7, image_key: str = "image",
                 parents_key: str = "variables", tag: str = "dscm/image_recon_sample") -> None:
        if summary_writer is None and log_dir is None:
            raise ValueError("DSCMImageLogger needs a log_dir or a summary_writer.")
        if int(interval) < 1 or int(num_images) < 1:
            raise ValueError(f"interval and num_images must be >= 1, got {interval} and {num_images}.")
        self.network = network
        self.data_loader = data_loader
        self.log_dir = log_dir
        self._writer = summary_writer
        self.interval, self.num_images, self.temperature = int(interval), int(num_images), float(temperature)
        self.image_key, self.parents_key, self.tag = image_key, parents_key, tag
        self._fixed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_epoch = -1

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def attach(self, engine: Engine) -> None:
        """Register on the trainer's EPOCH_COMPLETED (every ``interval``) and COMPLETED events."""
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def _batch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fixed is None:
            batch = next(iter(self.data_loader))
            x = torch.as_tensor(batch[self.image_key])[: self.num_images]
            v = torch.as_tensor(batch[self.parents_key])[: self.num_images]
            self._fixed = (x.as_subclass(torch.Tensor).float(), v.as_subclass(torch.Tensor).float())
        return self._fixed[0].to(device), self._fixed[1].to(device)

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        if epoch == self._last_epoch:
            return
        self._last_epoch = epoch
        net = self.network.module if isinstance(self.network, AveragedModel) else self.network
        device = next(net.parameters()).device
        x, v = self._batch(device)
        was_training = net.training
        net.eval()
        with torch.no_grad():
            pa = net.normalizer.normalize(v, allow_extrapolation=True)
            recon = net.hvae(x, pa, return_latents=True)["loc"].clamp(-1.0, 1.0)
            sample = net.hvae.sample(pa, temperature=self.temperature)
        net.train(was_training)
        cols = [x, recon, sample]
        if x.ndim == 5:  # (B, C, D, H, W): middle slice of the first spatial axis
            cols = [c[:, :, c.shape[2] // 2] for c in cols]
        cols = [c[:, :1] for c in cols]
        self.writer.add_image(self.tag, image_grid(cols), global_step=epoch, dataformats="CHW")
        self.writer.flush()
