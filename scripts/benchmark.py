#!/usr/bin/env python
"""Speed benchmarks of monai-cft, one section per part of the pipeline.

    python scripts/benchmark.py --only data --num-cases 100 --workers 2 [--write-docs docs/benchmarks.md]
    python scripts/benchmark.py --only scpr training inference quickstart [--write-docs docs/benchmarks.md]

Sections: ``data`` (phantom generation and sCPR preparation, cases/s), ``scpr`` (straightening
throughput of ``StraightenCPR`` against a SciPy ``map_coordinates`` reference sampling the same
points), ``training`` (DSCM and CFT iterations: images/s, peak memory, parameters), ``inference``
(counterfactual latency per image) and ``quickstart`` (stage times of ``python -m monai_cft.pipeline``).
GPU rows run only where CUDA is available (bfloat16 autocast for the networks); elsewhere they say
"not measured: no GPU in this session". ``--tiny`` runs every section at toy sizes as a smoke test
(its numbers mean nothing and cannot be written to the docs).

Each section prints a markdown table; with ``--write-docs`` its table (and the machine it ran on)
replaces the section's heading block in the given markdown file, leaving the other sections alone.
Add a section by writing ``def bench_<name>(args) -> str`` (returning markdown) and registering it
in ``SECTIONS`` with its heading; section-specific options go in ``add_arguments``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

#: what a GPU row says when CUDA is not available (never a made-up number).
NO_GPU = "not measured: no GPU in this session"

# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def machine_description() -> str:
    """One markdown line: cores, CPU model, load, Python / torch / MONAI versions."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or model
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    versions = [f"Python {platform.python_version()}"]
    for mod in ("torch", "monai", "numpy", "scipy", "nibabel"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    omp = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (f"{cores} cores (nproc), {model}; {gpu_description()}; load average at start {load_average()}; "
            f"{', '.join(versions)}; OMP_WAIT_POLICY {omp}")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``"3.1, 2.8, 3.2"``."""
    return ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def gpu_description() -> str:
    """``"GPU: <name> (<memory> GiB)"`` for the first CUDA device, or ``"no GPU"``."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return "no GPU"
    if not torch.cuda.is_available():
        return "no GPU"
    props = torch.cuda.get_device_properties(0)
    return f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB)"


def children_cpu_seconds() -> float:
    """User + system CPU time of finished child processes (the worker pools) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Run ``fn``; return (wall seconds, CPU seconds of this process and its finished children)."""
    cpu0 = children_cpu_seconds() + self_cpu_seconds()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, children_cpu_seconds() + self_cpu_seconds() - cpu0


def sync(device: Any) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op on the CPU) so wall-clock times are complete."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], device: Any = "cpu", warmup: int = 1, budget_s: float = 5.0,
    min_repeats: int = 1, max_repeats: int = 10,
) -> list[float]:
    """Wall seconds of repeated calls of ``fn``, after ``warmup`` untimed calls.

    Calls are repeated until at least ``min_repeats`` were timed and together they took ``budget_s``
    (at most ``max_repeats``); report the median, which is robust to other jobs on a shared machine.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


class TimeBudget:
    """Wall-clock budget of a section: a configuration predicted to take longer than ``cap_s`` or than
    what is left of ``total_s`` is skipped, and its row says so (on a busy shared machine a
    configuration can be many times slower than usual)."""

    def __init__(self, total_s: float, cap_s: float) -> None:
        self.total_s, self.cap_s = float(total_s), float(cap_s)
        self.deadline = time.perf_counter() + self.total_s

    def skip_reason(self, predicted_s: float | None) -> str | None:
        """``None`` to run a configuration predicted to take ``predicted_s`` (``None``: unknown), else the note."""
        left = self.deadline - time.perf_counter()
        if predicted_s is not None and predicted_s > self.cap_s:
            return f"skipped: predicted {predicted_s:.0f} s > --config-cap {self.cap_s:g} s"
        if left <= 0 or (predicted_s is not None and predicted_s > left):
            return (f"skipped: predicted {predicted_s or 0:.0f} s > the {max(left, 0):.0f} s left of "
                    f"--section-budget {self.total_s:g} s")
        return None


def median(values: Sequence[float]) -> float:
    """Median of ``values`` (NaN when empty)."""
    return float(statistics.median(values)) if values else float("nan")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` intra-op torch threads inside the block, restoring the previous count after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def count_parameters(module: Any) -> int:
    """Number of parameter elements of a torch module."""
    return sum(p.numel() for p in module.parameters())


def _current_rss_kb() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_memory() -> None:
    """Collect garbage and hand free heap memory back to the OS (glibc ``malloc_trim``), so that an
    earlier measurement's freed buffers do not hide the next one's peak."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


