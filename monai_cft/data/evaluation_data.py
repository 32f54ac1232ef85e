"""The evaluated split and its ground truth, loaded for :mod:`monai_cft.evaluation`.

* :func:`load_split_tensors`: a prepared sCPR split as tensors (images scaled to [-1, 1], variables,
  region masks, pixel area);
* :func:`load_ground_truth`: the ground-truth counterfactuals of
  :mod:`monai_cft.data.ground_truth`, aligned with the evaluated cases.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import LoadImage

from monai_cft.data.dataset import load_prepare_config, load_scpr_datalist
from monai_cft.constants import HU_WINDOW
from monai_cft.transforms.intensity import HUWindow
from monai_cft.transforms.regions import RegionMasks

__all__ = ["load_split_tensors", "load_ground_truth"]


def load_split_tensors(dataset_dir: str | os.PathLike, split: str, max_cases: int | None = None,
                       device: str | torch.device = "cpu") -> dict:
    """Load one split of a prepared sCPR dataset into memory for evaluation.

    Returns:
        dict with ``images`` (N, 1, H, W) scaled from the config's HU window to [-1, 1],
        ``variables`` (N, V) mm^2, ``region_masks`` (K, H, W) from the config's boundaries,
        ``element_size`` (pixel area, mm^2), ``ids`` and the prepared dataset's ``config``.
    """
    config = load_prepare_config(dataset_dir)
    items = load_scpr_datalist(dataset_dir, split)
    if max_cases is not None:
        items = items[: int(max_cases)]
    if not items:
        raise ValueError(f"split {split!r} of {str(dataset_dir)!r} has no cases to evaluate.")
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    images = torch.stack([torch.as_tensor(loader(it["image"])).float() for it in items])
    images = HUWindow(config.get("hu_window", HU_WINDOW))(images).to(device)
    variables = torch.tensor([it["variables"] for it in items], dtype=torch.float32, device=device)
    masks = RegionMasks(boundaries=config["boundaries"], names=config["regions"])(images[0].cpu())
    return {
        "images": images,
        "variables": variables,
        "region_masks": torch.as_tensor(masks).float().to(device),
        "element_size": float(config["spacing"]) ** (images.ndim - 2),
        "ids": [it["id"] for it in items],
        "config": config,
    }


def load_ground_truth(path: str | os.PathLike, case_ids: Sequence[str], names: Sequence[str]) -> dict:
    """Read a ground-truth ``.npz`` (``python -m monai_cft.data.ground_truth``) aligned with ``case_ids``.

    The file holds ``ids`` (M,) str, ``names`` (V,) str, ``targets`` (M, V) float32 mm^2, ``images``
    (M, V, H, W) float32 HU, ``hit`` (M, V) bool and optionally ``labels`` (M, V, H, W) uint8 and
    ``variables`` (M, V, V) mm^2.

    Returns:
        ``{"images", "targets", "hit"[, "variables"]}`` numpy arrays whose first axis follows
        ``case_ids`` (the ``ground_truth`` argument of :func:`evaluate_counterfactuals`).

    Raises:
        ValueError: a required array is missing, the variable names differ from ``names``, or some
            evaluated cases have no ground truth (they are named).
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as f:
        missing = [key for key in ("ids", "names", "targets", "images", "hit") if key not in f.files]
        if missing:
            raise ValueError(f"{path} lacks the arrays {missing}; it has {sorted(f.files)}.")
        gt_names = [str(s) for s in f["names"]]
        if gt_names != list(names):
            raise ValueError(f"{path} holds the variables {gt_names}, but the dataset's are {list(names)}.")
        pos = {str(cid): i for i, cid in enumerate(f["ids"])}
        absent = [cid for cid in case_ids if cid not in pos]
        if absent:
            shown = ", ".join(repr(c) for c in absent[:10]) + (", ..." if len(absent) > 10 else "")
            raise ValueError(f"{path} has no ground truth for {len(absent)} of the {len(case_ids)} evaluated cases: "
                             f"{shown}.")
        idx = np.array([pos[cid] for cid in case_ids], dtype=np.int64)
        return {key: f[key][idx] for key in ("images", "targets", "hit", "variables") if key in f.files}
