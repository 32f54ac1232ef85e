"""Summary statistics of per-case metric values: mean, standard deviation, confidence interval, n.

``NaN`` entries mean "not defined for this case" (e.g. locality of an unchanged image, a MAPE
with a guarded target) and are left out of every statistic, column by column.
"""

from __future__ import annotations

import math

import torch

from monai_cft.metrics._utils import check_positive_int

__all__ = ["summarize", "case_statistics", "finite_median"]

_CI_METHODS = ("normal", "bootstrap")


def summarize(
    values: torch.Tensor,
    ci: float = 0.95,
    method: str = "normal",
    num_bootstrap: int = 2000,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Mean, sample standard deviation, two-sided confidence interval of the mean and count.

    Args:
        values: (N, *D) per-case values; statistics are taken over dim 0, ignoring ``NaN``.
        ci: confidence level in (0, 1).
        method: ``"normal"``: mean +- z_{(1+ci)/2} * std / sqrt(n) (normal approximation, adequate
            for the hundreds of cases of an evaluation); ``"bootstrap"``: percentile bootstrap of the
            mean with ``num_bootstrap`` resamples (no normality assumption; better for skewed errors
            and small n).
        num_bootstrap: number of bootstrap resamples.
        generator: RNG of the bootstrap (a seeded ``torch.Generator`` makes it reproducible).

    Returns:
        dict of (*D) CPU float64 tensors ``mean``, ``std`` (ddof = 1), ``ci_low``, ``ci_high`` and int64
        ``n`` (non-NaN cases). With n = 0 every statistic is NaN; with n = 1 std and the interval are NaN.
    """
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}.")
    if values.ndim < 1:
        raise ValueError(f"values must be (N, *D), got a 0-d tensor {values}.")
    if not 0.0 < float(ci) < 1.0:
        raise ValueError(f"ci must be a confidence level in (0, 1), got {ci}.")
    if method not in _CI_METHODS:
        raise ValueError(f"method must be one of {_CI_METHODS}, got {method!r}.")
    x = values.detach().to(device="cpu", dtype=torch.float64)
    valid = ~torch.isnan(x)
    n = valid.sum(0)
    nf = n.to(torch.float64)
    mean = torch.where(valid, x, 0.0).sum(0) / nf  # NaN where n == 0
    dev = torch.where(valid, x - mean, 0.0)
    std = torch.sqrt((dev**2).sum(0) / (nf - 1.0))
    std = torch.where(n > 1, std, torch.full_like(std, math.nan))
    alpha = (1.0 - float(ci)) / 2.0
    if method == "normal":
        z = float(torch.special.ndtri(torch.tensor(1.0 - alpha, dtype=torch.float64)))
        half = z * std / torch.sqrt(nf)
        low, high = mean - half, mean + half
    else:
        check_positive_int(num_bootstrap, "num_bootstrap")
        flat, vflat = x.reshape(x.shape[0], -1), valid.reshape(x.shape[0], -1)
        low = torch.full((flat.shape[1],), math.nan, dtype=torch.float64)
        high = low.clone()
        q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
        for c in range(flat.shape[1]):  # one column at a time: each has its own NaN pattern
            col = flat[vflat[:, c], c]
            if col.numel() < 2:
                continue
            idx = torch.randint(col.numel(), (num_bootstrap, col.numel()), generator=generator)
            low[c], high[c] = torch.quantile(col[idx].mean(1), q)
        low, high = low.reshape(x.shape[1:]), high.reshape(x.shape[1:])
    return {"mean": mean, "std": std, "ci_low": low, "ci_high": high, "n": n}


def case_statistics(values) -> dict[str, float]:
    """:func:`summarize` of a flat list of per-case values as plain floats for JSON and tables.

    Returns:
        ``{"mean", "std", "ci95", "n"}``: the mean, the sample standard deviation (ddof = 1), the
        half-width of the normal 95 % interval of the mean and the number of non-NaN values; with
        n = 0 every statistic is NaN, with n = 1 std and ci95 are NaN (a spread of one case is undefined).
    """
    st = summarize(torch.as_tensor(values, dtype=torch.float64).reshape(-1))
    mean, low, high = float(st["mean"]), float(st["ci_low"]), float(st["ci_high"])
    return {"mean": mean, "std": float(st["std"]), "ci95": (high - low) / 2.0, "n": int(st["n"])}


def finite_median(values) -> float:
    """Median of the finite entries of ``values`` (None, NaN and inf skipped) as a float; NaN if none."""
    vals = sorted(float(v) for v in values if v is not None and math.isfinite(float(v)))
    if not vals:
        return math.nan
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])
