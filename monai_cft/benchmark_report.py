"""Report sections on the benchmark itself: can it tell a correct counterfactual from a wrong one?

* **Benchmark validity**: under the evaluation segmentor, the ground-truth counterfactual's error
  over the unchanged image's ("identity") error, per Table 1 cell: in the intervened cell it must
  be small (the measure sees a correct change), in the other cells about 1 (the truth leaks no
  more than doing nothing). The same for the HU-threshold calcium measure.
* **Measurements**: the segmentors' Dice per structure on the test split, their area errors, the
  calcium threshold and its error on real images, and the phantoms' rendered HU per class.

Inputs: ``<eval_root>/identity/effectiveness.csv`` and ``<eval_root>/ground_truth/effectiveness.csv``
(written by :mod:`monai_cft.evaluation`), ``<eval_root>/measurements.json``
(:mod:`monai_cft.segmentor_evaluation`) and the calcium block of ``summary.json``'s source metrics.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["validity_section", "measurements_section", "format_number", "VALIDITY_LIMITS"]

#: acceptance of a benchmark that can see a correct counterfactual: GT error / identity error.
VALIDITY_LIMITS = {"intervened": 0.35, "other": 1.1}


def format_number(x: float | None, digits: int = 2) -> str:
    """A number for a table cell with ``digits`` decimals; ``n/a`` for None or NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


_num = format_number


def _cell_means(path: Path) -> dict[tuple[str, str], float]:
    """Mean ``abs_error`` per (intervened, measured_variable) of an ``effectiveness.csv``."""
    sums: dict[tuple[str, str], list[float]] = {}
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            sums.setdefault((r["intervened"], r["measured_variable"]), []).append(float(r["abs_error"]))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def validity_section(eval_root: Path, structures: Sequence[str], regions: Sequence[str],
                     calcium: dict | None = None) -> tuple[list[str], dict | None]:
    """Markdown lines and numbers of the benchmark-validity check (see the module docstring)."""
    parts = ["## Benchmark validity: does the measure see a correct counterfactual?\n"]
    ident, gt = eval_root / "identity" / "effectiveness.csv", eval_root / "ground_truth" / "effectiveness.csv"
    if not (ident.is_file() and gt.is_file()):
        parts.append("_Omitted: no identity / ground-truth rows (run the `ground_truth` stage, then the evaluation)._\n")
        return parts, None
    e_id, e_gt = _cell_means(ident), _cell_means(gt)
    order = [s for s in ("noncalcified", "calcified", "lumen") if s in structures]
    label = {"noncalcified": "NCPA", "calcified": "CPA", "lumen": "LA"}
    rows, out = [], {"intervened_ratio": {}, "other_ratio": {}}
    for s in order:
        for r_iv in regions:
            iv = f"{s}_{r_iv}"
            cells = []
            for r in regions:
                mv = f"{s}_{r}"
                a, b = e_gt.get((iv, mv), math.nan), e_id.get((iv, mv), math.nan)
                ratio = a / b if b > 0 else math.nan
                key = "intervened_ratio" if r == r_iv else "other_ratio"
                out[key].setdefault(iv, {})[mv] = ratio
                txt = f"{_num(a)} / {_num(b)} = {_num(ratio)}"
                cells.append(f"**{txt}**" if r == r_iv else txt)
            rows.append([f"do({label.get(s, s)}-{r_iv})", *cells])
    inter = [v for d in out["intervened_ratio"].values() for v in d.values() if not math.isnan(v)]
    other = [v for d in out["other_ratio"].values() for v in d.values() if not math.isnan(v)]
    out["max_intervened_ratio"] = max(inter) if inter else math.nan
    out["max_other_ratio"] = max(other) if other else math.nan
    out["limits"] = dict(VALIDITY_LIMITS)
    parts.append("| Intervention | " + " | ".join(r.capitalize() for r in regions) + " |")
    parts.append("| --- | " + " | ".join("---" for _ in regions) + " |")
    parts.extend("| " + " | ".join(row) + " |" for row in rows)
    parts.append(
        f"\nEvaluation segmentor's mean absolute error (mm²) of the ground-truth counterfactual / of the unchanged "
        f"image = ratio, per Table 1 cell. **Bold** (intervened): the measure sees a correct change when the ratio is "
        f"small (limit {VALIDITY_LIMITS['intervened']}; worst here {_num(out['max_intervened_ratio'])}); plain (other "
        f"regions): the truth should leak no more than doing nothing (limit {VALIDITY_LIMITS['other']}; worst here "
        f"{_num(out['max_other_ratio'])}).\n")
    if calcium:
        errs = calcium.get("errors", {})
        cal_rows, cal = [], {}
        for r in regions:
            iv = f"calcified_{r}"
            g = errs.get("ground_truth", {}).get(iv, {}).get(r, {}).get("threshold", math.nan)
            i = errs.get("identity", {}).get(iv, {}).get(r, {}).get("threshold", math.nan)
            cal[iv] = g / i if i and i > 0 else math.nan
            cal_rows.append(f"do(CPA-{r}) {_num(g)} / {_num(i)} = {_num(cal[iv])}")
        out["calcium_threshold_intervened_ratio"] = cal
        parts.append("HU-threshold calcium measure, intervened cell, ground truth / unchanged image (mm²): "
                     + "; ".join(cal_rows) + f" (limit {VALIDITY_LIMITS['intervened']}).\n")
    return parts, out


