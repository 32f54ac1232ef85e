"""Smoke tests of the benchmark sections of ``scripts/benchmark.py`` at toy sizes (``--tiny``), so the
script cannot rot. No speed is asserted (speed targets live in the script's output, not in tests); what
is asserted is that every section runs, fills its rows and that the implementations it compares agree."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_cft.transforms.cpr import StraightenCPR

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("monai_cft_benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_args(bench, *extra: str):
    return bench.build_parser().parse_args(["--tiny", "--threads", "1", *extra])


def measured(rows):
    return [r for r in rows if not r.get("note")]


def test_scpr_section_agrees_with_scipy(bench, single_thread):
    args = tiny_args(bench, "--scpr-volumes", "1")
    rows = bench.scpr.scpr_measurements(args)
    done = measured(rows)
    # (clinical, phantom) x (2D, 3D) x (idle, other core busy): reference, transform, inverse (+ several per call)
    assert {(r["dataset"].split()[0], r["out_dims"], r["state"]) for r in done} == {
        (d, o, s) for d in ("clinical", "phantom") for o in (2, 3) for s in ("idle", "other core busy")}
    for r in done:
        assert r["seconds"] > 0
        assert r["max_abs_hu"] < 0.05, r  # float32 rounding only: same points, same interpolation
    assert {r["ratio"] for r in done if r["implementation"].startswith("SciPy")} == {1.0}
    assert all(r["note"] for r in done if r["implementation"].startswith("`Unstraighten"))  # exact round trip
    several = [r for r in done if "3 centrelines per call" in r["implementation"]]
    assert len(several) == 4 and all(r["dataset"].startswith("clinical") for r in several)
    gpu_rows = [r for r in rows if r["state"] == "CUDA"]
    assert len(gpu_rows) == 4
    if not torch.cuda.is_available():
        assert all(r["note"] == bench.harness.NO_GPU for r in gpu_rows)
    text = bench.scpr.scpr_markdown(rows, args)
    assert text.count("\n| clinical (tiny) |") + text.count("\n| phantom (1 volumes) (tiny) |") == len(rows)
    assert "grid-constant" in text and text.count("(target >= ") == 4


def test_scipy_reference_samples_the_transform_points_with_padded_columns(bench, single_thread):
    """Two phantoms (float32) and the int16 clinical toy volume, a field of view longer than the vessels."""
    cases = bench.scpr.phantom_cases(2, seed=3) + [bench.scpr.clinical_case(tiny=True)]
    assert cases[0]["image"].shape != cases[1]["image"].shape and cases[2]["image"].dtype == torch.int16
    for out_dims in (2, 3):
        cpr = StraightenCPR((6, 90), 2.0, padding_value=-1024.0, out_dims=out_dims)  # 180 mm > any vessel
        for case in cases:
            img, line = case["image"], case["centerlines"][0]
            single = cpr(img, line)
            assert single.meta["scpr_valid_columns"] < 90
            ref = bench.scpr.scipy_straighten(img.as_tensor()[0].numpy(), img.affine.numpy(), line, (6, 90), 2.0,
                                              out_dims)
            assert ref.shape == single.shape[1:]
            assert np.abs(ref - single[0].numpy()).max() < 0.05


def test_other_core_busy_starts_and_stops_one_process(bench):
    import multiprocessing

    with bench.scpr.OtherCoreBusy() as busy:
        assert busy.proc.is_alive() and len(multiprocessing.active_children()) >= 1
    assert not busy.proc.is_alive()


def test_training_section(bench, single_thread):
    args = tiny_args(bench, "--train-presets", "quick", "--cft-modes", "reg", "seg", "pos_seg")
    rows = bench.training.training_measurements(args)
    done = measured(rows)
    assert [r["kind"] for r in done] == ["dscm", "reg", "seg", "pos_seg"]
    for r in done:
        assert r["iterations"] == 2 and r["images_per_s"] > 0 and r["peak_mib"] >= 0
        assert r["trainable"] > 0
        assert (r["frozen"] > 0) == (r["kind"] != "dscm")
    text = bench.training.training_markdown(rows, args)
    assert "DSCMTrainer" in text and "CFT `pos_seg`" in text


def test_inference_section(bench, single_thread):
    args = tiny_args(bench, "--inference-presets", "quick", "--inference-batches", "1", "3", "--particles", "1", "2")
    rows = bench.inference.inference_measurements(args)
    done = measured(rows)
    assert [(r["batch"], r["particles"]) for r in done] == [(1, 1), (1, 2), (3, 1), (3, 2)]
    for r in done:
        assert r["ms_per_image"] == pytest.approx(1000.0 * r["seconds"] / r["batch"])
    assert "ms / image" in bench.inference.inference_markdown(rows, args)


def test_inference_skips_configurations_over_the_cap(bench, single_thread):
    args = tiny_args(bench, "--inference-presets", "quick", "--inference-batches", "1", "--particles", "1", "100000",
                     "--config-cap", "1")
    rows = bench.inference.inference_measurements(args)
    skipped = [r for r in rows if r.get("note", "").startswith("skipped")]
    assert [(r["batch"], r["particles"]) for r in skipped] == [(1, 100000)]


def test_estimate_from_other_setting(bench):
    measured_s = {"a": {"1": 1.0, "2": 3.0}, "b": {"1": 2.0, "2": 10.0}, "c": {"1": 4.0}}
    seconds, ratio = bench.harness.estimate_from_other_setting(measured_s, "c", "2", "1")
    assert ratio == pytest.approx(4.0) and seconds == pytest.approx(16.0)
    assert bench.harness.estimate_from_other_setting({"c": {"1": 4.0}}, "c", "2", "1") is None


def test_quickstart_section(bench, tmp_path):
    args = tiny_args(bench, "--outputs-dir", str(tmp_path))
    assert "has not been run" in bench.quickstart.bench_quickstart(args)
    stages = tmp_path / "stages"
    stages.mkdir()
    for name, seconds, finished in (("dscm", 600.0, "2026-01-01T10:10:50"), ("generate", 30.5, "2026-01-01T10:00:30"),
                                    ("prepare", 20.0, "2026-01-01T10:00:50")):
        cmd = ["python", "-m", "x", "--preset", "quick"] if name == "prepare" else ["python", "--num-cases", "600"]
        (stages / f"{name}.json").write_text(json.dumps({"stage": name, "seconds": seconds, "command": cmd,
                                                         "finished": finished}))
    text = bench.quickstart.bench_quickstart(args)
    assert text.index("`generate`") < text.index("`prepare`") < text.index("`dscm`")  # pipeline order
    assert "**650.5**" in text and "cases 600" in text and "preset quick" in text
    assert "| **wall clock with a stage running** |  | **650.5** |" in text  # 09:59:59.5 to 10:10:50, no gap
    assert "`finetune_pos_seg`" in text  # listed as missing
    (stages / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        bench.quickstart.read_stage_times(tmp_path)


def test_tiny_numbers_cannot_be_written_to_the_docs(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--only", "quickstart", "--tiny", "--write-docs", str(tmp_path / "b.md")])


def test_write_docs_replaces_only_its_section(bench, tmp_path):
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\n## Data generation and preparation\n\nold data\n\n## Quickstart pipeline\n\nold\n")
    assert bench.main(["--only", "quickstart", "--outputs-dir", str(tmp_path), "--write-docs", str(md)]) == 0
    text = md.read_text()
    assert "old data" in text and "\nold\n" not in text and "has not been run" in text


def test_thread_scaling_note(bench):
    rows = [{"kind": "a", "setting": "CPU, 1 thread", "seconds": 1.0},
            {"kind": "a", "setting": "CPU, 2 threads", "seconds": 3.0},
            {"kind": "b", "setting": "CPU, 1 thread", "seconds": 2.0},
            {"kind": "b", "setting": "CPU, 2 threads", "seconds": 1.0},
            {"kind": "c", "setting": "CPU, 2 threads", "note": "skipped"}]
    note = bench.harness.thread_scaling_note(rows, ("kind",), [1, 2])
    assert "1.75x" in note and "range 0.50-3.00" in note and "slower" in note
    assert bench.harness.thread_scaling_note(rows[2:4], ("kind",), [1, 2]).count("slower") == 0
    assert bench.harness.thread_scaling_note(rows, ("kind",), [1]) == ""


def test_predict_call_seconds(bench):
    seconds = {(1, 1): 0.5, (1, 8): 3.0, (32, 1): 8.0}
    assert bench.inference.predict_call_seconds(seconds, 32, 8) == pytest.approx(64.0)  # from (32, 1), the largest
    assert bench.inference.predict_call_seconds({(1, 1): 0.5}, 32, 8) == pytest.approx(128.0)
    assert bench.inference.predict_call_seconds({}, 1, 1) is None
