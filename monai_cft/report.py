"""Tables and the Markdown report built from the evaluation outputs of every CFT mode.

Inputs, written by :mod:`monai_cft.evaluation` under ``<output_dir>/eval/<mode>/``:

- ``effectiveness.csv``: one row per case x intervention x measured variable with the columns
  :data:`EFFECTIVENESS_COLUMNS` (errors in mm^2);
- ``metrics.json``: the aggregated metrics of that mode (see :func:`monai_cft.evaluation.CounterfactualEvaluation.run`);
- ``fig1_<mode>.png``: the Fig. 1-style panel;

and the baselines shared by all modes, ``<output_dir>/eval/identity/effectiveness.csv`` (the factual
image taken as the counterfactual) and ``<output_dir>/eval/ground_truth/effectiveness.csv`` (the true
counterfactuals of the synthetic phantoms), when they exist.

Outputs: ``table1.md`` (the paper's Table 1 layout: rows do(variable-region) x mode, columns the
regions, mean +- standard deviation of the absolute error with the number of cases; the
intervened cell in bold, the best mode per cell marked; an identity row first and a ground-truth
row last in each block when available), ``report.md`` (Table 1, gap closure, response slopes,
pixel L1 to the ground truth, the physics measure of calcium, the other metrics, figures, stage
times) and ``summary.json`` (the numbers of the new sections, machine-readable, NaN as null).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from monai_cft.benchmark_report import format_number as _num
from monai_cft.benchmark_report import measurements_section, validity_section
from monai_cft.cft_curves import curves_section
from monai_cft.constants import MODE_LABELS

from monai_cft.metrics.response import gap_closure
from monai_cft.utils.io import save_text
from monai_cft.metrics.summary import case_statistics, finite_median

__all__ = [
    "EFFECTIVENESS_COLUMNS",
    "REFERENCE_LABELS",
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

#: the baselines of Table 1, in ``<eval_root>/<name>/effectiveness.csv``: the first and the last row of a block.
REFERENCE_LABELS = {"identity": "Identity (x unchanged)", "ground_truth": "Ground truth"}
STRUCTURE_LABELS = {"noncalcified": "NCPA", "calcified": "CPA", "lumen": "LA"}
_STRUCTURE_WORDS = {"noncalcified": "non-calcified plaque", "calcified": "calcified plaque", "lumen": "lumen"}


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


def summarise_effectiveness(rows: Sequence[dict]) -> dict:
    """Aggregate rows into ``{intervened: {measured_variable: stats}}`` (stats: mean, std, ci95, n)."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["intervened"], r["measured_variable"])].append(r["abs_error"])
    out: dict[str, dict] = defaultdict(dict)
    for (iv, mv), vals in groups.items():
        out[iv][mv] = case_statistics(vals)
    return dict(out)


def _structure_order(structures: Sequence[str]) -> list[str]:
    """Table 1's structure order: NCPA, CPA, LA, then any other structures."""
    known = ("noncalcified", "calcified", "lumen")
    return [s for s in known if s in structures] + [s for s in structures if s not in known]


def _label(mode: str) -> str:
    return MODE_LABELS.get(mode, REFERENCE_LABELS.get(mode, mode))


