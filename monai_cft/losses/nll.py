"""Gaussian negative log-likelihood of (normalized) parents under a predicted mean and log-variance.

The parent regressor (``monai_cft.networks.predictors.ParentRegressor``) predicts, for every one of
the ``V`` variables, a mean and a log-variance of its *normalized* value (``[-1, 1]`` over the
observed training range); its output is ``(B, 2V)``: the ``V`` means, then the ``V`` log-variances.
It is trained with :class:`GaussianNLLLoss` and reused by Reg-CFT as ``-log q(pa_cf | x_cf)``.
"""

from __future__ import annotations

import math

import torch
from torch.nn.modules.loss import _Loss

__all__ = ["GaussianNLLLoss", "gaussian_nll"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_nll(
    mean: torch.Tensor,
    target: torch.Tensor,
    log_var: torch.Tensor,
    log_var_clamp: tuple[float, float] | None = (-9.0, 9.0),
    full: bool = True,
) -> torch.Tensor:
    """Element-wise ``0.5 * (log_var + (target - mean)^2 / exp(log_var)) [+ 0.5 log(2 pi)]``.

    Args:
        mean, target, log_var: tensors of one shape (or broadcastable), e.g. (B, V).
        log_var_clamp: ``(min, max)`` the log-variance is clamped to (gradients stop outside), or
            ``None`` for no clamp.
        full: include the constant ``0.5 log(2 pi)`` so the value is the exact negative log-density
            (in nats per variable).
    """
    if log_var_clamp is not None:
        log_var = log_var.clamp(float(log_var_clamp[0]), float(log_var_clamp[1]))
    nll = 0.5 * (log_var + (target - mean).square() * torch.exp(-log_var))
    return nll + _HALF_LOG_2PI if full else nll


class GaussianNLLLoss(_Loss):
    """Gaussian NLL of a target under a predicted mean and log-variance.

    Call as ``loss(pred, target)`` with ``pred`` (B, 2V) holding the means then the log-variances
    (the parent regressor's output), or as ``loss(mean, target, log_var)`` with three (B, V)
    tensors. ``target`` is (B, V), in the same (normalized) units as the means.

    Args:
        reduction: ``"mean"`` (mean over batch and variables, the PyTorch convention), ``"sum"`` or
            ``"none"`` ((B, V) element-wise terms).
        log_var_clamp: ``(min, max)`` clamp of the predicted log-variance (default (-9, 9):
            standard deviations from 0.011 to 90 in normalized units), or ``None``.
        full: include the constant ``0.5 log(2 pi)`` (default True: a true NLL in nats).

    Example::

        loss = GaussianNLLLoss()
        pred = regressor(images)              # (B, 2V)
        value = loss(pred, normalized_parents)  # scalar
    """

    def __init__(
        self, reduction: str = "mean", log_var_clamp: tuple[float, float] | None = (-9.0, 9.0), full: bool = True
    ) -> None:
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
        super().__init__(reduction=reduction)
        if log_var_clamp is not None:
            lo, hi = float(log_var_clamp[0]), float(log_var_clamp[1])
            if not lo < hi:
                raise ValueError(f"log_var_clamp must be (min, max) with min < max, got {tuple(log_var_clamp)}.")
            log_var_clamp = (lo, hi)
        self.log_var_clamp = log_var_clamp
        self.full = bool(full)

    def forward(self, input: torch.Tensor, target: torch.Tensor, log_var: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: (B, 2V) means then log-variances, or (B, V) means when ``log_var`` is given.
            target: (B, V) target values.
            log_var: optional (B, V) log-variances.

        Raises:
            ValueError: shapes that do not pair up.
        """
        if log_var is None:
            if input.ndim != 2 or input.shape[1] % 2 != 0:
                raise ValueError(
                    f"without log_var, input must be (B, 2V) means then log-variances, got shape {tuple(input.shape)}."
                )
            mean, log_var = input.chunk(2, dim=1)
        else:
            mean = input
            if log_var.shape != mean.shape:
                raise ValueError(f"log_var shape {tuple(log_var.shape)} differs from the mean's {tuple(mean.shape)}.")
        if target.shape != mean.shape:
            raise ValueError(f"target shape {tuple(target.shape)} does not match the predicted means' {tuple(mean.shape)}.")
        terms = gaussian_nll(mean, target.to(mean.dtype), log_var, self.log_var_clamp, self.full)
        if self.reduction == "mean":
            return terms.mean()
        if self.reduction == "sum":
            return terms.sum()
        return terms
