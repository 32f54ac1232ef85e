"""Helpers for the monai-cft MONAI bundle (``bundle/configs``).

- :func:`find_bundle_root`: the bundle folder, whatever the working directory (``"bundle_root"`` of
  ``common.json``).
- :func:`check_overrides` / :func:`validate_overrides`: make a misspelled command-line override an
  error. ``python -m monai.bundle run ... --train#trainer#max_epoch 1`` (note the missing ``s``)
  would otherwise silently *add* a new, unused key and train with the default. The configs call
  ``check_overrides()`` first in their ``"initialize"`` list.
- :func:`run_bundle`: ``monai.bundle.run`` for Python callers, with the same override check.
- :func:`load_bundle_component`: one parsed component of the bundle's configs (e.g. the inference
  ``pipeline``), with overrides, for Python callers.
- :func:`select`: pick a named entry of a config table with a clear error (e.g. the segmentor role).
- :func:`check_prepare_config`: the prepared dataset matches the bundle's ``preset``.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
import os
import pydoc
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_cft.utils.checks import check_count
from monai_cft.utils.cli import install_error_hook, readable_error, root_cause

__all__ = [
    "BUNDLE_ROOT_ENV",
    "find_bundle_root",
    "config_ids",
    "validate_overrides",
    "parse_run_argv",
    "check_overrides",
    "install_error_hook",
    "readable_error",
    "root_cause",
    "check_override_values",
    "check_number_overrides",
    "run_bundle",
    "load_bundle_component",
    "select",
    "check_prepare_config",
]

#: environment variable naming the bundle folder (the one holding ``configs/metadata.json``).
BUNDLE_ROOT_ENV = "MONAI_CFT_BUNDLE_ROOT"

#: keyword arguments of ``monai.bundle.run`` itself (not config overrides).
RUN_ARGS = ("run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file")


def _is_bundle(path: Path) -> bool:
    return (path / "configs" / "metadata.json").is_file()


def find_bundle_root() -> str:
    """Return the absolute path of the monai-cft bundle folder (the one holding ``configs/metadata.json``).

    Looked up, in order:

    1. the environment variable ``MONAI_CFT_BUNDLE_ROOT`` (an error if it does not point to a bundle);
    2. ``bundle/`` next to the installed ``monai_cft`` package (a source checkout or an editable
       install);
    3. the current working directory, if it has ``configs/metadata.json``.

    Raises:
        FileNotFoundError: none of these is a bundle folder (the message lists what was tried).
    """
    env = os.environ.get(BUNDLE_ROOT_ENV)
    if env:
        path = Path(env).expanduser().resolve()
        if not _is_bundle(path):
            raise FileNotFoundError(f"{BUNDLE_ROOT_ENV}={env!r} does not contain configs/metadata.json.")
        return str(path)
    import monai_cft

    tried = []
    for candidate in (Path(monai_cft.__file__).resolve().parent.parent / "bundle", Path.cwd().resolve()):
        if _is_bundle(candidate):
            return str(candidate)
        tried.append(str(candidate))
    raise FileNotFoundError(
        f"cannot find the monai-cft bundle folder (configs/metadata.json) in {tried}; set {BUNDLE_ROOT_ENV} "
        "to the bundle folder or pass --bundle_root."
    )


def _normalize_id(key: str) -> list[str]:
    return [part for part in str(key).replace("::", "#").split("#")]


def config_ids(config: Any, prefix: str = "") -> list[str]:
    """Every id of a raw config (nested dicts and lists), ``#``-separated, e.g. ``"train#trainer#max_epochs"``."""
    ids = []
    if isinstance(config, Mapping):
        items = ((str(k), v) for k, v in config.items())
    elif isinstance(config, list):
        items = ((str(i), v) for i, v in enumerate(config))
    else:
        return ids
    for k, v in items:
        cid = f"{prefix}#{k}" if prefix else k
        ids.append(cid)
        ids.extend(config_ids(v, cid))
    return ids


