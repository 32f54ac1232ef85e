"""monai_cft.publish: the run's numbers go into the docs between markers, nothing else changes."""

from __future__ import annotations

import json

import pytest

from monai_cft.publish import publish, replace_block


def test_replace_block_keeps_the_markers_and_the_rest():
    text = "a\n<!-- x:start -->\nold\n<!-- x:end -->\nb\n"
    assert replace_block(text, "x", "new") == "a\n<!-- x:start -->\nnew\n<!-- x:end -->\nb\n"
    with pytest.raises(ValueError, match="y:start"):
        replace_block(text, "y", "new")


def test_publish_writes_results_readme_and_figures(tmp_path):
    out, repo = tmp_path / "outputs", tmp_path / "repo"
    (out / "eval" / "pos_seg").mkdir(parents=True)
    (out / "stages").mkdir()
    (repo / "docs").mkdir(parents=True)
    (out / "eval" / "pos_seg" / "fig1_pos_seg.png").write_bytes(b"png")
    (out / "report.md").write_text("# monai-cft report\n\n![pos_seg](eval/pos_seg/fig1_pos_seg.png)\n")
    (out / "summary.json").write_text(json.dumps({"gap_closure": {"vs_no_cft": {"pos_seg": {"median": 0.5}}}}))
    (out / "stages" / "a.json").write_text(json.dumps({"stage": "a", "seconds": 60.0, "finished": "2026-01-01T10:02:00"}))
    (out / "stages" / "b.json").write_text(json.dumps({"stage": "b", "seconds": 30.0, "finished": "2026-01-01T10:03:00"}))
    (repo / "README.md").write_text("top\n<!-- results:start -->\nold\n<!-- results:end -->\nend\n")
    written = publish(out, repo)
    results = (repo / "docs" / "results.md").read_text()
    assert "# Results on the embedded synthetic coronary data" in results
    assert "](figures/fig1_pos_seg.png)" in results and (repo / "docs" / "figures" / "fig1_pos_seg.png").is_file()
    readme = (repo / "README.md").read_text()
    assert readme.startswith("top\n") and readme.endswith("end\n") and "old" not in readme
    assert "Pos-Seg-CFT 0.50" in readme and "2.0 min" in readme  # 10:01:00 to 10:03:00
    assert repo / "README.md" in written