class PeakMemory:
    """Peak memory (MiB) of the code run inside ``with PeakMemory(device) as mem:`` -> ``mem.peak_mib``.

    * CPU: the peak resident set size (``resource.getrusage(...).ru_maxrss``) minus the resident
      size at entry. At entry free heap memory is returned to the OS and the kernel's high-water
      mark is reset to the current size (``/proc/self/clear_refs``, Linux >= 4.0), so the value is
      what the block itself needed (models, optimizer states, activations). Where the reset is
      impossible it is the growth of the process's lifetime peak, a lower bound (``method`` says which).
    * CUDA: ``torch.cuda.max_memory_allocated`` during the block (tensors allocated before it count too).
    """

    def __init__(self, device: Any = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.peak_mib = float("nan")
        self.method = ""

    def __enter__(self) -> PeakMemory:
        import torch

        _release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reset = True
        except OSError:
            pass
        rss = _current_rss_kb() if reset else None
        self._base_kb = rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.method = "peak RSS above entry" if rss is not None else "growth of lifetime peak RSS (lower bound)"
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            sync(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base_kb, 0) / 1024


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (the GPU rows run only then)."""
    import torch

    return torch.cuda.is_available()


def fmt(value: float, digits: int = 2) -> str:
    """A number for a table: ``digits`` decimals below 10, one below 100, none above; ``n/a`` for NaN."""
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def command_line(args: argparse.Namespace, section: str) -> str:
    """The command that produced a section's numbers (as given to :func:`main`)."""
    return getattr(args, "command", None) or f"python scripts/benchmark.py --only {section}"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_markdown_section(path: Path, heading: str, body: str) -> None:
    """Replace the ``## heading`` block of ``path`` (up to the next ``## ``) with ``body``; append if absent."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    from monai_cft.data.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


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


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data section")
    group.add_argument("--num-cases", type=int, default=100, help="cases to generate and prepare (default 100)")
    group.add_argument("--target-cases", type=int, default=1000, help="extrapolate the time for this many cases")
    group.add_argument("--presets", nargs="+", default=["quick", "paper"], choices=["quick", "paper"])
    group.add_argument("--keep", default=None, help="keep the generated data in this folder")


# --------------------------------------------------------------------------------------------
# shared set-up of the model sections
# --------------------------------------------------------------------------------------------

def preset_geometry(preset: str, tiny: bool = False) -> tuple[float, tuple[int, int]]:
    """``(spacing_mm, (H, W))`` of an sCPR preset; with ``tiny`` a toy 16 x 48 image at 2 mm."""
    if tiny:
        return 2.0, (16, 48)
    from monai_cft.data.presets import get_scpr_preset

    geometry = get_scpr_preset(preset)
    return geometry["spacing"], geometry["output_size"]


#: toy network sizes used by ``--tiny`` (smoke tests only).
_TINY_HVAE = {"widths": (4, 8, 8), "blocks_per_level": (0, 1, 1), "z_max_res": 24, "z_dim": 2, "embed_dim": 8}
_TINY_FLOWS = {"hidden": (8,), "transforms": 1, "bins": 4}


def variables_and_ranges() -> tuple[list[str], dict[str, list[float]]]:
    """The 9 default variables (structure-major) with plausible 2D ranges in mm^2 (speed does not depend on them)."""
    from monai_cft.variables import DEFAULT_REGIONS, DEFAULT_STRUCTURES, variable_names

    names = variable_names(DEFAULT_STRUCTURES, DEFAULT_REGIONS)
    top = {"lumen": 40.0, "calcified": 8.0, "noncalcified": 12.0}
    return names, {n: [0.0, top[n.split("_")[0]]] for n in names}


def build_benchmark_dscm(preset: str, img_size: Sequence[int], tiny: bool = False):
    """A randomly initialised ``DeepSCM`` of an HVAE preset (``build_dscm``), toy-sized with ``tiny``."""
    from monai_cft.networks.dscm import build_dscm

    names, ranges = variables_and_ranges()
    overrides = dict(_TINY_HVAE) if tiny else {}
    return build_dscm(preset, 2, tuple(img_size), names, ranges, flow_kwargs=_TINY_FLOWS if tiny else None, **overrides)


def random_batch(batch: int, img_size: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """``{"image": (B, 1, H, W) uniform in [-1, 1], "variables": (B, 9) uniform in their ranges}``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    names, ranges = variables_and_ranges()
    low = torch.tensor([ranges[n][0] for n in names])
    high = torch.tensor([ranges[n][1] for n in names])
    image = torch.rand(batch, 1, *img_size, generator=g) * 2.0 - 1.0
    variables = low + (high - low) * torch.rand(batch, len(names), generator=g)
    return {"image": image, "variables": variables}


def _per_iteration_times(engine: Any, device: Any, warmup: int = 0, min_timed: int = 2,
                         cap_s: float = float("inf")) -> list[float]:
    """Attach handlers to an Ignite engine that record each iteration's wall seconds (batch fetching
    excluded: the clock starts at ``ITERATION_STARTED``); returns the list they fill. The engine is
    terminated once at least ``min_timed`` iterations after the first ``warmup`` took ``cap_s`` seconds."""
    from ignite.engine import Events

    times: list[float] = []
    start = [0.0]

    def started(_: Any) -> None:
        sync(device)
        start[0] = time.perf_counter()

    def completed(eng: Any) -> None:
        sync(device)
        times.append(time.perf_counter() - start[0])
        timed = times[warmup:]
        if len(timed) >= min_timed and sum(timed) >= cap_s:
            eng.terminate()

    engine.add_event_handler(Events.ITERATION_STARTED, started)
    engine.add_event_handler(Events.ITERATION_COMPLETED, completed)
    return times


def estimate_from_other_setting(measured: dict[Any, dict[str, float]], key: Any, setting: str,
                                reference: str) -> tuple[float, float] | None:
    """Predict the seconds of ``key`` under ``setting`` from its time under ``reference`` and the median
    ratio setting / reference of the keys already measured under both; ``(seconds, ratio)`` or ``None``."""
    ratios = [t[setting] / t[reference] for k, t in measured.items() if k != key and setting in t and reference in t]
    if not ratios or reference not in measured.get(key, {}):
        return None
    ratio = median(ratios)
    return ratio * measured[key][reference], ratio


def _device_settings(args: argparse.Namespace) -> list[tuple[str, int | None]]:
    """``(device, torch threads)`` to measure: the CPU with each of ``--threads``, then CUDA."""
    return [("cpu", n) for n in args.threads] + [("cuda", None)]


def _settings_label(device: str, threads: int | None) -> str:
    return f"CPU, {threads} thread{'s' if threads != 1 else ''}" if device == "cpu" else "CUDA, bf16 autocast"


def thread_scaling_note(rows: Sequence[dict[str, Any]], keys: Sequence[str], threads: Sequence[int]) -> str:
    """A sentence, computed from the rows, on the time with the second thread count relative to the first."""
    if len(threads) < 2:
        return ""
    first, second = _settings_label("cpu", threads[0]), _settings_label("cpu", threads[1])
    by_config: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if "seconds" in r and r["seconds"] == r["seconds"]:  # measured (not NaN)
            by_config.setdefault(tuple(r[k] for k in keys), {})[r["setting"]] = r["seconds"]
    ratios = [t[second] / t[first] for t in by_config.values() if first in t and second in t]
    if not ratios:
        return ""
    mid = median(ratios)
    text = (f" With {threads[1]} threads a configuration took {mid:.2f}x its {threads[0]}-thread time (median of "
            f"{len(ratios)}, range {min(ratios):.2f}-{max(ratios):.2f}).")
    if mid > 1.0:
        text += (" More threads were slower here: every parallel region of an operation waits for its slowest "
                 "thread; with the cores shared with other jobs (see the load average) a thread is often "
                 "descheduled for milliseconds while the others spin (OMP_WAIT_POLICY "
                 f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}), which many small operations pay again and again. "
                 "An idle machine (or `--omp-wait-policy passive`) is needed to see the parallel speed-up.")
    return text


def _threads_or_null(threads: int | None) -> contextlib.AbstractContextManager:
    return torch_threads(threads) if threads is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# section: sCPR straightening
# --------------------------------------------------------------------------------------------


def phantom_volumes(num: int, seed: int = 0) -> list[dict[str, Any]]:
    """Render ``num`` phantoms: ``{"image": MetaTensor (1, X, Y, Z) float32 HU with its affine,
    "centerline": (N, 3) world mm}`` (float32 as ``LoadImage`` would give the NIfTI files)."""
    import numpy as np
    import torch
    from monai.data import MetaTensor

    from monai_cft.data.phantom import render_phantom, sample_phantom_params

    cases = []
    for i in range(num):
        case = render_phantom(sample_phantom_params(seed + i))
        image = MetaTensor(torch.from_numpy(case.image.astype(np.float32))[None],
                           affine=torch.as_tensor(case.affine, dtype=torch.float64))
        cases.append({"image": image, "centerline": np.asarray(case.centerline, dtype=np.float64)})
    return cases


