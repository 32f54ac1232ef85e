"""monai-cft losses: the guidance losses of counterfactual fine-tuning and the regressor's Gaussian NLL."""

from .guidance import (
    RegressorGuidanceLoss,
    SegmentorGuidanceLoss,
    freeze_module,
    ranges_to_scales,
    structure_total_scales,
)
from .nll import GaussianNLLLoss, gaussian_nll

__all__ = [
    "GaussianNLLLoss",
    "gaussian_nll",
    "RegressorGuidanceLoss",
    "SegmentorGuidanceLoss",
    "freeze_module",
    "ranges_to_scales",
    "structure_total_scales",
]