def _target_accepts(node: Mapping, name: str) -> bool:
    """Whether ``node`` is a ``_target_`` component whose callable has a named parameter ``name``."""
    target = node.get("_target_")
    if not isinstance(target, str) or target.startswith(("$", "@", "%")):
        return False
    obj = pydoc.locate(target)
    if obj is None:
        from monai.bundle.config_item import ComponentLocator

        obj = ComponentLocator().get_component_module_name(target)
        obj = pydoc.locate(f"{obj}.{target}") if isinstance(obj, str) else None
    if obj is None:
        return False
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    p = params.get(name)
    return p is not None and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _lookup(config: Any, parts: Sequence[str]) -> bool:
    node = config
    for i, part in enumerate(parts):
        if isinstance(node, Mapping):
            if part in node:
                node = node[part]
                continue
            # a constructor argument the config leaves at its default is a valid override
            return i == len(parts) - 1 and _target_accepts(node, part)
        if isinstance(node, list):
            try:
                idx = int(part)
            except ValueError:
                return False
            if -len(node) <= idx < len(node):
                node = node[idx]
                continue
            return False
        return False
    return True


def validate_overrides(config_files: str | Sequence[str] | Mapping, overrides: Iterable[str]) -> list[str]:
    """Check that every override id names something in the (merged) config files.

    An id is valid when it exists in the configs, or when it is a named parameter of the
    ``_target_`` component it would be added to (for example ``train#trainer#amp`` when the
    trainer's config leaves ``amp`` at its default). Ids starting with ``_meta_`` are not checked.

    Args:
        config_files: what ``monai.bundle.run`` receives as ``config_file`` (a path, a list of paths,
            a comma-separated string, or an already merged dict).
        overrides: override ids, ``#`` or ``::`` separated (``"train#trainer#max_epochs"``).

    Returns:
        the checked ids.

    Raises:
        ValueError: naming every unknown id and its closest valid ids.
    """
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_files(config_files)
    checked, problems = [], []
    all_ids = None
    for key in overrides:
        key = str(key)
        checked.append(key)
        if key.startswith("_meta_"):
            continue
        if _lookup(config, _normalize_id(key)):
            continue
        if all_ids is None:
            all_ids = config_ids(config)
        close = difflib.get_close_matches(key.replace("::", "#"), all_ids, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        problems.append(f"{key!r}{hint}")
    if problems:
        raise ValueError(
            "unknown config override(s): " + "; ".join(problems) + ". An override must name an existing config id "
            "(or a parameter of a '_target_' component); to add new keys, put them in an extra config file "
            "appended to --config_file."
        )
    return checked


#: overrides (last id component) that must be whole numbers >= the given minimum (``--max_epochs 1.5``
#: would otherwise train 2 epochs, ``--max_epochs abc`` fail deep inside ignite).
COUNT_OVERRIDES: dict[str, int] = {"max_epochs": 1, "flow_epochs": 1, "batch_size": 1, "num_workers": 0,
                                   "checkpoint_interval": 1, "elbo_target_batches": 1}


def check_override_values(overrides: Mapping[str, Any], source: str = "the command line") -> None:
    """Raise ``ValueError`` naming an override of :data:`COUNT_OVERRIDES` that is not a whole number.

    String values are parsed as Python literals first; expressions (``$...``) and references
    (``@...``) are left to the config.
    """
    for key, value in overrides.items():
        name = _normalize_id(str(key))[-1]
        if name not in COUNT_OVERRIDES:
            continue
        if isinstance(value, str):
            if value.strip().startswith(("$", "@", "%")):
                continue
            value = _parse_value(value)
        try:
            check_count(value, name, COUNT_OVERRIDES[name])
        except (TypeError, ValueError) as err:
            raise ValueError(f"override {key!r} from {source}: {err}") from None


_MISSING = object()


def _value_at(config: Any, parts: Sequence[str]) -> Any:
    """The config value at ``parts`` (an override id split at ``#``), or ``_MISSING``."""
    node = config
    for part in parts:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def check_number_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any],
                           source: str = "the command line") -> None:
    """Raise ``ValueError`` when an override of a numeric config value is not a finite number.

    ``--lr abc`` or ``--noise_temperature nan`` would otherwise reach the optimiser or the model as
    text or NaN. A config value counts as numeric when its default in the merged ``config`` is an
    int or a float (not a bool); expressions (``$...``) and references (``@...``) are left to the
    config.
    """
    for key, value in overrides.items():
        default = _value_at(config, _normalize_id(str(key)))
        if default is _MISSING or isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        parsed = value
        if isinstance(value, str):
            if value.strip().startswith(("$", "@", "%")):
                continue
            parsed = _parse_value(value)
        if isinstance(parsed, bool) or not isinstance(parsed, (int, float)) or not math.isfinite(parsed):
            raise ValueError(f"override {key!r} from {source} must be a finite number (the config's default is "
                             f"{default!r}), got {value!r}.")


