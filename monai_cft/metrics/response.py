"""Response of a counterfactual model to its interventions: slopes and the closure of the gap to the truth.

* :func:`response_slope`: the ordinary least-squares slope (with intercept) of the *measured*
  change of a variable on the *intended* change of the intervened variable, over test cases. In the
  intervened region a slope of 1 means the counterfactual follows the intervention in proportion
  (0: it ignores it, 0.5: it does half of it); in the other regions of the same structure a slope of
  0 means no leakage. Unlike a mean absolute error the slope is insensitive to a constant
  measurement bias (the intercept takes it).
* :func:`gap_closure`: how much of the distance between a reference (the unchanged image, or the
  model before counterfactual fine-tuning) and the ground-truth counterfactual a model covers,
  ``(err_ref - err_model) / (err_ref - err_gt)``.

See ``docs/metrics.md`` (sections "Response slopes" and "Gap closure").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["response_slope", "gap_closure", "parent_sensitivity"]


def _as_1d(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one value per case (1-D), got shape {arr.shape}.")
    return arr


def response_slope(intended_change: Any, measured_change: Any) -> float:
    """Least-squares slope (with intercept) of ``measured_change`` regressed on ``intended_change``.

    Args:
        intended_change: (N,) intended change of the intervened variable per case, target - factual
            value (mm^2); a tensor, array or sequence.
        measured_change: (N,) change measured on the counterfactual per case, measurement of x_cf -
            measurement of x with the same measure (mm^2), of the intervened or of another variable.

    Returns:
        ``cov(intended, measured) / var(intended)`` (dimensionless). Pairs with a non-finite entry are
        left out; NaN when fewer than 2 pairs remain or the intended change has (numerically) zero
        variance, where no slope is defined.
    """
    x = _as_1d(intended_change, "intended_change")
    y = _as_1d(measured_change, "measured_change")
    if x.shape != y.shape:
        raise ValueError(f"intended_change and measured_change must have the same length, got {x.size} and {y.size}.")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2:
        return math.nan
    dx = x - x.mean()
    sxx = float(dx @ dx)
    # zero variance up to the rounding of the mean (a constant column gives deviations ~1e-16 * |x|)
    scale = max(float(np.abs(x).max()), np.finfo(np.float64).tiny)
    if sxx <= x.size * (1e-12 * scale) ** 2:
        return math.nan
    return float(dx @ (y - y.mean()) / sxx)


def gap_closure(err_reference: float, err_model: float, err_ground_truth: float) -> float:
    """Fraction of the error gap between a reference and the ground truth that a model closes.

    Args:
        err_reference: mean absolute error of the reference (the unchanged image, or No-CFT), mm^2.
        err_model: mean absolute error of the model under evaluation, mm^2.
        err_ground_truth: mean absolute error of the ground-truth counterfactual (the measurement
            floor of a perfect counterfactual), mm^2.

    Returns:
        ``(err_reference - err_model) / (err_reference - err_ground_truth)``: 1 = as good as the
        ground truth, 0 = no better than the reference, < 0 worse, > 1 below the ground truth's
        error. NaN when an input is NaN or the denominator is <= 0 (the reference is already as good
        as the ground truth: there is no gap to close).
    """
    ref, mod, gt = float(err_reference), float(err_model), float(err_ground_truth)
    den = ref - gt
    if not (math.isfinite(ref) and math.isfinite(mod) and math.isfinite(gt)) or den <= 0.0:
        return math.nan
    return (ref - mod) / den


def parent_sensitivity(scm: Any, measure: Any, images: torch.Tensor, parents: torch.Tensor,
                       names: list[str], seed: int = 0, batch_size: int = 32) -> dict[str, float]:
    """Does a trained deep SCM follow its parents? Slope of the measured change under shuffled parents.

    Every case's abducted noise is decoded with *another* case's parents (a random permutation: all
    variables change at once, by realistic amounts): ``x_cf = scm.counterfactual(x, pa, pa[perm])``.
    For each variable the response slope (:func:`response_slope`) of ``measure(x_cf) - measure(x)``
    on ``pa[perm] - pa`` is returned: about 1 when the image follows the parents, about 0 when the
    latents carry everything (the "ignored conditioning" of likelihood-trained DSCMs).

    Args:
        scm: a :class:`~monai_cft.networks.dscm.DeepSCM` (eval mode).
        measure: ``images (B, C, *sp) -> (B, V)`` measured variables in the parents' units (e.g. the
            evaluation segmentor's areas).
        images: (N, C, *sp) images in the model's range; ``parents``: (N, V) physical values.
        names: the V variable names.
        seed: seeds the permutation.

    Returns:
        ``{name: slope}``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(images.shape[0], generator=gen)
    target = parents[perm]
    changes, intended = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            x, pa, t = images[sl], parents[sl], target[sl]
            x_cf = scm.counterfactual(x, pa, {nm: t[:, j] for j, nm in enumerate(names)},
                                      allow_extrapolation=True)["x_cf"]
            changes.append((measure(x_cf) - measure(x)).double().cpu())
            intended.append((t - pa).double().cpu())
    dm, di = torch.cat(changes), torch.cat(intended)
    return {nm: response_slope(di[:, j], dm[:, j]) for j, nm in enumerate(names)}