def table1_markdown(
    summaries: dict[str, dict],
    structures: Sequence[str],
    regions: Sequence[str],
    modes: Sequence[str] | None = None,
    unit: str = "mm²",
) -> str:
    """Render Table 1: for each do(structure-region), one row per mode, columns = regions.

    Each cell holds the mean +- std of the absolute error (``unit``: mm² for 2D images, mm³ for 3D
    volumes, as the evaluation's ``metrics.json`` records it) of the intervened *structure*
    measured in that region. The intervened region's cell is bold; the lowest mean among the
    CFT modes of a block is marked with a dagger. ``summaries`` maps mode -> output of
    :func:`summarise_effectiveness`; modes without results are left out. The baselines
    ``summaries["identity"]`` and ``summaries["ground_truth"]``, when present, add the first and the
    last row of each block (they take no part in the dagger).
    """
    modes = [m for m in (modes or list(summaries)) if m in summaries and m not in REFERENCE_LABELS]
    if not modes:
        return "_no evaluation results found_\n"
    shown = (["identity"] if "identity" in summaries else []) + modes + (
        ["ground_truth"] if "ground_truth" in summaries else [])
    n_cases = sorted({st["n"] for m in modes for iv in summaries[m].values() for st in iv.values()})
    lines = [
        "| Intervention | CFT type | " + " | ".join(r.capitalize() for r in regions) + " |",
        "| --- | --- | " + " | ".join("---" for _ in regions) + " |",
    ]
    for s in _structure_order(structures):
        label = STRUCTURE_LABELS.get(s, s)
        for r_iv in regions:
            iv = f"{s}_{r_iv}"
            best = {}
            for r in regions:
                vals = [(summaries[m].get(iv, {}).get(f"{s}_{r}", {}).get("mean", math.nan), m) for m in modes]
                vals = [v for v in vals if not math.isnan(v[0])]
                best[r] = min(vals)[1] if vals else None
            for i, m in enumerate(shown):
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
                lines.append(f"| {head} | {_label(m)} | " + " | ".join(cells) + " |")
    note = (
        f"\nAbsolute error ({unit}, mean ± standard deviation over test cases; n = "
        + ", ".join(str(n) for n in n_cases)
        + ") between the counterfactual target and the value measured on the counterfactual by the "
        "evaluation segmentor, for the intervened structure in each region. **Bold**: the intervened "
        "region (did the change happen?); plain: the other regions (did the image stay put?). "
        "†: lowest mean error among the CFT modes in that cell.\n"
    )
    if "identity" in summaries:
        note += ("Identity: the factual image taken as the counterfactual, the score of doing nothing "
                 "(its errors in the other regions are the segmentor's measurement floor).\n")
    if "ground_truth" in summaries:
        note += ("Ground truth: the true counterfactual of the synthetic phantom for the same target, the score "
                 "of a perfect counterfactual under this segmentor.\n")
    return "\n".join(lines) + "\n" + note


def _load_mode_results(eval_root: Path, modes: Sequence[str]) -> tuple[dict, dict]:
    """Summaries (modes and the baselines found) and metrics (modes) under ``eval_root``."""
    summaries, metrics = {}, {}
    for m in (*modes, *(r for r in REFERENCE_LABELS if r not in modes)):
        d = eval_root / m
        if (d / "effectiveness.csv").exists():
            summaries[m] = summarise_effectiveness(read_effectiveness(d / "effectiveness.csv"))
        if m in modes and (d / "metrics.json").exists():
            metrics[m] = json.loads((d / "metrics.json").read_text())
    return summaries, metrics


def write_table1(eval_root: str | os.PathLike, modes: Sequence[str], structures: Sequence[str],
                 regions: Sequence[str], path: str | os.PathLike | None = None) -> Path:
    """Write ``table1.md`` from the modes evaluated so far under ``eval_root``; return its path."""
    eval_root = Path(eval_root)
    summaries, metrics = _load_mode_results(eval_root, modes)
    path = Path(path) if path is not None else eval_root / "table1.md"
    save_text(table1_markdown(summaries, structures, regions, modes, _area_unit(metrics)), path)
    return path


def _area_unit(metrics: dict) -> str:
    """The area / volume unit the evaluations recorded (mm² for 2D images, mm³ for 3D volumes)."""
    return next((mm["area_unit"] for mm in metrics.values() if mm.get("area_unit")), "mm²")


def _fmt(st: dict | float | None, digits: int = 2) -> str:
    if st is None or (isinstance(st, dict) and not st):
        return "n/a"
    if isinstance(st, (int, float)):
        return f"{st:.{digits}f}"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


_median = finite_median


def _interventions(structures: Sequence[str], regions: Sequence[str]) -> list[tuple[str, str]]:
    """``(variable, do-label)`` of every intervention in Table 1's order."""
    return [(f"{s}_{r}", f"do({STRUCTURE_LABELS.get(s, s)}-{r})")
            for s in _structure_order(structures) for r in regions]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _first(metrics: dict, key: str) -> dict | None:
    """``metrics[m][key]`` of the first mode that has it (the baselines are the same in every mode)."""
    return next((mm[key] for mm in metrics.values() if mm.get(key)), None)


