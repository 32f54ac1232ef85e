"""``segmentation``: the guidance segmentor on an sCPR image -> a label map with named labels."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferType

from monai_cft.monailabel.inputs import file_shape, load_scpr
from monai_cft.monailabel.models import ModelStore
from monai_cft.monailabel.tasks.base import CFTInferTask, check_spacing, measure_variables, scpr_spacing

__all__ = ["SegmentationTask"]


class SegmentationTask(CFTInferTask):
    """Lumen / calcified / non-calcified plaque segmentation of a straightened coronary (sCPR) image.

    Input: an (H, W) (or (H, W, 1)) sCPR NIfTI in HU at the models' geometry. Output: an (H, W)
    uint8 label map with the input's affine, 0 background and the values of ``labels``
    (``{"lumen": 1, "calcified": 2, "noncalcified": 3}``). Type ``segmentation``, so 3D Slicer's
    MONAI Label plugin lists it. Uses the train task's fine-tuned segmentor once one exists, else the
    guidance segmentor. The JSON result has ``variables``: the nine soft areas (mm^2) per region.

    Example (server running, ``docs/monailabel.md``)::

        curl -X POST "$S/infer/segmentation?image=scpr_0007&output=image" -o label.nii.gz
    """

    def __init__(self, store: ModelStore) -> None:
        _, meta = store.segmentor()
        labels = {str(k): int(v) for k, v in meta["structures"].items()}
        super().__init__(store, InferType.SEGMENTATION, labels,
                         "Lumen, calcified and non-calcified plaque on a straightened coronary (sCPR) image",
                         dimension=2)

    def load(self, data: dict) -> dict:
        _, meta = self.store.segmentor(finetuned=True)
        data["scpr"], data["scpr_affine"] = load_scpr(data.get("image"), meta["img_size"])
        check_spacing(data["scpr_affine"], scpr_spacing(meta), str(data.get("image")))
        return data

    @torch.no_grad()
    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict:
        from monai_cft.constants import HU_WINDOW
        from monai_cft.transforms.intensity import HUWindow

        segmentor, meta = self.store.segmentor(finetuned=True)
        x = HUWindow(meta.get("hu_window") or HU_WINDOW)(torch.as_tensor(data["scpr"])[None, None])
        logits = segmentor(x.to(next(segmentor.parameters()).device))
        label = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        data["pred"], data["pred_affine"], data["pred_dtype"] = label, data["scpr_affine"], np.uint8
        data["pred_shape"] = file_shape(data["image"])
        data["result"] = {
            "labels": dict(self.labels),
            "variables": measure_variables(segmentor, meta, data["scpr"]),
            "segmentor": str(meta["path"]),
            "units": {"variables": "mm^2"},
        }
        return data
