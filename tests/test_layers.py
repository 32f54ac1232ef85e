"""The package's layer order, enforced on every import statement (module level and local imports alike).

Bottom to top: ``variables``, ``constants`` and ``utils`` -> ``transforms`` -> ``networks``, ``losses``, ``metrics``
-> ``data``, ``engines`` -> the applications (``inference``, ``evaluation``, ``report``,
``visualize``, ``pipeline``, ...) -> ``monailabel``. A module may import its own layer or lower ones,
never a higher one, and no chain of imports may lead back to where it started (docs/design.md draws
the same order).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "monai_cft"
LAYERS = {"variables": 0, "constants": 0, "utils": 0, "transforms": 1, "networks": 2, "losses": 2, "metrics": 2, "data": 3,
          "engines": 3, "monailabel": 5}
APPLICATION = 4  # every other top-level module: inference, evaluation, report, pipeline, ...


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every monai_cft module named by an import in the file (absolute or relative, at any depth)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "monai_cft" or m.startswith("monai_cft.")}


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package itself: __version__ only
    return LAYERS.get(parts[1], APPLICATION)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        targets = set()
        for imp in _imports(name, path):
            while imp and imp not in mods:  # "monai_cft.x.y.Name" -> the module monai_cft.x.y
                imp = imp.rsplit(".", 1)[0] if "." in imp else ""
            if imp and imp != name:
                targets.add(imp)
        graph[name] = targets
    return graph


def test_no_import_goes_up_the_layers():
    graph = _graph()
    assert len(graph) > 60
    upward = sorted(f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
                    for m, ts in graph.items() for t in ts if _layer(t) > _layer(m))
    assert not upward, "\n".join(upward)


def test_no_circular_imports():
    graph = _graph()
    # a package's __init__ importing its own submodules is how packages re-export; cycles through it are not
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_the_check_sees_local_imports(tmp_path):
    """A function-local upward import is caught (the old test_repo check only read module-level imports)."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from monai_cft.inference import CounterfactualPipeline\n")
    assert "monai_cft.inference" in _imports("monai_cft.transforms.m", path)
    path.write_text("from ..engines import common\n")
    assert "monai_cft.engines" in _imports("monai_cft.transforms.m", path)


def test_no_module_over_600_lines():
    root = PACKAGE.parent
    long = sorted(f"{p.relative_to(root)}: {n} lines" for p in [*PACKAGE.rglob("*.py"), *(root / "scripts").rglob("*.py")]
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600)
    assert not long, "\n".join(long)
