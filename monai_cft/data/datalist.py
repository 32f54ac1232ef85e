"""Deterministic train / validation / test splits and datalists for raw dataset folders.

``python -m monai_cft.data.datalist --data-dir RAW`` writes ``RAW/dataset.json`` for a folder of a
user's own data laid out as ``images/<id>.nii.gz``, ``centerlines/<id>.<csv|txt|npy|json|fcsv>``
and optionally ``labels/<id>.nii.gz`` (see ``docs/data.md``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_cft.utils.io import DEFAULT_SPLITS, save_json
from monai_cft.variables import DEFAULT_STRUCTURES
from monai_cft.utils.cli import count_arg, number_arg, run_cli

__all__ = ["split_ids", "make_datalist", "IMAGE_SUFFIXES", "CENTERLINE_SUFFIXES", "LABEL_NAMES", "main"]

#: image / label file endings recognised by :func:`make_datalist`.
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
#: centreline file endings recognised by :func:`make_datalist` (see ``io.load_centerline``).
CENTERLINE_SUFFIXES: tuple[str, ...] = (".mrk.json", ".csv", ".txt", ".npy", ".json", ".fcsv")
#: names of the label values, as written into datalists.
LABEL_NAMES: dict[str, str] = {"0": "background", **{str(v): k for k, v in DEFAULT_STRUCTURES.items()}}


def split_ids(
    ids: Sequence[str], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[str]]:
    """Assign ids to training / validation / test, deterministically for a given seed.

    The sorted ids are shuffled with ``numpy.random.default_rng([seed, 1])`` and cut by ``fractions``
    (training, validation, test; rounded, each non-zero fraction gets at least one id once there
    are three or more, and training always keeps at least one).

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` with each list sorted.
    """
    ids = sorted(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique.")
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {list(fractions)}.")
    n = len(ids)
    counts = [int(round(f * n)) for f in fractions[1:]]
    if n >= 3:
        counts = [max(1, c) if f > 0 else 0 for c, f in zip(counts, fractions[1:])]
    while n > 0 and sum(counts) > n - 1:
        counts[int(np.argmax(counts))] -= 1
    order = np.random.default_rng([int(seed), 1]).permutation(n)
    shuffled = [ids[i] for i in order]
    n_val, n_test = counts
    return {
        "training": sorted(shuffled[n_val + n_test :]),
        "validation": sorted(shuffled[:n_val]),
        "test": sorted(shuffled[n_val : n_val + n_test]),
    }


def _index(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Map case id (file name without its suffix) -> file, for files with one of ``suffixes``."""
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        for suffix in suffixes:  # longest suffixes first where they overlap (.mrk.json / .json)
            if path.name.lower().endswith(suffix):
                case = path.name[: -len(suffix)]
                if case in out:
                    raise ValueError(f"two files for case {case!r} in {str(folder)!r}: {out[case].name}, {path.name}.")
                out[case] = path
                break
    return out


def make_datalist(
    data_dir: str | Path,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    write: bool = True,
) -> dict[str, Any]:
    """Build (and write) ``<data_dir>/dataset.json`` for a raw folder of images and centrelines.

    Cases are matched by file name: ``images/<id>.nii.gz`` needs ``centerlines/<id>.csv`` (or another
    centreline format); ``labels/<id>.nii.gz`` is used when present.

    Raises:
        ValueError: no images, or images without a centreline (listed by name), or labels /
            centrelines without an image.
    """
    root = Path(data_dir)
    images = _index(root / "images", IMAGE_SUFFIXES)
    centerlines = _index(root / "centerlines", CENTERLINE_SUFFIXES)
    labels = _index(root / "labels", IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {str(root / 'images')!r}.")
    no_cl = sorted(set(images) - set(centerlines))
    if no_cl:
        raise ValueError(f"image(s) without a centreline in {str(root / 'centerlines')!r}: {no_cl[:20]}.")
    orphans = sorted((set(centerlines) | set(labels)) - set(images))
    if orphans:
        raise ValueError(f"centreline(s) / label(s) without an image: {orphans[:20]}.")
    splits = split_ids(sorted(images), fractions, seed)
    data: dict[str, Any] = {"name": root.name, "description": "raw dataset (monai-cft layout)", "labels": LABEL_NAMES}
    for split in DEFAULT_SPLITS:
        items = []
        for case in splits[split]:
            item = {"id": case, "image": images[case].relative_to(root).as_posix()}
            if case in labels:
                item["label"] = labels[case].relative_to(root).as_posix()
            item["centerline"] = centerlines[case].relative_to(root).as_posix()
            items.append(item)
        data[split] = items
    if write:
        save_json(data, root / "dataset.json")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write ``dataset.json`` for a raw folder of a user's images and centrelines."""
    parser = argparse.ArgumentParser(prog="python -m monai_cft.data.datalist", description=main.__doc__)
    parser.add_argument("--data-dir", required=True, help="raw folder with images/, centerlines/ [, labels/]")
    parser.add_argument("--fractions", type=number_arg(0.0, 1.0), nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=count_arg(0), default=0)
    args = parser.parse_args(argv)
    data = make_datalist(args.data_dir, args.fractions, args.seed)
    counts = {s: len(data[s]) for s in DEFAULT_SPLITS}
    print(f"wrote {Path(args.data_dir) / 'dataset.json'}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
