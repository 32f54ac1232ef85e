"""Benchmark section ``scpr``: ``StraightenCPR`` against the simplest SciPy straightener, and ``UnstraightenCPR``.

The reference (:func:`scipy_straighten`) is what one writes without the library: the centreline
resampled with ``np.interp``, parallel-transport frames by double reflection in a Python loop, the
world grid of the sCPR converted to voxels and sampled by ``scipy.ndimage.map_coordinates`` (order 1,
``grid-constant`` padding) on the volume as stored (int16 included). It samples the same points as
``StraightenCPR`` (angle 0, default initial normal), so the outputs agree to float rounding.

Both run interleaved (reference, transform, reference, ...) in each machine state:

* ``idle``: nothing else started by the benchmark (the load average is recorded: on a shared machine
  other jobs may run);
* ``other core busy``: the benchmark starts one single-threaded busy process (a spin loop) for the
  state's duration.

The ratio is the median reference time over the median transform time of the same configuration.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .harness import (NO_GPU, command_line, cuda_available, fmt, load_average, machine_description, markdown_table,
                      run_section)

#: the targets of issue 11 (CPU, clinical size, per sCPR): (out_dims, state) -> minimum ratio.
TARGETS = {(2, "idle"): 5.0, (3, "idle"): 3.0, (2, "other core busy"): 2.0, (3, "other core busy"): 2.0}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def helix_centerline(centre: Sequence[float], radius: float = 15.0, turns: float = 0.9, length: float = 100.0,
                     phase: float = 0.0, points: int = 400) -> Any:
    """(points, 3) world mm of a helix of ``turns`` turns and arc length ``length`` mm around the z axis."""
    import numpy as np

    angle = 2 * math.pi * turns
    pitch_per_rad = math.sqrt(max((length / angle) ** 2 - radius**2, 1e-6))
    t = np.linspace(0.0, angle, points)
    return np.stack([centre[0] + radius * np.cos(t + phase), centre[1] + radius * np.sin(t + phase),
                     centre[2] + pitch_per_rad * t], 1)


def clinical_case(tiny: bool = False, seed: int = 0) -> dict[str, Any]:
    """A CCTA-sized int16 HU volume (512 x 512 x 300 voxels of 0.4 mm; toy 96 x 96 x 64 with ``tiny``)
    with three helical 0.9-turn centrelines (one per artery of a scan). The values are noise around
    soft tissue with bright tubes along the centrelines (speed does not depend on them)."""
    import numpy as np
    import torch
    from monai.data import MetaTensor

    shape, voxel = ((96, 96, 64), 0.4) if tiny else ((512, 512, 300), 0.4)
    rng = np.random.default_rng(seed)
    vol = rng.integers(-60, 140, size=shape, dtype=np.int16)
    extent = np.asarray(shape) * voxel
    radius, length = (4.0, 20.0) if tiny else (15.0, 100.0)
    centres = [(0.35, 0.35), (0.65, 0.4), (0.5, 0.68)]
    lines = [helix_centerline((extent[0] * cx, extent[1] * cy, 0.15 * extent[2]), radius, 0.9, length, phase=k)
             for k, (cx, cy) in enumerate(centres)]
    for line in lines:  # a 2 mm lumen of 350 HU along each centreline (sparse: only voxels near the line)
        idx = np.round(line / voxel).astype(int)
        for d in np.ndindex(5, 5, 5):
            j = np.clip(idx + np.asarray(d) - 2, 0, np.asarray(shape) - 1)
            vol[j[:, 0], j[:, 1], j[:, 2]] = 350
    affine = np.diag([voxel, voxel, voxel, 1.0])
    return {"image": MetaTensor(torch.from_numpy(vol)[None], affine=torch.as_tensor(affine)), "centerlines": lines}


def phantom_cases(num: int, seed: int = 0) -> list[dict[str, Any]]:
    """``num`` phantoms (``monai_cft.data.phantom``): float32 HU ``MetaTensor`` and centreline (N, 3) mm."""
    import numpy as np
    import torch
    from monai.data import MetaTensor

    from monai_cft.data.phantom import render_phantom, sample_phantom_params

    cases = []
    for i in range(num):
        case = render_phantom(sample_phantom_params(seed + i))
        image = MetaTensor(torch.from_numpy(case.image.astype(np.float32))[None],
                           affine=torch.as_tensor(case.affine, dtype=torch.float64))
        cases.append({"image": image, "centerlines": [np.asarray(case.centerline, dtype=np.float64)]})
    return cases


# --------------------------------------------------------------------------------------------
# the reference straightener
# --------------------------------------------------------------------------------------------


def scipy_straighten(volume: Any, affine: Any, centerline: Any, size: Sequence[int], spacing: float,
                     out_dims: int = 2, padding: float = -1024.0) -> Any:
    """The plain NumPy + SciPy sCPR of a (X, Y, Z) array (any dtype): (H, W) or (H, H, W) float32.

    Same conventions as ``StraightenCPR`` (angle 0): points at arc lengths ``j * spacing`` (one more
    for the last tangent), central-difference tangents, first normal from the least aligned world
    axis, frames carried by double reflection one point after the other, rows at
    ``(i - (H - 1) / 2) * spacing`` along the normal (and the binormal), padding beyond the vessel's end.
    """
    import numpy as np
    from scipy.ndimage import map_coordinates

    height, width = size
    pts = np.asarray(centerline, dtype=np.float64)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    pts = np.concatenate([pts[:1], pts[1:][seg > 1e-6]])
    cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    count = min(int(math.floor(cum[-1] / spacing + 1e-9)) + 1, width + 1)
    s = np.arange(count) * spacing
    curve = np.stack([np.interp(s, cum, pts[:, k]) for k in range(3)], 1)
    valid = min(count, width)
    if count == valid and np.linalg.norm(pts[-1] - curve[-1]) > 1e-6:
        curve = np.concatenate([curve, pts[-1:]])
    d = np.empty_like(curve)
    d[1:-1], d[0], d[-1] = curve[2:] - curve[:-2], curve[1] - curve[0], curve[-1] - curve[-2]
    tangent = d / np.linalg.norm(d, axis=1, keepdims=True)
    axis = np.zeros(3)
    axis[np.argmin(np.abs(tangent[0]))] = 1.0
    normal = axis - (axis @ tangent[0]) * tangent[0]
    normals = [normal / np.linalg.norm(normal)]
    for i in range(len(curve) - 1):  # double reflection (Wang et al. 2008), one step at a time
        v1 = curve[i + 1] - curve[i]
        c1 = v1 @ v1
        r_l = normals[-1] - (2.0 / c1) * (v1 @ normals[-1]) * v1
        t_l = tangent[i] - (2.0 / c1) * (v1 @ tangent[i]) * v1
        v2 = tangent[i + 1] - t_l
        c2 = v2 @ v2
        normals.append(r_l - (2.0 / c2) * (v2 @ r_l) * v2 if c2 > 1e-24 else r_l)
    n = np.asarray(normals[:valid])
    n = n - (n * tangent[:valid]).sum(1, keepdims=True) * tangent[:valid]
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    offsets = (np.arange(height) - (height - 1) / 2.0) * spacing
    grid = curve[None, :valid] + offsets[:, None, None] * n[None]
    if out_dims == 3:
        b = np.cross(tangent[:valid], n)
        grid = grid[:, None] + offsets[None, :, None, None] * b[None, None]
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    vox = grid @ inv[:3, :3].T + inv[:3, 3]
    out = np.full((*grid.shape[:-2], width), padding, dtype=np.float32)
    out[..., :valid] = map_coordinates(volume, np.moveaxis(vox, -1, 0), order=1, mode="grid-constant",
                                       cval=padding, output=np.float32)
    return out


# --------------------------------------------------------------------------------------------
# machine states and timing
# --------------------------------------------------------------------------------------------


def _spin(stop: Any) -> None:  # pragma: no cover - runs in the busy child process
    while not stop.is_set():
        pass


class OtherCoreBusy:
    """``with OtherCoreBusy():`` runs one single-threaded busy process (a spin loop) during the block."""

    def __enter__(self) -> OtherCoreBusy:
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.stop = ctx.Event()
        self.proc = ctx.Process(target=_spin, args=(self.stop,), daemon=True)
        self.proc.start()
        time.sleep(0.3)  # let it get scheduled
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.proc.join(timeout=5)
        if self.proc.is_alive():  # pragma: no cover
            self.proc.terminate()
            self.proc.join()


def interleaved(fns: Sequence[Callable[[], Any]], repeats: int, budget_s: float) -> list[list[float]]:
    """Wall seconds of each function, called in turn (one untimed round first), ``repeats`` rounds or
    until ``budget_s`` is spent (at least 3 rounds)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for r in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


