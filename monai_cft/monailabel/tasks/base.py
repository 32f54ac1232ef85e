"""Shared parts of the monai-cft MONAI Label infer tasks: loading checks, measuring, writing NIfTI.

Each task is a ``monailabel.tasks.infer.basic_infer.BasicInferTask``: ``pre_transforms`` is one
loader that checks the request and reads the image, ``run_inferer`` runs monai-cft, ``writer``
writes the result NIfTI atomically (:func:`monai_cft.utils.io.save_nifti`) to a temporary file that
the MONAI Label endpoint sends back and then deletes. No task saves anything into the datastore.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monailabel.tasks.infer.basic_infer import BasicInferTask

from monai_cft.monailabel.models import ModelStore
from monai_cft.monailabel.inputs import RequestError

__all__ = ["CFTInferTask", "measure_variables", "scpr_spacing", "check_spacing"]


def scpr_spacing(meta: Mapping[str, Any]) -> float:
    """Pixel size (mm) of the sCPR images a checkpoint was trained on (its meta, else its preset's)."""
    from monai_cft.data.presets import get_scpr_preset

    if meta.get("spacing") is not None:
        return float(meta["spacing"])
    return float(get_scpr_preset(meta.get("preset", "quick"))["spacing"])


def check_spacing(affine: np.ndarray, spacing: float, name: str) -> None:
    """Raise :class:`RequestError` when an sCPR's in-plane pixel size is not the models' ``spacing`` (mm)."""
    zooms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :2], axis=0)
    if not np.allclose(zooms, spacing, rtol=0.01):
        raise RequestError(
            f"sCPR image {name!r} has pixel spacing {[round(float(z), 4) for z in zooms]} mm; the models take "
            f"{spacing} mm (straighten the volume with the 'straighten' task at the models' geometry)."
        )


@torch.no_grad()
def measure_variables(segmentor: torch.nn.Module, meta: Mapping[str, Any], hu: np.ndarray | torch.Tensor,
                      boundaries: Sequence[float] | None = None) -> dict[str, float]:
    """The nine regional variables (mm^2) the segmentor measures on an (H, W) sCPR image in HU.

    Soft areas (sum of softmax probabilities per region, as in the pipeline's measurements) of every
    structure in ``meta["structures"]`` inside the positional regions ``meta["regions"]``.
    """
    from monai_cft.constants import HU_WINDOW
    from monai_cft.transforms.intensity import HUWindow
    from monai_cft.metrics.effectiveness import measure_with_segmentor
    from monai_cft.transforms.regions import RegionMasks
    from monai_cft.variables import DEFAULT_BOUNDARIES, variable_names

    x = torch.as_tensor(np.asarray(hu, dtype=np.float32))[None, None]
    window = meta.get("hu_window") or HU_WINDOW
    masks = RegionMasks(boundaries=boundaries or meta.get("boundaries") or DEFAULT_BOUNDARIES,
                        names=meta["regions"])(x[0])
    structures = dict(meta["structures"])
    areas = measure_with_segmentor(segmentor, HUWindow(window)(x), torch.as_tensor(masks).float(),
                                   list(structures.values()), scpr_spacing(meta) ** 2)
    names = variable_names(structures, meta["regions"])
    return dict(zip(names, (float(v) for v in areas.flatten().tolist())))


class CFTInferTask(BasicInferTask):
    """Base of the monai-cft infer tasks (subclasses implement ``load`` and ``run_inferer``).

    ``data["pred"]`` holds the output array, ``data["pred_affine"]`` its (4, 4) affine,
    ``data["pred_dtype"]`` its on-disk dtype, ``data["pred_shape"]`` (optional) the shape to write it
    in (the input file's, so that an (H, W, 1) sCPR gets an (H, W, 1) result) and ``data["result"]``
    the JSON result.
    """

    def __init__(self, store: ModelStore, type: Any, labels: Any, description: str, dimension: int = 2,
                 config: dict | None = None) -> None:
        super().__init__(path=None, network=None, type=type, labels=labels, dimension=dimension,
                         description=description, config=config)
        self.store = store

    def is_valid(self) -> bool:
        return True

    def pre_transforms(self, data=None):
        return [self.load]

    def post_transforms(self, data=None):
        return []

    def load(self, data: dict) -> dict:
        raise NotImplementedError

    def writer(self, data: Mapping[str, Any], extension=None, dtype=None) -> tuple[str, dict]:
        from monai_cft.utils.io import save_nifti

        fd, path = tempfile.mkstemp(prefix="monai_cft_", suffix=".nii.gz")
        os.close(fd)
        pred = np.asarray(data["pred"])
        shape = data.get("pred_shape")  # the input file's shape, e.g. (H, W, 1) as 3D Slicer writes 2D images
        pred = pred.reshape(shape) if shape is not None and int(np.prod(shape)) == pred.size else pred
        save_nifti(pred, data["pred_affine"], path, data.get("pred_dtype", np.float32))
        return path, dict(data["result"])
