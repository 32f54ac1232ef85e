"""Straighten a raw 3D dataset into the 2D sCPR dataset the networks are trained on.

``python -m monai_cft.data.prepare --data-dir RAW --out SCPR --preset quick|paper [--workers W] [--angle 0]``

For every case of ``RAW/dataset.json`` (synthetic, or a user's own NIfTI volumes and centrelines,
see ``docs/data.md``)::

    LoadImaged (MONAI: world coordinates are RAS mm) -> StraightenCPRd (image bilinear, padding
    -1024 HU; label nearest, padding 0) -> RegionMasksd (proximal / mid / distal thirds)
    -> StructureMeasuresd (lumen / calcified / non-calcified area per region, mm^2)

and writes::

    SCPR/images/<id>.nii.gz       (H, W) float32 HU, affine diag(spacing, spacing, spacing, 1)
    SCPR/labels/<id>.nii.gz       (H, W) uint8 labels (when the raw case has a label)
    SCPR/cases/<id>.csv           the case's nine variables (mm^2); written last: marks a finished case
    SCPR/grids/<id>.npy           (H, W, 3) float32 world mm of every pixel (only with --save-grid)
    SCPR/dataset.json             splits of the raw datalist, items with "variables" and each variable
    SCPR/variables.csv            id, split, the nine variables
    SCPR/prepare_config.json      geometry, names and the training split's [min, max] per variable

Cases whose marker exists are skipped unless ``--overwrite`` (an interrupted run resumes), provided
their image (and label) has the requested geometry (shape and pixel spacing; a case made with other
settings is prepared again, with a warning); every file is written atomically. Cases without a label
are straightened but get no variables. One run at a time per folder: ``SCPR/.prepare.lock`` is held
(``fcntl.flock``) for the whole run, and a second run on the same folder fails at once.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_cft.data._parallel import default_workers, parallel_map
from monai_cft.utils.io import atomic_path, check_file_name, load_centerline, load_datalist, save_csv, save_json, save_nifti
from monai_cft.data.presets import HU_WINDOW, SCPR_PRESETS, get_scpr_preset
from monai_cft.variables import DEFAULT_BOUNDARIES, DEFAULT_REGIONS, DEFAULT_STRUCTURES, variable_names
from monai_cft.utils.cli import count_arg, number_arg, run_cli

__all__ = [
    "PREPARE_CONFIG",
    "VARIABLES_CSV",
    "IMAGE_PADDING_HU",
    "build_prepare_transform",
    "prepare_case",
    "prepare_dataset",
    "main",
]

#: file names at the top of a prepared folder.
PREPARE_CONFIG = "prepare_config.json"
VARIABLES_CSV = "variables.csv"
#: value of sCPR pixels outside the volume (HU); labels are padded with background (0).
IMAGE_PADDING_HU = -1024.0
#: prepare_config keys that must match for an existing folder to be resumed.
_GEOMETRY_KEYS = ("spacing", "output_size", "angle", "structures", "regions", "boundaries")
#: hidden file with the settings of a run, written before any case (guards resuming with other settings).
_SETTINGS = ".prepare_settings.json"
#: lock file held for the whole of a run (one ``prepare`` per folder at a time).
LOCK_FILE = ".prepare.lock"


@contextlib.contextmanager
def _folder_lock(root: Path) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on ``root/.prepare.lock``; fail at once if another run holds it."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RuntimeError(
                f"{str(root)!r} is being prepared by another process (pid {holder}, lock file {str(path)!r}); "
                f"wait for it to finish or use another --out."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def build_prepare_transform(
    spacing: float,
    output_size: Sequence[int],
    angle: float = 0.0,
    with_label: bool = True,
    record_grid: bool = False,
    keys: Sequence[str] | None = None,
    load: bool = True,
):
    """The MONAI pipeline of one case: load, straighten, and (with a label) measure.

    Args:
        spacing: sCPR pixel size (mm).
        output_size: ``(H, W)`` pixels across / along the vessel.
        angle: rotation of the sampling plane about the vessel (degrees).
        with_label: also straighten ``"label"`` and compute the region masks and variables.
        record_grid: keep the world coordinates of every sCPR pixel in the image's meta.
        keys: the images to straighten (default ``("image", "label")`` or ``("image",)`` by
            ``with_label``); ``("label",)`` straightens and measures the label alone.
        load: start with ``LoadImaged`` (paths in); ``False`` takes ``MetaTensor`` (1, X, Y, Z) inputs.

    Returns:
        ``monai.transforms.Compose`` mapping ``{"image": path, ["label": path,] "centerline": path}`` to
        ``image`` (1, H, W), ``label`` (1, H, W), ``regions`` (3, H, W) and ``variables`` (9,) mm^2.
    """
    from monai.transforms import Compose, LoadImaged

    from monai_cft.transforms.cpr import StraightenCPRd
    from monai_cft.transforms.measures import StructureMeasuresd
    from monai_cft.transforms.regions import RegionMasksd

    keys = list(keys) if keys is not None else (["image", "label"] if with_label else ["image"])
    with_label = "label" in keys
    modes = {"image": ("bilinear", IMAGE_PADDING_HU), "label": ("nearest", 0.0)}
    transforms = [LoadImaged(keys, ensure_channel_first=True, image_only=True)] if load else []
    transforms += [
        StraightenCPRd(
            keys,
            centerline_key="centerline",
            output_size=tuple(output_size),
            spacing=spacing,
            angle=angle,
            mode=[modes[k][0] for k in keys],
            padding_value=[modes[k][1] for k in keys],
            record_grid=record_grid,
        ),
    ]
    if with_label:
        transforms += [
            RegionMasksd("label", output_key="regions", boundaries=DEFAULT_BOUNDARIES, names=DEFAULT_REGIONS),
            StructureMeasuresd("label", region_key="regions", output_key="variables",
                               structures=DEFAULT_STRUCTURES, region_names=DEFAULT_REGIONS),
        ]
    return Compose(transforms)


def _case_files(case: str) -> dict[str, str]:
    return {
        "image": f"images/{case}.nii.gz",
        "label": f"labels/{case}.nii.gz",
        "marker": f"cases/{case}.csv",
        "grid": f"grids/{case}.npy",
    }


def _geometry_mismatch(path: Path, spacing: float, output_size: Sequence[int]) -> str | None:
    """How the prepared image at ``path`` differs from the requested geometry (``None``: it matches)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape, zooms = tuple(int(v) for v in img.shape), [float(z) for z in img.header.get_zooms()[:2]]
    except Exception as err:  # unreadable file: prepare the case again
        return f"{path.name} is unreadable ({type(err).__name__}: {err})"
    if shape != tuple(int(v) for v in output_size):
        return f"{path.name} has shape {shape}, expected {tuple(output_size)}"
    if not np.allclose(zooms, spacing, rtol=1e-5, atol=0.0):
        return f"{path.name} has spacing {zooms} mm, expected {spacing} mm"
    return None