_NO_GT = "_Omitted: no ground-truth counterfactuals in the evaluation (`python -m monai_cft.data.ground_truth`)._\n"


def _gap_closure_section(metrics: dict, modes: Sequence[str],
                         ivs: list[tuple[str, str]]) -> tuple[list[str], dict | None]:
    parts = ["## Gap closure\n"]
    has_gt = [m for m in modes
              if any("err_ground_truth" in e for e in metrics.get(m, {}).get("intervened_error", {}).values())]
    if not has_gt:
        parts.append(_NO_GT)
        return parts, None

    def err(m: str, var: str, key: str) -> float:
        v = metrics.get(m, {}).get("intervened_error", {}).get(var, {}).get(key)
        return math.nan if v is None else float(v)

    summary: dict = {}
    refs = [("vs_no_cft", "No-CFT", "none", [m for m in has_gt if m != "none"]),
            ("vs_identity", "identity", None, has_gt)]
    for key, ref_label, ref_mode, cols in refs:
        if ref_mode is not None and ref_mode not in metrics:
            parts.append(f"_Gap closure vs {ref_label} omitted: mode `{ref_mode}` has not been evaluated._\n")
            continue
        if not cols:
            parts.append(f"_Gap closure vs {ref_label} omitted: no other mode with ground truth._\n")
            continue
        table: dict[str, dict] = {m: {} for m in cols}
        for var, _ in ivs:
            for m in cols:
                e_ref = err(ref_mode, var, "err_mode") if ref_mode else err(m, var, "err_identity")
                table[m][var] = gap_closure(e_ref, err(m, var, "err_mode"), err(m, var, "err_ground_truth"))
        medians = {m: _median(table[m].values()) for m in cols}
        summary[key] = {m: {"per_intervention": table[m], "median": medians[m]} for m in cols}
        parts.append(f"Gap closure vs {ref_label}: (err_{ref_label} − err_mode) / (err_{ref_label} − err_GT)\n")
        rows = [[lab, *(_num(table[m][var]) for m in cols)] for var, lab in ivs]
        rows.append(["**median**", *(f"**{_num(medians[m])}**" for m in cols)])
        parts.extend(_md_table(["Intervention", *(_label(m) for m in cols)], rows))
        parts.append("")
    parts.append(f"err: mean absolute error ({_area_unit(metrics)}) of the intervened variable measured by the evaluation segmentor, "
                 "over the cases whose ground truth reached its target. 1: the mode scores like the true "
                 "counterfactual; 0: no better than the reference; n/a: the reference is already at the ground "
                 "truth's error (no gap).\n")
    return parts, summary


def _slope_entry(slopes: dict | None, var: str) -> dict:
    row = (slopes or {}).get(var, {})
    others = _finite(abs(v) for mv, v in row.items() if mv != var)
    intervened = row.get(var)
    return {"intervened": math.nan if intervened is None else float(intervened),
            "max_abs_other": max(others) if others else math.nan, "slopes": row}


def _response_section(metrics: dict, modes: Sequence[str], ivs: list[tuple[str, str]]) -> tuple[list[str], dict | None]:
    parts = ["## Response slopes\n"]
    sources = {m: metrics[m]["response_slope"] for m in modes if m in metrics and metrics[m].get("response_slope")}
    gt = _first(metrics, "response_slope_ground_truth")
    if gt:
        sources["ground_truth"] = gt
    if not sources:
        parts.append("_Omitted: the evaluations have no response slopes (re-run the evaluate stages)._\n")
        return parts, None
    summary = {src: {var: _slope_entry(sl, var) for var, _ in ivs} for src, sl in sources.items()}
    header = ["Intervention"] + [h for src in sources for h in (f"{_label(src)} slope", f"{_label(src)} max abs other")]
    rows = [[lab, *(c for src in sources for c in (_num(summary[src][var]["intervened"]),
                                                   _num(summary[src][var]["max_abs_other"])))] for var, lab in ivs]
    parts.extend(_md_table(header, rows))
    parts.append("\nOrdinary least-squares slope of the change measured by the evaluation segmentor (x_cf vs x) on "
                 "the intended change (target − factual value), over test cases. slope: the intervened region (1: "
                 "follows the intervention); max abs other: the largest |slope| in the other regions of the same "
                 "structure (0: no leakage).\n")
    return parts, summary