def measurements_section(eval_root: Path) -> tuple[list[str], dict | None]:
    """Markdown lines of ``measurements.json``: Dice, area errors, calcium threshold, rendered HU."""
    parts = ["## Measurements: segmentors, calcium threshold, phantom HU\n"]
    path = eval_root / "measurements.json"
    if not path.is_file():
        parts.append("_Omitted: no `eval/measurements.json` (the `measurements` stage)._\n")
        return parts, None
    m = json.loads(path.read_text())
    segs = m.get("segmentors", {})
    if segs:
        structures = list(next(iter(segs.values()))["dice"])
        parts.append(f"Dice on the {m.get('split', 'test')} split ({m.get('n_cases', '?')} cases), per image "
                     "(mean over images containing the structure) / pooled over all pixels:\n")
        parts.append("| segmentor | " + " | ".join(structures) + " |")
        parts.append("| --- | " + " | ".join("---" for _ in structures) + " |")
        for role, r in segs.items():
            cells = [f"{_num(r['dice'][s]['per_image'], 3)} / {_num(r['dice'][s]['pooled'], 3)}" for s in structures]
            parts.append(f"| {role} ({r.get('arch', '?')}) | " + " | ".join(cells) + " |")
        names = list(next(iter(segs.values()))["area_mae_mm2"])
        parts.append("\nArea error on real test images (mm², mean absolute, against the labels):\n")
        parts.append("| segmentor | " + " | ".join(names) + " |")
        parts.append("| --- | " + " | ".join("---" for _ in names) + " |")
        for role, r in segs.items():
            parts.append(f"| {role} | " + " | ".join(_num(r["area_mae_mm2"][n]) for n in names) + " |")
    cal = m.get("calcium_threshold")
    if cal:
        parts.append(f"\nCalcium threshold {cal['threshold_hu']:.0f} HU ({cal.get('fitted_on', '')}); its area error "
                     "on the real test images (mm², mean absolute): "
                     + ", ".join(f"{r} {_num(v)}" for r, v in cal["test_mae_mm2"].items()) + ".\n")
    ps = m.get("parent_sensitivity")
    if ps:
        parts.append("Parent sensitivity of the pretrained DSCM (before fine-tuning): response slope of the evaluation "
                     "segmentor's change when each test case's latents are decoded with another case's parents "
                     "(1: the image follows its parents, 0: it ignores them): "
                     + ", ".join(f"{k} {_num(v)}" for k, v in ps["slopes"].items()) + ".\n")
    hu = m.get("rendered_hu")
    if hu:
        from monai_cft.data.fidelity import hu_table_markdown

        parts.append(f"Rendered HU of the phantoms ({hu.get('n_cases', '?')} {hu.get('split', '')} cases, after "
                     "blur, blooming and noise) against real contrast CCTA:\n")
        parts.append(hu_table_markdown(hu))
    return parts, m
