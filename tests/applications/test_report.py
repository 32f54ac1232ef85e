"""Table 1 and the report from hand-made evaluation outputs with known statistics."""

from __future__ import annotations

import csv
import json

import pytest

from monai_cft.report import EFFECTIVENESS_COLUMNS, read_effectiveness, summarise_effectiveness, table1_markdown, write_report

STRUCTS = ["lumen", "calcified", "noncalcified"]
REGIONS = ["proximal", "mid", "distal"]


def _write_mode(root, mode, err_fn, n_cases=4, extra=None, with_metrics=True):
    d = root / "eval" / mode
    d.mkdir(parents=True)
    with (d / "effectiveness.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=EFFECTIVENESS_COLUMNS)
        w.writeheader()
        for c in range(n_cases):
            for s in STRUCTS:
                for r_iv in REGIONS:
                    for s2 in STRUCTS:
                        for r in REGIONS:
                            e = err_fn(c, r == r_iv and s2 == s)
                            w.writerow(dict(case_id=f"case_{c}", mode=mode, intervened=f"{s}_{r_iv}", target=5.0,
                                            measured_variable=f"{s2}_{r}", measured_structure=s2, measured_region=r,
                                            is_intervened=int(r == r_iv and s2 == s), cf_value=1.0,
                                            measured_value=1.0 + e, abs_error=abs(e)))
    if not with_metrics:
        return
    (d / "metrics.json").write_text(json.dumps({
        "structures": STRUCTS, "regions": REGIONS, "preset": "quick", "n_cases": n_cases, "seed": 0,
        "composition": {"1": {"mean": 1.0, "std": 0.1}, "10": {"mean": 3.0, "std": 0.3}},
        "reversibility": {"mean": 2.0, "std": 0.2}, "locality": {"mean": 0.7, "std": 0.1},
        "realism": {"fid": 12.0, "kid": 0.01}, **(extra or {})}))


def test_summary_statistics_are_exact(tmp_path):
    # errors 1, 2, 3, 4 in the intervened cell -> mean 2.5, sample std 1.29099
    _write_mode(tmp_path, "pos_seg", lambda c, iv: float(c + 1) if iv else 0.5)
    rows = read_effectiveness(tmp_path / "eval" / "pos_seg" / "effectiveness.csv")
    s = summarise_effectiveness(rows)
    st = s["calcified_mid"]["calcified_mid"]
    assert st["n"] == 4 and st["mean"] == pytest.approx(2.5) and st["std"] == pytest.approx(1.2909944)
    assert s["calcified_mid"]["calcified_proximal"]["mean"] == pytest.approx(0.5)


def test_table1_layout_bold_and_best(tmp_path):
    _write_mode(tmp_path, "none", lambda c, iv: 10.0 if iv else 3.0)
    _write_mode(tmp_path, "pos_seg", lambda c, iv: 2.0 if iv else 1.0)
    summaries = {m: summarise_effectiveness(read_effectiveness(tmp_path / "eval" / m / "effectiveness.csv"))
                 for m in ("none", "pos_seg")}
    md = table1_markdown(summaries, STRUCTS, REGIONS, ["none", "reg", "seg", "pos_seg"])
    lines = [l for l in md.splitlines() if l.startswith("|")]
    assert lines[0] == "| Intervention | CFT type | Proximal | Mid | Distal |"
    assert len(lines) == 2 + 9 * 2, "9 interventions x 2 evaluated modes"
    assert lines[2].startswith("| do(NCPA-proximal) | No-CFT | **10.00 ± 0.00** | 3.00 ± 0.00 |")
    assert lines[3] == "|  | Pos-Seg-CFT | **2.00 ± 0.00 †** | 1.00 ± 0.00 † | 1.00 ± 0.00 † |"


def test_write_report(tmp_path):
    _write_mode(tmp_path, "reg", lambda c, iv: 4.0 if iv else 2.0)
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "generate.json").write_text(json.dumps({"stage": "generate", "seconds": 12.5}))
    p = write_report(tmp_path, ["none", "reg", "seg", "pos_seg"])
    text = p.read_text()
    assert "Reg-CFT" in text and "| generate | 12.5 |" in text and "12.00" in text
    assert (tmp_path / "table1.md").exists()


def test_report_without_results_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate_<mode>"):
        write_report(tmp_path, ["none"])


VARS = [f"{s}_{r}" for s in STRUCTS for r in REGIONS]