def _pixel_l1_section(metrics: dict, modes: Sequence[str], ivs: list[tuple[str, str]]) -> tuple[list[str], dict | None]:
    parts = ["## Pixel L1 to the ground truth (HU)\n"]
    sources = {m: metrics[m]["pixel_l1_to_ground_truth"] for m in modes
               if m in metrics and metrics[m].get("pixel_l1_to_ground_truth")}
    if not sources:
        parts.append(_NO_GT)
        return parts, None
    summary: dict = {}
    for src, l1 in sources.items():
        summary[src] = {var: {side: l1.get(var, {}).get(side, {}).get("model", math.nan)
                              for side in ("inside", "outside")} for var, _ in ivs}
    ident = next(iter(sources.values()))
    summary["identity"] = {var: {side: ident.get(var, {}).get(side, {}).get("identity", math.nan)
                                 for side in ("inside", "outside")} for var, _ in ivs}
    cols = [*sources, "identity"]
    header = ["Intervention"] + [h for src in cols for h in (f"{_label(src)} inside", f"{_label(src)} outside")]
    rows = [[lab, *(c for src in cols for c in (_num(summary[src][var]["inside"], 1),
                                                _num(summary[src][var]["outside"], 1)))] for var, lab in ivs]
    parts.extend(_md_table(header, rows))
    parts.append("\nMean absolute difference (HU, in the network's window) between the counterfactual and the true "
                 "counterfactual, inside the intervened region and outside it, averaged over the cases whose ground "
                 "truth reached its target; identity: the unchanged factual image (the distance to beat).\n")
    return parts, summary


def _calcium_section(metrics: dict, modes: Sequence[str], structures: Sequence[str],
                     regions: Sequence[str]) -> tuple[list[str], dict | None]:
    parts = ["## Physics measure of calcium\n"]
    sources = {m: metrics[m]["calcium_threshold"] for m in modes
               if m in metrics and metrics[m].get("calcium_threshold")}
    if not sources or "calcified" not in structures:
        parts.append("_Omitted: no HU threshold in the evaluation (`python -m monai_cft.segmentor_evaluation` writes "
                     "`eval/measurements.json`)._\n")
        return parts, None
    first = next(iter(sources.values()))
    thresholds = sorted({float(c["threshold_hu"]) for c in sources.values()})
    # (name, its calcium_threshold block, the key of the source inside it)
    # the order of Table 1: identity, the CFT modes, ground truth
    has = lambda ref: any(ref in reg for iv in first["errors"].values() for reg in iv.values())  # noqa: E731
    entries = [(m, c, "model") for m, c in sources.items()]
    if has("identity"):
        entries.insert(0, ("identity", first, "identity"))
    if has("ground_truth"):
        entries.append(("ground_truth", first, "ground_truth"))
    ivs = [(f"calcified_{r}", f"do({STRUCTURE_LABELS['calcified']}-{r})") for r in regions]
    summary: dict = {"threshold_hu": thresholds[0] if len(thresholds) == 1
                     else {m: c["threshold_hu"] for m, c in sources.items()}, "errors": {}}

    def mean(block: dict, kind: str, var: str, r: str, key: str) -> float:
        return block.get(kind, {}).get(var, {}).get(r, {}).get(key, {}).get("mean", math.nan)

    rows = []
    for name, block, key in entries:
        summary["errors"][name] = {}
        for var, _ in ivs:
            summary["errors"][name][var] = {
                r: {"segmentor": mean(block, "segmentor_errors", var, r, key),
                    "threshold": mean(block, "errors", var, r, key)} for r in regions}
    for var, lab in ivs:
        for i, (name, _, _) in enumerate(entries):
            cells = []
            for r in regions:
                e = summary["errors"][name][var][r]
                txt = f"{_num(e['segmentor'])} / {_num(e['threshold'])}"
                cells.append(f"**{txt}**" if var == f"calcified_{r}" else txt)
            rows.append([lab if i == 0 else "", _label(name), *cells])
    parts.append("Threshold " + ", ".join(f"{t:.0f}" for t in thresholds) + " HU (fitted on the training split by "
                 "`monai_cft.segmentor_evaluation`).\n")
    parts.extend(_md_table(["Intervention", "Source", *(r.capitalize() for r in regions)], rows))
    floor = first.get("factual_error")
    if floor:
        summary["factual_threshold_error"] = {r: floor[r]["mean"] for r in regions if r in floor}
        parts.append(f"\nMeasurement floor of the threshold on the real test images ({_area_unit(metrics)}): "
                     + ", ".join(f"{r} {_num(floor[r]['mean'])}" for r in regions if r in floor) + ".")
    hit = " Over the cases whose ground truth reached its target." if first.get("cases") == "hit" else ""
    parts.append(f"\nAbsolute error ({_area_unit(metrics)}, mean over cases) of the calcified area in each region against the "
                 "counterfactual target: evaluation segmentor / pixels above the HU threshold. A counterfactual that "
                 "fools the segmentor (e.g. a brighter lumen) shows a low segmentor but a high threshold error. "
                 f"**Bold**: the intervened region.{hit}\n")
    return parts, summary


