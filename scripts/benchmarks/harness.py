"""Shared helpers of the benchmark sections: machine description, timing, peak memory, markdown,
and the set-up shared by the model sections (presets, random DSCMs and batches, thread settings)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import os
import platform
import re
import resource
import statistics
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


def run_section(measure: Callable[[argparse.Namespace], list], render: Callable[..., str],
                args: argparse.Namespace) -> str:
    """Measure the rows of a section and render its markdown with the machine and the final load average."""
    machine = machine_description()
    rows = measure(args)
    return render(rows, args, f"{machine}; load average at the end {load_average()}")


def table_rows(rows: Sequence[dict[str, Any]], cells: Callable[[dict], list], note_cells: Callable[[dict], list]) -> list[list]:
    """Markdown table cells of measurement rows: ``note_cells(r)`` for a row with a ``"note"`` (a setting
    that was not measured, and why), ``cells(r)`` for the others."""
    return [note_cells(r) if r.get("note") else cells(r) for r in rows]


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
    from monai_cft.utils.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)



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