def _parse_value(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def parse_run_argv(argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Split a ``python -m monai.bundle run ...`` command line the way ``fire`` does.

    Args:
        argv: the arguments after the program name, e.g. ``["run", "training", "--config_file",
            "['a.json', 'b.json']", "--train#trainer#max_epochs", "1"]``.

    Returns:
        ``(run_args, overrides)``: ``run``'s own keyword arguments (``config_file``, ``args_file``,
        ... with literal values parsed) and the config overrides ``{id: raw string value}``.
        ``--a-b`` is read as ``a_b``; ``--flag`` without a value is ``"True"``; tokens after a bare
        ``--`` (fire's own flags) are ignored.
    """
    run_args: dict[str, Any] = {}
    overrides: dict[str, str] = {}
    tokens = list(argv)
    if "--" in tokens:
        tokens = tokens[: tokens.index("--")]

    def is_flag(tok: str) -> bool:
        if not tok.startswith("-"):
            return False
        try:
            float(tok)
            return False
        except ValueError:
            return True

    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if not is_flag(tok):
            continue
        key = tok.lstrip("-")
        if "=" in key:
            key, value = key.split("=", 1)
        elif i < len(tokens) and not is_flag(tokens[i]):
            value = tokens[i]
            i += 1
        else:
            value = "True"
        key = key.replace("-", "_")
        if key in RUN_ARGS:
            run_args[key] = _parse_value(value)
        else:
            overrides[key] = value
    return run_args, overrides


def _running_bundle_cli(argv0: str) -> bool:
    parts = Path(argv0).parts
    return len(parts) >= 3 and parts[-3:] == ("monai", "bundle", "__main__.py")


def check_overrides(argv: Sequence[str] | None = None) -> list[str]:
    """Raise ``ValueError`` when a command-line override of ``python -m monai.bundle run`` is unknown.

    Meant as the first expression of a config's ``"initialize"`` list::

        "initialize": ["$monai_cft.utils.bundle.check_overrides()", ...]

    With ``argv=None`` the process's command line is checked, but only when the process is
    ``python -m monai.bundle`` (a Python caller of ``monai.bundle.run`` should use
    :func:`run_bundle`, which validates its keyword overrides itself). Overrides given in an
    ``--args_file`` are checked as well.

    In the bundle CLI it also installs :func:`install_error_hook`, so that any later error of the
    run reaches the user as one line naming its root cause.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        the checked override ids (empty when nothing was checked).
    """
    if argv is None:
        if not sys.argv or not _running_bundle_cli(sys.argv[0]):
            return []
        install_error_hook()
        argv = sys.argv[1:]
    run_args, overrides = parse_run_argv(argv)
    check_override_values(overrides)
    keys = list(overrides)
    config_file = run_args.get("config_file")
    if run_args.get("args_file"):
        from monai.bundle import ConfigParser

        file_args = ConfigParser.load_config_file(str(run_args["args_file"]))
        config_file = config_file if config_file is not None else file_args.get("config_file")
        keys += [k for k in file_args if k not in RUN_ARGS and k not in overrides]
    if config_file is None or not keys:
        return []
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_files(config_file)
    checked = validate_overrides(config, keys)
    check_number_overrides(config, overrides)
    return checked


def run_bundle(
    run_id: str,
    config_file: str | Sequence[str],
    meta_file: str | Sequence[str] | None = None,
    logging_file: str | bool | None = None,
    **override: Any,
) -> None:
    """``monai.bundle.run`` with the override check of :func:`validate_overrides`.

    Example::

        run_bundle("training", [f"{root}/configs/common.json", f"{root}/configs/train.json"],
                   **{"dataset_dir": "/data/scpr_quick", "train#trainer#max_epochs": 1})
    """
    from monai.bundle import run

    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_files(config_file)
    validate_overrides(config, override.keys())
    check_override_values(override, "run_bundle's keyword arguments")
    check_number_overrides(config, override, "run_bundle's keyword arguments")
    kwargs: dict[str, Any] = {}
    if meta_file is not None:
        kwargs["meta_file"] = meta_file
    if logging_file is not None:
        kwargs["logging_file"] = logging_file
    run(run_id=run_id, config_file=config_file, **kwargs, **override)


def load_bundle_component(
    component: str,
    config_files: Sequence[str],
    bundle_dir: str | os.PathLike | None = None,
    expected_type: type | None = None,
    **overrides: Any,
) -> Any:
    """Parse the bundle's ``config_files`` and return the component ``component`` (its config id).

    Args:
        component: the config id to instantiate, e.g. ``"pipeline"`` of ``inference.json``.
        config_files: file names under ``<bundle_dir>/configs`` (later ones override earlier ones).
        bundle_dir: the bundle folder (default: :func:`find_bundle_root`); ``bundle_root`` is set to it.
        expected_type: raise a ``TypeError`` when the component is not an instance of it.
        overrides: config values to set before parsing (``device="cpu"`` becomes ``torch.device``),
            checked like command-line overrides (:func:`validate_overrides`).

    Raises:
        FileNotFoundError: a config file that does not exist (named).
        ValueError: an override that names no config entry (with the closest ones).
    """
    import torch
    from monai.bundle import ConfigParser

    root = Path(bundle_dir if bundle_dir is not None else find_bundle_root()).resolve()
    files = [str(root / "configs" / f) for f in config_files]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"bundle config file(s) {missing} do not exist.")
    parser = ConfigParser()
    parser.read_config(files)
    validate_overrides(parser.get(), overrides.keys())
    parser["bundle_root"] = str(root)
    for key, value in overrides.items():
        if key == "device" and isinstance(value, (str, torch.device)):
            value = f"$torch.device('{value}')"
        parser[key] = value
    out = parser.get_parsed_content(component)
    if expected_type is not None and not isinstance(out, expected_type):
        raise TypeError(f"the bundle's {component!r} is a {type(out).__name__}, expected {expected_type.__name__}.")
    return out


def select(table: Mapping[str, Any], key: str, what: str = "option") -> Any:
    """Return ``table[key]`` or raise ``ValueError`` naming ``key`` and the valid choices.

    Used by the configs to resolve named settings, e.g.
    ``"$monai_cft.utils.bundle.select(@segmentor_roles, @segmentor_role, 'segmentor_role')"``.
    """
    if key not in table:
        raise ValueError(f"unknown {what} {key!r}; valid choices are {sorted(table)}.")
    return table[key]


def check_prepare_config(config: Mapping[str, Any], preset: str, dataset_dir: str | os.PathLike = "") -> Mapping[str, Any]:
    """Return a prepared dataset's ``prepare_config.json`` content after checking it fits the bundle.

    Raises:
        ValueError: the dataset was prepared with another preset than ``preset`` (e.g. a ``quick``
            32 x 192 dataset for the ``paper`` networks), or lacks a key the configs read.
    """
    needed = ("variables", "ranges", "structures", "regions", "output_size")
    missing = [k for k in needed if k not in config]
    if missing:
        raise ValueError(f"prepare_config.json of {str(dataset_dir)!r} lacks {missing}; re-run monai_cft.data.prepare.")
    if not config["ranges"]:
        raise ValueError(
            f"dataset {str(dataset_dir)!r} has no variable ranges (no labelled training cases); the bundle's "
            "networks are trained on labelled data."
        )
    prepared = config.get("preset")
    if prepared is not None and prepared != preset:
        raise ValueError(
            f"dataset {str(dataset_dir)!r} was prepared with preset {prepared!r} but the bundle runs preset {preset!r}; "
            f"pass --preset {prepared} or --dataset_dir of a {preset!r} dataset."
        )
    return config
