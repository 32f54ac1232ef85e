"""Constants shared by every layer of monai-cft: the network intensity window and the CFT modes.

This module imports nothing from the package, so any module may use it. The structure labels and
the variable order live beside it in :mod:`monai_cft.variables`.
"""

from __future__ import annotations

__all__ = ["HU_WINDOW", "CFT_MODES", "MODE_LABELS", "check_cft_mode", "area_unit"]

#: HU range clipped and mapped linearly to [-1, 1] for the networks
#: (:class:`monai_cft.transforms.intensity.HUWindow`).
HU_WINDOW: tuple[float, float] = (-300.0, 1100.0)

#: fine-tuning modes: ``none`` (the pretrained DSCM, the No-CFT baseline), Reg-CFT, Seg-CFT and
#: Pos-Seg-CFT. Each mode's guidance loss is built by :func:`monai_cft.engines.guidance.build_guidance_loss`.
CFT_MODES: tuple[str, ...] = ("none", "reg", "seg", "pos_seg")

#: the name of each mode in tables and figures.
MODE_LABELS: dict[str, str] = {"none": "No-CFT", "reg": "Reg-CFT", "seg": "Seg-CFT", "pos_seg": "Pos-Seg-CFT"}


def check_cft_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`CFT_MODES`, else raise a ``ValueError`` listing them."""
    if mode not in CFT_MODES:
        raise ValueError(f"unknown cft_mode {mode!r}; expected one of {list(CFT_MODES)}.")
    return mode


def area_unit(spatial_dims: int) -> str:
    """The unit of the structure variables of ``spatial_dims``-D images: areas (mm²) in 2D, volumes (mm³) in 3D."""
    return "mm²" if int(spatial_dims) == 2 else "mm³"
