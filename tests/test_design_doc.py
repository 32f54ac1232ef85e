"""docs/design.md matches the code: every call signature it shows exists, with the parameters it names.

A signature is a backticked ``name(arg, kw=default, ...)`` span. ``name`` may be dotted (``dscm.DeepSCM``,
``monai_cft.transforms.intensity.HUWindow``) or bare; it is looked up among the package's modules,
their classes and the classes' methods. Each named argument must be a parameter of what it names
(or that callable must take ``**kwargs``); ``...``, ``*`` and ``**kwargs`` stand for "more".
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import monai_cft

DOC = Path(__file__).resolve().parents[1] / "docs" / "design.md"
SPAN = re.compile(r"`([A-Za-z_][\w.]*)\(([^`]*?)\)(?:\s*->[^`]*)?`")
SKIP = {"python", "torch", "nn", "np", "os", "json", "dict", "list", "tuple", "len", "float", "int", "str", "max", "min",
        "sum", "isinstance", "open", "range", "print", "zip"}
OUTSIDE = ("torch.", "monai.", "np.", "nn.", "os.", "zuko.", "ignite.", "F.", "math.")


def _modules() -> dict[str, object]:
    mods = {"monai_cft": monai_cft}
    for info in pkgutil.walk_packages(monai_cft.__path__, "monai_cft."):
        if ".monailabel" in info.name or info.name.endswith("__main__"):
            continue
        mods[info.name] = importlib.import_module(info.name)
    return mods


def _candidates(name: str, mods: dict[str, object]) -> list[object]:
    parts = name.split(".")
    found = []
    for mod_name, mod in mods.items():
        mparts = mod_name.split(".")
        for k in range(len(parts) - 1, -1, -1):  # the longest module suffix the dotted name starts with
            head, tail = parts[:k], parts[k:]
            if head and mparts[-len(head):] != head:
                continue
            obj = mod
            for attr in tail:
                obj = getattr(obj, attr, None)
                if obj is None:
                    break
            if obj is not None and callable(obj) and tail:
                found.append(obj)
            break
    if not found:  # a method shown on an instance (``hvae.check_compatible``) or bare: a class defining it
        for mod in mods.values():
            for _, cls in inspect.getmembers(mod, inspect.isclass):
                if cls.__module__.startswith("monai_cft") and parts[-1] in vars(cls):
                    found.append(getattr(cls, parts[-1]))
    return found


def _arg_names(args: str) -> list[str]:
    depth, cur, parts = 0, "", []
    for ch in args:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth < 0:  # "Name(args)(call args)": the first parentheses are the signature
            break
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    names = []
    for p in (p.strip() for p in parts):
        m = re.match(r"^\**([A-Za-z_]\w*)\s*(?:[:=]|$)", p)
        if p and not p.startswith("*") and m and p != "...":
            names.append(m.group(1))
    return names


def _accepts(obj: object, names: list[str]) -> bool:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return True
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return all(n in params for n in names)


def test_every_signature_in_design_md_exists():
    text = DOC.read_text(encoding="utf-8")
    mods = _modules()
    problems, checked = [], 0
    for m in SPAN.finditer(text):
        name, args = m.group(1), m.group(2)
        if name in SKIP or name.startswith(OUTSIDE):
            continue
        found = _candidates(name, mods)
        if not found:
            problems.append(f"{m.group(0)}: no {name!r} in monai_cft")
            continue
        checked += 1
        names = _arg_names(args)
        if not any(_accepts(obj, names) for obj in found):
            problems.append(f"{m.group(0)}: {name} takes {list(inspect.signature(found[0]).parameters)}")
    assert checked > 30
    assert not problems, "\n".join(problems)