def _json_clean(obj):
    """NaN / inf -> None, recursively (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    return obj


def write_report(output_dir: str | os.PathLike, modes: Sequence[str]) -> Path:
    """Write ``<output_dir>/report.md``, ``table1.md`` and ``summary.json``; return the report's path.

    The report holds Table 1 (with the identity and ground-truth rows when their folders exist),
    gap closure, response slopes, pixel L1 to the ground truth, the physics measure of calcium, the
    other metrics, figures and stage times; a section whose inputs are missing (e.g. no ground
    truth) is replaced by a one-line note. ``summary.json`` holds the numbers of the four new
    sections (``gap_closure``, ``response_slope``, ``pixel_l1_to_ground_truth``, ``calcium_threshold``;
    null when omitted, NaN written as null).
    """
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
    parts.append(table1_markdown(summaries, structures, regions, modes, _area_unit(metrics)))
    fac = any_m.get("factual_segmentor_error")
    if fac:
        parts.append("\nMeasurement floor: the evaluation segmentor's absolute error on the *real* test images "
                     f"({_area_unit(metrics)}, mean ± std): " + ", ".join(f"{k} {_fmt(v)}" for k, v in fac.items()) + ".\n")
    ivs = _interventions(structures, regions)
    summary: dict = {"modes": [m for m in modes if m in metrics]}
    calcium_sec = _calcium_section(metrics, modes, structures, regions)
    for key, (sec, data) in (
        ("benchmark_validity", validity_section(eval_root, structures, regions, calcium_sec[1])),
        ("measurements", measurements_section(eval_root)),
    ):
        parts.append("")
        parts.extend(sec)
        summary[key] = data
    for key, (sec, data) in (
        ("gap_closure", _gap_closure_section(metrics, modes, ivs)),
        ("response_slope", _response_section(metrics, modes, ivs)),
        ("pixel_l1_to_ground_truth", _pixel_l1_section(metrics, modes, ivs)),
        ("calcium_threshold", calcium_sec),
        ("cft_curves", curves_section(metrics, modes, eval_root, out, MODE_LABELS)),
    ):
        parts.append("")
        parts.extend(sec)
        summary[key] = data
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
        fig = any_m.get("figure") or {}
        structure = _STRUCTURE_WORDS.get(fig.get("structure", "calcified"), fig.get("structure", "calcified"))
        what = f"{float(fig['delta']):+g} {_area_unit(metrics)} {structure}" if "delta" in fig else structure
        parts.append(f"## Figure 1: {what} in each region\n")
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
    save_text("\n".join(parts) + "\n", path)
    write_table1(eval_root, modes, structures, regions, out / "table1.md")
    save_text(json.dumps(_json_clean(summary), indent=2) + "\n", out / "summary.json")
    return path