def _extra(err_mode, slope, l1_model, thr_model, with_gt=True):
    """New metrics.json keys with constant values: identity error 12, ground truth 2, identity L1 50 / 20 HU."""
    st = lambda v: {"mean": v, "std": 0.0, "ci95": 0.0, "n": 4}  # noqa: E731
    extra = {
        "intervened_error": {v: {"err_mode": err_mode, "err_identity": 12.0, "n": 4,
                                 **({"err_ground_truth": 2.0} if with_gt else {})} for v in VARS},
        "response_slope": {v: {f"{v.split('_')[0]}_{r}": (slope if v.endswith(r) else -0.1 * (i + 1))
                               for i, r in enumerate(REGIONS)} for v in VARS},
    }
    if with_gt:
        extra["response_slope_ground_truth"] = {v: {f"{v.split('_')[0]}_{r}": float(v.endswith(r)) for r in REGIONS}
                                                for v in VARS}
        extra["pixel_l1_to_ground_truth"] = {v: {"inside": {"model": l1_model, "identity": 50.0},
                                                 "outside": {"model": 1.0, "identity": 20.0}, "n": 4} for v in VARS}
    srcs = ("model", "identity", "ground_truth") if with_gt else ("model", "identity")
    extra["calcium_threshold"] = {
        "threshold_hu": 455.0, "cases": "hit" if with_gt else "all",
        "factual_error": {r: st(0.5) for r in REGIONS},
        "errors": {v: {r: {s: st({"model": thr_model, "identity": 9.0, "ground_truth": 0.75}[s]) for s in srcs}
                       for r in REGIONS} for v in VARS},
        "segmentor_errors": {v: {r: {s: st({"model": 1.5, "identity": 8.0, "ground_truth": 0.25}[s]) for s in srcs}
                                 for r in REGIONS} for v in VARS},
    }
    return extra


def test_table1_identity_and_ground_truth_rows(tmp_path):
    _write_mode(tmp_path, "none", lambda c, iv: 10.0 if iv else 3.0)
    _write_mode(tmp_path, "pos_seg", lambda c, iv: 2.0 if iv else 1.0)
    _write_mode(tmp_path, "identity", lambda c, iv: 12.0 if iv else 0.5, with_metrics=False)
    _write_mode(tmp_path, "ground_truth", lambda c, iv: 0.25 if iv else 0.5, with_metrics=False)
    write_report(tmp_path, ["none", "reg", "seg", "pos_seg"])
    lines = [l for l in (tmp_path / "table1.md").read_text().splitlines() if l.startswith("|")]
    assert len(lines) == 2 + 9 * 4, "9 interventions x (identity, 2 modes, ground truth)"
    assert lines[2] == ("| do(NCPA-proximal) | Identity (x unchanged) | **12.00 ± 0.00** | 0.50 ± 0.00 | "
                        "0.50 ± 0.00 |")
    assert lines[3].startswith("|  | No-CFT | **10.00 ± 0.00** |")
    # the baselines are lower in places but the dagger compares the CFT modes only
    assert lines[4] == "|  | Pos-Seg-CFT | **2.00 ± 0.00 †** | 1.00 ± 0.00 † | 1.00 ± 0.00 † |"
    assert lines[5] == "|  | Ground truth | **0.25 ± 0.00** | 0.50 ± 0.00 | 0.50 ± 0.00 |"
    assert "Identity: the factual image" in (tmp_path / "report.md").read_text()


def test_report_sections_with_ground_truth(tmp_path):
    _write_mode(tmp_path, "none", lambda c, iv: 10.0 if iv else 3.0, extra=_extra(10.0, 0.2, 40.0, 8.0))
    curves = {"iterations": [0, 70, 140], "n_cases": 24, "median_gap_closure": [0.0, 0.4, 0.6],
              "median_slope": [0.2, 0.5, 0.7]}
    _write_mode(tmp_path, "pos_seg", lambda c, iv: 4.0 if iv else 1.0,
                extra=dict(_extra(4.0, 0.9, 10.0, 3.0), curves=curves))
    text = write_report(tmp_path, ["none", "reg", "seg", "pos_seg"]).read_text()
    for head in ("## Gap closure", "## Response slopes", "## Pixel L1 to the ground truth (HU)",
                 "## Physics measure of calcium", "## Fine-tuning curves"):
        assert head in text
    new_sections = text.split("## Gap closure")[1].split("## Composition")[0]
    assert "_Omitted" not in new_sections
    assert "- Pos-Seg-CFT (updates: median gap closure / median slope): 0: 0.00 / 0.20, 70: 0.40 / 0.50, " \
           "140: 0.60 / 0.70" in text
    assert (tmp_path / "eval" / "cft_curves.png").stat().st_size > 1000 and "](eval/cft_curves.png)" in text
    lines = text.splitlines()
    # vs No-CFT: (10 - 4) / (10 - 2) = 0.75; vs identity: (12 - 4) / (12 - 2) = 0.8 and (12 - 10) / 10 = 0.2
    i = lines.index("| Intervention | Pos-Seg-CFT |")
    assert lines[i + 2] == "| do(NCPA-proximal) | 0.75 |" and lines[i + 11] == "| **median** | **0.75** |"
    i = lines.index("| Intervention | No-CFT | Pos-Seg-CFT |")
    assert lines[i + 2] == "| do(NCPA-proximal) | 0.20 | 0.80 |"
    assert "| do(CPA-mid) | 0.20 | 0.30 | 0.90 | 0.30 | 1.00 | 0.00 |" in lines  # slope, max |other| per source
    assert "| do(LA-distal) | 40.0 | 1.0 | 10.0 | 1.0 | 50.0 | 20.0 |" in lines  # L1 inside / outside, identity last
    assert "Threshold 455 HU" in text
    i = lines.index("| do(CPA-proximal) | Identity (x unchanged) | **8.00 / 9.00** | 8.00 / 9.00 | 8.00 / 9.00 |")
    assert lines[i + 1] == "|  | No-CFT | **1.50 / 8.00** | 1.50 / 8.00 | 1.50 / 8.00 |"
    assert lines[i + 2] == "|  | Pos-Seg-CFT | **1.50 / 3.00** | 1.50 / 3.00 | 1.50 / 3.00 |"
    assert lines[i + 3] == "|  | Ground truth | **0.25 / 0.75** | 0.25 / 0.75 | 0.25 / 0.75 |"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["modes"] == ["none", "pos_seg"]
    gap = summary["gap_closure"]
    assert gap["vs_no_cft"]["pos_seg"]["median"] == pytest.approx(0.75) and "none" not in gap["vs_no_cft"]
    assert gap["vs_identity"]["none"]["per_intervention"]["lumen_mid"] == pytest.approx(0.2)
    assert summary["response_slope"]["pos_seg"]["calcified_mid"]["intervened"] == pytest.approx(0.9)
    assert summary["response_slope"]["ground_truth"]["calcified_mid"]["max_abs_other"] == 0.0
    assert summary["pixel_l1_to_ground_truth"]["identity"]["lumen_mid"] == {"inside": 50.0, "outside": 20.0}
    cal = summary["calcium_threshold"]
    assert cal["threshold_hu"] == 455.0
    assert cal["errors"]["pos_seg"]["calcified_mid"]["mid"] == {"segmentor": 1.5, "threshold": 3.0}
    assert set(cal["errors"]) == {"none", "pos_seg", "ground_truth", "identity"}


