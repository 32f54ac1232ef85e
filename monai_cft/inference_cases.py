"""Load one inference case: a prepared sCPR image, or a 3D CCTA volume straightened along its centreline.

:func:`load_case` turns what a user has (a NIfTI path, an array, a ``MetaTensor``; optionally a
centreline) into what :class:`~monai_cft.inference.CounterfactualPipeline` takes: the model-sized
sCPR image in HU as a ``MetaTensor`` with its affine, plus the volume it was straightened from (to
write a counterfactual back into it, :func:`monai_cft.inference_output.save_result`)::

    case = load_case("ccta.nii.gz", "lad_centerline.json", **pipe.geometry)
    result = pipe(case.image, None, {"calcified_mid": "+20"})
    save_result(result, "out", name="case_0001", volume=case.volume)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["Case", "load_case"]


class Case(NamedTuple):
    """One loaded case.

    Attributes:
        image: (1, *img_size) sCPR image in HU, float32 ``MetaTensor`` with the sCPR affine (and, for a
            straightened volume, the sampling grid in its meta).
        volume: the (1, X, Y, Z) volume the sCPR was straightened from, ``None`` for an sCPR input.
    """

    image: torch.Tensor
    volume: torch.Tensor | None


def load_case(image: Any, centerline: Any | None = None, *, img_size: Sequence[int], spacing: float) -> Case:
    """Load a case at the model's geometry (``CounterfactualPipeline.geometry`` gives both keywords).

    Args:
        image: a NIfTI path, or an array / tensor / ``MetaTensor``: a (1, *img_size) or (*img_size) sCPR
            image, or (with ``centerline``) a (1, X, Y, Z) / (X, Y, Z) volume, in HU.
        centerline: (N, 3) world-mm points (RAS, ostium first) or a centreline file (``.csv``,
            ``.npy``, ``.json``, ``.fcsv``); the volume is then straightened at ``spacing`` to
            ``img_size`` with :class:`~monai_cft.transforms.cpr.StraightenCPR`, its sampling grid recorded.
        img_size: the model's image size, (H, W) for 2D models or (H, H, W) for 3D ones.
        spacing: the model's pixel size (mm).

    Raises:
        FileNotFoundError: the image file does not exist.
        TypeError: an image that is neither a path nor an array / tensor.
        ValueError: a centreline with a 2D image, or the centreline problems of ``StraightenCPR``.
    """
    from monai.data import MetaTensor
    from monai.transforms import LoadImage

    img_size = tuple(int(s) for s in img_size)
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file {str(image)!r} does not exist.")
        img = LoadImage(image_only=True, ensure_channel_first=True)(str(image))
    elif isinstance(image, (torch.Tensor, np.ndarray)):
        img = image if isinstance(image, MetaTensor) else MetaTensor(torch.as_tensor(image))
    else:
        raise TypeError(f"image must be a file path, a numpy array or a tensor, got {type(image).__name__}.")
    if centerline is None:
        if img.ndim == len(img_size):
            img = img.unsqueeze(0)
        return Case(img.float(), None)
    from monai_cft.transforms.cpr import StraightenCPR

    if img.ndim == 3:
        img = img.unsqueeze(0)
    if img.ndim != 4:
        raise ValueError(f"with a centreline the image must be a 3D volume (X, Y, Z), got shape {tuple(img.shape)}.")
    if isinstance(centerline, (str, os.PathLike)):
        from monai_cft.utils.io import load_centerline

        centerline = load_centerline(centerline)
    cpr = StraightenCPR(output_size=(img_size[0], img_size[-1]), spacing=float(spacing), out_dims=len(img_size),
                        record_grid=True)  # the grid writes a counterfactual back into the volume
    return Case(cpr(img.float(), centerline).float(), img)