def _configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The datasets x outputs measured: the clinical volume at 64 x 384 (0.25 mm), the phantoms at the presets."""
    from .harness import preset_geometry

    tiny = args.tiny
    clinical = clinical_case(tiny, args.seed)
    size = (16, 48) if tiny else (64, 384)
    out = [{"dataset": "clinical" + (" (tiny)" if tiny else ""), "cases": [clinical], "size": size,
            "spacing": 0.25, "out_dims": d} for d in args.scpr_out_dims]
    if args.scpr_volumes > 0:
        phantoms = phantom_cases(1 if tiny else args.scpr_volumes, args.seed)
        spacing, psize = preset_geometry("quick", tiny)
        out += [{"dataset": f"phantom ({len(phantoms)} volumes)" + (" (tiny)" if tiny else ""), "cases": phantoms,
                 "size": psize, "spacing": spacing, "out_dims": d} for d in args.scpr_out_dims]
    return out


def _measure_config(cfg: dict[str, Any], state: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import numpy as np
    import torch

    from monai_cft.transforms import StraightenCPR, UnstraightenCPR

    size, spacing, out_dims = cfg["size"], cfg["spacing"], cfg["out_dims"]
    cpr = StraightenCPR(size, spacing, out_dims=out_dims)
    jobs = [(c["image"], line) for c in cfg["cases"] for line in c["centerlines"]]
    arrays = [(img.as_tensor()[0].numpy(), img.affine.numpy()) for img, _ in jobs]
    per_call = [(c["image"], c["centerlines"]) for c in cfg["cases"]]

    def reference() -> list[Any]:
        return [scipy_straighten(v, a, line, size, spacing, out_dims) for (v, a), (_, line) in zip(arrays, jobs)]

    def single() -> list[Any]:
        return [cpr(img, line) for img, line in jobs]

    def several() -> list[Any]:
        return [o for img, lines in per_call for o in cpr(img, lines)]

    scprs = single()
    edited = []
    for s in scprs:
        e = s.clone()
        e[..., : size[0] // 4, 10:-10] += 100.0
        edited.append(e)
    inverse = UnstraightenCPR("bilinear")

    def unstraighten() -> list[Any]:
        return [inverse(img, e, s) for (img, _), e, s in zip(jobs, edited, scprs)]

    ref_out = reference()
    diff = max(float(np.abs(o[0].numpy() - r).max()) for o, r in zip(scprs, ref_out))
    exact = all(torch.equal(inverse(img, s, s).as_tensor(), img.as_tensor()) for (img, _), s in zip(jobs, scprs))
    fns = [reference, single, unstraighten] + ([several] if len(jobs) > len(per_call) else [])
    repeats = 3 if args.tiny else (40 if out_dims == 2 else 8)
    times = interleaved(fns, repeats, 0.0 if args.tiny else args.repeat_budget * 2)
    ref_s = _median(times[0]) / len(jobs)
    base = {"dataset": cfg["dataset"], "size": size, "spacing": spacing, "out_dims": out_dims, "state": state,
            "scprs": len(jobs), "volume_shape": tuple(jobs[0][0].shape[1:]), "dtype": str(jobs[0][0].dtype)}
    names = ["SciPy straightener (reference)", "`StraightenCPR`, one centreline per call",
             "`UnstraightenCPR` (bilinear)", f"`StraightenCPR`, {len(jobs) // len(per_call)} centrelines per call"]
    rows = []
    for name, t in zip(names, times):
        sec = _median(t) / len(jobs)
        rows.append(dict(base, implementation=name, seconds=sec, repeats=len(t),
                         ratio=ref_s / sec if not name.startswith("`Unstraighten") else float("nan"),
                         max_abs_hu=0.0 if name.startswith("SciPy") else diff,
                         note="unchanged sCPR gives the volume back exactly" if name.startswith("`Unstraighten")
                         and exact else ""))
    return rows


def _gpu_rows(cfg: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Batched CUDA straightening of every centreline of the configuration's volumes (one grid_sample)."""
    import torch

    from monai_cft.transforms import StraightenCPR

    base = {"dataset": cfg["dataset"], "size": cfg["size"], "spacing": cfg["spacing"], "out_dims": cfg["out_dims"],
            "state": "CUDA", "implementation": "`StraightenCPR.batch` (CUDA, one `grid_sample`, bf16 autocast)",
            "scprs": sum(len(c["centerlines"]) for c in cfg["cases"]), "ratio": float("nan"), "max_abs_hu": 0.0}
    if not cuda_available():
        return [dict(base, seconds=float("nan"), note=NO_GPU)]
    cpr = StraightenCPR(cfg["size"], cfg["spacing"], out_dims=cfg["out_dims"])
    images = [c["image"].to("cuda") for c in cfg["cases"]]
    lines = [c["centerlines"] for c in cfg["cases"]]

    def run() -> Any:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = cpr.batch(images, lines)
        torch.cuda.synchronize()
        return out

    times = interleaved([run], 3 if args.tiny else 20, args.repeat_budget)[0]
    cpu = [o for c in cfg["cases"] for o in cpr(c["image"], c["centerlines"])]
    gpu = [o for res in run() for o in res]
    diff = max(float((g.cpu().as_tensor() - c.as_tensor()).abs().max()) for g, c in zip(gpu, cpu))
    return [dict(base, seconds=_median(times) / base["scprs"], repeats=len(times), max_abs_hu=diff, note="")]


