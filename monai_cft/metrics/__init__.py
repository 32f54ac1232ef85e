"""Counterfactual metrics of monai-cft: effectiveness, composition, reversibility, locality, realism, response.

See ``docs/metrics.md`` for the definitions, units and evaluation protocol.
"""

from .composition import composition, image_l1, reversibility, to_pixel_range
from .effectiveness import effectiveness_errors, measure_with_segmentor
from .interventions import Interventions, counterfactual_per_sample, run_counterfactual, uniform_targets
from .locality import locality
from .realism import FeatureExtractor, frechet_distance, gaussian_frechet_distance, kernel_distance
from .calcium import CalciumThreshold, calcium_areas
from .response import gap_closure, parent_sensitivity, response_slope
from .segmentation import dice_per_structure
from .summary import summarize

__all__ = [
    "Interventions",
    "uniform_targets",
    "CalciumThreshold",
    "calcium_areas",
    "dice_per_structure",
    "response_slope",
    "parent_sensitivity",
    "gap_closure",
    "run_counterfactual",
    "counterfactual_per_sample",
    "measure_with_segmentor",
    "effectiveness_errors",
    "to_pixel_range",
    "image_l1",
    "composition",
    "reversibility",
    "locality",
    "FeatureExtractor",
    "gaussian_frechet_distance",
    "frechet_distance",
    "kernel_distance",
    "summarize",
]
