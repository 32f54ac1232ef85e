"""Loading a prepared (sCPR) dataset for training: datalists and the preparation config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from monai_cft.utils.io import DEFAULT_SPLITS, load_datalist, read_json
from monai_cft.data.prepare import PREPARE_CONFIG
from monai_cft.transforms.parents import range_bounds
from monai_cft.variables import variable_names

__all__ = ["load_prepare_config", "load_scpr_datalist"]

_CONFIG_KEYS = ("preset", "spacing", "output_size", "structures", "regions", "boundaries", "variables", "ranges")


def load_prepare_config(scpr_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``<scpr_dir>/prepare_config.json``.

    Returns:
        The config dict with ``output_size`` as a tuple ``(H, W)``, ``spacing`` a float (mm),
        ``variables`` the structure-major names, ``ranges`` ``{name: [min, max]}`` (mm^2, training
        split; may be empty for an unlabelled dataset).

    Raises:
        FileNotFoundError: no config (the folder was not prepared, or preparation did not finish).
        ValueError: a missing key or an inconsistent value (named in the message).
    """
    path = Path(scpr_dir) / PREPARE_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist; run "
            f"`python -m monai_cft.data.prepare --data-dir RAW --out {scpr_dir}` first."
        )
    config = read_json(path, "prepare config")
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}.")
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"{str(path)!r} lacks the key(s) {missing}.")
    size = config["output_size"]
    if not isinstance(size, list) or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"{str(path)!r}: output_size must be two positive ints (H, W), got {size!r}.")
    config["output_size"] = tuple(size)
    spacing = config["spacing"]
    if not isinstance(spacing, (int, float)) or isinstance(spacing, bool) or not spacing > 0:
        raise ValueError(f"{str(path)!r}: spacing must be a positive number (mm), got {spacing!r}.")
    config["spacing"] = float(spacing)
    if not isinstance(config["structures"], dict) or not isinstance(config["regions"], list):
        raise ValueError(f"{str(path)!r}: structures must be a dict and regions a list.")
    expected = variable_names(config["structures"], config["regions"])
    if config["variables"] != expected:
        raise ValueError(
            f"{str(path)!r}: variables {config['variables']} do not match structures x regions {expected}."
        )
    ranges = config["ranges"]
    if not isinstance(ranges, dict):
        raise ValueError(f"{str(path)!r}: ranges must be a dict name -> [min, max], got {type(ranges).__name__}.")
    if ranges:
        absent = [n for n in expected if n not in ranges]
        if absent:
            raise ValueError(f"{str(path)!r}: ranges lack the variable(s) {absent}.")
        try:
            range_bounds(ranges, expected, allow_constant=True)
        except ValueError as err:
            raise ValueError(f"{str(path)!r}: {err}") from None
    return config


def load_scpr_datalist(scpr_dir: str | Path, split: str, require_variables: bool = True) -> list[dict[str, Any]]:
    """Items of one split of a prepared dataset, ready for ``monai.data.Dataset``.

    Args:
        scpr_dir: the prepared folder (``python -m monai_cft.data.prepare``).
        split: ``"training"``, ``"validation"`` or ``"test"``.
        require_variables: every item must have a label and its variables (False allows the
            unlabelled items of a user's own data).

    Returns:
        Items ``{"id", "image", "label", "variables", <each variable by name>}`` with absolute
        paths, ``"variables"`` a list of float32-representable floats in the config's variable
        order (mm^2), each named variable the same value.

    Raises:
        FileNotFoundError: missing folder / files (named).
        ValueError: unknown split, or items inconsistent with ``prepare_config.json``.
    """
    if split not in DEFAULT_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(DEFAULT_SPLITS)}.")
    config = load_prepare_config(scpr_dir)
    names = config["variables"]
    required = ("id", "image", "label", "variables") if require_variables else ("id", "image")
    items = load_datalist(Path(scpr_dir) / "dataset.json", required_keys=required, path_keys=("image", "label"),
                          splits=[split])[split]
    for item in items:
        if "variables" not in item:
            continue
        values = item["variables"]
        if not isinstance(values, list) or len(values) != len(names):
            raise ValueError(
                f"item {item['id']!r}: 'variables' must be a list of {len(names)} numbers ({names}), got {values!r}."
            )
        arr = np.asarray(values, dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"item {item['id']!r} has non-finite variables {values}.")
        item["variables"] = arr.tolist()
        item.update(zip(names, item["variables"]))
    return items
