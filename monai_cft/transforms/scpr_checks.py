"""Argument and input checks shared by the sCPR transforms (straightening and its inverse)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from .centerline import positive_float

__all__ = ["SUPPORTED_MODES", "check_mode", "check_padding", "check_geometry", "image_and_affine",
           "check_finite_output", "centerline_list"]

SUPPORTED_MODES = ("bilinear", "nearest")


def check_mode(mode: Any) -> str:
    m = str(getattr(mode, "value", mode)).lower()
    if m == "bicubic":
        raise ValueError(
            "mode 'bicubic' is not supported: torch grid_sample has no cubic interpolation for 3D "
            "volumes; use 'bilinear' (trilinear) for images or 'nearest' for label maps."
        )
    if m not in SUPPORTED_MODES:
        raise ValueError(f"mode must be one of {SUPPORTED_MODES}, got {mode!r}.")
    return m


def check_padding(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"padding_value must be a number, got {value!r}.") from e
    if math.isnan(v):
        raise ValueError("padding_value must not be NaN.")
    return v


def check_geometry(
    output_size: Any, spacing: Any, angle: Any, out_dims: Any
) -> tuple[tuple[int, int], float, float, int]:
    try:
        if isinstance(output_size, (str, bytes)):
            raise TypeError("text")
        size = tuple(int(s) for s in output_size)
    except (TypeError, ValueError) as e:
        raise TypeError(f"output_size must be a pair (H, W) of positive ints, got {output_size!r}.") from e
    if len(size) != 2 or min(size) < 1 or any(float(s) != float(o) for s, o in zip(size, output_size)):
        raise ValueError(f"output_size must be a pair (H, W) of positive ints, got {output_size!r}.")
    try:
        ang = float(angle)
    except (TypeError, ValueError) as e:
        raise TypeError(f"angle must be a number of degrees, got {angle!r}.") from e
    if not math.isfinite(ang):
        raise ValueError(f"angle must be finite, got {angle!r}.")
    if out_dims not in (2, 3) or isinstance(out_dims, bool):
        raise ValueError(f"out_dims must be 2 (a plane) or 3 (a straightened volume), got {out_dims!r}.")
    return size, positive_float(spacing, "spacing"), ang, int(out_dims)


def image_and_affine(img: Any, affine: Any | None, name: str = "img") -> tuple[torch.Tensor, torch.Tensor]:
    """Return the image tensor (C, X, Y, Z) and its float64 (4, 4) voxel -> world affine."""
    if not isinstance(img, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a MetaTensor (or a tensor / ndarray with affine=), got {type(img).__name__}.")
    if affine is None:
        if not isinstance(img, MetaTensor):
            raise TypeError(
                f"{name} is a plain {type(img).__name__} without geometry: pass a MetaTensor whose affine maps "
                "voxel indices to world mm (as LoadImage returns it), or give affine= explicitly."
            )
        affine = img.affine
    if isinstance(affine, torch.Tensor):
        affine = (affine.as_tensor() if isinstance(affine, MetaTensor) else affine).detach().cpu().numpy()
    aff = np.array(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise ValueError(f"the affine of {name} must be a finite 4 x 4 matrix, got shape {tuple(aff.shape)}.")
    if abs(float(np.linalg.det(aff[:3, :3]))) < 1e-12:
        raise ValueError(f"the affine of {name} is singular: {aff.tolist()}.")
    aff = torch.from_numpy(aff)
    data = img if isinstance(img, torch.Tensor) else torch.as_tensor(img)
    if data.ndim != 4:
        raise ValueError(f"{name} must be channel-first 3D (C, X, Y, Z), got shape {tuple(data.shape)}.")
    if min(data.shape[1:]) < 2:
        raise ValueError(f"{name} needs at least 2 voxels along every spatial axis, got shape {tuple(data.shape)}.")
    return data, aff


def check_finite_output(out: torch.Tensor, source: torch.Tensor, name: str = "img") -> None:
    """Raise when the values sampled from a floating-point ``source`` are not finite (NaN / inf voxels where
    the sCPR samples it); integer volumes cannot hold them and are not checked."""
    if not (source.is_floating_point() or source.is_complex()):
        return
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(
            f"{name} has NaN or infinite voxels where the sCPR samples it ({bad} of {out.numel()} output values "
            "are not finite); straightening would spread them into the sCPR. Replace them first (e.g. with the "
            "padding value, torch.nan_to_num) or fix the file."
        )


def centerline_list(value: Any) -> tuple[list[Any], bool]:
    """``(centrelines, several)``: a list / tuple whose first item is itself a centreline ((N, 3) array,
    tensor, nested list or a path), or a (K, N, 3) array, holds several centrelines; anything else is one.
    Paths are read with ``monai_cft.utils.io.load_centerline``."""
    several = False
    if isinstance(value, (list, tuple)) and len(value) > 0:
        first = value[0]
        several = isinstance(first, (str, os.PathLike)) or np.ndim(
            first.detach().cpu() if isinstance(first, torch.Tensor) else first) == 2
    elif isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 3:
        several = True
    items = list(value) if several else [value]
    return [load_centerline_value(v) for v in items], several


def load_centerline_value(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        try:
            from monai_cft.utils.io import load_centerline
        except ImportError as e:
            raise ImportError(
                f"the centreline {str(value)!r} is a path, which needs monai_cft.utils.io.load_centerline "
                f"(not importable: {e}); pass the (N, 3) points instead."
            ) from e
        return load_centerline(value)
    return value
