"""Reading and writing the files of monai-cft datasets.

* :func:`atomic_path` / :func:`save_nifti` / :func:`save_json` / :func:`save_csv`: every file is
  written to a temporary name in its destination folder and moved into place with ``os.replace``
  only when writing succeeded, so an interrupted run never leaves a half-written file behind.
* :func:`load_centerline` / :func:`save_centerline`: vessel centrelines as (N, 3) arrays of world
  coordinates in millimetres, RAS (the NIfTI / MONAI convention), ostium first. Reads CSV, TXT,
  NPY, JSON point lists, 3D Slicer markups (``.mrk.json``, LPS or RAS) and legacy Slicer ``.fcsv``.
* :func:`load_datalist`: a validated MONAI datalist (``{"training": [...], ...}``) with its paths
  resolved against the datalist's folder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "read_json",
    "atomic_path",
    "save_nifti",
    "save_text",
    "save_json",
    "save_csv",
    "load_centerline",
    "save_centerline",
    "load_datalist",
    "check_file_name",
    "DEFAULT_SPLITS",
    "DEFAULT_PATH_KEYS",
]

#: split names recognised in a MONAI datalist, in the order they are reported.
DEFAULT_SPLITS: tuple[str, ...] = ("training", "validation", "test")
#: item keys that hold file paths (resolved relative to the datalist's folder).
DEFAULT_PATH_KEYS: tuple[str, ...] = ("image", "label", "centerline")

PathLike = str | os.PathLike

#: longest case id / file-name prefix accepted (bytes; the file system's limit is 255 with suffixes).
MAX_NAME_BYTES = 200


def check_file_name(name: Any, what: str = "case id", source: str | None = None) -> str:
    """Return ``name`` if it is a plain file name (a case id or a file-name prefix), else raise.

    A plain name is a non-empty string of at most :data:`MAX_NAME_BYTES` bytes without ``/``,
    ``\\``, NUL or ``..``, that does not start with ``.`` (no hidden files, no ``.`` / ``..``), so
    that ``<folder>/<name>.nii.gz`` always stays inside ``<folder>``.

    Raises:
        ValueError: naming the bad value and, if given, where it came from (``source``).
    """
    where = f" in {source}" if source else ""
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid {what} {name!r}{where}: it must be a non-empty string (a plain file name).")
    bad = [c for c in ("/", "\\", "\0", "..") if c in name]
    if bad or name.startswith("."):
        why = f"contains {', '.join(repr(c) for c in bad)}" if bad else "starts with '.'"
        raise ValueError(
            f"invalid {what} {name!r}{where}: it {why}; it must be a plain file name (no path separators, no '..', "
            f"no leading '.', no NUL) because files are named after it."
        )
    if len(name.encode("utf-8", errors="surrogatepass")) > MAX_NAME_BYTES:
        raise ValueError(f"invalid {what} {name[:40]!r}...{where}: it is longer than {MAX_NAME_BYTES} bytes.")
    return name


@contextlib.contextmanager
def atomic_path(path: PathLike, makedirs: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    The temporary file lives in the destination folder (so ``os.replace`` is an atomic rename on
    the same file system) and keeps the full suffix of ``path`` (``.nii.gz``, ``.csv``), so
    libraries that pick a format from the extension still work. Before the rename the file's data
    is flushed to disk (``os.fsync``) and after it the folder's entry, so that after a power loss
    ``path`` holds either the old or the complete new content. If the ``with`` block raises,
    the temporary file is deleted and the exception propagates; ``path`` is left untouched.

    Args:
        path: the final destination.
        makedirs: create the destination folder if it does not exist.

    Example::

        with atomic_path("out/case.nii.gz") as tmp:
            nib.save(img, tmp)
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ValueError(f"atomic_path needs a file path, got {str(path)!r}.")
    if makedirs:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {str(path)!r}.")
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush a file's data (or a folder's entries) to disk; folders that cannot be opened (Windows) are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _to_numpy(array: Any) -> np.ndarray:
    """Convert a numpy array, torch tensor or MetaTensor to a numpy array (no copy when possible)."""
    if hasattr(array, "detach"):
        array = array.detach().cpu()
        if hasattr(array, "as_tensor"):  # MetaTensor -> plain tensor
            array = array.as_tensor()
        return array.numpy()
    return np.asarray(array)


def save_nifti(array: Any, affine: Any, path: PathLike, dtype: Any = None) -> Path:
    """Write ``array`` as a NIfTI-1 file atomically.

    Args:
        array: 2D (H, W) or 3D (X, Y, Z) array (numpy, torch or MetaTensor), indexed in voxel order.
        affine: (4, 4) voxel index -> world mm (RAS) matrix; stored as both sform and qform
            (code 1, scanner). For 2D images use the pixel spacing on the diagonal.
        path: destination, normally ending in ``.nii.gz`` (gzip level 1 for speed).
        dtype: on-disk dtype (e.g. ``np.int16`` for HU, ``np.uint8`` for labels); default keeps
            the array's dtype. Values are rounded when casting floats to integers.

    Returns:
        The written path.
    """
    import nibabel as nib

    arr = _to_numpy(array)
    aff = _to_numpy(affine).astype(np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ValueError(f"affine must be a finite (4, 4) matrix, got shape {aff.shape}.")
    if arr.ndim not in (2, 3, 4):
        raise ValueError(f"save_nifti expects a 2D, 3D or 4D array, got shape {arr.shape}.")
    if dtype is not None:
        dtype = np.dtype(dtype)
        if np.issubdtype(dtype, np.integer) and not np.issubdtype(arr.dtype, np.integer):
            info = np.iinfo(dtype)
            arr = np.clip(np.rint(arr), info.min, info.max)
        arr = arr.astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, aff)
    img.header.set_xyzt_units("mm")
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def read_json(path: PathLike, what: str = "file") -> Any:
    """The parsed JSON of ``path``; ``FileNotFoundError`` / ``ValueError`` naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {err}.") from None


