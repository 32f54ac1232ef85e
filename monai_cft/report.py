"""Tables and the Markdown report built from the evaluation outputs of every CFT mode.

Inputs, written by :mod:`monai_cft.evaluation` under ``<output_dir>/eval/<mode>/``:

- ``effectiveness.csv``: one row per case x intervention x measured variable with the columns
  :data:`EFFECTIVENESS_COLUMNS` (errors in mm^2);
- ``metrics.json``: the aggregated metrics of that mode (see :func:`monai_cft.evaluation.CounterfactualEvaluation.run`);
- ``fig1_<mode>.png``: the Fig. 1-style panel.

Outputs: ``table1.md`` (the paper's Table 1 layout: rows do(variable-region) x mode, columns the
regions, mean +- standard deviation of the absolute error with the number of cases; the
intervened cell in bold, the best mode per cell marked) and ``report.md``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "EFFECTIVENESS_COLUMNS",
    "MODE_LABELS",
    "STRUCTURE_LABELS",
    "read_effectiveness",
    "summarise_effectiveness",
    "table1_markdown",
    "write_table1",
    "write_report",
]

EFFECTIVENESS_COLUMNS = (
    "case_id",
    "mode",
    "intervened",
    "target",
    "measured_variable",
    "measured_structure",
    "measured_region",
    "is_intervened",
    "cf_value",
    "measured_value",
    "abs_error",
)

MODE_LABELS = {"none": "No-CFT", "reg": "Reg-CFT", "seg": "Seg-CFT", "pos_seg": "Pos-Seg-CFT"}
STRUCTURE_LABELS = {"noncalcified": "NCPA", "calcified": "CPA", "lumen": "LA"}


def read_effectiveness(path: str | os.PathLike) -> list[dict]:
    """Read an ``effectiveness.csv`` written by the evaluation; numeric columns as floats."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in EFFECTIVENESS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the columns {missing}; expected {list(EFFECTIVENESS_COLUMNS)}.")
        rows = []
        for r in reader:
            for k in ("target", "cf_value", "measured_value", "abs_error"):
                r[k] = float(r[k])
            r["is_intervened"] = r["is_intervened"] in ("1", "True", "true")
            rows.append(r)
    return rows


def _stats(values: Sequence[float]) -> dict:
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci95": float("nan"), "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": 1.96 * std / math.sqrt(n), "n": n}


