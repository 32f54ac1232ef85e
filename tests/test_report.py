"""Table 1 and the report from hand-made evaluation outputs with known statistics."""

from __future__ import annotations

import csv
import json

import pytest

from monai_cft.report import EFFECTIVENESS_COLUMNS, read_effectiveness, summarise_effectiveness, table1_markdown, write_report

STRUCTS = ["lumen", "calcified", "noncalcified"]
REGIONS = ["proximal", "mid", "distal"]


def _write_mode(root, mode, err_fn, n_cases=4):
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
    (d / "metrics.json").write_text(json.dumps({
        "structures": STRUCTS, "regions": REGIONS, "preset": "quick", "n_cases": n_cases, "seed": 0,
        "composition": {"1": {"mean": 1.0, "std": 0.1}, "10": {"mean": 3.0, "std": 0.3}},
        "reversibility": {"mean": 2.0, "std": 0.2}, "locality": {"mean": 0.7, "std": 0.1},
        "realism": {"fid": 12.0, "kid": 0.01}}))


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
