"""Write and describe a counterfactual of :class:`~monai_cft.inference.CounterfactualPipeline`.

:func:`save_result` writes a :class:`~monai_cft.inference.CounterfactualResult` as NIfTI, JSON and a
PNG panel (and, given the volume the sCPR came from, the counterfactual written back into it);
:func:`describe_result` is the two-line text of the panel's title.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_cft.constants import area_unit
from monai_cft.utils.tensors import to_plain_tensor
from monai_cft.utils.io import check_file_name, save_json, save_nifti

__all__ = ["save_result", "describe_result"]


def _affine4(affine: Any, spatial_dims: int) -> torch.Tensor:
    """A (4, 4) float64 affine; (d+1, d+1) affines of 2D images are embedded with unit z spacing."""
    aff = torch.as_tensor(np.asarray(affine.detach().cpu() if torch.is_tensor(affine) else affine), dtype=torch.float64)
    if aff.shape == (4, 4):
        return aff
    d = aff.shape[0] - 1
    if aff.shape != (d + 1, d + 1) or d < 1:
        raise ValueError(f"affine must be square (d + 1, d + 1), got shape {tuple(aff.shape)}.")
    out = torch.eye(4, dtype=torch.float64)
    out[:d, :d] = aff[:d, :d]
    out[:d, 3] = aff[:d, d]
    return out


def describe_result(result: Any) -> str:
    """Two-line title: the intervention with its intended and measured values, then the other variables.

    Args:
        result: a :class:`~monai_cft.inference.CounterfactualResult`.
    """
    unit = area_unit(result.image.ndim - 1)
    parts, others = [], []
    for k, target in result.intervention.items():
        parts.append(f"do({k} = {target:.1f} {unit}, factual {result.variables[k]:.1f}): "
                     f"measured on counterfactual {result.measured[k]:.1f}")
    for k in result.intended:
        if k not in result.intervention:
            others.append(f"{k} {result.intended[k]:.1f}/{result.measured[k]:.1f}")
    mode = f"[{result.mode}] " if result.mode else ""
    return mode + "; ".join(parts) + "\nintended/measured: " + ", ".join(others)


def save_result(result: Any, output_dir: str | os.PathLike, name: str = "case",
                volume: torch.Tensor | None = None) -> dict[str, str]:
    """Write a :class:`~monai_cft.inference.CounterfactualResult` to ``output_dir`` (each file atomically).

    Files: ``<name>_cf.nii.gz`` (counterfactual, HU, float32, the sCPR affine),
    ``<name>_diff.nii.gz`` (counterfactual - factual, HU), ``<name>_panel.png`` (factual,
    counterfactual, difference, region boundaries dashed, :func:`describe_result` as the title) and
    ``<name>_values.json`` (every variable: factual, measured on the factual, intended, measured).
    With ``volume`` (the 3D CCTA the sCPR was straightened from, ``load_case(...).volume``) also
    ``<name>_cf_volume.nii.gz``: the volume with the counterfactual's change written back along the
    sCPR's sampling grid (:class:`~monai_cft.transforms.UnstraightenCPR`, trilinear splatting),
    float32 HU with the volume's own affine, so it opens over the original scan in 3D Slicer.

    Args:
        result: the pipeline's result.
        output_dir: created if needed.
        name: file-name prefix (a plain file name).
        volume: optional (1, X, Y, Z) ``MetaTensor`` the result's image was straightened from.

    Returns:
        ``{"counterfactual", "difference", "panel", "values"[, "volume"]}`` -> written path.

    Raises:
        ValueError: a ``name`` that is not a plain file name, or a ``volume`` for a result whose image
            carries no sampling grid (it was not straightened from a volume).
    """
    from monai_cft.transforms.cpr import SCPR_GRID_KEY
    from monai_cft.visualize import plot_counterfactual_panel, region_boundaries

    check_file_name(name, "save name", "save_result")
    if volume is not None and SCPR_GRID_KEY not in getattr(result.image, "meta", {}):
        raise ValueError("a volume can only be written for a result of a 3D CCTA volume given with its centreline "
                         "(load_case(volume, centerline)); this one came from an sCPR image.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cf, diff = result.counterfactual, result.difference
    spatial_dims = cf.ndim - 1
    affine = _affine4(cf.affine if hasattr(cf, "affine") else torch.eye(spatial_dims + 1), spatial_dims)
    paths = {
        "counterfactual": save_nifti(to_plain_tensor(cf)[0].numpy(), affine, out / f"{name}_cf.nii.gz", np.float32),
        "difference": save_nifti(to_plain_tensor(diff)[0].numpy(), affine, out / f"{name}_diff.nii.gz", np.float32),
    }
    paths["panel"] = plot_counterfactual_panel(
        to_plain_tensor(result.image), to_plain_tensor(cf), out / f"{name}_panel.png", difference=to_plain_tensor(diff),
        boundaries=region_boundaries(result.region_masks), title=describe_result(result),
        window=result.hu_window, spacing=result.spacing,
    )
    values = {
        "mode": result.mode,
        "intervention": result.intervention,
        "variables": {
            k: {"factual": result.variables[k], "measured_factual": result.measured_factual[k],
                "intended": result.intended[k], "measured": result.measured[k]}
            for k in result.variables
        },
    }
    paths["values"] = save_json(values, out / f"{name}_values.json")
    if volume is not None:
        from monai_cft.transforms.unstraighten import UnstraightenCPR

        cf_vol = UnstraightenCPR(mode="bilinear")(volume.float(), result.counterfactual, result.image)
        paths["volume"] = save_nifti(to_plain_tensor(cf_vol)[0].numpy(), _affine4(volume.affine, 3),
                                     out / f"{name}_cf_volume.nii.gz", np.float32)
    return {k: str(v) for k, v in paths.items()}
