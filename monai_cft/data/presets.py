"""Presets of the straightened curved planar reformation (sCPR).

``SCPR_PRESETS["paper"]`` is the geometry of the positional Seg-CFT paper (0.25 mm pixels,
64 x 384: 16 mm across the vessel, 96 mm along it); ``"quick"`` covers the same field of view at
half the resolution (0.5 mm, 32 x 192) for CPU-sized experiments.
"""

from __future__ import annotations

from typing import Any

from monai_cft.constants import HU_WINDOW  # re-exported: configs written before monai_cft.constants

__all__ = ["SCPR_PRESETS", "HU_WINDOW", "get_scpr_preset"]

#: sCPR geometry per preset: pixel spacing (mm) and output size (H across, W along the vessel).
SCPR_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"spacing": 0.25, "output_size": (64, 384)},
    "quick": {"spacing": 0.5, "output_size": (32, 192)},
}



def get_scpr_preset(name: str) -> dict[str, Any]:
    """Return a copy of ``SCPR_PRESETS[name]``; a ValueError lists the valid names otherwise."""
    if name not in SCPR_PRESETS:
        raise ValueError(f"unknown sCPR preset {name!r}; valid presets are {sorted(SCPR_PRESETS)}.")
    preset = SCPR_PRESETS[name]
    return {"spacing": float(preset["spacing"]), "output_size": tuple(int(v) for v in preset["output_size"])}