def save_text(text: str, path: PathLike) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`); return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_json(obj: Any, path: PathLike, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically (``allow_nan=False``: NaN/inf are rejected)."""
    text = json.dumps(obj, indent=indent, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return Path(path)


def save_csv(header: Sequence[str], rows: Sequence[Sequence[Any]], path: PathLike) -> Path:
    """Write a CSV file with a header row atomically.

    Floats are written with ``repr`` precision (exact round trip); ``None`` becomes an empty cell.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(header))
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"CSV row {list(row)} has {len(row)} cells, the header {list(header)} has {len(header)}.")
        writer.writerow(["" if v is None else v for v in row])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return Path(path)


# --------------------------------------------------------------------------------------------
# centrelines
# --------------------------------------------------------------------------------------------


def _check_points(points: Any, source: str) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"centreline {source} must be a list of 3D points (N, 3), got shape {pts.shape}.")
    if pts.shape[0] < 2:
        raise ValueError(f"centreline {source} needs at least 2 points, got {pts.shape[0]}.")
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"centreline {source} contains non-finite coordinates.")
    return pts


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_table(path: Path) -> np.ndarray:
    """Read x, y, z columns from a CSV / whitespace table, with or without a header row."""
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"centreline file {str(path)!r} is empty.")
    delimiter = "," if "," in lines[0] else None
    rows = [[c.strip() for c in (ln.split(delimiter) if delimiter else ln.split())] for ln in lines]
    columns = [0, 1, 2]
    if not all(_is_number(c) for c in rows[0][:3] if c):
        header = [c.lower() for c in rows[0]]
        if all(k in header for k in ("x", "y", "z")):
            columns = [header.index(k) for k in ("x", "y", "z")]
        elif len(header) >= 3:
            raise ValueError(
                f"centreline file {str(path)!r} has header {rows[0]} without columns 'x', 'y', 'z'."
            )
        rows = rows[1:]
    try:
        pts = [[float(r[c]) for c in columns] for r in rows]
    except (ValueError, IndexError) as err:
        raise ValueError(f"centreline file {str(path)!r} has a row that is not 3 numbers ({err}).") from None
    return np.asarray(pts, dtype=np.float64)


def _read_fcsv(path: Path) -> np.ndarray:
    """Legacy 3D Slicer fiducial list (``.fcsv``); LPS coordinates are converted to RAS."""
    lps = False
    rows = []
    for ln in path.read_text().splitlines():
        if ln.startswith("#"):
            key, _, value = ln[1:].partition("=")
            if key.strip().lower() == "coordinatesystem":
                lps = value.strip().upper() in ("LPS", "1")
            continue
        if ln.strip():
            rows.append(ln.split(","))
    try:
        pts = np.asarray([[float(r[1]), float(r[2]), float(r[3])] for r in rows], dtype=np.float64)
    except (ValueError, IndexError):
        raise ValueError(f"{str(path)!r} is not a valid Slicer .fcsv file (columns id,x,y,z,...).") from None
    if lps:
        pts[:, :2] *= -1.0
    return pts


def _points_from_json(obj: Any, path: Path) -> np.ndarray:
    """A JSON list of points, ``{"points": [...]}`` or a 3D Slicer markups file."""
    if isinstance(obj, Mapping) and "markups" in obj:
        markups = obj["markups"]
        if not isinstance(markups, list) or not markups or not all(isinstance(m, Mapping) for m in markups):
            raise ValueError(f"Slicer markups file {str(path)!r} has no markups (a list of objects).")
        curves = [m for m in markups if str(m.get("type", "")).lower() in ("curve", "closedcurve")]
        if len(curves) > 1:
            raise ValueError(f"Slicer markups file {str(path)!r} holds {len(curves)} curves; expected one.")
        markup = curves[0] if curves else markups[0]
        system = str(markup.get("coordinateSystem", "LPS")).upper()
        if system not in ("LPS", "RAS"):
            raise ValueError(f"Slicer markups coordinateSystem must be 'LPS' or 'RAS', got {system!r}.")
        units = str(markup.get("coordinateUnits", "mm")).lower()
        if units != "mm":
            raise ValueError(f"Slicer markups coordinateUnits must be 'mm', got {units!r}.")
        try:
            pts = np.asarray([cp["position"] for cp in markup.get("controlPoints", [])], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"Slicer markups file {str(path)!r} has control points without a 'position'.") from None
        pts = _check_points(pts, repr(str(path)))
        if system == "LPS":
            pts[:, :2] *= -1.0
        return pts
    if isinstance(obj, Mapping) and "points" in obj:
        obj = obj["points"]
    return _check_points(obj, repr(str(path)))


def load_centerline(path: PathLike) -> np.ndarray:
    """Load a vessel centreline as world coordinates (RAS, mm), ostium first.

    Supported formats (chosen by extension):

    * ``.csv`` / ``.txt``: one point per row, comma or whitespace separated; an optional header
      row naming the columns ``x``, ``y``, ``z`` (any other columns are ignored); ``#`` comments.
    * ``.npy``: an (N, 3) array.
    * ``.json``: a list of ``[x, y, z]`` points, ``{"points": [...]}``, or a 3D Slicer markups
      curve (``.mrk.json``); its ``coordinateSystem`` ``"LPS"`` (Slicer's default for files) is
      converted to RAS by negating x and y.
    * ``.fcsv``: a legacy 3D Slicer fiducial list (``# CoordinateSystem = LPS`` is converted).

    Returns:
        (N, 3) float64 array, N >= 2, in world millimetres (RAS).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension, or content that is not a list of finite 3D points.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"centreline file {str(path)!r} does not exist.")
    name = path.name.lower()
    if name.endswith(".npy"):
        pts = np.load(path, allow_pickle=False)
    elif name.endswith(".json"):
        obj = read_json(path, "centreline file")
        pts = _points_from_json(obj, path)
    elif name.endswith(".fcsv"):
        pts = _read_fcsv(path)
    elif name.endswith((".csv", ".txt")):
        pts = _read_table(path)
    else:
        raise ValueError(
            f"unsupported centreline file {str(path)!r}; expected .csv, .txt, .npy, .json, .mrk.json or .fcsv."
        )
    return _check_points(pts, repr(str(path)))


def save_centerline(points: Any, path: PathLike, decimals: int = 4) -> Path:
    """Write a centreline (N, 3) in world mm (RAS) as CSV with header ``x,y,z`` or as ``.npy``.

    Args:
        points: (N, 3) array-like of world coordinates, ostium first.
        path: ``.csv`` (``decimals`` digits after the point) or ``.npy`` (float64, exact).
    """
    pts = _check_points(_to_numpy(points), "to save")
    path = Path(path)
    if path.name.lower().endswith(".npy"):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, pts)
        return path
    if not path.name.lower().endswith(".csv"):
        raise ValueError(f"save_centerline writes .csv or .npy files, got {str(path)!r}.")
    body = "\n".join(",".join(f"{v:.{decimals}f}" for v in p) for p in pts)
    with atomic_path(path) as tmp:
        tmp.write_text("x,y,z\n" + body + "\n")
    return path


# --------------------------------------------------------------------------------------------
# datalists
# --------------------------------------------------------------------------------------------


def load_datalist(
    path: PathLike,
    required_keys: Sequence[str] = ("id", "image"),
    path_keys: Sequence[str] = DEFAULT_PATH_KEYS,
    splits: Sequence[str] | None = None,
    check_files: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Load and validate a MONAI datalist JSON file.

    The file must hold a JSON object whose split entries (``"training"``, ``"validation"``,
    ``"test"``) are lists of objects. Other top-level keys (``"name"``, ``"description"``, ...)
    are ignored. Every item must have ``required_keys``; item ids must be unique across splits.
    Values under ``path_keys`` are resolved against the datalist's folder (absolute paths are kept).

    Args:
        path: the datalist JSON file.
        required_keys: keys every item must have.
        path_keys: keys holding file paths; missing ones are allowed unless required.
        splits: splits to return; ``None`` returns every one of :data:`DEFAULT_SPLITS` present.
            A requested split missing from the file is an error.
        check_files: verify that every referenced file exists.

    Returns:
        ``{split: [item, ...]}`` with copies of the items whose path values are absolute strings.

    Raises:
        FileNotFoundError: the datalist, or files it references (all listed by name), are missing.
        ValueError: malformed JSON or structure (the message names the offending split / item / key).
    """
    path = Path(path)
    data = read_json(path, "datalist")
    if not isinstance(data, dict):
        raise ValueError(f"datalist {str(path)!r} must be a JSON object with split lists, got {type(data).__name__}.")
    if splits is None:
        wanted = [s for s in DEFAULT_SPLITS if s in data]
        if not wanted:
            raise ValueError(
                f"datalist {str(path)!r} has none of the splits {list(DEFAULT_SPLITS)}; its keys are {sorted(data)}."
            )
    else:
        wanted = list(splits)
        absent = [s for s in wanted if s not in data]
        if absent:
            raise ValueError(f"datalist {str(path)!r} has no split(s) {absent}; its keys are {sorted(data)}.")
    root = path.parent.resolve()
    out: dict[str, list[dict[str, Any]]] = {}
    seen: dict[str, str] = {}
    missing: list[str] = []
    for split in wanted:
        items = data[split]
        if not isinstance(items, list):
            raise ValueError(f"datalist split {split!r} must be a list of objects, got {type(items).__name__}.")
        resolved = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError(f"datalist item {split}[{i}] must be an object, got {type(item).__name__}: {item!r}.")
            absent_keys = [k for k in required_keys if k not in item]
            if absent_keys:
                raise ValueError(
                    f"datalist item {split}[{i}] lacks required key(s) {absent_keys}; it has {sorted(item)}."
                )
            item = dict(item)
            if "id" in item:
                check_file_name(item["id"], "case id", f"datalist {str(path)!r} item {split}[{i}]")
                if item["id"] in seen:
                    raise ValueError(
                        f"datalist id {item['id']!r} appears twice (in {seen[item['id']]!r} and {split!r})."
                    )
                seen[item["id"]] = split
            for key in path_keys:
                if key not in item:
                    continue
                value = item[key]
                if not isinstance(value, str) or not value:
                    raise ValueError(f"datalist item {split}[{i}] key {key!r} must be a file path, got {value!r}.")
                full = (root / value) if not os.path.isabs(value) else Path(value)
                item[key] = str(full)
                if check_files and not full.is_file():
                    missing.append(f"{split}[{i}].{key}: {value}")
            resolved.append(item)
        out[split] = resolved
    if missing:
        shown = "\n  ".join(missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise FileNotFoundError(f"datalist {str(path)!r} references {len(missing)} missing file(s), the first "
                                f"{missing[0]}:\n  {shown}{more}")
    return out