def world_to_voxel(grid_world: Any, affine: Any) -> Any:
    """(..., 3) world mm -> (..., 3) continuous voxel indices with the inverse of the (4, 4) affine (NumPy)."""
    import numpy as np

    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return np.asarray(grid_world, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]


def scipy_sample(volume: Any, voxels: Any, width: int, padding: float, mode: str = "grid-constant") -> Any:
    """The SciPy reference of the sampling: trilinear ``map_coordinates`` (order 1) of a (X, Y, Z)
    float32 volume at (..., Wv, 3) voxel coordinates; columns ``Wv..width-1`` and every point outside
    are ``padding``.

    ``mode="grid-constant"`` (default) extends the volume with ``padding`` *and interpolates* across
    its border, which is the transform's constant padding; ``mode="constant"`` instead sets every
    point beyond the outermost voxel centres to ``padding`` outright. Returns (..., width) float32.
    """
    import numpy as np
    from scipy.ndimage import map_coordinates

    out = np.full((*voxels.shape[:-2], width), padding, dtype=np.float32)
    out[..., : voxels.shape[-2]] = map_coordinates(volume, np.moveaxis(voxels, -1, 0), order=1,
                                                   mode=mode, cval=padding, output=np.float32)
    return out


def straighten_batched(cpr: Any, images: Sequence[Any], centerlines: Sequence[Any], device: Any = "cpu") -> Any:
    """Straighten several volumes (of any shapes) with ONE ``grid_sample`` call (benchmark code, not a library API).

    Every volume gets its geometry from ``cpr.plan`` (the transform's own planning), is copied into a
    common (N, C, X+2, Y+2, Z+2) block whose margin and unused voxels hold ``cpr.padding_value``,
    and is sampled with ``padding_mode="border"``: inside the block that is exact constant padding
    (the margin is at least one voxel), and any point beyond the block lands on a border of padding
    values. Columns beyond the vessel's end point far outside and come out as padding.

    Args:
        cpr: a ``StraightenCPR`` (bilinear mode).
        images: N channel-first (C, X, Y, Z) ``MetaTensor`` volumes (same C) with their affines.
        centerlines: N (M, 3) world-mm centrelines.
        device: where the block is built and sampled.

    Returns:
        (N, C, H, W) or (N, C, H, H, W) float32 tensor on ``device``.
    """
    import torch
    import torch.nn.functional as F

    device = torch.device(device)
    shapes = [tuple(int(s) for s in img.shape[1:]) for img in images]
    affines = [torch.as_tensor(img.affine).detach().cpu().to(torch.float64) for img in images]  # planning: CPU
    plans = [cpr.plan(c, a, s) for a, c, s in zip(affines, centerlines, shapes)]
    block = [max(s[k] for s in shapes) + 2 for k in range(3)]
    channels = int(images[0].shape[0])
    data = torch.full((len(images), channels, *block), cpr.padding_value, dtype=torch.float32, device=device)
    grids = []
    big = torch.tensor(block[::-1], dtype=torch.float64)  # grid order (z, y, x)
    for i, (img, shape, plan) in enumerate(zip(images, shapes, plans)):
        data[i, :, 1 : shape[0] + 1, 1 : shape[1] + 1, 1 : shape[2] + 1] = img.as_tensor().to(device, torch.float32)
        small = torch.tensor(shape[::-1], dtype=torch.float64)
        voxels = (plan.sample_grid + 1.0) / 2.0 * (small - 1.0) + 1.0  # in the block, margin included
        grid = 2.0 * voxels / (big - 1.0) - 1.0
        missing = plan.size[1] - plan.n_valid
        if missing:
            grid = torch.cat([grid, torch.full((*grid.shape[:-2], missing, 3), 4.0, dtype=grid.dtype)], -2)
        grids.append(grid)
    grid = torch.stack(grids).to(device=device, dtype=torch.float32)
    out_spatial = grid.shape[1:-1]
    grid5 = grid.view(len(images), -1, *grid.shape[-3:]) if grid.ndim == 5 else grid.unsqueeze(1)
    out = F.grid_sample(data, grid5, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(len(images), channels, *out_spatial)


def scpr_measurements(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Volumes per second of every sCPR implementation (see :func:`bench_scpr`); one dict per row."""
    import numpy as np
    import torch

    from monai_cft.transforms.cpr import StraightenCPR

    num = 2 if args.tiny else args.scpr_volumes
    budget = 0.0 if args.tiny else args.repeat_budget
    print(f"[scpr] rendering {num} phantom volumes", file=sys.stderr)
    cases = phantom_volumes(num, args.seed)
    arrays = [c["image"].as_tensor()[0].numpy() for c in cases]
    affines = [c["image"].affine.numpy() for c in cases]
    shapes = [tuple(c["image"].shape[1:]) for c in cases]
    pad = -1024.0
    rows: list[dict[str, Any]] = []
    for preset in args.scpr_presets:
        spacing, size = preset_geometry(preset, args.tiny)
        for out_dims in args.scpr_out_dims:
            cpr = StraightenCPR(size, spacing, mode="bilinear", padding_value=pad, out_dims=out_dims)
            batched = f"batched: {num} volume{'s' if num > 1 else ''}, one `grid_sample`"
            plans = [cpr.plan(c["centerline"], c["image"].affine, s) for c, s in zip(cases, shapes)]
            voxels = [world_to_voxel(p.grid_world.numpy(), a) for p, a in zip(plans, affines)]
            reference = [scipy_sample(v, vox, size[1], pad) for v, vox in zip(arrays, voxels)]
            constant = max(float(np.abs(scipy_sample(v, vox, size[1], pad, "constant") - r).max())
                           for v, vox, r in zip(arrays, voxels, reference))
            base = {"preset": f"{preset} (tiny)" if args.tiny else preset, "out_dims": out_dims, "size": size,
                    "spacing": spacing, "volumes": num, "volume_shapes": shapes, "constant_mode_hu": constant,
                    "voxel_mm": [np.linalg.norm(a[:3, :3], axis=0).tolist() for a in affines]}
            print(f"[scpr] {preset} {out_dims}D {size}", file=sys.stderr)

            def record(name: str, scope: str, setting: str, fn: Callable[[], Any] | None, device: str = "cpu",
                       check: Callable[[], float] | None = None) -> None:
                row = dict(base, implementation=name, scope=scope, setting=setting)
                if fn is None:
                    row.update(seconds=float("nan"), note=NO_GPU)
                else:
                    times = time_calls(fn, device, warmup=1, budget_s=budget, min_repeats=1 if args.tiny else 3)
                    row.update(seconds=median(times), repeats=len(times), max_abs_hu=check() if check else 0.0)
                rows.append(row)

            def diff(outputs: Sequence[Any]) -> float:
                return max(float(np.abs(np.asarray(o.detach().cpu() if hasattr(o, "detach") else o).reshape(r.shape)
                                        - r).max()) for o, r in zip(outputs, reference))

            def scipy_full() -> list[Any]:
                out = []
                for c, s, v, a in zip(cases, shapes, arrays, affines):
                    plan = cpr.plan(c["centerline"], c["image"].affine, s)
                    out.append(scipy_sample(v, world_to_voxel(plan.grid_world.numpy(), a), size[1], pad))
                return out

            def transform_all(images: Sequence[Any]) -> list[Any]:
                return [cpr(img, c["centerline"]) for img, c in zip(images, cases)]

            images, lines = [c["image"] for c in cases], [c["centerline"] for c in cases]
            tensors, padding = [img.as_tensor() for img in images], torch.full((1,), pad)
            with torch_threads(1):  # the plan is torch code: one thread, like the SciPy sampling
                record("SciPy `map_coordinates` (order 1)", "plan + sample", "CPU, 1 thread", scipy_full)
            for threads in args.threads:
                with torch_threads(threads):
                    record("`StraightenCPR`", "plan + sample + meta", _settings_label("cpu", threads),
                           lambda: transform_all(images), check=lambda: diff(transform_all(images)))
                    record(batched, "plan + sample", _settings_label("cpu", threads),
                           lambda: straighten_batched(cpr, images, lines),
                           check=lambda: diff(straighten_batched(cpr, images, lines)[:, 0]))
            record("SciPy `map_coordinates` (order 1)", "sample only", "CPU, 1 thread",
                   lambda: [scipy_sample(v, vox, size[1], pad) for v, vox in zip(arrays, voxels)])
            for threads in args.threads:
                with torch_threads(threads):
                    record("`SCPRGeometry.sample` (`grid_sample`)", "sample only", _settings_label("cpu", threads),
                           lambda: [p.sample(t, "bilinear", padding) for p, t in zip(plans, tensors)],
                           check=lambda: diff([p.sample(t, "bilinear", padding) for p, t in zip(plans, tensors)]))
            if cuda_available():
                gpu = [img.to("cuda") for img in images]
                record("`StraightenCPR`", "plan + sample + meta", "CUDA (volumes on the GPU)",
                       lambda: transform_all(gpu), "cuda", check=lambda: diff(transform_all(gpu)))
                record(batched, "plan + sample", "CUDA (volumes on the GPU)",
                       lambda: straighten_batched(cpr, gpu, lines, "cuda"), "cuda",
                       check=lambda: diff(straighten_batched(cpr, gpu, lines, "cuda")[:, 0]))
            else:
                record("`StraightenCPR`", "plan + sample + meta", "CUDA", None)
                record(batched, "plan + sample", "CUDA", None)
    # throughput and the ratio to the SciPy reference of the same scope
    for row in rows:
        row["volumes_per_s"] = row["volumes"] / row["seconds"] if row["seconds"] == row["seconds"] else float("nan")
        ref = next(r for r in rows if r["preset"] == row["preset"] and r["out_dims"] == row["out_dims"]
                   and r["implementation"].startswith("SciPy")
                   and (r["scope"] == "sample only") == (row["scope"] == "sample only"))
        row["ratio"] = row["volumes_per_s"] / ref["volumes_per_s"]
    return rows


def bench_scpr(args: argparse.Namespace) -> str:
    """sCPR straightening throughput of ``StraightenCPR`` against SciPy ``map_coordinates`` on the same points."""
    machine = machine_description()
    rows = scpr_measurements(args)
    return scpr_markdown(rows, args, f"{machine}; load average at the end {load_average()}")


def scpr_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, machine: str = "") -> str:
    """The ``scpr`` section's markdown for the rows of :func:`scpr_measurements`."""
    table = []
    for r in rows:
        h, w = r["size"]
        shape = f"{h} x {w}" if r["out_dims"] == 2 else f"{h} x {h} x {w}"
        if r.get("note"):
            table.append([r["preset"], shape, r["scope"], r["implementation"], r["setting"], r["note"], "", "", ""])
            continue
        reference = r["implementation"].startswith("SciPy")
        table.append([r["preset"], shape, r["scope"], r["implementation"], r["setting"], fmt(r["volumes_per_s"]),
                      fmt(1000.0 * r["seconds"] / r["volumes"]), f"{r['ratio']:.2f}x",
                      "(reference)" if reference else f"{r['max_abs_hu']:.3g}"])
    num = rows[0]["volumes"] if rows else 0
    mean_shape = " x ".join(f"{sum(s[k] for s in rows[0]['volume_shapes']) / num:.0f}" for k in range(3))
    voxel = " x ".join(f"{sum(v[k] for v in rows[0]['voxel_mm']) / num:.2f}" for k in range(3))
    header = ["preset", "output (px)", "scope", "implementation", "device", "volumes/s", "ms / volume",
              "vs SciPy (same scope)", "max abs diff vs SciPy (HU)"]
    return (
        f"`{command_line(args, 'scpr')}` on {machine or machine_description()}.\n\n"
        f"{markdown_table(header, table)}\n\n"
        f"{num} phantom volumes (`monai_cft.data.phantom`, seeds {args.seed}..{args.seed + num - 1}, float32 "
        f"`MetaTensor`s with their affines, on average {mean_shape} voxels of {voxel} mm) straightened "
        "along their centrelines, trilinear, padding -1024 HU. Each figure is the median over repeated passes "
        "over all volumes (one untimed warm-up pass first). **plan + sample** includes the geometry "
        "(resampled centreline, parallel-transport frames, world grid: `StraightenCPR.plan`, shared by every "
        "row); `StraightenCPR` also builds the output `MetaTensor` with its `scpr_*` metadata (the world grid "
        "of every pixel). **sample only** starts from precomputed plans / voxel coordinates. The SciPy "
        "reference converts the plan's world grid (`scpr_grid_world`) with the inverse affine and calls "
        "`scipy.ndimage.map_coordinates(order=1, mode='grid-constant', cval=-1024)` (single-threaded); "
        "`grid-constant` is the transform's padding semantics (interpolating into the padding across the "
        f"border); `mode='constant'` would differ from it by up to {max(r['constant_mode_hu'] for r in rows):.0f} HU "
        "here (points in the outermost half voxel get the padding outright). The last column is "
        "the largest difference of any pixel from the reference (float32 rounding). The batched rows pad all "
        "volumes into one block and sample them with a single `grid_sample` call (`straighten_batched` in "
        "this script, not a library API; plain tensors out, no metadata). CUDA rows time volumes already on "
        "the GPU (planning stays on the CPU)."
        + thread_scaling_note(rows, ("preset", "out_dims", "implementation", "scope"), args.threads)
    )


def _scpr_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scpr section")
    group.add_argument("--scpr-volumes", type=int, default=4, help="phantom volumes per pass (default 4)")
    group.add_argument("--scpr-presets", nargs="+", default=["quick", "paper"], choices=["quick", "paper"])
    group.add_argument("--scpr-out-dims", nargs="+", type=int, default=[2, 3], choices=[2, 3])


# --------------------------------------------------------------------------------------------
# section: training throughput
# --------------------------------------------------------------------------------------------


def build_guidance_loss(mode: str, img_size: Sequence[int], spacing: float, variables: Any, tiny: bool = False):
    """The CFT guidance loss of ``mode`` around a randomly initialised network, built as ``finetune.json`` does:
    ``reg``: ``RegressorGuidanceLoss(ParentRegressor)``; ``seg`` / ``pos_seg``: ``SegmentorGuidanceLoss``
    around the guidance UNet (``build_segmentor(arch="unet")``) without / with the three region masks."""
    import torch

    from monai_cft.losses import (RegressorGuidanceLoss, SegmentorGuidanceLoss, ranges_to_scales,
                                  structure_total_scales)
    from monai_cft.networks.predictors import ParentRegressor, build_segmentor
    from monai_cft.transforms.regions import RegionMasks
    from monai_cft.variables import DEFAULT_STRUCTURES

    names, ranges = variables_and_ranges()
    if mode == "reg":
        kwargs = {"block_inplanes": (4, 8, 8, 8)} if tiny else {}
        return RegressorGuidanceLoss(ParentRegressor(2, 1, len(names), **kwargs), len(names), reduction="none")
    if mode not in ("seg", "pos_seg"):
        raise ValueError(f"unknown CFT mode {mode!r}; expected 'reg', 'seg' or 'pos_seg'.")
    segmentor = build_segmentor(2, "unet", 1, len(DEFAULT_STRUCTURES) + 1, channels=(4, 8, 16, 16) if tiny else None,
                                img_size=tuple(img_size))
    if mode == "seg":
        masks, scales = None, structure_total_scales(variables, len(DEFAULT_STRUCTURES))
    else:
        masks = torch.as_tensor(RegionMasks()(torch.zeros(1, *img_size)))
        scales = ranges_to_scales(ranges, names)
    return SegmentorGuidanceLoss(segmentor, DEFAULT_STRUCTURES, masks, "l1", spacing**2, scales, reduction="none")


def _train_run(kind: str, preset: str, batch: int, device: str, threads: int | None, warmup: int, iters: int,
               tiny: bool, cap_s: float = float("inf")) -> dict[str, Any]:
    """Time ``warmup + iters`` iterations of a ``DSCMTrainer`` (``kind="dscm"``) or ``CFTTrainer``
    (``kind`` a CFT mode) on one random batch (fewer, but at least two, once the timed ones took ``cap_s``);
    returns the median seconds per timed iteration, their number, peak memory and parameter counts."""
    import torch
    from ignite.engine import Events

    from monai_cft.engines.cft_trainer import CFTTrainer
    from monai_cft.engines.dscm_trainer import DSCMTrainer

    spacing, size = preset_geometry(preset, tiny)
    data = random_batch(batch, size)
    batches = [data] * (warmup + iters)
    amp = device == "cuda"
    with _threads_or_null(threads), PeakMemory(device) as mem:
        torch.manual_seed(0)
        dscm = build_benchmark_dscm(preset, size, tiny)
        if kind == "dscm":
            trainer = DSCMTrainer(device, 1, batches, dscm, epoch_length=len(batches), lr_warmup_steps=0,
                                  grad_skip=None, flow_grad_skip=None, amp=amp)
            params = {"trainable": count_parameters(dscm), "frozen": 0}
        else:
            guidance = build_guidance_loss(kind, size, spacing, data["variables"], tiny)
            trainer = CFTTrainer(device, 1, batches, dscm, kind, guidance, epoch_length=len(batches),
                                 elbo_target=1.0, grad_skip=None, checkpoint_dir=None, amp=amp)
            params = {"trainable": count_parameters(trainer.hvae), "frozen": count_parameters(guidance.network)}
        times = _per_iteration_times(trainer, device, warmup, min(2, iters), cap_s)
        skipped: list[bool] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: skipped.append(bool(e.state.output["skipped"])))
        trainer.run()
    timed = times[warmup:]
    if any(skipped[warmup:]):  # a skipped update would make the iteration cheaper than a real one
        raise RuntimeError(f"{kind} ({preset}): {sum(skipped[warmup:])} timed update(s) were skipped (non-finite "
                           "loss); the timing would not be that of a full iteration.")
    return {"seconds": median(timed), "iterations": len(timed), "peak_mib": mem.peak_mib, "memory": mem.method,
            **params}


def training_measurements(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One dict per (model, preset, device setting): images/s, peak memory, parameter counts.

    Settings run one after the other (all configurations on the CPU with the first thread count, then
    the next, then CUDA). A configuration's time per iteration under a later setting is predicted from
    its time under the first one and the ratio seen on the configurations before it; one predicted
    not to fit ``--config-cap`` / ``--section-budget`` (warm-up plus two iterations) is skipped and says
    so. Timed iterations stop early (after two) once they took ``3 x --repeat-budget`` seconds.
    """
    tiny = args.tiny
    configs = [("dscm", preset) for preset in args.train_presets]
    configs += [(mode, preset) for preset in args.cft_presets for mode in args.cft_modes]
    settings = _device_settings(args)
    reference = _settings_label(*settings[0])
    budget = TimeBudget(args.section_budget, args.config_cap)
    measured: dict[Any, dict[str, float]] = {}
    rows = []
    for device, threads in settings:
        label = _settings_label(device, threads)
        if device == "cpu" or cuda_available():
            for kind, preset in dict.fromkeys(configs):  # untimed toy runs: one-time initialisations (thread
                _train_run(kind, preset, 2, device, threads, 0, 1, tiny=True)  # pools, kernels) stay out of the rows
        for kind, preset in configs:
            batch = args.train_batch if preset == "quick" else args.train_batch_paper
            batch = min(batch, 4) if tiny else batch
            row = {"model": "DSCM" if kind == "dscm" else f"CFT `{kind}`", "kind": kind,
                   "preset": f"{preset} (tiny)" if tiny else preset, "batch": batch, "setting": label,
                   "order": (configs.index((kind, preset)), settings.index((device, threads)))}
            if device == "cuda" and not cuda_available():
                rows.append(dict(row, note=NO_GPU))
                continue
            if device == "cuda":
                warmup, iters = args.cuda_warmup, args.cuda_iters
            else:
                warmup = args.train_warmup
                iters = args.train_iters if preset == "quick" else args.train_iters_paper
            warmup, iters = (1, 2) if tiny else (warmup, iters)
            guess = estimate_from_other_setting(measured, (kind, preset), label, reference) if device == "cpu" else None
            reason = budget.skip_reason(None if guess is None else guess[0] * (warmup + min(2, iters)))
            if reason:
                if guess is not None:
                    reason += f" ({guess[0]:.1f} s / iteration: {guess[1]:.1f}x its {reference} time)"
                rows.append(dict(row, note=reason))
                continue
            print(f"[training] {row['model']} {preset} batch {batch} {label}: {warmup} + {iters} iterations",
                  file=sys.stderr)
            res = _train_run(kind, preset, batch, device, threads, warmup, iters, tiny, 3.0 * args.repeat_budget)
            measured.setdefault((kind, preset), {})[label] = res["seconds"]
            rows.append(dict(row, **res, images_per_s=batch / res["seconds"]))
    return sorted(rows, key=lambda r: r["order"])


def bench_training(args: argparse.Namespace) -> str:
    """Training throughput (images/s) and peak memory of the DSCM and of the three CFT modes."""
    machine = machine_description()
    rows = training_measurements(args)
    return training_markdown(rows, args, f"{machine}; load average at the end {load_average()}")


def training_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, machine: str = "") -> str:
    """The ``training`` section's markdown for the rows of :func:`training_measurements`."""
    table = []
    for r in rows:
        if r.get("note"):
            table.append([r["model"], r["preset"], r["batch"], r["setting"], r["note"], "", "", "", ""])
            continue
        table.append([r["model"], r["preset"], r["batch"], r["setting"], fmt(r["images_per_s"]),
                      f"{1000.0 * r['seconds']:.0f}", f"{r['iterations']}", fmt(r["peak_mib"], 0),
                      f"{r['trainable'] / 1e6:.3f} M"
                      + (f" (+{r['frozen'] / 1e6:.3f} M frozen)" if r["frozen"] else "")])
    header = ["model", "preset", "batch", "device", "images/s", "ms / iteration (median)", "timed iterations",
              "peak memory (MiB)", "parameters trained"]
    method = next((r["memory"] for r in rows if r.get("memory") and "CUDA" not in r["setting"]), "")
    return (
        f"`{command_line(args, 'training')}` on {machine or machine_description()}.\n\n"
        f"{markdown_table(header, table)}\n\n"
        "Iterations of the real engines on one random batch (images uniform in [-1, 1], variables uniform "
        "in plausible ranges; the speed does not depend on the values), randomly initialised networks: "
        "**DSCM** = `monai_cft.engines.dscm_trainer.DSCMTrainer` (`schedule='joint'`: flows' NLL and the HVAE's "
        "negative ELBO, backward, gradient clipping, both AdamW steps, EMA update of the whole DeepSCM); "
        "**CFT** = `monai_cft.engines.cft_trainer.CFTTrainer` (factual HVAE pass with latents, one "
        "intervention per image through the frozen flows, counterfactual decoding, the frozen guidance "
        "network on `x_cf`, constrained-ELBO loss, backward into the HVAE, AdamW + Lagrange multiplier "
        "steps, EMA), guidance networks as `finetune.json` builds them (`reg`: `ParentRegressor`; `seg` / "
        "`pos_seg`: the guidance UNet, without / with the three region masks). Gradient skipping is "
        "switched off (`grad_skip=None`) so that every timed iteration does the full update. Each "
        "iteration is timed from Ignite's `ITERATION_STARTED` to `ITERATION_COMPLETED` (batch fetching "
        f"excluded) after {args.train_warmup} untimed warm-up iteration(s) ({args.cuda_warmup} on CUDA); up to "
        f"{args.train_iters} (quick) / {args.train_iters_paper} (paper) / {args.cuda_iters} (CUDA) timed iterations, "
        f"fewer (but two) once they took {3 * args.repeat_budget:g} s; images/s = batch / median seconds per "
        "iteration. CPU rows set `torch.set_num_threads`; configurations predicted (from the ratio to the "
        "first thread count on the rows before them) not to fit the time limits are skipped and say so. "
        f"Peak memory on the CPU: {method or 'peak RSS above entry'} (`ru_maxrss`, after returning free heap "
        "memory to the OS and resetting the high-water mark through `/proc/self/clear_refs`): models, EMA "
        "copy, optimizer states and activations, not the Python / torch runtime. On CUDA: "
        "`torch.cuda.max_memory_allocated` (bfloat16 autocast, as the bundle runs it). Parameters: the "
        "trained ones (DSCM: HVAE + flows; CFT: the HVAE) and the frozen guidance network's."
        + thread_scaling_note(rows, ("kind", "preset"), args.threads)
    )


def _training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training section")
    group.add_argument("--train-presets", nargs="+", default=["quick", "paper"], choices=["quick", "paper"])
    group.add_argument("--cft-presets", nargs="*", default=["quick"], choices=["quick", "paper"])
    group.add_argument("--cft-modes", nargs="+", default=["reg", "seg", "pos_seg"], choices=["reg", "seg", "pos_seg"])
    group.add_argument("--train-batch", type=int, default=32, help="batch size of the quick preset (default 32)")
    group.add_argument("--train-batch-paper", type=int, default=8, help="batch size of the paper preset (default 8)")
    group.add_argument("--train-warmup", type=int, default=1, help="untimed iterations on the CPU (default 1)")
    group.add_argument("--train-iters", type=int, default=5, help="timed iterations, quick preset, CPU (default 5)")
    group.add_argument("--train-iters-paper", type=int, default=3,
                       help="timed iterations, paper preset, CPU (default 3)")
    group.add_argument("--cuda-warmup", type=int, default=3, help="untimed iterations on CUDA (default 3)")
    group.add_argument("--cuda-iters", type=int, default=20, help="timed iterations on CUDA (default 20)")


# --------------------------------------------------------------------------------------------
# section: counterfactual inference latency
# --------------------------------------------------------------------------------------------


def predict_call_seconds(seconds: dict[tuple[int, int], float], batch: int, particles: int) -> float | None:
    """Predict a ``counterfactual`` call's seconds from the measured ``{(batch, particles): seconds}``:
    from the largest measured configuration with no larger batch and no more particles, scaled by
    ``batch`` and ``particles`` (both costs are at most proportional); ``None`` if there is none."""
    smaller = [(b * p, b, p) for b, p in seconds if b <= batch and p <= particles]
    if not smaller:
        return None
    _, b, p = max(smaller)
    return seconds[(b, p)] * (batch / b) * (particles / p)


def inference_measurements(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Latency of ``DeepSCM.counterfactual`` per (preset, device setting, batch, particles).

    Within a preset and setting, a configuration's time is predicted from those already measured
    (:func:`predict_call_seconds`); one predicted (with its warm-up call) not to fit ``--config-cap``
    or what is left of ``--section-budget`` is skipped and says so.
    """
    import torch

    from monai_cft.engines.common import autocast

    names, ranges = variables_and_ranges()
    target = {"lumen_mid": 0.5 * (ranges["lumen_mid"][0] + ranges["lumen_mid"][1])}
    budget = 0.0 if args.tiny else args.repeat_budget
    section = TimeBudget(args.section_budget, args.config_cap)
    batches, particle_counts = sorted(set(args.inference_batches)), sorted(set(args.particles))
    rows = []
    for preset in args.inference_presets:
        _, size = preset_geometry(preset, args.tiny)
        name = f"{preset} (tiny)" if args.tiny else preset
        for device, threads in _device_settings(args):
            label = _settings_label(device, threads)
            if device == "cuda" and not cuda_available():
                rows.append({"preset": name, "setting": label, "note": NO_GPU})
                continue
            with _threads_or_null(threads):
                torch.manual_seed(0)
                model = build_benchmark_dscm(preset, size, args.tiny).to(device).eval()
                data = random_batch(max(batches), size)
                x_all, pa_all = data["image"].to(device), data["variables"].to(device)
                seconds: dict[tuple[int, int], float] = {}
                for batch in batches:
                    x, pa = x_all[:batch], pa_all[:batch]
                    for particles in particle_counts:
                        row = {"preset": name, "setting": label, "batch": batch, "particles": particles}

                        def call(x=x, pa=pa, particles=particles) -> None:
                            with autocast(device, device == "cuda"):
                                model.counterfactual(x, pa, target, num_particles=particles)

                        # a many-particle call repeats the one-particle call's shapes: after that call
                        # (same batch) it needs no warm-up of its own
                        warm = 0 if particles > 1 and (batch, 1) in seconds else 1
                        guess = predict_call_seconds(seconds, batch, particles)
                        reason = section.skip_reason(None if guess is None else guess * (warm + 1))
                        if reason:
                            rows.append(dict(row, note=reason))
                            continue
                        print(f"[inference] {name} {label} batch {batch} particles {particles}", file=sys.stderr)
                        times = time_calls(call, device, warmup=warm, budget_s=budget, min_repeats=1)
                        seconds[(batch, particles)] = sec = median(times)
                        rows.append(dict(row, seconds=sec, repeats=len(times), ms_per_image=1000.0 * sec / batch))
    return rows


def bench_inference(args: argparse.Namespace) -> str:
    """Counterfactual inference latency per image (``DeepSCM.counterfactual``)."""
    machine = machine_description()
    rows = inference_measurements(args)
    return inference_markdown(rows, args, f"{machine}; load average at the end {load_average()}")


def inference_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, machine: str = "") -> str:
    """The ``inference`` section's markdown for the rows of :func:`inference_measurements`."""
    table = []
    for r in rows:
        if r.get("note"):
            table.append([r["preset"], r["setting"], r.get("batch", ""), r.get("particles", ""), r["note"], "", ""])
            continue
        table.append([r["preset"], r["setting"], r["batch"], r["particles"], fmt(r["ms_per_image"], 1),
                      fmt(1000.0 * r["seconds"], 1), r["repeats"]])
    header = ["preset", "device", "batch", "particles", "ms / image", "ms / call (median)", "timed calls"]
    return (
        f"`{command_line(args, 'inference')}` on {machine or machine_description()}.\n\n"
        f"{markdown_table(header, table)}\n\n"
        "`DeepSCM.counterfactual(x, parents, {'lumen_mid': value}, num_particles=k)` of a randomly initialised "
        "DSCM (HVAE preset of the same name; the speed does not depend on the weights) in eval mode: "
        "normalisation, abduction of the parents' noise and counterfactual parents through the flows, then "
        "per particle one HVAE pass (posterior latents) and one decoding with the counterfactual parents; "
        "the particles' mean (and standard deviation when k > 1). ms / image = median seconds per call / "
        "batch. Calls are repeated until they took "
        f"{args.repeat_budget:g} s (at least once) after one untimed warm-up call; on the CPU a many-particle "
        "run directly follows the one-particle run of the same batch, which warms its shapes up. Configurations "
        "predicted (proportionally to batch and particles from a smaller configuration) not to fit the "
        "time limits are skipped and say so. CUDA rows: bfloat16 autocast, inputs already on the GPU."
        + thread_scaling_note(rows, ("preset", "batch", "particles"), args.threads)
    )


def _inference_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference section")
    group.add_argument("--inference-presets", nargs="+", default=["quick", "paper"], choices=["quick", "paper"])
    group.add_argument("--inference-batches", nargs="+", type=int, default=[1, 32])
    group.add_argument("--particles", nargs="+", type=int, default=[1, 8])


# --------------------------------------------------------------------------------------------
# section: the quickstart pipeline's stage times
# --------------------------------------------------------------------------------------------


def pipeline_stages(output_dir: Path) -> dict[str, int | None]:
    """Stage name -> wave (stages of one wave may run concurrently) of ``python -m monai_cft.pipeline``, in
    running order ({} if it cannot be imported)."""
    try:
        from monai_cft.pipeline import build_stages, parse_args

        return {s.name: getattr(s, "wave", None) for s in build_stages(parse_args(["--output-dir", str(output_dir)]))}
    except (ImportError, SystemExit, ValueError):
        return {}


def read_stage_times(output_dir: Path) -> list[dict[str, Any]]:
    """The ``<output_dir>/stages/*.json`` markers of ``python -m monai_cft.pipeline``, in pipeline order
    (stages the pipeline does not list, e.g. from another version, come last by finishing time). Each
    gets ``"started"`` / ``"ended"`` (``datetime``) when its ``"finished"`` time stamp can be read."""
    import datetime

    stage_dir = Path(output_dir) / "stages"
    markers = []
    for path in sorted(stage_dir.glob("*.json")) if stage_dir.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"stage marker {path} is not valid JSON: {e}") from e
        if not isinstance(record, dict) or not isinstance(record.get("seconds"), (int, float)):
            raise ValueError(f"stage marker {path} has no numeric 'seconds': {record!r}")
        record.setdefault("stage", path.stem)
        try:
            record["ended"] = datetime.datetime.fromisoformat(str(record["finished"]))
            record["started"] = record["ended"] - datetime.timedelta(seconds=float(record["seconds"]))
        except (KeyError, ValueError):
            pass
        markers.append(record)
    rank = {name: i for i, name in enumerate(pipeline_stages(output_dir))}
    return sorted(markers, key=lambda m: (rank.get(m["stage"], len(rank)), str(m.get("finished", ""))))


def _command_option(command: Any, option: str) -> str | None:
    if isinstance(command, list) and option in command:
        i = command.index(option)
        return str(command[i + 1]) if i + 1 < len(command) else None
    return None


def bench_quickstart(args: argparse.Namespace) -> str:
    """Stage times of the last ``python -m monai_cft.pipeline`` run (its ``stages/*.json`` markers)."""
    out = Path(args.outputs_dir)
    stages = read_stage_times(out)
    if not stages:
        return (f"The quickstart has not been run: no stage markers under `{out / 'stages'}`. Run "
                "`python -m monai_cft.pipeline` (see the README), then "
                "`python scripts/benchmark.py --only quickstart --write-docs docs/benchmarks.md`.")
    waves = pipeline_stages(out)
    total = sum(float(s["seconds"]) for s in stages)
    rows = [[f"`{s['stage']}`", "" if waves.get(s["stage"]) is None else waves[s["stage"]],
             f"{float(s['seconds']):.1f}", f"{float(s['seconds']) / 60:.1f}",
             s["started"].strftime("%H:%M:%S") if "started" in s else "", s.get("finished", "")] for s in stages]
    rows.append(["**sum of the stages**", "", f"**{total:.1f}**", f"**{total / 60:.1f}**", "", ""])
    span_text = ""
    if all("started" in s for s in stages):
        intervals = sorted((s["started"], s["ended"]) for s in stages)
        busy, (lo, hi) = 0.0, intervals[0]
        for a, b in intervals[1:]:  # union of the stages' intervals
            if a > hi:
                busy, lo = busy + (hi - lo).total_seconds(), a
            hi = max(hi, b)
        busy += (hi - lo).total_seconds()
        span = (max(s["ended"] for s in stages) - intervals[0][0]).total_seconds()
        rows.append(["**wall clock with a stage running**", "", f"**{busy:.1f}**", f"**{busy / 60:.1f}**", "", ""])
        rows.append(["wall clock, first start to last finish", "", f"{span:.1f}", f"{span / 60:.1f}", "", ""])
        span_text = (
            f" Stages of one wave run concurrently, so the wall-clock time during which at least one stage was "
            f"running ({busy / 60:.1f} min, the union of the stages' intervals) is "
            f"{'shorter' if busy < total else 'not shorter'} than their sum ({total / 60:.1f} min)"
            + (f"; the span from the first start to the last finish ({span / 60:.1f} min) also counts "
               f"{(span - busy) / 60:.1f} min without any stage running (e.g. between separate runs of stages)."
               if span - busy > 1.0 else ".")
        )
    details = []
    for s in stages:
        for option, what in (("--num-cases", "cases"), ("--preset", "preset"), ("--workers", "workers")):
            value = _command_option(s.get("command"), option)
            if value is not None and f"{what} {value}" not in details:
                details.append(f"{what} {value}")
    missing = [name for name in waves if name not in {s["stage"] for s in stages}]
    text = (
        f"Stage times of `python -m monai_cft.pipeline` read from `{out / 'stages'}/*.json` "
        f"({', '.join(details) or 'settings not recorded'}), tabulated {time.strftime('%Y-%m-%d %H:%M %Z')} on "
        f"{machine_description()} (the load average is of the moment of tabulation, not of the run).\n\n"
        f"{markdown_table(['stage', 'wave', 'seconds', 'minutes', 'started (computed)', 'finished'], rows)}\n\n"
        "Each stage's wall time as the pipeline recorded it (a stage skipped because it had finished in an "
        "earlier run keeps its earlier time); started = finished - seconds." + span_text
    )
    if missing:
        text += f" Stages without a marker (not run, or failed): {', '.join(f'`{m}`' for m in missing)}."
    return text


def _quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quickstart section")
    group.add_argument("--outputs-dir", default=str(Path(__file__).resolve().parent.parent / "outputs"),
                       help="the pipeline's --output-dir (default: outputs/ of the repository)")


# --------------------------------------------------------------------------------------------
# registry and CLI
# --------------------------------------------------------------------------------------------

#: section name -> (markdown heading, benchmark function, argument adder)
SECTIONS: dict[str, tuple[str, Callable[[argparse.Namespace], str], Callable[[argparse.ArgumentParser], None]]] = {
    "data": ("Data generation and preparation", bench_data, _data_arguments),
    "scpr": ("sCPR straightening", bench_scpr, _scpr_arguments),
    "training": ("Training throughput", bench_training, _training_arguments),
    "inference": ("Counterfactual inference latency", bench_inference, _inference_arguments),
    "quickstart": ("Quickstart pipeline", bench_quickstart, _quickstart_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    """The command line: global options plus every section's own group."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=None,
                        help="sections to run (default: all)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes where a section uses them")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                        help="torch intra-op thread counts of the CPU measurements (default: 1 2)")
    parser.add_argument("--repeat-budget", type=float, default=5.0, metavar="S",
                        help="repeat a timed call until the repeats took this many seconds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantoms (data, scpr)")
    parser.add_argument("--section-budget", type=float, default=240.0, metavar="S",
                        help="wall seconds a section (training, inference) may take; configurations predicted "
                        "not to fit are skipped (default 240)")
    parser.add_argument("--config-cap", type=float, default=90.0, metavar="S",
                        help="skip a configuration predicted to take longer than this (training, inference; "
                        "default 90)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: toy sizes and one repeat (numbers meaningless; not with --write-docs)")
    parser.add_argument("--omp-wait-policy", choices=["passive", "active"], default=None,
                        help="set OMP_WAIT_POLICY before torch starts (how idle OpenMP threads wait; on a shared "
                        "machine spinning threads can slow multi-threaded torch down many times); the sections' "
                        "headings then name it, so both variants can stand in the docs")
    parser.add_argument("--write-docs", default=None, metavar="MD", help="update this markdown file's sections")
    for _, _, add in SECTIONS.values():
        add(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = "python scripts/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    if args.tiny and args.write_docs:
        parser.error("--tiny measures toy sizes; its numbers must not be written to the docs (drop --write-docs).")
    if min(args.threads) < 1:
        parser.error(f"--threads must be positive, got {args.threads}.")
    if args.omp_wait_policy:
        policy = args.omp_wait_policy.upper()
        if "torch" in sys.modules and os.environ.get("OMP_WAIT_POLICY", "").upper() != policy:
            parser.error("--omp-wait-policy must be set before torch is imported (run the script in a fresh process).")
        os.environ["OMP_WAIT_POLICY"] = policy
    for name in args.only or list(SECTIONS):
        heading, fn, _ = SECTIONS[name]
        if args.omp_wait_policy:
            heading = f"{heading} (OMP_WAIT_POLICY={args.omp_wait_policy.upper()})"
        body = fn(args)
        print(f"## {heading}\n\n{body}\n")
        if args.write_docs:
            update_markdown_section(Path(args.write_docs), heading, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
