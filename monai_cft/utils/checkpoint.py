"""Plain-dict checkpoints: ``{"model": state_dict, "meta": {...}}``, loadable with ``weights_only=True``.

Every network monai-cft trains (segmentors, the parent regressor, the DSCM before and after
counterfactual fine-tuning) is saved in one format::

    {"model": {name: Tensor, ...},          # a plain state_dict, tensors on the CPU
     "meta":  {"kind": "dscm", "preset": "quick", "variables": [...], "ranges": {...},
               "cft_mode": "none", ...}}      # primitives only: str, int, float, bool, None,
                                              # lists and str-keyed dicts of those

so that ``torch.load(path, weights_only=True)`` (the only way monai-cft and MONAI's
``CheckpointLoader`` read weights) never unpickles code. ``meta`` records what the weights were
trained for; :func:`load_checkpoint` compares it with what the caller expects (for example a DSCM
trained on other variables, or a Seg-CFT model where a Reg-CFT one was asked for) and raises a
``ValueError`` naming every mismatch instead of failing later with a shape error or silently
giving wrong counterfactuals.

Files are written atomically (``monai_cft.utils.io.atomic_path``): a crash never leaves a
truncated checkpoint under the final name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["save_checkpoint", "load_torch_file", "load_checkpoint", "load_model_weights", "check_meta", "check_finite",
           "to_primitive"]

_PRIMITIVES = (str, int, float, bool, type(None))


def to_primitive(value: Any, name: str = "meta") -> Any:
    """Return ``value`` as JSON-like primitives (tuples become lists), or raise ``TypeError``.

    Accepted: ``str``, ``int``, ``float``, ``bool``, ``None``, ``torch.Size``, lists / tuples of accepted
    values, dicts with ``str`` keys and accepted values; 0-d tensors and numpy scalars are converted
    with ``.item()``.

    Args:
        value: the value to convert.
        name: dotted name used in the error message.

    Raises:
        TypeError: naming the first value (by its dotted path) that is not a primitive.
    """
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, (list, tuple, torch.Size)):
        return [to_primitive(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint meta keys must be str, got {k!r} ({type(k).__name__}) in {name}.")
            out[k] = to_primitive(v, f"{name}.{k}")
        return out
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d tensor / numpy scalar
        return value.item()
    raise TypeError(
        f"checkpoint meta must hold primitives only (str, int, float, bool, None, lists, str-keyed dicts); "
        f"{name} is a {type(value).__name__}."
    )


def save_checkpoint(path: str | os.PathLike, model: nn.Module | Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Atomically write ``{"model": state_dict, "meta": meta}`` to ``path``.

    Args:
        path: destination file (parent folders are created).
        model: a module (its ``state_dict()`` is saved) or a state dict; tensors are detached and
            moved to the CPU.
        meta: what the weights are for; must contain ``"kind"`` (e.g. ``"dscm"``, ``"segmentor"``,
            ``"regressor"``) and hold primitives only (see :func:`to_primitive`).

    Returns:
        the path written.

    Raises:
        TypeError: ``model`` is neither a module nor a mapping of tensors, or ``meta`` holds a
            non-primitive.
        ValueError: ``meta`` has no ``"kind"``.
    """
    from monai_cft.utils.io import atomic_path

    if isinstance(model, nn.Module):
        state = model.state_dict()
    elif isinstance(model, Mapping):
        state = model
    else:
        raise TypeError(f"model must be a torch.nn.Module or a state dict, got {type(model).__name__}.")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state dict entries must be tensors; {bad[:5]} are not.")
    meta = to_primitive(dict(meta))
    if "kind" not in meta:
        raise ValueError(f"checkpoint meta must name its 'kind' (e.g. 'dscm'), got keys {sorted(meta)}.")
    payload = {"model": {k: v.detach().cpu() for k, v in state.items()}, "meta": meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _same(a: Any, b: Any) -> bool:
    """Compare primitives; numbers with a relative tolerance of 1e-6, sequences and dicts element-wise."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def check_meta(meta: Mapping[str, Any], expect: Mapping[str, Any] | None, source: str = "checkpoint") -> None:
    """Raise ``ValueError`` listing every key of ``expect`` whose value differs from ``meta``'s.

    Args:
        meta: the checkpoint's meta dict.
        expect: expected values (``None`` entries are ignored); tuples compare equal to lists and
            numbers with a relative tolerance of 1e-6.
        source: name of the checkpoint in the message (e.g. its path).
    """
    if not expect:
        return
    problems = []
    for key, want in expect.items():
        if want is None:
            continue
        want = to_primitive(want, f"expect.{key}")
        if key not in meta:
            problems.append(f"{key!r}: missing (expected {want!r})")
        elif not _same(meta[key], want):
            problems.append(f"{key!r}: checkpoint has {meta[key]!r}, expected {want!r}")
    if problems:
        raise ValueError(f"{source} does not match what was asked for: " + "; ".join(problems) + ".")


def check_finite(state: Any, source: str, prefix: str = "") -> None:
    """Raise ``ValueError`` naming every tensor of a (nested) state dict with NaN or infinite values.

    NaN weights would otherwise load silently and make every output NaN. ``source`` names the file
    (or object) in the message; ``prefix`` is put before the keys.
    """
    bad: list[str] = []

    def visit(value: Any, key: str) -> None:
        if isinstance(value, torch.Tensor):
            if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
                n = int((~torch.isfinite(value)).sum())
                bad.append(f"{key!r} ({n} of {value.numel()} values)")
        elif isinstance(value, Mapping):
            for k, v in value.items():
                visit(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(v, f"{key}[{i}]")
        elif isinstance(value, float) and not math.isfinite(value):
            bad.append(f"{key!r} (= {value})")

    visit(state, prefix)
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"{source} holds non-finite (NaN / inf) values in {shown}; "
                         "it is corrupt or its training diverged: retrain or use another checkpoint.")


def load_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors that name the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is empty, truncated or not written by ``torch.save``, or it holds
            objects other than tensors and plain containers (refused: loading them could run code).
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")
    size = path.stat().st_size
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise ValueError(f"{what} {str(path)!r} holds objects other than tensors and plain containers; refused "
                         f"(weights_only=True: loading it could run code). {first}".strip()) from err
    except (RuntimeError, EOFError, KeyError, OSError, ValueError, IndexError) as err:
        raise ValueError(f"{what} {str(path)!r} ({size} bytes) is not a readable torch file: empty, truncated or not "
                         f"written by torch.save ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
                         ) from err


def load_checkpoint(
    path: str | os.PathLike, expect: Mapping[str, Any] | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Args:
        path: the ``.pt`` file.
        expect: values the checkpoint's meta must have, e.g.
            ``{"kind": "dscm", "preset": "quick", "cft_mode": "none", "variables": [...]}``.
        map_location: device the tensors are loaded to.

    Returns:
        ``{"model": state_dict, "meta": dict}``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a monai-cft checkpoint, its meta differs from ``expect``
            (the message names every differing key), or a weight tensor holds NaN / inf (the
            message names the keys and the file).
    """
    path = Path(path)
    payload = load_torch_file(path, map_location)
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict) or not isinstance(payload.get("meta"), dict):
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{str(path)!r} is not a monai-cft checkpoint (expected keys 'model' and 'meta', got {keys}).")
    check_meta(payload["meta"], expect, source=f"checkpoint {str(path)!r}")
    check_finite(payload["model"], f"checkpoint {str(path)!r}")
    return payload


def load_model_weights(
    model: nn.Module,
    path: str | os.PathLike,
    expect: Mapping[str, Any] | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint's weights into ``model`` (in place) after checking its meta; return the meta.

    Args:
        model: the module to fill.
        path: checkpoint written by :func:`save_checkpoint`.
        expect: see :func:`load_checkpoint`.
        strict: passed to ``load_state_dict``.
        map_location: device the tensors are loaded to before copying.
    """
    payload = load_checkpoint(path, expect=expect, map_location=map_location)
    try:
        model.load_state_dict(payload["model"], strict=strict)
    except RuntimeError as err:  # "Error(s) in loading state_dict ...": the problems are on the next lines
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        raise ValueError(f"checkpoint {str(path)!r} does not fit {type(model).__name__}: "
                         + "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
                         ) from err
    return payload["meta"]
