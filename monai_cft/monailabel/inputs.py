"""Reading and checking what a MONAI Label request gives the monai-cft tasks (no MONAI Label import).

Every problem with a request raises :class:`RequestError` (a ``ValueError``) whose message names the
bad value, what was expected and where it came from; the app turns it into an HTTP 400 answer
(:mod:`monai_cft.monailabel.main`). Shapes: a 3D CCTA volume is (X, Y, Z) voxels, HU, with a (4, 4)
voxel -> world (RAS mm) affine; an sCPR image is (H, W) pixels, HU (a NIfTI with a trailing
singleton axis, (H, W, 1), as 3D Slicer writes 2D images, is accepted).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RequestError",
    "parse_params",
    "get_int",
    "load_nifti",
    "load_scpr",
    "file_shape",
    "load_volume",
    "resolve_centerline",
]


class RequestError(ValueError):
    """A request the task cannot serve (bad parameter, image or centreline): HTTP 400."""


def parse_params(value: Any, what: str = "params") -> dict:
    """A JSON object given as a dict or as its text."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RequestError(f"{what} {value[:80]!r} is not valid JSON: {err}.") from None
    if not isinstance(value, Mapping):
        raise RequestError(f"{what} must be a JSON object, got {type(value).__name__} {value!r}.")
    return dict(value)


def get_int(request: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    """``request[key]`` as an integer in ``[lo, hi]`` (``default`` when absent)."""
    value = request.get(key, default)
    try:
        number = int(value)
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()) or number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise RequestError(f"parameter {key!r} must be an integer in [{lo}, {hi}], got {value!r}.") from None
    if not lo <= number <= hi:
        raise RequestError(f"parameter {key!r} = {number} is outside [{lo}, {hi}].")
    return number


def load_nifti(path: Any, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """(array float32 in voxel order, (4, 4) float64 affine) of a NIfTI file."""
    import nibabel as nib

    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise RequestError(f"no {what} given: pass ?image=<datastore id> or upload the file.")
    if not Path(path).is_file():
        raise RequestError(f"{what} file {str(path)!r} does not exist.")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises several types for files that are not NIfTI
        raise RequestError(f"{what} {Path(path).name!r} is not a readable NIfTI image ({type(err).__name__}: {err}).") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(data).all():
        raise RequestError(f"{what} {Path(path).name!r} has {int((~np.isfinite(data)).sum())} NaN or infinite voxels.")
    return data, affine


def load_scpr(path: Any, img_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """An sCPR image (H, W) in HU of the model's size and its (4, 4) affine (an (H, W, 1) file is
    read as (H, W); :func:`file_shape` gives the shape to write results back in).

    Raises:
        RequestError: not 2D (a 3D volume must go through the ``straighten`` task first), or not
            ``img_size``.
    """
    data, affine = load_nifti(path)
    data = data[:, :, 0] if data.ndim == 3 and data.shape[2] == 1 else data
    size = tuple(int(v) for v in img_size)
    if data.ndim != len(size):
        hint = " (straighten a 3D CCTA volume with the 'straighten' task first)" if data.ndim == 3 else ""
        raise RequestError(
            f"image {Path(path).name!r} has {data.ndim} dimensions {tuple(data.shape)}; this task takes a "
            f"{len(size)}D sCPR image of shape {size}{hint}."
        )
    if tuple(data.shape) != size:
        raise RequestError(f"sCPR image {Path(path).name!r} has shape {tuple(data.shape)}; the models take {size}.")
    return data, affine


def file_shape(path: Any) -> tuple[int, ...]:
    """The array shape stored in a NIfTI file (e.g. (H, W) or (H, W, 1)), read from its header."""
    import nibabel as nib

    return tuple(int(v) for v in nib.load(str(path)).shape)


def load_volume(path: Any) -> tuple[np.ndarray, np.ndarray]:
    """A 3D CCTA volume (X, Y, Z) in HU and its (4, 4) voxel -> world (RAS mm) affine."""
    data, affine = load_nifti(path)
    if data.ndim != 3 or min(data.shape) < 2:
        raise RequestError(
            f"image {Path(path).name!r} has shape {tuple(data.shape)}; straightening needs a 3D CCTA volume "
            "(X, Y, Z), each at least 2 voxels."
        )
    return data, affine


def resolve_centerline(request: Mapping[str, Any], image_info: Mapping[str, Any] | None) -> tuple[np.ndarray, str]:
    """The centreline of a straighten request, (N, 3) float64 world mm (RAS), ostium first, and its source.

    Looked up in this order:

    1. a file uploaded with the request (the ``label`` form field of ``POST /infer``; its name's
       extension picks the format: ``.csv``, ``.txt``, ``.npy``, ``.json``, ``.mrk.json``, ``.fcsv``);
    2. ``params["centerline"]``: a list of ``[x, y, z]`` points or a path on the server;
    3. the image's datastore info ``"centerline"`` (points or a path, given when the image was uploaded).
    """
    from monai_cft.utils.io import load_centerline

    candidates = [
        ("the uploaded centreline file", request.get("label")),
        ("params 'centerline'", request.get("centerline")),
        ("the image's datastore info 'centerline'", (image_info or {}).get("centerline")),
    ]
    for source, value in candidates:
        if value is None or (isinstance(value, (str, list)) and not value):
            continue
        try:
            if isinstance(value, (str, os.PathLike)):
                return load_centerline(value), f"{source} ({Path(value).name})"
            return _points(value, source), source
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise RequestError(f"centreline from {source}: {err}") from None
    raise RequestError(
        "no centreline: upload the centreline file with the image (form field 'label'), give "
        "params {\"centerline\": [[x, y, z], ...] or a server path}, or store \"centerline\" in the image's info."
    )


def _points(value: Any, source: str) -> np.ndarray:
    """Inline centreline points: (N, 3) finite world mm, N >= 2."""
    pts = np.asarray(value, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] < 2:
        raise ValueError(f"expected a list of at least 2 points [x, y, z] (world mm), got shape {pts.shape}.")
    if not np.isfinite(pts).all():
        raise ValueError("the points contain non-finite coordinates.")
    return pts
