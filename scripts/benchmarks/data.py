"""Benchmark section ``data``: phantom generation and sCPR preparation (cases/s)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .harness import machine_description, markdown_table, timed

# --------------------------------------------------------------------------------------------
# section: data generation and preparation
# --------------------------------------------------------------------------------------------


def bench_data(args: argparse.Namespace) -> str:
    """Cases/s of phantom generation and of sCPR preparation (quick and paper presets).

    Every stage runs three times: once doing all the work (``overwrite``) and twice more with every
    case already done, which costs only the start of the worker pool (importing numpy / MONAI in each
    worker) and the skip checks. The difference gives the marginal time per case; the
    extrapolation to ``--target-cases`` is ``start-up + marginal x cases``.
    """
    from monai_cft.data.prepare import prepare_dataset
    from monai_cft.data.synthetic import generate_dataset

    n, workers, target = args.num_cases, args.workers, args.target_cases
    machine = machine_description()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="monai_cft_bench_"))
    raw = root / "raw"
    print(f"[data] {n} cases, {workers} workers, in {root}", file=sys.stderr)

    def generate(overwrite: bool) -> None:
        generate_dataset(raw, n, seed=args.seed, workers=workers, overwrite=overwrite, progress=False)

    def prepare(preset: str, overwrite: bool) -> None:
        prepare_dataset(raw, root / f"scpr_{preset}", preset=preset, workers=workers, overwrite=overwrite,
                        progress=False)

    def full_and_startup(fn: Callable[[bool], None]) -> tuple[tuple[float, float], tuple[float, float]]:
        full = timed(lambda: fn(True))
        skips = [timed(lambda: fn(False)) for _ in range(2)]  # start-up is noisy: mean of two
        return full, (sum(s[0] for s in skips) / 2, sum(s[1] for s in skips) / 2)

    stages: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {}
    stages["generate (3D phantoms, NIfTI)"] = full_and_startup(generate)
    for preset in args.presets:
        stages[f"prepare `{preset}`"] = full_and_startup(lambda overwrite, p=preset: prepare(p, overwrite))
    size = sum(f.stat().st_size for f in raw.rglob("*") if f.is_file()) / n / 1e6
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)

    rows = []
    total = {"start": 0.0, "per_case": 0.0, "cpu": 0.0, "cpu0": 0.0, "wall": 0.0}
    for name, ((wall, cpu), (wall0, cpu0)) in stages.items():
        per_case = max(wall - wall0, 1e-9) / n
        cpu_case = (cpu - cpu0) / n
        idle = (cpu0 + cpu_case * target) / max(workers, 1)
        rows.append([name, f"{wall:.1f}", f"{wall0:.1f}", f"{1.0 / per_case:.2f}", f"{cpu_case:.3f}",
                     f"{wall0 + per_case * target:.0f}", f"{idle:.0f}"])
        if not name.startswith("prepare `paper`"):
            for key, value in zip(("start", "per_case", "cpu", "cpu0", "wall"), (wall0, per_case, cpu_case, cpu0, wall)):
                total[key] += value
    if "quick" in args.presets:
        idle = (total["cpu0"] + total["cpu"] * target) / max(workers, 1)
        rows.append(["**end to end: generate + prepare `quick`**", f"{total['wall']:.1f}", f"{total['start']:.1f}",
                     f"{1.0 / total['per_case']:.2f}", f"{total['cpu']:.3f}",
                     f"**{total['start'] + total['per_case'] * target:.0f}**", f"**{idle:.0f}**"])
    table = markdown_table(
        ["stage", f"wall s ({n} cases)", "start-up s", "cases/s (marginal)", "CPU s / case",
         f"extrapolated wall s, {target} cases", f"projected wall s on idle cores, {target} cases"], rows)
    return (
        f"`python scripts/benchmark.py --only data --num-cases {n} --workers {workers}` on "
        f"{machine}.\n\n{table}\n\n"
        "Each stage runs three times: doing all the work, then twice with every case done, which measures "
        "the start-up (spawning the workers, each importing numpy / MONAI, plus the skip checks; the mean "
        "of the two). cases/s is "
        "the marginal rate, (wall - start-up) / cases; the extrapolation is start-up + cases / rate. "
        "CPU s / case is the marginal user + system time of all processes: it does not depend on other "
        "jobs sharing the machine; the projection for idle cores is (start-up CPU s + CPU s / case x cases) "
        "/ workers. "
        f"Raw dataset on disk: {size:.1f} MB per case (NIfTI, gzip level 1)."
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data section")
    group.add_argument("--num-cases", type=int, default=100, help="cases to generate and prepare (default 100)")
    group.add_argument("--target-cases", type=int, default=1000, help="extrapolate the time for this many cases")
    group.add_argument("--presets", nargs="+", default=["quick", "paper"], choices=["quick", "paper"])
    group.add_argument("--keep", default=None, help="keep the generated data in this folder")
