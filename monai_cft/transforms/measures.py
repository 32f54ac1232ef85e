"""Per-structure, per-region physical measurements of (soft) segmentations.

The core is :func:`measure_structures`, a differentiable sum of structure probabilities inside
region masks times the pixel (voxel) size. It is the measurement of Seg-CFT (one global region)
and Pos-Seg-CFT (K regions, Eq. 2 of the positional paper), shared by the
``StructureMeasures`` transforms, the guidance losses and the metrics.
"""

from __future__ import annotations

import torch

__all__ = ["measure_structures"]


def measure_structures(
    probs: torch.Tensor,
    region_masks: torch.Tensor | None,
    channels: list[int] | tuple[int, ...],
    element_size: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Sum structure probabilities inside regions: ``area[b, s, k] = size * sum_p probs[b, c_s, p] * R[k, p]``.

    Args:
        probs: (B, C, *spatial) channel-wise probabilities or one-hot maps (any float dtype);
            gradients flow through it.
        region_masks: (K, *spatial) or (B, K, *spatial) region masks (binary or soft), or ``None``
            for one region covering the whole image.
        channels: the channel index of each of the S structures in ``probs``.
        element_size: area (2D, mm^2) or volume (3D, mm^3) of one pixel / voxel; a scalar or a (B,)
            tensor when cases have different spacings.

    Returns:
        (B, S, K) tensor of measurements in physical units (K = 1 without region masks).
    """
    if probs.ndim < 3:
        raise ValueError(f"probs must be (B, C, *spatial), got shape {tuple(probs.shape)}.")
    spatial = probs.shape[2:]
    n_ch = probs.shape[1]
    bad = [c for c in channels if not 0 <= int(c) < n_ch]
    if bad:
        raise ValueError(f"structure channels {bad} out of range for probs with {n_ch} channels.")
    sel = probs[:, list(channels)].flatten(2)  # (B, S, P)
    if region_masks is None:
        out = sel.sum(-1, keepdim=True)
    else:
        if region_masks.ndim == len(spatial) + 1:
            if tuple(region_masks.shape[1:]) != tuple(spatial):
                raise ValueError(
                    f"region masks of spatial shape {tuple(region_masks.shape[1:])} do not match "
                    f"the segmentation's {tuple(spatial)}."
                )
            out = torch.einsum("bsp,kp->bsk", sel, region_masks.flatten(1).to(sel.dtype))
        elif region_masks.ndim == len(spatial) + 2:
            if tuple(region_masks.shape[2:]) != tuple(spatial) or region_masks.shape[0] != probs.shape[0]:
                raise ValueError(
                    f"region masks of shape {tuple(region_masks.shape)} do not match the "
                    f"segmentation's batch {probs.shape[0]} and spatial shape {tuple(spatial)}."
                )
            out = torch.einsum("bsp,bkp->bsk", sel, region_masks.flatten(2).to(sel.dtype))
        else:
            raise ValueError(
                f"region masks must be (K, *spatial) or (B, K, *spatial), got shape {tuple(region_masks.shape)}."
            )
    size = torch.as_tensor(element_size, dtype=out.dtype, device=out.device)
    if size.ndim == 1:
        size = size.view(-1, 1, 1)
    return out * size
