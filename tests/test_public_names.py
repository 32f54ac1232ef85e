"""No dead public names: every name in a module's ``__all__`` is used by the package, a bundle config,
a script or an example in the docs (a fenced code block of README.md, docs/*.md or the bundle's docs).

A name only re-exported by a package ``__init__`` or mentioned in its own module does not count:
something must call it. The few entry points that a framework looks up by name are listed with the
reason.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "monai_cft"

#: names a framework finds by itself, not by an import in this repository.
ENTRY_POINTS = {
    "monai_cft.monailabel.main.MONAICFTApp": "MONAI Label loads the app's main.py and looks up its MONAILabelApp subclass",
}


def _public_names() -> dict[str, tuple[Path, list[str]]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                names = [elt.value for elt in node.value.elts]  # type: ignore[attr-defined]
                module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                out[module] = (path, names)
    return out


def _code_blocks(text: str) -> str:
    return "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S))


def _called_names(path: Path) -> set[str]:
    """Names a module calls (a package ``__init__`` calling a helper uses it; re-exporting does not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            found.add(f.id if isinstance(f, ast.Name) else getattr(f, "attr", ""))
    return found


def _loaded_names(path: Path) -> set[str]:
    """Identifiers a module's code reads (names, attributes, imported names), not the ones it defines."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            found |= {a.name for a in node.names}
    return found


def _text_corpus() -> str:
    """Configs, scripts and the docs' examples (fenced code blocks)."""
    parts = []
    for path in [*(ROOT / "scripts").rglob("*.py"), *(ROOT / "scripts").rglob("*.sh"), *(ROOT / "bundle").rglob("*.json")]:
        parts.append(path.read_text(encoding="utf-8"))
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *(ROOT / "bundle").rglob("*.md")]:
        parts.append(_code_blocks(path.read_text(encoding="utf-8")))
    return "\n".join(parts)


def test_every_public_name_is_used_somewhere():
    names = _public_names()
    assert len(names) > 50
    used_by = {path: _loaded_names(path) if path.name != "__init__.py" else _called_names(path)
               for path in PACKAGE.rglob("*.py")}
    text = _text_corpus()
    unused = []
    for module, (path, public) in names.items():
        for name in public:
            if f"{module}.{name}" in ENTRY_POINTS:
                continue
            if any(name in loaded for loaded in used_by.values()) or re.search(rf"\b{re.escape(name)}\b", text):
                continue
            unused.append(f"{module}.{name}")
    assert not unused, "public names nothing uses (make them private, use them, or remove them):\n" + "\n".join(unused)


def test_entry_points_exist():
    for dotted in ENTRY_POINTS:
        module, name = dotted.rsplit(".", 1)
        path = ROOT / (module.replace(".", "/") + ".py")
        assert re.search(rf"^class {name}\b|^def {name}\b", path.read_text(encoding="utf-8"), flags=re.M), dotted
