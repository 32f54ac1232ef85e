"""Data-parallel training with real ``torchrun`` launches (CPU, gloo, tiny data and networks).

Two processes with per-process batch B/2 must follow the run of one process with batch B (both
launched with ``multi_gpu.json``, so both draw their batches from ``DistributedSampler``): the DSCM
to float rounding, the counterfactual fine-tuning (whose Adam steps amplify float rounding of the
guidance loss's large sums) to within a few per cent of what the fine-tuning changed, with the
same averaged gradient norm at every step.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_cft.utils.io import _is_number  # the CSV reader's own test of a number cell
from helpers import make_scpr_dataset

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bundle" / "configs"
TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY = {"network_def#widths": [4, 8, 8, 8], "network_def#blocks_per_level": 1, "network_def#z_max_res": 24,
        "network_def#flow_kwargs": {"hidden": [8], "transforms": 1, "bins": 4}}

pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"torchrun not found next to {sys.executable}")


def torchrun(nproc: int, run_id: str, configs: list[str], out: Path, **overrides) -> subprocess.CompletedProcess:
    files = [str(CONFIGS / c) if not os.path.isabs(c) else c for c in configs]
    cmd = [str(TORCHRUN), "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}", "-m", "monai.bundle", "run",
           run_id, "--config_file", str(files), "--meta_file", str(CONFIGS / "metadata.json")]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MONAI_CFT_BUNDLE_ROOT", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["model"]
    return {k: v.double() for k, v in state.items() if v.is_floating_point()}


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    scpr = make_scpr_dataset(root / "scpr_quick", n_train=8, n_val=2, n_test=5)
    (root / "tiny.json").write_text(json.dumps(TINY))
    return root, scpr


@pytest.fixture(scope="module")
def dscm_runs(setup):
    root, scpr = setup
    runs = {}
    for nproc, batch in ((1, 4), (2, 2)):
        out = root / f"dscm_{nproc}"
        out.mkdir()
        proc = torchrun(nproc, "training", ["common.json", "train.json", str(root / "tiny.json"), "multi_gpu.json",
                                            "multi_gpu_validate.json"], out,
                        dataset_dir=scpr, ckpt_dir=out / "models", output_dir=out, batch_size=batch, torch_threads=1,
                        max_epochs=2, val_interval=2, image_interval=100)
        runs[nproc] = (out, proc)
    return runs


def test_dscm_two_processes_follow_one(dscm_runs):
    (one, _), (two, _) = dscm_runs[1], dscm_runs[2]
    a, b = _weights(one / "models" / "dscm_last.pt"), _weights(two / "models" / "dscm_last.pt")
    scale = math.sqrt(sum(float((v**2).sum()) for v in a.values()))
    assert _distance(a, b) <= 1e-7 * scale, _distance(a, b) / scale
    # the distributed validation ran (its best checkpoint written once, by rank 0) and its metric is global
    assert (two / "models" / "dscm.pt").is_file()
    assert sorted(p.name for p in (two / "models").iterdir()) == ["dscm.pt", "dscm_last.pt"]
    for name in ("dscm.pt", "dscm_last.pt"):
        assert torch.load(two / "models" / name, weights_only=True)["meta"]["kind"] == "dscm"


def _grad_norms(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"Iter: \d+/\d+ -- .*?grad_norm: ([0-9.eE+-]+)", text)]


SGD = {"train#trainer#optimizer": {"_target_": "torch.optim.SGD", "params": "$@network.hvae.parameters()", "lr": 0.05}}


@pytest.fixture(scope="module", params=["adamw", "sgd"])
def cft_runs(request, setup, dscm_runs):
    """Pos-Seg-CFT fine-tunings with 1 x 4 and 2 x 2 (and their logs), with the default AdamW and with SGD
    (whose steps are linear in the gradient, so the weights must agree element by element)."""
    root, scpr = setup
    pretrained = dscm_runs[2][0] / "models"
    from monai_cft.networks.predictors import build_segmentor
    from monai_cft.utils.checkpoint import save_checkpoint

    meta = torch.load(pretrained / "dscm.pt", weights_only=True)["meta"]
    torch.manual_seed(0)
    seg_meta = {"kind": "segmentor", "role": "guidance", "arch": "unet", "out_channels": 4, "in_channels": 1,
                "spatial_dims": 2, "img_size": meta["img_size"], "preset": "quick", "variables": meta["variables"]}
    segmentor = build_segmentor(2, "unet", 1, 4)  # one untrained guidance segmentor for both runs
    evaluator = build_segmentor(2, "unet", 1, 4)  # and one evaluation segmentor
    runs = {}
    for nproc, batch in ((1, 4), (2, 2)):
        out = root / f"cft_{request.param}_{nproc}"
        (out / "models").mkdir(parents=True)
        shutil.copy(pretrained / "dscm.pt", out / "models" / "dscm.pt")
        save_checkpoint(out / "models" / "segmentor_guidance.pt", segmentor, seg_meta)
        save_checkpoint(out / "models" / "segmentor_eval.pt", evaluator, dict(seg_meta, role="eval"))
        extra = []
        if request.param == "sgd":
            (root / "sgd.json").write_text(json.dumps(SGD))
            extra = [str(root / "sgd.json")]
        proc = torchrun(nproc, "finetune", ["common.json", "finetune.json", *extra, "multi_gpu.json"], out,
                        dataset_dir=scpr, ckpt_dir=out / "models", output_dir=out, batch_size=batch, torch_threads=1,
                        max_epochs=2, cft_mode="pos_seg", elbo_target_batches=2, lr=0.002, log_every=1)
        runs[nproc] = (out, proc.stdout + proc.stderr)
    runs["optimizer"] = request.param
    return runs


def test_cft_two_processes_follow_one(dscm_runs, cft_runs):
    runs, pretrained = cft_runs, dscm_runs[2][0] / "models"
    w0 = _weights(pretrained / "dscm.pt")
    w1, w2 = (_weights(runs[n][0] / "models" / "dscm_cft_pos_seg.pt") for n in (1, 2))
    g1, g2 = _grad_norms(runs[1][1]), _grad_norms(runs[2][1])
    assert len(g1) == 4 and len(g2) == 4, (g1, g2)  # rank 0 alone logs: 2 epochs x 2 updates
    assert g2 == pytest.approx(g1, rel=1e-4)
    moved = _distance(w1, w0)
    assert moved > 0
    assert _distance(w2, w1) <= 0.05 * moved, (_distance(w2, w1), moved)
    if runs["optimizer"] == "sgd":  # linear steps: element by element
        assert _distance(w2, w1) <= 1e-3 * moved, (_distance(w2, w1), moved)
        for k in w1:
            assert torch.allclose(w2[k], w1[k], rtol=1e-4, atol=1e-6), k
    m1, m2 = (torch.load(runs[n][0] / "models" / "dscm_cft_pos_seg.pt", weights_only=True)["meta"]["cft"] for n in (1, 2))
    assert m1["iterations"] == m2["iterations"] == 4
    assert m2["elbo_target"] == pytest.approx(m1["elbo_target"], rel=1e-6)
    assert sorted(p.name for p in (runs[2][0] / "models").iterdir()) == [
        "dscm.pt", "dscm_cft_pos_seg.pt", "segmentor_eval.pt", "segmentor_guidance.pt"]


def test_evaluation_on_two_processes_equals_one(setup, cft_runs):
    """Every test case evaluated once: the same metrics, effectiveness rows and Table 1 as one process
    (5 test cases in batches of 4: shards of 2 + 2, then 1 + 0)."""
    if cft_runs["optimizer"] != "adamw":
        pytest.skip("the evaluation runs once, on the models of the default (AdamW) fine-tuning")
    root, scpr = setup
    models = cft_runs[1][0] / "models"
    outs = {}
    for nproc in (1, 2):
        out = root / f"eval_{nproc}"
        out.mkdir()
        configs = ["common.json", "evaluate.json"] + (["multi_gpu_evaluate.json"] if nproc > 1 else [])
        torchrun(nproc, "evaluating", configs, out, dataset_dir=scpr, ckpt_dir=models, output_dir=out,
                 cft_mode="pos_seg", eval_batch_size=4, allow_extrapolation=True, torch_threads=1,
                 snapshot_dir=cft_runs[1][0] / "cft_state" / "cft_pos_seg_snapshots", curve_cases=3)
        outs[nproc] = out / "eval" / "pos_seg"
    m1, m2 = (json.loads((outs[n] / "metrics.json").read_text()) for n in (1, 2))
    for m in (m1, m2):
        m.pop("seconds")
    assert m1["n_cases"] == 5 and "curves" in m1
    # equal up to the float rounding of smaller convolution batches (the shards), e.g. 1.6e-7 vs 1.4e-7 mm^2
    _assert_close(m2, m1)
    assert (outs[2] / "table1.md").read_text() == (outs[1] / "table1.md").read_text()
    import csv

    r1, r2 = (list(csv.DictReader((outs[n] / "effectiveness.csv").open())) for n in (1, 2))
    assert len(r1) == len(r2) == 5 * 9 * 9  # case x intervention x measured variable: none duplicated or dropped
    for a, b in zip(r1, r2):
        assert {k: v for k, v in a.items() if not _is_number(v)} == {k: v for k, v in b.items() if not _is_number(v)}
        assert [float(b[k]) for k in a if _is_number(a[k])] == pytest.approx(
            [float(a[k]) for k in a if _is_number(a[k])], rel=1e-4, abs=1e-4)


def _assert_close(got, want, path="metrics"):
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            _assert_close(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-4, abs=1e-5), (path, got, want)
    else:
        assert got == want, (path, got, want)


def test_pipeline_nproc_launches_training_stages_with_torchrun(tmp_path):
    from monai_cft import pipeline

    args = pipeline.parse_args(["--nproc", "2", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path)])
    args.torch_threads = 1
    stages = {s.name: s.command for s in pipeline.build_stages(args)}
    for name in ("dscm", "segmentor_guidance", "segmentor_eval", "regressor", "finetune_pos_seg"):
        cmd = stages[name]
        assert cmd[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m"]
        files = eval(cmd[cmd.index("--config_file") + 1])
        assert Path(files[-1]).name in ("multi_gpu.json", "multi_gpu_validate.json")
        assert ("multi_gpu_validate.json" in files[-1]) == (name != "finetune_pos_seg")
    assert "torch.distributed.run" not in stages["evaluate_pos_seg"] and "torch.distributed.run" not in stages["prepare"]
    one = pipeline.parse_args(["--data-dir", str(tmp_path), "--output-dir", str(tmp_path)])
    one.torch_threads = 1
    assert all("torch.distributed.run" not in (s.command or []) for s in pipeline.build_stages(one))


def test_distributed_benchmark_reads_epoch_times_and_needs_data(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import benchmark as bench
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    log = ("... Epoch[1] Complete. Time taken: 00:00:09.500\n... Epoch[2] Complete. Time taken: 00:01:02.250\n"
           "... Epoch[2] Complete. Time taken: 00:01:02.750\n")
    assert bench.distributed._epoch_seconds(log, 2) == pytest.approx(62.75)  # the slowest rank
    assert bench.distributed._epoch_seconds(log, 3) is None
    args = bench.build_parser().parse_args(["--only", "distributed", "--dist-dataset-dir", str(tmp_path / "none")])
    args.command = "x"
    with pytest.raises(FileNotFoundError, match="none/dataset.json"):
        bench.distributed.bench_distributed(args)