def test_report_sections_without_ground_truth(tmp_path):
    _write_mode(tmp_path, "reg", lambda c, iv: 4.0 if iv else 2.0, extra=_extra(4.0, 0.5, 0.0, 3.0, with_gt=False))
    text = write_report(tmp_path, ["none", "reg", "seg", "pos_seg"]).read_text()
    assert "## Gap closure\n\n_Omitted: no ground-truth counterfactuals" in text
    assert "## Pixel L1 to the ground truth (HU)\n\n_Omitted" in text
    assert "Ground truth" not in text.split("## Physics measure of calcium")[1].split("## Composition")[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["gap_closure"] is None and summary["pixel_l1_to_ground_truth"] is None
    assert summary["response_slope"]["reg"]["lumen_mid"]["max_abs_other"] == pytest.approx(0.3)
    assert set(summary["calcium_threshold"]["errors"]) == {"reg", "identity"}


def test_report_of_old_metrics_omits_the_new_sections(tmp_path):
    _write_mode(tmp_path, "reg", lambda c, iv: 4.0 if iv else 2.0)
    text = write_report(tmp_path, ["reg"]).read_text()
    assert text.count("_Omitted") == 7  # the four metric sections, the curves, benchmark validity and measurements
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(summary[k] is None for k in ("gap_closure", "response_slope", "pixel_l1_to_ground_truth",
                                             "calcium_threshold"))


def test_benchmark_validity_ratios_and_measurements(tmp_path):
    _write_mode(tmp_path, "none", lambda c, iv: 10.0 if iv else 3.0)
    _write_mode(tmp_path, "identity", lambda c, iv: 12.0 if iv else 0.5, with_metrics=False)
    _write_mode(tmp_path, "ground_truth", lambda c, iv: 3.0 if iv else 0.5, with_metrics=False)
    dice = {s: {"per_image": 0.9, "pooled": 0.91, "n_images": 4, "false_positive_images": 0} for s in STRUCTS}
    (tmp_path / "eval" / "measurements.json").write_text(json.dumps({
        "split": "test", "n_cases": 4,
        "segmentors": {"eval": {"arch": "segresnet", "dice": dice,
                                "area_mae_mm2": {f"{s}_{r}": 1.0 for s in STRUCTS for r in REGIONS}}},
        "calcium_threshold": {"threshold_hu": 600.0, "fitted_on": "training split (8 cases)",
                              "test_mae_mm2": {r: 1.5 for r in REGIONS}}}))
    text = write_report(tmp_path, ["none"]).read_text()
    assert "| do(NCPA-mid) | 0.50 / 0.50 = 1.00 | **3.00 / 12.00 = 0.25** | 0.50 / 0.50 = 1.00 |" in text
    assert "| eval (segresnet) | 0.900 / 0.910 | 0.900 / 0.910 | 0.900 / 0.910 |" in text
    assert "Calcium threshold 600 HU" in text
    val = json.loads((tmp_path / "summary.json").read_text())["benchmark_validity"]
    assert val["max_intervened_ratio"] == pytest.approx(0.25) and val["max_other_ratio"] == pytest.approx(1.0)
