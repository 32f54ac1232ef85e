"""Training utilities shared by the DSCM trainer and the counterfactual fine-tuning trainer.

- :class:`ModelEMA`: exponential moving average of a model's weights
  (``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``); buffers are copied.
- :func:`clip_and_check` / :func:`step_or_skip`: clip the gradient norm and skip the update when the
  norm is huge or not finite (causal-gen's recipe: clip 350, skip at 500).
- :func:`linear_warmup`: linear learning-rate warm-up (``LambdaLR``), stepped once per iteration.
- :func:`autocast`: bfloat16 autocast on CUDA, a no-op elsewhere.
- :class:`PrepareBatchKeys`: ``prepare_batch`` for MONAI trainers/evaluators reading arbitrary keys.

AMP policy. Mixed precision uses ``torch.bfloat16`` autocast on CUDA only. bfloat16 has float32's
exponent range, so no ``GradScaler`` is needed (and none is created). On the CPU autocast stays
off: results are then bit-for-bit float32 and independent of the CPU's bfloat16 support. The
optimizer state and the master weights stay float32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from monai_cft.utils.tensors import as_plain_tensor, to_plain_tensor
from monai_cft.utils.checks import check_count
from monai_cft.utils.distributed import sync_gradients

__all__ = [
    "ModelEMA",
    "clip_and_check",
    "step_or_skip",
    "linear_warmup",
    "autocast",
    "PrepareBatchKeys",
    "lower_is_better",
    "check_count",
]


class ModelEMA(AveragedModel):
    """Exponential moving average of a model's parameters: ``w_ema <- d * w_ema + (1 - d) * w``.

    A thin layer over ``torch.optim.swa_utils.AveragedModel`` with
    ``multi_avg_fn=get_ema_multi_avg_fn(d)`` (fused ``torch._foreach_lerp_`` update) that

    - copies the model's buffers (BatchNorm statistics, normalizer ranges, integer counters) instead
      of averaging them, which ``AveragedModel(use_buffers=True)`` cannot do for integer buffers;
    - optionally warms the decay up: with ``warmup=True`` the update after ``n`` earlier ones uses
      ``d = min(decay, (1 + n) / (10 + n))`` (the ``num_updates`` rule of TensorFlow's
      ``ExponentialMovingAverage``), so the average follows the model early on instead of staying
      close to the random initialization for thousands of updates (``decay=0.999`` alone keeps
      ``0.999^n`` of the initial weights: 82 % after 200 updates). ``d`` reaches 0.99 after 890
      updates and 0.999 after 8990.

    The averaged copy is ``ema.module``: always in eval mode, without gradients; evaluate and save it
    (``ema.module.state_dict()`` has the same keys as the model's).

    Args:
        model: the trained model (deep-copied at construction).
        decay: EMA decay in [0, 1).
        warmup: use the decay warm-up described above.
        device: optional device for the averaged copy (default: the model's).

    Example::

        ema = ModelEMA(net, decay=0.999)
        ...  # after every optimizer step
        ema.update(net)
        evaluate(ema.module)
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.999, warmup: bool = True, device: str | torch.device | None = None
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModelEMA needs a torch.nn.Module, got {type(model).__name__}.")
        decay = float(decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
        super().__init__(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.decay = decay
        self.warmup = bool(warmup)
        self.module.requires_grad_(False)
        self.module.eval()

    def current_decay(self) -> float:
        """Decay the next :meth:`update` applies (see ``warmup``)."""
        if not self.warmup:
            return self.decay
        n = float(self.n_averaged)
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def train(self, mode: bool = True) -> ModelEMA:
        """Keep the averaged copy in eval mode whatever ``mode`` is asked for."""
        super().train(False)
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average ``model``'s parameters into ``self.module`` and copy its buffers."""
        self.multi_avg_fn = get_ema_multi_avg_fn(self.current_decay())
        self.update_parameters(model)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b.detach().to(b_ema.device))


def clip_and_check(
    parameters: Iterable[torch.Tensor] | torch.Tensor, clip: float | None = 350.0, skip: float | None = 500.0
) -> tuple[float, bool]:
    """Clip the total gradient 2-norm of ``parameters`` to ``clip``; say whether to skip the update.

    Args:
        parameters: tensors whose ``.grad`` to clip (tensors without gradient are ignored).
        clip: maximum total norm after clipping (``None`` or ``inf``: no clipping, only measured).
        skip: the update should be skipped when the norm *before* clipping is ``>= skip``
            (``None`` or ``inf``: never for size) or is not finite (always).

    Returns:
        ``(grad_norm, skipped)``: the norm before clipping (a float; ``nan``/``inf`` if not finite)
        and whether the caller must skip ``optimizer.step()``.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    clip = math.inf if clip is None else float(clip)
    skip = math.inf if skip is None else float(skip)
    if not clip > 0:
        raise ValueError(f"clip must be positive (or None), got {clip}.")
    if not skip > 0:
        raise ValueError(f"skip must be positive (or None), got {skip}.")
    if not params:
        return 0.0, False
    sync_gradients(params)  # data-parallel: the averaged gradient is clipped and judged on every rank
    if math.isinf(clip):
        norms = torch._foreach_norm([p.grad for p in params])
        total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    else:
        total = torch.nn.utils.clip_grad_norm_(params, clip, error_if_nonfinite=False)
    grad_norm = float(total)
    skipped = not math.isfinite(grad_norm) or grad_norm >= skip
    return grad_norm, skipped


def step_or_skip(
    optimizer: Optimizer,
    parameters: Iterable[torch.Tensor],
    clip: float | None = 350.0,
    skip: float | None = 500.0,
) -> tuple[float, bool]:
    """After ``loss.backward()``: :func:`clip_and_check`, then ``optimizer.step()`` or drop the gradients.

    Returns:
        ``(grad_norm, skipped)`` as :func:`clip_and_check`; when skipped, the gradients are set to
        ``None`` and the optimizer state is untouched.
    """
    grad_norm, skipped = clip_and_check(parameters, clip, skip)
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return grad_norm, skipped


def linear_warmup(optimizer: Optimizer, warmup_steps: int) -> LambdaLR:
    """Learning-rate schedule rising linearly to the optimizer's lr over ``warmup_steps`` steps, then constant.

    The factor at scheduler step ``s`` (0-based, stepped once per iteration) is
    ``min(1, (s + 1) / warmup_steps)``, so the first update already uses ``lr / warmup_steps``.
    ``warmup_steps <= 1`` gives a constant learning rate.
    """
    warmup_steps = int(warmup_steps)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    n = max(1, warmup_steps)
    return LambdaLR(optimizer, lr_lambda=lambda step: min(1.0, (step + 1) / n))


def autocast(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when ``enabled``; a ``nullcontext`` on any other device.

    See the module docstring for the AMP policy.
    """
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PrepareBatchKeys(PrepareBatch):
    """``prepare_batch`` for MONAI trainers/evaluators: returns ``(batch[image_key], batch[label_key])``.

    MONAI's default reads the keys ``"image"`` and ``"label"``; the regressor trains on
    ``"parents"`` (normalized variables) and validates against ``"variables"`` (physical units), so
    the keys are configurable. Both are moved to ``device`` and returned as plain tensors.

    Args:
        image_key: the network input's key.
        label_key: the target's key, or ``None`` to return ``(image, None)``.
        dtype: optional floating dtype the *label* is cast to (e.g. ``torch.float32``).
    """

    def __init__(self, image_key: str = "image", label_key: str | None = "label", dtype: torch.dtype | None = None):
        self.image_key = image_key
        self.label_key = label_key
        self.dtype = dtype

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(batchdata, dict):
            raise TypeError(f"PrepareBatchKeys expects a dict batch, got {type(batchdata).__name__}.")
        missing = [k for k in (self.image_key, self.label_key) if k is not None and k not in batchdata]
        if missing:
            raise KeyError(f"batch has no key(s) {missing}; available keys: {sorted(batchdata)}.")
        image = as_plain_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        if self.label_key is None:
            return image, None
        label = to_plain_tensor(batchdata[self.label_key])
        label = label.to(device=device, non_blocking=non_blocking, **kwargs)
        if self.dtype is not None:
            label = label.to(self.dtype)
        return image, label


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for losses and errors (MONAI's default keeps the *largest* metric)."""
    return current < best
