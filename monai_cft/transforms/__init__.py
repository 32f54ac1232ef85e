"""MONAI transforms of monai-cft: sCPR straightening and its inverse, region masks, structure measurements, the HU window."""

from .cpr import (
    SCPR_ANGLE_KEY,
    SCPR_CENTERLINE_KEY,
    SCPR_GRID_KEY,
    SCPR_LENGTH_KEY,
    SCPR_SPACING_KEY,
    SCPR_VALID_COLUMNS_KEY,
    SCPRGeometry,
    StraightenCPR,
    StraightenCPRd,
    centerline_length,
    clean_centerline,
    parallel_transport_frames,
    resample_centerline,
    scpr_to_world,
)
from .intensity import HUWindow, HUWindowd
from .unstraighten import UnstraightenCPR, UnstraightenCPRd
from .measures import StructureMeasures, StructureMeasuresd, measure_structures
from .regions import REGION_NAMES_KEY, RegionMasks, RegionMasksd, context_pixels, region_window_shape, region_windows

__all__ = [
    "SCPR_ANGLE_KEY",
    "SCPR_CENTERLINE_KEY",
    "SCPR_GRID_KEY",
    "SCPR_LENGTH_KEY",
    "SCPR_SPACING_KEY",
    "SCPR_VALID_COLUMNS_KEY",
    "REGION_NAMES_KEY",
    "HUWindow",
    "HUWindowd",
    "SCPRGeometry",
    "StraightenCPR",
    "StraightenCPRd",
    "UnstraightenCPR",
    "UnstraightenCPRd",
    "RegionMasks",
    "RegionMasksd",
    "StructureMeasures",
    "StructureMeasuresd",
    "centerline_length",
    "clean_centerline",
    "context_pixels",
    "measure_structures",
    "parallel_transport_frames",
    "region_window_shape",
    "region_windows",
    "resample_centerline",
    "scpr_to_world",
]
