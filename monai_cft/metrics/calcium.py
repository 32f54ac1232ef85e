"""A physics measure of calcified plaque: area above an HU threshold, per region.

A learned measure (a segmentor or a regressor) can be fooled by a counterfactual that changes
something else, e.g. a brighter lumen; a threshold on attenuation cannot: calcium is the only
tissue of a contrast CCTA sCPR far brighter than the contrast-filled lumen. The calcium-scoring
threshold (130 HU) lies below contrast, so the threshold here is fitted on labelled training cases
(:meth:`CalciumThreshold.fit`: the value that minimises the mean absolute area error against the
labels over all regions); blooming makes the bright region larger than the true plaque, which the
fitted threshold compensates on average.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["calcium_areas", "CalciumThreshold"]


def _check(images: torch.Tensor, region_masks: torch.Tensor) -> None:
    if images.ndim < 3 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, *spatial) HU, got shape {tuple(images.shape)}.")
    if tuple(region_masks.shape[1:]) != tuple(images.shape[2:]):
        raise ValueError(
            f"region_masks {tuple(region_masks.shape)} do not match the images' spatial shape {tuple(images.shape[2:])}."
        )


def calcium_areas(images: torch.Tensor, region_masks: torch.Tensor, threshold_hu: float,
                  element_size: float = 1.0) -> torch.Tensor:
    """Area (mm^2, or volume in mm^3 in 3D) of pixels brighter than ``threshold_hu`` inside each region.

    Args:
        images: (N, 1, *spatial) images in HU.
        region_masks: (K, *spatial) binary region masks.
        threshold_hu: pixels strictly above it count as calcium.
        element_size: pixel area (mm^2) or voxel volume (mm^3).

    Returns:
        (N, K) float32 areas.
    """
    _check(images, region_masks)
    bright = (images[:, 0] > float(threshold_hu)).float().flatten(1)  # (N, P)
    return bright @ region_masks.float().flatten(1).T.to(bright.device) * float(element_size)


@dataclass(frozen=True)
class CalciumThreshold:
    """A fitted HU threshold and its training error.

    Attributes:
        threshold_hu: the threshold (HU).
        train_mae: mean absolute area error (mm^2) per region on the cases it was fitted on.
    """

    threshold_hu: float
    train_mae: tuple[float, ...]

    def __call__(self, images: torch.Tensor, region_masks: torch.Tensor, element_size: float = 1.0) -> torch.Tensor:
        """(N, K) calcium areas of HU ``images`` (see :func:`calcium_areas`)."""
        return calcium_areas(images, region_masks, self.threshold_hu, element_size)

    @classmethod
    def fit(cls, images: torch.Tensor, areas: torch.Tensor, region_masks: torch.Tensor, element_size: float = 1.0,
            candidates: torch.Tensor | None = None) -> CalciumThreshold:
        """Choose the threshold minimising the mean absolute error to ``areas`` over every case and region.

        Args:
            images: (N, 1, *spatial) training images in HU.
            areas: (N, K) their labelled calcified areas per region (mm^2).
            region_masks: (K, *spatial) region masks.
            element_size: pixel area (mm^2).
            candidates: thresholds to try (HU); default 150 to 1500 HU in 5 HU steps.
        """
        _check(images, region_masks)
        if areas.shape != (images.shape[0], region_masks.shape[0]):
            raise ValueError(f"areas must be (N, K) = {(images.shape[0], region_masks.shape[0])}, got {tuple(areas.shape)}.")
        cand = torch.arange(150.0, 1500.0 + 1e-6, 5.0) if candidates is None else torch.as_tensor(candidates).float()
        masks = region_masks.bool().flatten(1)
        vals = images[:, 0].flatten(1).float()
        errors = torch.zeros(len(cand), region_masks.shape[0], dtype=torch.float64)
        for k in range(masks.shape[0]):
            sorted_vals = torch.sort(vals[:, masks[k]], dim=1).values  # (N, P_k)
            above = sorted_vals.shape[1] - torch.searchsorted(sorted_vals.contiguous(),
                                                                cand.expand(len(vals), -1).contiguous(), right=True)
            errors[:, k] = (above.double() * element_size - areas[:, k : k + 1].double()).abs().mean(0)
        best = int(errors.mean(1).argmin())
        return cls(float(cand[best]), tuple(float(e) for e in errors[best]))
