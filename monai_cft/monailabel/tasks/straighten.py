"""``straighten``: a 3D CCTA volume and its centreline -> the sCPR image and its nine measurements."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferType

from monai_cft.monailabel.inputs import RequestError, load_volume, resolve_centerline
from monai_cft.monailabel.models import ModelStore
from monai_cft.monailabel.tasks.base import CFTInferTask, measure_variables, scpr_spacing

__all__ = ["StraightenTask"]


class StraightenTask(CFTInferTask):
    """Straightened curved planar reformation (sCPR) of a 3D CCTA volume along its centreline.

    Input: a (X, Y, Z) NIfTI volume in HU (datastore image or uploaded file) and a centreline in
    world mm, RAS, ostium first (see :func:`~monai_cft.monailabel.inputs.resolve_centerline`).
    Output: the (H, W) float32 sCPR in HU at the models' geometry (the guidance segmentor's preset:
    0.5 mm, 32 x 192 for ``quick``), affine ``diag(spacing, spacing, spacing, 1)`` as
    ``python -m monai_cft.data.prepare`` writes it; padding outside the volume is -1024 HU. The JSON
    result has ``variables`` (the nine regional areas in mm^2 measured by the guidance segmentor)
    and ``geometry``. Params: ``centerline``, ``angle`` (degrees about the vessel, default 0).

    Example (server running, ``docs/monailabel.md``)::

        curl -X POST "$S/infer/straighten?image=ct_0007&output=image" -F "label=@centerline.csv" -o scpr.nii.gz
    """

    def __init__(self, store: ModelStore) -> None:
        _, meta = store.segmentor()
        super().__init__(store, InferType.OTHERS, None,
                         "sCPR straightening of a 3D CCTA volume along its centreline (+ nine measurements)",
                         dimension=3, config={"angle": 0.0})

    def load(self, data: dict) -> dict:
        volume, affine = load_volume(data.get("image"))
        data["centerline_points"], data["centerline_source"] = resolve_centerline(data, data.get("image_info"))
        try:
            data["angle"] = float(data.get("angle", 0.0))
        except (TypeError, ValueError):
            raise RequestError(f"parameter 'angle' must be a number of degrees, got {data.get('angle')!r}.") from None
        if not np.isfinite(data["angle"]):
            raise RequestError(f"parameter 'angle' must be finite, got {data['angle']}.")
        data["volume"], data["volume_affine"] = volume, affine
        return data

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict:
        from monai.data import MetaTensor

        from monai_cft.data.prepare import build_prepare_transform
        from monai_cft.transforms.cpr import SCPR_VALID_COLUMNS_KEY

        segmentor, meta = self.store.segmentor()
        spacing, size = scpr_spacing(meta), tuple(int(v) for v in meta["img_size"])
        transform = build_prepare_transform(spacing, size, data["angle"], keys=["image"], load=False)
        image = MetaTensor(torch.as_tensor(data["volume"])[None], affine=torch.as_tensor(data["volume_affine"]))
        try:
            out = transform({"image": image, "centerline": data["centerline_points"]})["image"]
        except Exception as err:  # MONAI wraps the transform's ValueError in a RuntimeError
            cause = err.__cause__ if err.__cause__ is not None else err
            if isinstance(cause, ValueError):
                raise RequestError(f"straightening along {data['centerline_source']} failed: {cause}") from None
            raise
        hu = out[0].detach().cpu().numpy().astype(np.float32)
        data["pred"], data["pred_affine"], data["pred_dtype"] = hu, np.asarray(out.affine, dtype=np.float64), np.float32
        data["result"] = {
            "variables": measure_variables(segmentor, meta, hu),
            "geometry": {
                "spacing_mm": spacing,
                "shape": list(size),
                "angle_deg": data["angle"],
                "valid_columns": int(out.meta.get(SCPR_VALID_COLUMNS_KEY, size[-1])),
                "centerline_source": data["centerline_source"],
                "centerline_points": int(len(data["centerline_points"])),
            },
            "units": {"variables": "mm^2", "image": "HU"},
        }
        return data