def scpr_measurements(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One dict per (dataset, output, machine state, implementation); see the module docstring."""
    configs = _configs(args)
    rows: list[dict[str, Any]] = []
    states = [("idle", None), ("other core busy", OtherCoreBusy)]
    for state, busy in states:
        ctx = busy() if busy is not None else None
        if ctx is not None:
            ctx.__enter__()
        try:
            start_load = load_average()
            for cfg in configs:
                print(f"[scpr] {state}: {cfg['dataset']} {cfg['out_dims']}D {cfg['size']}", file=sys.stderr)
                for row in _measure_config(cfg, state, args):
                    row["load"] = f"{start_load} -> {load_average()}"
                    rows.append(row)
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    for cfg in configs:
        rows += _gpu_rows(cfg, args)
    return rows


def target_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per target of issue 11: the best measured ratio of the clinical volume, met or not."""
    lines = []
    for (out_dims, state), target in TARGETS.items():
        found = [r["ratio"] for r in rows if r["dataset"].startswith("clinical") and r["out_dims"] == out_dims
                 and r["state"] == state and r["implementation"].startswith("`StraightenCPR`")]
        if found:
            best = max(found)
            lines.append(f"{out_dims}D output, {state}: {best:.2f}x the reference (target >= {target:g}x): "
                         f"{'met' if best >= target else 'NOT met'}")
    return lines


def scpr_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, machine: str = "") -> str:
    """The ``scpr`` section's markdown for the rows of :func:`scpr_measurements`."""
    table = []
    for r in rows:
        h, w = r["size"]
        shape = f"{h} x {w}" if r["out_dims"] == 2 else f"{h} x {h} x {w}"
        if r["seconds"] != r["seconds"]:
            table.append([r["dataset"], shape, r["state"], r["implementation"], r.get("note", ""), "", "", "", ""])
            continue
        ratio = "" if r["ratio"] != r["ratio"] else f"{r['ratio']:.2f}x"
        table.append([r["dataset"], shape, r["state"], r["implementation"], fmt(1000.0 * r["seconds"]), ratio,
                      "(reference)" if r["implementation"].startswith("SciPy") else f"{r['max_abs_hu']:.3g}",
                      r.get("load", ""), r.get("note", "")])
    header = ["volumes", "output (px)", "machine state", "implementation", "ms / sCPR", "vs reference",
              "max abs diff (HU)", "load average (1, 5, 15 min) at start -> end", "note"]
    clinical = next((r for r in rows if r["dataset"].startswith("clinical")), None)
    vol = (" x ".join(str(s) for s in clinical["volume_shape"]) + f" {clinical['dtype'].replace('torch.', '')}"
           if clinical else "")
    targets = "\n".join(f"- {line}" for line in target_lines(rows))
    return (
        f"`{command_line(args, 'scpr')}` on {machine or machine_description()}.\n\n"
        f"{markdown_table(header, table)}\n\n"
        f"Targets (issue 11; CPU, clinical volume, per sCPR, several centrelines per call allowed):\n\n{targets}\n\n"
        f"**clinical**: a {vol} volume of 0.4 mm voxels (HU as CCTA files store them) with three helical "
        "0.9-turn centrelines of 100 mm (as LAD, LCX and RCA of one scan), straightened at 0.25 mm into "
        "64 x 384 planes or 64 x 64 x 384 volumes, trilinear, padding -1024 HU. **phantom**: the phantoms of "
        "`monai_cft.data.phantom` (float32) at the `quick` preset's geometry. The reference is the plain "
        "NumPy + SciPy straightener (`scipy_straighten` in `scripts/benchmarks/scpr.py`: frames by double "
        "reflection in a Python loop, `map_coordinates(order=1, mode='grid-constant')` on the stored array); "
        "it samples the same points (max abs diff: float32 rounding). Reference and transform run interleaved, "
        "one call after the other, and each figure is a median over the rounds. **idle**: the benchmark starts "
        "nothing else; **other core busy**: it runs one single-threaded spin loop meanwhile. On a shared "
        "machine other jobs add to both (see the load average column: an idle 2-core machine reads below 0.5); "
        "the interleaved ratios are what compare. `StraightenCPR` chooses its threads itself (one for planning and "
        "small samplings, up to torch's setting capped by the cores free at that moment for large ones). "
        "`UnstraightenCPR` writes an sCPR with a 100 HU band added back into the volume (one copy of the "
        "volume included). CUDA rows: `StraightenCPR.batch` of all centrelines of the volumes on the GPU."
    )


def bench_scpr(args: argparse.Namespace) -> str:
    """sCPR straightening against the SciPy reference in two machine states, and the inverse."""
    return run_section(scpr_measurements, scpr_markdown, args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scpr section")
    group.add_argument("--scpr-volumes", type=int, default=2, help="phantom volumes (0: clinical size only; default 2)")
    group.add_argument("--scpr-out-dims", nargs="+", type=int, default=[2, 3], choices=[2, 3])


__all__ = ["scipy_straighten", "clinical_case", "phantom_cases", "helix_centerline", "OtherCoreBusy",
           "interleaved", "scpr_measurements", "scpr_markdown", "target_lines", "bench_scpr", "add_arguments"]
