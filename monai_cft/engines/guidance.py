"""One factory for the guidance loss of each CFT mode.

A CFT mode is fully described by the guidance loss it fine-tunes with; :class:`CFTTrainer
<monai_cft.engines.cft_trainer.CFTTrainer>` only calls that loss (``loss.from_parents(...)``) and
never looks at the mode's name. The mapping from a mode to its loss lives here, once:

======== ============================================================================================
mode     guidance loss
======== ============================================================================================
none     no loss: the pretrained DSCM is exported unchanged (the No-CFT baseline)
reg      :class:`~monai_cft.losses.RegressorGuidanceLoss`: the frozen parent regressor's Gaussian NLL
seg      :class:`~monai_cft.losses.SegmentorGuidanceLoss` without region masks: whole-structure areas,
         each scaled by the spread of that structure's total area on the training cases
pos_seg  :class:`~monai_cft.losses.SegmentorGuidanceLoss` with the region masks: per-region areas,
         each scaled by its variable's observed range
======== ============================================================================================

Segmentor losses are divided by ``seg_guidance_weight`` through their scales, so the weight
multiplies the guidance term against the constrained ELBO.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monai_cft.constants import CFT_MODES, check_cft_mode
from monai_cft.losses.guidance import (
    RegressorGuidanceLoss,
    SegmentorGuidanceLoss,
    ranges_to_scales,
    structure_total_scales,
)
from monai_cft.networks.loading import load_regressor, load_segmentor

__all__ = ["GuidanceSpec", "GUIDANCE_BUILDERS", "build_guidance_loss", "check_guidance_for_mode"]


@dataclass
class GuidanceSpec:
    """Everything a guidance loss may be built from (each builder uses what it needs).

    Attributes:
        structures: structure name -> segmentor channel, in variable order.
        variables: the V variable names, structure-major.
        ranges: observed ``[min, max]`` of every variable (training split), physical units.
        region_masks: (K, *spatial) region masks.
        element_size: pixel area (mm^2) / voxel volume (mm^3).
        segmentor_path, regressor_path: checkpoints of the frozen guidance networks.
        segmentor_network, regressor_network: the networks themselves instead of their checkpoints
            (e.g. benchmarks on randomly initialised networks); they are used as given (frozen by the loss).
        expect: checkpoint meta the guidance networks must match (e.g. preset and variables).
        train_variables: (N, V) training values, for Seg-CFT's whole-structure scales.
        seg_loss: ``"l1"`` / ``"l2"``; seg_guidance_weight: divides the segmentor loss's scales.
        reg_loss: ``"gaussian_nll"`` / ``"l1"`` / ``"l2"``.
    """

    structures: Mapping[str, int]
    variables: Sequence[str]
    ranges: Mapping[str, Sequence[float]]
    region_masks: torch.Tensor | None = None
    element_size: float = 1.0
    segmentor_path: str | os.PathLike | None = None
    regressor_path: str | os.PathLike | None = None
    segmentor_network: nn.Module | None = None
    regressor_network: nn.Module | None = None
    expect: Mapping[str, Any] = field(default_factory=dict)
    train_variables: Any = None
    seg_loss: str = "l1"
    seg_guidance_weight: float = 1.0
    reg_loss: str = "gaussian_nll"

    def _path(self, attr: str) -> str | os.PathLike:
        path = getattr(self, attr)
        if path is None:
            raise ValueError(f"this CFT mode needs {attr} (the frozen guidance network's checkpoint).")
        return path

    def segmentor(self) -> nn.Module:
        if self.segmentor_network is not None:
            return self.segmentor_network
        return load_segmentor(self._path("segmentor_path"), expect={"role": "guidance", **dict(self.expect)})

    def regressor(self) -> nn.Module:
        if self.regressor_network is not None:
            return self.regressor_network
        return load_regressor(self._path("regressor_path"), expect=dict(self.expect))

    def weighted(self, scales: torch.Tensor) -> torch.Tensor:
        w = float(self.seg_guidance_weight)
        if not w > 0:
            raise ValueError(f"seg_guidance_weight must be > 0, got {self.seg_guidance_weight!r}.")
        return torch.as_tensor(scales, dtype=torch.float32) / w


def _no_guidance(spec: GuidanceSpec) -> None:
    return None


def _regressor_guidance(spec: GuidanceSpec) -> nn.Module:
    return RegressorGuidanceLoss(spec.regressor(), num_outputs=len(spec.variables), loss=spec.reg_loss, reduction="none")


def _global_segmentor_guidance(spec: GuidanceSpec) -> nn.Module:
    if spec.train_variables is None:
        raise ValueError("Seg-CFT needs train_variables (the training cases' values) for its whole-structure scales.")
    scales = structure_total_scales(spec.train_variables, len(spec.structures))
    return SegmentorGuidanceLoss(spec.segmentor(), spec.structures, None, loss=spec.seg_loss,
                                 element_size=spec.element_size, scales=spec.weighted(scales), reduction="none")


def _regional_segmentor_guidance(spec: GuidanceSpec) -> nn.Module:
    if spec.region_masks is None:
        raise ValueError("Pos-Seg-CFT needs region_masks (K, *spatial).")
    scales = ranges_to_scales(spec.ranges, spec.variables)
    return SegmentorGuidanceLoss(spec.segmentor(), spec.structures, spec.region_masks, loss=spec.seg_loss,
                                 element_size=spec.element_size, scales=spec.weighted(scales), reduction="none")


#: CFT mode -> builder of its guidance loss (``None``: no fine-tuning).
GUIDANCE_BUILDERS: dict[str, Callable[[GuidanceSpec], nn.Module | None]] = {
    "none": _no_guidance,
    "reg": _regressor_guidance,
    "seg": _global_segmentor_guidance,
    "pos_seg": _regional_segmentor_guidance,
}
if tuple(GUIDANCE_BUILDERS) != CFT_MODES:  # pragma: no cover - a mode added in one place only
    raise ImportError(f"GUIDANCE_BUILDERS {list(GUIDANCE_BUILDERS)} must list monai_cft.constants.CFT_MODES {list(CFT_MODES)}.")


def build_guidance_loss(mode: str, **spec: Any) -> nn.Module | None:
    """The guidance loss of CFT ``mode`` (see the module docstring); ``spec``: the fields of :class:`GuidanceSpec`.

    Only the networks the mode needs are loaded (a Reg-CFT run needs no segmentor checkpoint).
    """
    return GUIDANCE_BUILDERS[check_cft_mode(mode)](GuidanceSpec(**spec))


def check_guidance_for_mode(mode: str, loss: nn.Module | None) -> None:
    """Raise a ``ValueError`` when ``loss`` is not what :func:`build_guidance_loss` gives ``mode``: a
    loss for a mode that fine-tunes, ``None`` for one that does not (``none``, the No-CFT baseline)."""
    fine_tunes = GUIDANCE_BUILDERS[check_cft_mode(mode)] is not _no_guidance
    if (loss is None) == fine_tunes:
        need = "a guidance loss" if fine_tunes else "no guidance loss"
        raise ValueError(f"cft_mode {mode!r} needs {need} (see monai_cft.engines.guidance.build_guidance_loss).")
