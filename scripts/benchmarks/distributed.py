"""Benchmark section ``distributed``: DSCM training throughput with 1 and 2 processes (torchrun).

Each configuration is a real ``torchrun --standalone -m monai.bundle run training`` launch of
``train.json`` (+ ``multi_gpu.json``, ``multi_gpu_validate.json``) on a prepared dataset (default:
the main job's ``data/scpr_quick``) with the same global batch; the time of its last epoch (ignite's
"Epoch[k] Complete. Time taken" of rank 0, so start-up, data caching and the first epoch are left
out) gives images per second. On a CPU the fair single-process reference uses every core too (one
process with as many threads as the two processes have together).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import cuda_available, load_average, machine_description, markdown_table

_REPO = Path(__file__).resolve().parents[2]
_EPOCH = re.compile(r"Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributed")
    g.add_argument("--dist-dataset-dir", default=str(_REPO / "data" / "scpr_quick"),
                   help="prepared sCPR dataset to train on (default: the main job's data/scpr_quick)")
    g.add_argument("--dist-batch", type=int, default=32, help="global batch (split over the processes)")
    g.add_argument("--dist-epochs", type=int, default=2, help="epochs per launch (the last one is timed)")


def _epoch_seconds(text: str, epoch: int) -> float | None:
    times = [int(h) * 3600 + int(m) * 60 + float(s) for e, h, m, s in _EPOCH.findall(text) if int(e) == epoch]
    return max(times) if times else None


def _launch(dataset: Path, nproc: int, threads: int, batch: int, epochs: int, device: str, work: Path) -> dict[str, Any]:
    configs = [str(_REPO / "bundle" / "configs" / c)
               for c in ("common.json", "train.json", "multi_gpu.json", "multi_gpu_validate.json")]
    out = work / f"p{nproc}_t{threads}_{device}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}",
           "-m", "monai.bundle", "run", "training", "--config_file", repr(configs),
           "--meta_file", str(_REPO / "bundle" / "configs" / "metadata.json"),
           "--dataset_dir", str(dataset), "--ckpt_dir", str(out / "models"), "--output_dir", str(out),
           "--batch_size", str(batch // nproc), "--torch_threads", str(threads), "--max_epochs", str(epochs),
           "--val_interval", str(epochs + 1), "--image_interval", str(epochs + 1)]
    if device == "cpu":
        cmd += ["--device", "$torch.device('cpu')"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... failed:\n{proc.stderr[-2000:]}")
    return {"nproc": nproc, "threads": threads, "device": device, "wall_s": wall,
            "epoch_s": _epoch_seconds(proc.stdout + proc.stderr, epochs)}


def distributed_measurements(args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    dataset = Path(args.dist_dataset_dir)
    if not (dataset / "dataset.json").is_file():
        raise FileNotFoundError(f"{dataset}/dataset.json does not exist: run the main job (bash scripts/quickstart.sh) "
                                "or pass --dist-dataset-dir.")
    n_train = len(json.loads((dataset / "dataset.json").read_text())["training"])
    epochs = 1 if args.tiny else int(args.dist_epochs)
    settings = [(1, 1, "cpu"), (1, 2, "cpu"), (2, 1, "cpu")]
    if cuda_available():
        import torch

        settings += [(1, 1, "cuda")] + ([(2, 1, "cuda")] if torch.cuda.device_count() >= 2 else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_dist_") as tmp:
        for nproc, threads, device in settings:
            r = _launch(dataset, nproc, threads, args.dist_batch, epochs, device, Path(tmp))
            r["images_per_s"] = n_train / r["epoch_s"] if r["epoch_s"] else float("nan")
            rows.append(r)
            print(f"  distributed {device} {nproc} x {threads} thread(s): epoch {r['epoch_s']} s", flush=True)
    return rows, n_train


def bench_distributed(args: argparse.Namespace) -> str:
    rows, n_train = distributed_measurements(args)
    base = {r["device"]: r for r in rows if r["nproc"] == 1 and r["threads"] == 1}
    table = []
    for r in rows:
        ref = base.get(r["device"])
        eff = (r["images_per_s"] / (r["nproc"] * r["threads"] * ref["images_per_s"])) if ref else float("nan")
        table.append([r["device"], r["nproc"], r["threads"], f"{r['epoch_s']:.1f}", f"{r['images_per_s']:.1f}",
                      f"{eff:.2f}", f"{r['wall_s']:.0f}"])
    body = [
        f"Machine: {machine_description()}; load average before: {load_average()}.",
        f"DSCM (train.json, quick preset) on {n_train} training images, global batch {args.dist_batch} split over the "
        "processes; time of the last epoch of each launch (start-up, caching and the first epoch excluded).",
        "",
        markdown_table(["device", "processes", "threads each", "epoch (s)", "images/s",
                        "efficiency vs 1 x 1", "launch wall (s)"], table),
        "",
        "Efficiency = images/s / (processes x threads x images/s of one process with one thread). "
        + ("" if cuda_available() else "GPU rows: not measured: no GPU in this session."),
        "",
        f"Command: `{args.command}`",
    ]
    return "\n".join(body)
