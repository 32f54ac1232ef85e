"""Helpers shared by tests in several folders (``tests/`` is on ``sys.path`` through its conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monai_cft.data.prepare import PREPARE_CONFIG
from monai_cft.data.presets import SCPR_PRESETS
from monai_cft.utils.io import save_json, save_nifti
from monai_cft.variables import DEFAULT_REGIONS, DEFAULT_STRUCTURES, variable_names

#: the repository root (tests/ is one level below it).
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
COMMON = str(CONFIGS / "common.json")
VARIABLES = variable_names(DEFAULT_STRUCTURES, DEFAULT_REGIONS)


def model_meta(prep: dict, **extra) -> dict:
    """Checkpoint meta of a quick-preset 2D model trained on the prepared dataset ``prep`` (its config)."""
    base = {
        "preset": "quick",
        "variables": VARIABLES,
        "ranges": prep["ranges"],
        "structures": dict(DEFAULT_STRUCTURES),
        "regions": list(DEFAULT_REGIONS),
        "spatial_dims": 2,
        "img_size": [32, 192],
        "in_channels": 1,
    }
    return {**base, **extra}


def _case(rng: np.random.Generator, h: int = 32, w: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """A straightened-vessel-like image (HU) and its label: a lumen band with plaques in random thirds."""
    label = np.zeros((h, w), np.uint8)
    half = int(rng.integers(2, 5))
    label[h // 2 - half : h // 2 + half, :] = 1
    for third in range(3):
        c0 = third * w // 3
        for value, row in ((2, h // 2 - half - 2), (3, h // 2 + half)):
            if rng.random() < 0.7:
                start = c0 + int(rng.integers(2, 30))
                label[row : row + 2, start : start + int(rng.integers(3, 20))] = value
    hu = np.choose(label, [-80.0, 330.0, 780.0, 50.0]) + rng.normal(0.0, 15.0, (h, w))
    return hu.astype(np.float32), label


def make_scpr_dataset(root: Path, n_train: int = 6, n_val: int = 2, n_test: int = 2, seed: int = 0) -> Path:
    """Write a minimal prepared (quick preset) dataset: images, labels, dataset.json, prepare_config.json."""
    rng = np.random.default_rng(seed)
    spacing = SCPR_PRESETS["quick"]["spacing"]
    affine = np.diag([spacing, spacing, 1.0, 1.0])
    splits = {"training": n_train, "validation": n_val, "test": n_test}
    data, k = {}, 0
    for split, n in splits.items():
        data[split] = []
        for _ in range(n):
            cid = f"case_{k:04d}"
            k += 1
            hu, label = _case(rng)
            save_nifti(hu, affine, root / "images" / f"{cid}.nii.gz", dtype=np.int16)
            save_nifti(label, affine, root / "labels" / f"{cid}.nii.gz", dtype=np.uint8)
            thirds = np.array_split(np.arange(label.shape[1]), 3)
            values = [float((label[:, cols] == v).sum() * spacing**2) for v in DEFAULT_STRUCTURES.values() for cols in thirds]
            item = {"id": cid, "image": f"images/{cid}.nii.gz", "label": f"labels/{cid}.nii.gz", "variables": values}
            item.update(zip(VARIABLES, values))
            data[split].append(item)
    train = np.array([it["variables"] for it in data["training"]])
    lo, hi = train.min(0), train.max(0)
    hi = np.where(hi > lo, hi, lo + 1.0)  # keep every range non-degenerate
    config = {
        "preset": "quick",
        "spacing": spacing,
        "output_size": list(SCPR_PRESETS["quick"]["output_size"]),
        "structures": dict(DEFAULT_STRUCTURES),
        "regions": list(DEFAULT_REGIONS),
        "boundaries": [1 / 3, 2 / 3],
        "variables": VARIABLES,
        "ranges": {n: [float(a), float(b)] for n, a, b in zip(VARIABLES, lo, hi)},
    }
    save_json(config, root / PREPARE_CONFIG)
    save_json(data, root / "dataset.json")
    return root
