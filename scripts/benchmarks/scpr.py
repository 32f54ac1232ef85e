"""Benchmark section ``scpr``: sCPR straightening throughput against a SciPy reference."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .harness import (
    NO_GPU, _settings_label, command_line, cuda_available, fmt, load_average, machine_description,
    markdown_table, median, preset_geometry, thread_scaling_note, time_calls, torch_threads,
)

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scpr section")
    group.add_argument("--scpr-volumes", type=int, default=4, help="phantom volumes per pass (default 4)")
    group.add_argument("--scpr-presets", nargs="+", default=["quick", "paper"], choices=["quick", "paper"])
    group.add_argument("--scpr-out-dims", nargs="+", type=int, default=[2, 3], choices=[2, 3])