def _read_marker(path: Path, names: Sequence[str]) -> list[float] | None:
    """Variables stored in a finished case's CSV (``None`` for an unlabelled case)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if len(rows) != 2 or rows[0][0] != "id":
        raise ValueError(f"per-case file {str(path)!r} is malformed; delete it or run with --overwrite.")
    if rows[0][1:] == []:
        return None
    if rows[0][1:] != list(names):
        raise ValueError(f"per-case file {str(path)!r} has columns {rows[0][1:]}, expected {list(names)}.")
    return [float(v) for v in rows[1][1:]]


#: an sCPR's centre rows must cross contrast lumen at this fraction of their valid columns at least.
_CENTRE_LUMEN_FRACTION = 0.5
#: contrast-enhanced lumen is brighter than this (HU) on CCTA (284-367 HU at high contrast, docs/data.md).
_LUMEN_MIN_HU = 150.0


def _centre_lumen_fraction(out: Mapping[str, Any], labelled: bool) -> float:
    """Fraction of the sCPR's centre-row pixels (valid columns) that look like the vessel lumen:
    labelled lumen (any vessel structure) with a label, else brighter than ``_LUMEN_MIN_HU``."""
    from monai_cft.transforms.cpr import SCPR_VALID_COLUMNS_KEY

    image = out["label" if labelled else "image"]
    h = image.shape[1]
    rows = [h // 2 - 1, h // 2] if h % 2 == 0 else [h // 2]
    valid = int(image.meta.get(SCPR_VALID_COLUMNS_KEY, image.shape[2]))
    centre = np.asarray(image[0, rows, :valid])
    inside = centre > 0 if labelled else centre > _LUMEN_MIN_HU
    return float(inside.mean()) if inside.size else 0.0


def _check_centerline_convention(data: Mapping[str, Any], out: Mapping[str, Any], transform: Any, labelled: bool,
                                 case: str) -> None:
    """Raise when the centreline misses the lumen but its LPS reading (x and y negated) follows it.

    A centreline exported in DICOM / LPS patient coordinates instead of the NIfTI's RAS world still
    crosses the volume, but the sCPR then shows whatever lies at (-x, -y, z): the measured variables
    are silently wrong. On CCTA the centreline runs inside contrast lumen, so its sCPR's centre rows
    are lumen (label) or bright (image); when they are not and the negated centreline's are, the
    coordinate convention is the likely cause.
    """
    fraction = _centre_lumen_fraction(out, labelled)
    if fraction >= _CENTRE_LUMEN_FRACTION:
        return
    centerline = data["centerline"]
    points = np.array(load_centerline(centerline) if isinstance(centerline, (str, os.PathLike)) else centerline,
                      dtype=np.float64)
    points[:, :2] *= -1.0
    try:
        flipped = transform(dict(data, centerline=points))
    except Exception:  # the LPS reading does not even fit the volume: not that
        return
    other = _centre_lumen_fraction(flipped, labelled)
    what = "labelled vessel" if labelled else f"brighter than {_LUMEN_MIN_HU:.0f} HU"
    if other >= _CENTRE_LUMEN_FRACTION:
        raise ValueError(
            f"case {case!r}: the centreline {centerline if isinstance(centerline, (str, os.PathLike)) else ''} "
            f"runs through lumen ({what}) at only {fraction:.0%} of the sCPR's centre pixels, but at {other:.0%} with "
            "x and y negated: it looks like DICOM / LPS patient coordinates. monai-cft expects RAS world "
            "millimetres, the frame of the NIfTI affine: negate x and y of every point (or pass --no-centerline-check "
            "to straighten it as given)."
        )
    warnings.warn(f"case {case!r}: the centreline runs through lumen ({what}) at only {fraction:.0%} of the sCPR's "
                  "centre pixels; check that it follows the vessel in RAS world millimetres.", stacklevel=2)


def prepare_case(job: Mapping[str, Any]) -> dict[str, Any]:
    """Straighten (and measure) one case and write its files; the per-case CSV is written last.

    Args:
        job: ``{"item": raw datalist item with absolute paths, "out_dir", "spacing", "output_size",
            "angle", "overwrite", "save_grid"[, "check_centerline"]}``; with ``check_centerline``
            (default True) a centreline that misses the lumen while its LPS reading follows it is an
            error (:func:`_check_centerline_convention`).

    Returns:
        ``{"id", "labelled", "variables": list[float] | None, "skipped": bool}``.
    """
    item = job["item"]
    case = check_file_name(item.get("id"), "case id", "prepare_case")
    root = Path(job["out_dir"])
    files = _case_files(case)
    names = variable_names(DEFAULT_STRUCTURES, DEFAULT_REGIONS)
    labelled = "label" in item
    marker = root / files["marker"]
    mismatch = None
    if marker.is_file() and not job["overwrite"]:
        image_ok = (root / files["image"]).is_file() and (not labelled or (root / files["label"]).is_file())
        if image_ok:
            values = _read_marker(marker, names)
            for key in ("image", "label") if labelled else ("image",):
                mismatch = mismatch or _geometry_mismatch(root / files[key], job["spacing"], job["output_size"])
            if (values is not None) == labelled and mismatch is None:
                return {"id": case, "labelled": labelled, "variables": values, "skipped": True}
    marker.unlink(missing_ok=True)

    transform = build_prepare_transform(
        job["spacing"], job["output_size"], job["angle"], with_label=labelled, record_grid=job["save_grid"]
    )
    data = {k: item[k] for k in ("image", "label", "centerline") if k in item}
    try:
        out = transform(data)
    except Exception as err:  # add the case to the message; MONAI wraps transform errors
        cause = err.__cause__ if err.__cause__ is not None else err
        kind = ValueError if isinstance(cause, ValueError) else RuntimeError
        raise kind(f"preparing case {case!r} ({item['image']}) failed: {type(cause).__name__}: {cause}") from err
    if job.get("check_centerline", True):
        _check_centerline_convention(data, out, transform, labelled, case)

    image = out["image"]
    affine = np.asarray(image.affine, dtype=np.float64)
    save_nifti(image[0], affine, root / files["image"], dtype=np.float32)
    values = None
    if labelled:
        label = out["label"][0]
        found = sorted(int(v) for v in np.unique(label.numpy()))
        allowed = [0, *DEFAULT_STRUCTURES.values()]
        unexpected = [v for v in found if v not in allowed]
        if unexpected:
            raise ValueError(
                f"case {case!r}: label {item['label']} holds values {unexpected}; expected {allowed} "
                f"(0 background, {', '.join(f'{v} {k}' for k, v in DEFAULT_STRUCTURES.items())})."
            )
        save_nifti(label, affine, root / files["label"], dtype=np.uint8)
        values = [float(v) for v in out["variables"].tolist()]
    if job["save_grid"]:
        from monai_cft.transforms.cpr import SCPR_GRID_KEY

        grid = np.asarray(image.meta[SCPR_GRID_KEY], dtype=np.float32)
        with atomic_path(root / files["grid"]) as tmp, open(tmp, "wb") as fh:
            np.save(fh, grid)
    if values is None:
        save_csv(["id"], [[case]], marker)
    else:
        save_csv(["id", *names], [[case, *values]], marker)
    return {"id": case, "labelled": labelled, "variables": values, "skipped": False, "redone": mismatch}


def _check_existing_config(out_dir: Path, config: Mapping[str, Any]) -> None:
    """Refuse to resume a folder (finished or interrupted) that was prepared with other settings."""
    for name in (_SETTINGS, PREPARE_CONFIG):
        path = out_dir / name
        if not path.is_file():
            continue
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        diff = {k: (old.get(k), config[k]) for k in _GEOMETRY_KEYS if json.dumps(old.get(k)) != json.dumps(config[k])}
        if diff:
            raise ValueError(
                f"{str(out_dir)!r} was prepared with other settings {diff} (old, new); use another --out or --overwrite."
            )


def prepare_dataset(
    data_dir: str | Path,
    out_dir: str | Path,
    preset: str = "quick",
    workers: int | None = None,
    angle: float = 0.0,
    overwrite: bool = False,
    save_grid: bool = False,
    progress: bool = True,
    check_centerline: bool = True,
) -> dict[str, Any]:
    """Prepare every case of ``data_dir/dataset.json`` into ``out_dir`` (see the module docstring).

    Args:
        data_dir: raw dataset folder with ``dataset.json``.
        out_dir: prepared (sCPR) folder, created.
        preset: ``"quick"`` or ``"paper"`` (:data:`monai_cft.data.presets.SCPR_PRESETS`).
        workers: processes (default: all cores); 0 or 1 runs in this process.
        angle: rotation of the sCPR plane about the vessel (degrees).
        overwrite: redo finished cases (and allow changing the settings of an existing folder).
        save_grid: also write the world coordinates of every pixel (``grids/<id>.npy``).
        progress: show a progress bar.
        check_centerline: refuse a case whose centreline misses the lumen while its LPS reading (x and
            y negated) follows it (a centreline in DICOM patient coordinates instead of RAS world mm).

    Returns:
        The prepare config (as written to ``prepare_config.json``).
    """
    geometry = get_scpr_preset(preset)
    raw = Path(data_dir)
    root = Path(out_dir)
    names = variable_names(DEFAULT_STRUCTURES, DEFAULT_REGIONS)
    config: dict[str, Any] = {
        "preset": preset,
        "spacing": geometry["spacing"],
        "output_size": list(geometry["output_size"]),
        "angle": float(angle),
        "structures": dict(DEFAULT_STRUCTURES),
        "regions": list(DEFAULT_REGIONS),
        "boundaries": list(DEFAULT_BOUNDARIES),
        "variables": names,
        "units": "mm^2",
        "hu_window": list(HU_WINDOW),
        "image_padding_hu": IMAGE_PADDING_HU,
    }
    datalist = load_datalist(raw / "dataset.json", required_keys=("id", "image", "centerline"))
    with _folder_lock(root):
        return _prepare_locked(raw, root, preset, geometry, names, config, datalist, workers, angle, overwrite,
                               save_grid, progress, check_centerline)


def _prepare_locked(raw: Path, root: Path, preset: str, geometry: Mapping[str, Any], names: Sequence[str],
                    config: dict[str, Any], datalist: Mapping[str, Any], workers: int | None, angle: float,
                    overwrite: bool, save_grid: bool, progress: bool, check_centerline: bool = True) -> dict[str, Any]:
    """:func:`prepare_dataset` once the folder's lock is held."""
    if not overwrite:
        _check_existing_config(root, config)
    save_json({k: config[k] for k in ("preset", *_GEOMETRY_KEYS)}, root / _SETTINGS)
    jobs = [
        {"item": item, "out_dir": str(root), "spacing": geometry["spacing"], "output_size": geometry["output_size"],
         "angle": float(angle), "overwrite": bool(overwrite), "save_grid": bool(save_grid),
         "check_centerline": bool(check_centerline)}
        for split in datalist for item in datalist[split]
    ]
    start = time.perf_counter()
    preload = ("monai.transforms", "monai_cft.transforms.cpr", "monai_cft.transforms.regions",
               "monai_cft.transforms.measures")
    results = {
        r["id"]: r
        for r in parallel_map(prepare_case, jobs, workers, desc=f"sCPR {preset}", progress=progress, preload=preload)
    }
    elapsed = time.perf_counter() - start
    redone = {r["id"]: r["redone"] for r in results.values() if r.get("redone")}
    if redone:
        shown = "; ".join(f"{k}: {v}" for k, v in list(redone.items())[:5])
        warnings.warn(f"{len(redone)} finished case(s) of {str(root)!r} had been made with other settings and were "
                      f"prepared again ({shown}{' ...' if len(redone) > 5 else ''}).", stacklevel=3)

    out_list: dict[str, Any] = {"name": f"sCPR ({preset}) of {raw.name}", "tensorImageSize": "2D"}
    rows = []
    for split in datalist:
        items = []
        for raw_item in datalist[split]:
            res = results[raw_item["id"]]
            files = _case_files(res["id"])
            item: dict[str, Any] = {"id": res["id"], "image": files["image"]}
            if res["labelled"]:
                item["label"] = files["label"]
                item["variables"] = res["variables"]
                item.update(zip(names, res["variables"]))
                rows.append([res["id"], split, *res["variables"]])
            items.append(item)
        out_list[split] = items
    train = np.asarray([r[2:] for r in rows if r[1] == "training"], dtype=np.float64).reshape(-1, len(names))
    if len(train) == 0:
        warnings.warn("no labelled training case: prepare_config.json gets no variable ranges.", stacklevel=2)
        ranges: dict[str, list[float]] = {}
    else:
        ranges = {n: [float(train[:, i].min()), float(train[:, i].max())] for i, n in enumerate(names)}
    config.update(
        ranges=ranges,
        num_cases={split: len(out_list[split]) for split in datalist},
        num_labelled_training=int(len(train)),
        source=str(raw.resolve()),
    )
    save_json(out_list, root / "dataset.json")
    save_csv(["id", "split", *names], rows, root / VARIABLES_CSV)
    save_json(config, root / PREPARE_CONFIG)
    config["_stats"] = {
        "prepared": sum(not r["skipped"] for r in results.values()),
        "skipped": sum(r["skipped"] for r in results.values()),
        "seconds": elapsed,
    }
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: straighten a raw dataset into an sCPR dataset."""
    parser = argparse.ArgumentParser(prog="python -m monai_cft.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="raw dataset folder with dataset.json")
    parser.add_argument("--out", required=True, help="output (sCPR) folder")
    parser.add_argument("--preset", default="quick", choices=sorted(SCPR_PRESETS))
    parser.add_argument("--workers", type=count_arg(0), default=None, help=f"processes (default: {default_workers()} cores)")
    parser.add_argument("--angle", type=number_arg(), default=0.0, help="rotation of the sCPR plane about the vessel (deg)")
    parser.add_argument("--overwrite", action="store_true", help="redo finished cases")
    parser.add_argument("--save-grid", action="store_true", help="write grids/<id>.npy (world mm of each pixel)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-centerline-check", action="store_true",
                        help="straighten centrelines that miss the lumen as given (default: refuse one whose LPS "
                             "reading, x and y negated, follows the lumen)")
    args = parser.parse_args(argv)
    config = prepare_dataset(
        args.data_dir, args.out, args.preset, args.workers, args.angle, args.overwrite, args.save_grid,
        progress=not args.no_progress, check_centerline=not args.no_centerline_check,
    )
    stats = config["_stats"]
    print(
        f"{args.out}: {stats['prepared']} prepared, {stats['skipped']} already done, splits {config['num_cases']} "
        f"({stats['seconds']:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
