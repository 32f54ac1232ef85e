"""Locality of a counterfactual change: how much of it falls inside the intervened region.

``locality = sum_p |x_cf - x|_p * R_p / sum_p |x_cf - x|_p`` per sample, with ``R`` the (binary or
soft) mask of the intervened region. 1 means the whole change lies inside the region; for a change
spread uniformly over the image it equals the region's area fraction (1/3 for the sCPR thirds).
"""

from __future__ import annotations

import math

import torch

from monai_cft.metrics._utils import plain

__all__ = ["locality"]


def locality(x: torch.Tensor, x_cf: torch.Tensor, region_mask: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Fraction of the total absolute change ``|x_cf - x|`` that lies inside a region, per sample.

    Args:
        x: (B, C, *spatial) factual images.
        x_cf: (B, C, *spatial) counterfactual images (any intensity scale: the ratio is scale-free).
        region_mask: mask of the intervened region, values in [0, 1]: (*spatial) for all samples,
            (B, *spatial) one per sample (e.g. ``region_masks[region_index]``), or (B|1, C|1, *spatial).
        eps: changes whose total ``sum |x_cf - x|`` is ``<= eps`` count as "no change" (locality
            undefined).

    Returns:
        (B,) float32 in [0, 1]; ``NaN`` for samples without change (left out by
        :func:`~monai_cft.metrics.summary.summarize`).
    """
    if x.shape != x_cf.shape or x.ndim < 3:
        raise ValueError(
            f"x and x_cf must be (B, C, *spatial) of one shape, got {tuple(x.shape)} and {tuple(x_cf.shape)}."
        )
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    x, x_cf, region_mask = plain(x), plain(x_cf), plain(region_mask)
    spatial = tuple(x.shape[2:])
    m = region_mask.to(device=x.device, dtype=torch.float32)
    if tuple(m.shape[-len(spatial) :]) != spatial:
        raise ValueError(f"region_mask of shape {tuple(m.shape)} does not end in the images' spatial shape {spatial}.")
    if m.ndim == len(spatial):
        m = m[None, None]
    elif m.ndim == len(spatial) + 1:
        m = m[:, None]
    elif m.ndim != x.ndim:
        raise ValueError(
            f"region_mask must be (*spatial), (B, *spatial) or (B, C, *spatial), got shape {tuple(m.shape)}."
        )
    if m.shape[0] not in (1, x.shape[0]) or m.shape[1] not in (1, x.shape[1]):
        raise ValueError(
            f"region_mask of shape {tuple(m.shape)} does not broadcast to images of shape {tuple(x.shape)}."
        )
    if bool(((m < 0) | (m > 1)).any()):
        raise ValueError("region_mask values must lie in [0, 1].")
    diff = (x_cf.to(torch.float32) - x.to(torch.float32)).abs()
    total = diff.flatten(1).sum(1)
    inside = (diff * m).flatten(1).sum(1)
    frac = inside / total.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(total > eps, frac, torch.full_like(frac, math.nan))
