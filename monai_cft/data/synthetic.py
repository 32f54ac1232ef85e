"""Write a synthetic CCTA dataset of LAD phantoms in the raw monai-cft layout.

``python -m monai_cft.data.synthetic --out DIR --num-cases N --seed S [--workers W]`` writes::

    DIR/dataset.json              MONAI datalist (training / validation / test, 70 / 15 / 15)
    DIR/images/case_0000.nii.gz   int16 HU, scanner-like affine (RAS)
    DIR/labels/case_0000.nii.gz   uint8: 0 background, 1 lumen, 2 calcified, 3 non-calcified
    DIR/centerlines/case_0000.csv header x,y,z, world mm (RAS), ostium first
    DIR/params/case_0000.json     every generative parameter (``render_phantom`` re-renders it)

Case ``i`` is drawn from the seed ``[S, i]``, so a case does not depend on how many cases are
generated, nor on the number of workers. Existing complete cases with identical parameters are
skipped (an interrupted run resumes); the params JSON is written last and marks a complete case.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_cft.data._parallel import default_workers, parallel_map
from monai_cft.data.datalist import LABEL_NAMES, split_ids
from monai_cft.utils.io import DEFAULT_SPLITS, check_file_name, save_centerline, save_json, save_nifti
from monai_cft.data.phantom import LABELS, PHANTOM_VERSION, PhantomConfig, render_phantom, sample_phantom_params
from monai_cft.utils.cli import count_arg, run_cli

__all__ = ["case_id", "case_paths", "write_case", "generate_dataset", "main"]


def case_id(index: int) -> str:
    """Id of the ``index``-th case: ``case_0000``."""
    return f"case_{int(index):04d}"


def case_paths(case: str) -> dict[str, str]:
    """Paths (relative to the dataset folder) of one case's files."""
    return {
        "image": f"images/{case}.nii.gz",
        "label": f"labels/{case}.nii.gz",
        "centerline": f"centerlines/{case}.csv",
        "params": f"params/{case}.json",
    }


def _is_complete(root: Path, case: str, params: dict[str, Any]) -> bool:
    paths = case_paths(case)
    if not all((root / p).is_file() for p in paths.values()):
        return False
    try:
        saved = json.loads((root / paths["params"]).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    saved.pop("derived", None)
    return saved == params


def write_case(job: tuple[str, str, dict[str, Any], bool]) -> dict[str, Any]:
    """Render one phantom and write its image, label, centreline and params (in that order).

    Args:
        job: ``(out_dir, case_id, params, overwrite)``.

    Returns:
        ``{"id", "image", "label", "centerline", "params", "skipped", "seconds"}``.
    """
    out_dir, case, params, overwrite = job
    check_file_name(case, "case id", "write_case")
    root = Path(out_dir)
    paths = case_paths(case)
    start = time.perf_counter()
    if not overwrite and _is_complete(root, case, params):
        return {"id": case, **paths, "skipped": True, "seconds": 0.0}
    (root / paths["params"]).unlink(missing_ok=True)  # the case is incomplete until its params are back
    phantom = render_phantom(params)
    save_nifti(phantom.image, phantom.affine, root / paths["image"], dtype=np.int16)
    save_nifti(phantom.label, phantom.affine, root / paths["label"], dtype=np.uint8)
    save_centerline(phantom.centerline, root / paths["centerline"])
    derived = {
        "shape": [int(v) for v in phantom.image.shape],
        "affine": phantom.affine.tolist(),
        "centerline_length_mm": float(np.sum(np.linalg.norm(np.diff(phantom.centerline, axis=0), axis=1))),
        "label_voxels": {name: int(np.count_nonzero(phantom.label == v)) for name, v in LABELS.items()},
    }
    save_json({**params, "derived": derived}, root / paths["params"])
    return {"id": case, **paths, "skipped": False, "seconds": time.perf_counter() - start}


def generate_dataset(
    out_dir: str | Path,
    num_cases: int,
    seed: int = 0,
    workers: int | None = None,
    config: PhantomConfig | None = None,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate ``num_cases`` phantoms into ``out_dir`` and write its ``dataset.json``.

    Args:
        out_dir: dataset folder (created).
        num_cases: number of cases (>= 1).
        seed: dataset seed; case ``i`` uses ``[seed, i]``; the split uses ``seed`` too.
        workers: processes (default: all cores); 0 or 1 runs in this process.
        config: phantom distributions (default :class:`PhantomConfig`).
        fractions: training / validation / test fractions.
        overwrite: re-render cases even when complete files with identical parameters exist.
        progress: show a progress bar.

    Returns:
        The datalist written to ``out_dir/dataset.json`` (paths relative to ``out_dir``).
    """
    if int(num_cases) < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}.")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    cfg = config or PhantomConfig()
    ids = [case_id(i) for i in range(int(num_cases))]
    jobs = [(str(root), cid, sample_phantom_params([int(seed), i], cfg), bool(overwrite)) for i, cid in enumerate(ids)]
    results = {r["id"]: r for r in parallel_map(write_case, jobs, workers, desc="phantoms", progress=progress)}
    splits = split_ids(ids, fractions, seed)
    datalist: dict[str, Any] = {
        "name": "monai-cft synthetic LAD CCTA",
        "description": "synthetic coronary CT angiography phantoms of the LAD (monai_cft.data.phantom)",
        "generator": {"module": "monai_cft.data.phantom", "version": PHANTOM_VERSION, "seed": int(seed)},
        "modality": {"0": "CT"},
        "labels": LABEL_NAMES,
        "tensorImageSize": "3D",
        "numCases": len(ids),
    }
    for split in DEFAULT_SPLITS:
        datalist[split] = [
            {"id": cid, **{k: v for k, v in case_paths(cid).items() if k != "params"}} for cid in splits[split]
        ]
    save_json(datalist, root / "dataset.json")
    datalist["_stats"] = {
        "rendered": sum(not r["skipped"] for r in results.values()),
        "skipped": sum(r["skipped"] for r in results.values()),
    }
    return datalist


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: generate a synthetic LAD CCTA dataset."""
    parser = argparse.ArgumentParser(prog="python -m monai_cft.data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--num-cases", type=count_arg(1), required=True)
    parser.add_argument("--seed", type=count_arg(0), default=0)
    parser.add_argument("--workers", type=count_arg(0), default=None, help=f"processes (default: {default_workers()} cores)")
    parser.add_argument("--overwrite", action="store_true", help="re-render existing complete cases")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data = generate_dataset(
        args.out, args.num_cases, args.seed, args.workers, overwrite=args.overwrite, progress=not args.no_progress
    )
    stats = data["_stats"]
    counts = {s: len(data[s]) for s in DEFAULT_SPLITS}
    print(
        f"{args.out}: {stats['rendered']} rendered, {stats['skipped']} already complete, splits {counts} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