def summarise_effectiveness(rows: Sequence[dict]) -> dict:
    """Aggregate rows into ``{intervened: {measured_variable: stats}}`` (stats: mean, std, ci95, n)."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["intervened"], r["measured_variable"])].append(r["abs_error"])
    out: dict[str, dict] = defaultdict(dict)
    for (iv, mv), vals in groups.items():
        out[iv][mv] = _stats(vals)
    return dict(out)


def table1_markdown(
    summaries: dict[str, dict],
    structures: Sequence[str],
    regions: Sequence[str],
    modes: Sequence[str] | None = None,
) -> str:
    """Render Table 1: for each do(structure-region), one row per mode, columns = regions.

    Each cell holds the mean +- std of the absolute error (mm^2) of the intervened *structure*
    measured in that region. The intervened region's cell is bold; the lowest mean among the
    modes of a block is marked with a dagger. ``summaries`` maps mode -> output of
    :func:`summarise_effectiveness`; modes without results are left out.
    """
    modes = [m for m in (modes or list(summaries)) if m in summaries]
    if not modes:
        return "_no evaluation results found_\n"
    order = [s for s in ("noncalcified", "calcified", "lumen") if s in structures] + [
        s for s in structures if s not in ("noncalcified", "calcified", "lumen")
    ]
    n_cases = sorted({st["n"] for m in modes for iv in summaries[m].values() for st in iv.values()})
    lines = [
        "| Intervention | CFT type | " + " | ".join(r.capitalize() for r in regions) + " |",
        "| --- | --- | " + " | ".join("---" for _ in regions) + " |",
    ]
    for s in order:
        label = STRUCTURE_LABELS.get(s, s)
        for r_iv in regions:
            iv = f"{s}_{r_iv}"
            best = {}
            for r in regions:
                vals = [(summaries[m].get(iv, {}).get(f"{s}_{r}", {}).get("mean", math.nan), m) for m in modes]
                vals = [v for v in vals if not math.isnan(v[0])]
                best[r] = min(vals)[1] if vals else None
            for i, m in enumerate(modes):
                cells = []
                for r in regions:
                    st = summaries[m].get(iv, {}).get(f"{s}_{r}")
                    if st is None or st["n"] == 0:
                        cells.append("n/a")
                        continue
                    txt = f"{st['mean']:.2f} ± {st['std']:.2f}"
                    if best[r] == m and len(modes) > 1:
                        txt += " †"
                    cells.append(f"**{txt}**" if r == r_iv else txt)
                head = f"do({label}-{r_iv})" if i == 0 else ""
                lines.append(f"| {head} | {MODE_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    note = (
        "\nAbsolute error (mm², mean ± standard deviation over test cases; n = "
        + ", ".join(str(n) for n in n_cases)
        + ") between the counterfactual target and the value measured on the counterfactual by the "
        "evaluation segmentor, for the intervened structure in each region. **Bold**: the intervened "
        "region (did the change happen?); plain: the other regions (did the image stay put?). "
        "†: lowest mean error among the modes in that cell.\n"
    )
    return "\n".join(lines) + "\n" + note


def _load_mode_results(eval_root: Path, modes: Sequence[str]) -> tuple[dict, dict]:
    summaries, metrics = {}, {}
    for m in modes:
        d = eval_root / m
        if (d / "effectiveness.csv").exists():
            summaries[m] = summarise_effectiveness(read_effectiveness(d / "effectiveness.csv"))
        if (d / "metrics.json").exists():
            metrics[m] = json.loads((d / "metrics.json").read_text())
    return summaries, metrics


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_table1(eval_root: str | os.PathLike, modes: Sequence[str], structures: Sequence[str],
                 regions: Sequence[str], path: str | os.PathLike | None = None) -> Path:
    """Write ``table1.md`` from the modes evaluated so far under ``eval_root``; return its path."""
    eval_root = Path(eval_root)
    summaries, _ = _load_mode_results(eval_root, modes)
    path = Path(path) if path is not None else eval_root / "table1.md"
    _atomic_write_text(path, table1_markdown(summaries, structures, regions, modes))
    return path


def _fmt(st: dict | None, digits: int = 2) -> str:
    if not st:
        return "n/a"
    if isinstance(st, (int, float)):
        return f"{st:.{digits}f}"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def write_report(output_dir: str | os.PathLike, modes: Sequence[str]) -> Path:
    """Write ``<output_dir>/report.md``: Table 1, figures, the other metrics and the stage times."""
    out = Path(output_dir)
    eval_root = out / "eval"
    summaries, metrics = _load_mode_results(eval_root, modes)
    if not metrics:
        raise FileNotFoundError(f"no evaluation results under {eval_root}: run the evaluate_<mode> stages first.")
    any_m = next(iter(metrics.values()))
    structures, regions = any_m["structures"], any_m["regions"]
    parts = ["# monai-cft report\n", f"Preset `{any_m.get('preset', '?')}`, test cases: {any_m.get('n_cases', '?')}, "
             f"evaluation seed {any_m.get('seed', '?')}, evaluation segmentor `{any_m.get('segmentor', '?')}`.\n"]
    parts.append("## Table 1: effectiveness of positional interventions\n")
    parts.append(table1_markdown(summaries, structures, regions, modes))
    fac = any_m.get("factual_segmentor_error")
    if fac:
        parts.append("\nMeasurement floor: the evaluation segmentor's absolute error on the *real* test images "
                     "(mm², mean ± std): " + ", ".join(f"{k} {_fmt(v)}" for k, v in fac.items()) + ".\n")
    parts.append("\n## Composition, reversibility, locality, realism\n")
    parts.append("| CFT type | composition 1x (L1, 0-255) | composition 10x | reversibility (L1) | locality | "
                 "realism FID | realism KID |")
    parts.append("| --- | --- | --- | --- | --- | --- | --- |")
    for m in modes:
        if m not in metrics:
            continue
        mm = metrics[m]
        comp = mm.get("composition", {})
        real = mm.get("realism", {})
        parts.append(
            f"| {MODE_LABELS.get(m, m)} | {_fmt(comp.get('1'))} | {_fmt(comp.get('10'))} | "
            f"{_fmt(mm.get('reversibility'))} | {_fmt(mm.get('locality'), 3)} | {_fmt(real.get('fid'))} "
            f"(real halves {_fmt(real.get('fid_real_halves'))}) | {_fmt(real.get('kid'), 4)} "
            f"(real halves {_fmt(real.get('kid_real_halves'), 4)}) |"
        )
    parts.append("\nComposition and reversibility: mean absolute difference to the input with images mapped to "
                 "0-255 (lower is better). Locality: fraction of the total |x_cf - x| inside the intervened "
                 "region (higher is better). Realism: Fréchet and kernel distances between features of the real "
                 "images of half of the test cases and the counterfactuals of the other half (see docs/metrics.md); "
                 "in brackets the same distance between the two halves of the real images, the floor set by the "
                 "number of cases.\n")
    figs = [(m, eval_root / m / f"fig1_{m}.png") for m in modes]
    figs = [(m, p) for m, p in figs if p.exists()]
    if figs:
        parts.append("## Figure 1: +20 mm² calcified plaque in each region\n")
        for m, p in figs:
            parts.append(f"**{MODE_LABELS.get(m, m)}**\n\n![{m}]({os.path.relpath(p, out)})\n")
    stage_dir = out / "stages"
    if stage_dir.exists():
        parts.append("## Stage times\n\n| stage | seconds |\n| --- | --- |")
        total = 0.0
        for p in sorted(stage_dir.glob("*.json"), key=lambda q: q.stat().st_mtime):
            st = json.loads(p.read_text())
            total += st.get("seconds", 0.0)
            parts.append(f"| {st['stage']} | {st.get('seconds', 0.0):.1f} |")
        parts.append(f"| **total** | {total:.1f} |\n")
    path = out / "report.md"
    _atomic_write_text(path, "\n".join(parts) + "\n")
    write_table1(eval_root, modes, structures, regions, out / "table1.md")
    return path
