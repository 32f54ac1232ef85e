"""Sampling a volume on the ruled grid of an sCPR at a cost proportional to the samples.

An sCPR samples ``c[w] + a_i n[w]`` (a plane) or ``c[w] + a_i n[w] + a_j b[w]`` (a straightened
volume): ``c`` the resampled centreline, ``n`` / ``b`` the (rotated) frame vectors, ``a`` the
offsets across the vessel. :class:`RuledGrid` holds these factors in voxel coordinates of the
volume; its bounding box follows exactly from them (a linear function over a square takes its
extremes at the corners), so nothing of the size of the volume is ever touched:

* sparse sampling (fewer than ``8 x points`` voxels in the bounding box, e.g. a 2D sCPR of a curved
  vessel): the eight neighbours of every point are gathered from the volume as it is stored (int16
  included, any strides), no copy or dtype conversion of the volume;
* dense sampling (a 3D sCPR): the bounding box (plus the interpolation margin) is copied once, in
  the compute dtype, and sampled with ``grid_sample``. On the CPU the copy is laid out as a 2D
  mosaic of x-slices (each a (Y, Z) tile, copied as contiguous rows) with the next slice as a second
  channel, so that the vectorized 2D kernel does
  the work and one ``lerp`` finishes the trilinear interpolation (the 3D kernel is scalar and runs on
  one thread); on CUDA the 3D kernel samples the box directly.

Both give constant padding with interpolation across the border (SciPy's ``grid-constant``): a
point half a voxel outside mixes the border voxel with the padding value. Sampling runs in float32
(float64 for float64 volumes) with autocast disabled, and on the CPU with a thread count chosen for
the work size and the cores that are free right now (never more than torch's setting).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["RuledGrid", "sample_ruled", "sample_ruled_many", "sample_ruled_batch", "sampling_threads"]

#: below this many gathered values per call, sampling runs on one thread (threads cost more than they give).
PARALLEL_WORK = 1 << 19
#: margin (voxels) kept between the points and any edge a fast path relies on: the points are computed in
#: float32 relative to the box corner, so they may move by about 1e-5 voxel.
EDGE = 1e-3


def free_cores() -> int:
    """Cores of this process's affinity not running another task now (``/proc/loadavg``), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])  # runnable tasks, this one included
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return cores
    return max(1, min(cores, cores - (running - 1)))


@contextlib.contextmanager
def sampling_threads(work: int, limit: int | None = None) -> Iterator[int]:
    """Run the block with the torch intra-op threads suited to ``work`` (values computed), restoring them.

    One thread below :data:`PARALLEL_WORK` (planning, metadata: pass 0); above it ``limit`` (default:
    torch's current count; never more) capped by :func:`free_cores`. On a busy machine a parallel
    region waits for its slowest thread, and a thread waiting for a core costs a time slice (measured:
    8 ms for a (384, 3) reduction on 2 threads with the other core busy, 10 us on one).
    """
    before = torch.get_num_threads()
    cap = before if limit is None else max(1, int(limit))
    want = 1 if work < PARALLEL_WORK else max(1, min(cap, free_cores()))
    if want != before:
        torch.set_num_threads(want)
    try:
        yield want
    finally:
        if want != before:
            torch.set_num_threads(before)


class RuledGrid:
    """The points ``c[w] + a_i u[w]`` (2D) or ``c[w] + a_i u[w] + a_j v[w]`` (3D) of an sCPR.

    Args:
        c, u, v: (Wv, 3) float64 tensors: origin (the centreline) and the two directions per column,
            in any linear coordinates (world mm or voxel indices; ``u``, ``v`` per mm of offset).
        offsets: (H,) float64 offsets ``a`` across the vessel (mm).
        out_dims: 2 (points (H, Wv)) or 3 (points (H, H, Wv)).
    """

    def __init__(self, c: Any, u: Any, v: Any, offsets: Any, out_dims: int):
        self.c, self.u, self.v, self.offsets = (
            z.detach().cpu().to(torch.float64) if isinstance(z, torch.Tensor)
            else torch.from_numpy(np.asarray(z, np.float64)) for z in (c, u, v, offsets))
        self.out_dims = out_dims
        h, wv = self.offsets.numel(), self.c.shape[0]
        self.shape: tuple[int, ...] = (h, wv) if out_dims == 2 else (h, h, wv)
        self.count = math.prod(self.shape)
        self._bounds: tuple[np.ndarray, np.ndarray] | None = None

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(3,) float64 minimum and maximum of every coordinate over all points (exact up to rounding)."""
        if self._bounds is None:
            c, u, v = self.c.numpy(), self.u.numpy(), self.v.numpy()
            reach = float(np.abs(self.offsets.numpy()).max())
            spread = reach * (np.abs(u) + (np.abs(v) if self.out_dims == 3 else 0.0))
            self._bounds = ((c - spread).min(0), (c + spread).max(0))
        return self._bounds

    def coords(self, dtype: torch.dtype, device: torch.device | str = "cpu",
               shift: Sequence[float] = (0.0, 0.0, 0.0), out: torch.Tensor | None = None) -> torch.Tensor:
        """(3, *shape) tensor: the coordinates of every point minus ``shift`` (subtracted in float64);
        written into ``out`` ((3, count) view, e.g. a slice of a larger buffer) when given."""
        c = (self.c - torch.as_tensor(shift, dtype=torch.float64)).T.to(device=device, dtype=dtype).contiguous()
        u = self.u.T.to(device=device, dtype=dtype).contiguous()
        a = self.offsets.to(device=device, dtype=dtype)
        dest = None if out is None else out.view(3, *self.shape)
        if self.out_dims == 2:
            return torch.addcmul(c.unsqueeze(1), a.view(1, -1, 1), u.unsqueeze(1), out=dest)  # (3, H, Wv)
        plane = torch.addcmul(c.unsqueeze(1), a.view(1, -1, 1), u.unsqueeze(1))
        v = self.v.T.to(device=device, dtype=dtype).contiguous()
        return torch.addcmul(plane.unsqueeze(2), a.view(1, 1, -1, 1), v.view(3, 1, 1, -1), out=dest)  # (3, H, H, Wv)

    def components(self, dtype: torch.dtype, device: torch.device | str = "cpu",
                   shift: Sequence[float] = (0.0, 0.0, 0.0)) -> list[torch.Tensor]:
        """The three coordinates of every point minus ``shift``, each a contiguous ``shape`` tensor."""
        return list(self.coords(dtype, device, shift).unbind(0))

    def points(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(*shape, 3)`` tensor of the points."""
        return torch.stack(self.components(dtype, device), -1)

    def count_inside(self, spatial_shape: Sequence[int]) -> int:
        """Points within half a voxel of the volume ``[-0.5, N - 0.5]`` (the grid in voxel coordinates)."""
        lo, hi = self.bounds()
        size = np.asarray(spatial_shape, dtype=np.float64)
        if bool((lo >= -0.5).all() and (hi <= size - 0.5).all()):
            return self.count
        inside = torch.ones(self.shape, dtype=torch.bool)
        for k, comp in enumerate(self.components(torch.float64)):
            inside &= (comp >= -0.5) & (comp <= float(size[k]) - 0.5)
        return int(inside.sum())


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _storage_view(x: torch.Tensor) -> torch.Tensor:
    """A 1D view of all elements reachable by ``x``'s strides (index ``sum(i_k * stride_k)``)."""
    span = 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride()))
    return torch.as_strided(x, (span,), (1,), x.storage_offset())


def _gather(x: torch.Tensor, grids: Sequence[RuledGrid], mode: str, padding: torch.Tensor, fast: bool
            ) -> torch.Tensor:
    """Sample (C, X, Y, Z) ``x`` at the points of ``grids`` (several only when ``fast``) by gathering their
    neighbours, all in one pass; (C, total count) in the compute dtype, the grids' points one after the other.

    ``fast``: every neighbour is inside the volume (no masks needed)."""
    compute = _compute_dtype(x.dtype)
    channels, shape, strides = x.shape[0], x.shape[1:], x.stride()
    flat = _storage_view(x)
    itype = torch.int32 if flat.numel() < 2**31 else torch.int64
    chan = (torch.arange(channels, device=x.device, dtype=itype) * strides[0]).view(-1, 1, 1)
    pad = padding.to(device=x.device, dtype=compute)
    # coordinates relative to each grid's box corner: small numbers, so float32 keeps ~1e-5 voxel
    corners = [[int(math.floor(float(v) - EDGE)) for v in g.bounds()[0]] for g in grids]
    coords = torch.empty(3, sum(g.count for g in grids), dtype=compute, device=x.device)  # (3, P)
    starts = [0]
    for g, corner in zip(grids, corners):
        g.coords(compute, x.device, shift=corner, out=coords[:, starts[-1] : starts[-1] + g.count])
        starts.append(starts[-1] + g.count)
    if not fast:
        vals, fracs = _gather_masked(flat, coords, corners[0], shape, strides, mode, itype, chan, pad)
        if mode == "nearest":
            return vals
    else:  # all neighbours inside the volume and the coordinates positive: truncation is floor
        idx = (torch.round(coords) if mode == "nearest" else coords).to(itype)
        base = (idx * torch.tensor(strides[1:], dtype=itype, device=x.device).view(3, 1)).sum(0, dtype=itype)
        origins = [sum(c * s for c, s in zip(corner, strides[1:])) for corner in corners]
        for k in range(1, len(grids)):  # the first grid's origin goes into the offsets
            base[starts[k] : starts[k + 1]] += origins[k] - origins[0]
        cells = [0] if mode == "nearest" else range(8)
        offsets = torch.tensor([origins[0] + (c >> 2) * strides[1] + ((c >> 1) & 1) * strides[2] + (c & 1) * strides[3]
                                for c in cells], dtype=itype, device=x.device)
        lin = base.unsqueeze(0) + offsets.unsqueeze(1)  # (8, P) corner-major, or (1, P)
        if channels > 1:
            lin = lin.unsqueeze(0) + chan
        vals = flat.index_select(0, lin.reshape(-1)).view(channels, *lin.shape[-2:]).to(compute)
        if mode == "nearest":
            return vals[:, 0]
        fracs = torch.frac(coords)
    vals = vals.view(channels, 2, 2, 2, -1)
    vals = torch.lerp(vals[:, 0], vals[:, 1], fracs[0])  # (C, 2, 2, P)
    vals = torch.lerp(vals[:, 0], vals[:, 1], fracs[1])  # (C, 2, P)
    return torch.lerp(vals[:, 0], vals[:, 1], fracs[2])  # (C, P)


def _gather_masked(flat: torch.Tensor, coords: torch.Tensor, corner: Sequence[int], shape: Sequence[int],
                   strides: Sequence[int], mode: str, itype: torch.dtype, chan: torch.Tensor, pad: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_gather` where neighbours may lie outside the volume: clamped indices, padding where outside.
    Returns the (C, P) nearest values or the (C, 8, P) corner values and the (3, P) fractions."""
    channels = chan.shape[0]
    if mode == "nearest":
        lin, inside = 0, None
        for k in range(3):
            r = torch.round(coords[k]).to(itype) + corner[k]
            ok = (r >= 0) & (r <= shape[k] - 1)
            inside = ok if inside is None else inside & ok
            lin = lin + r.clamp(0, shape[k] - 1) * strides[k + 1]
        vals = flat.index_select(0, (lin.unsqueeze(0) + chan.view(-1, 1)).reshape(-1)).view(channels, -1)
        return torch.where(inside, vals.to(pad.dtype), pad.view(-1, 1)), None
    views = ((2, 1, 1, -1), (1, 2, 1, -1), (1, 1, 2, -1))  # corner-major: the long axis innermost
    floor = torch.floor(coords)
    lin, inside = 0, None
    for k in range(3):
        i0 = floor[k].to(itype) + corner[k]
        idx = torch.stack([i0, i0 + 1])  # (2, P): the neighbours along axis k
        ok = ((idx >= 0) & (idx <= shape[k] - 1)).view(views[k])
        inside = ok if inside is None else inside & ok
        lin = lin + (idx.clamp(0, shape[k] - 1) * strides[k + 1]).view(views[k])
    lin = lin.reshape(1, 8, -1) + chan
    vals = flat.index_select(0, lin.reshape(-1)).view(channels, 8, -1).to(pad.dtype)
    vals = torch.where(inside.reshape(1, 8, -1), vals, pad.view(-1, 1, 1))
    return vals, coords - floor


def crop_box(grid: RuledGrid, spatial_shape: Sequence[int]) -> tuple[list[int], list[int], bool]:
    """Voxel box ``[lo, hi]`` (inclusive) holding every interpolation neighbour (with a margin of
    ``EDGE`` voxel for the float32 rounding of the points), clipped to one voxel beyond the volume, and
    whether some points lie beyond that clipped box (they need clamping)."""
    lo, hi = grid.bounds()
    lo_i = [max(int(math.floor(float(v) - EDGE)), -1) for v in lo]
    hi_i = [min(int(math.floor(float(v) + EDGE)) + 1, n) for v, n in zip(hi, spatial_shape)]
    beyond = any(float(lo[k]) - EDGE < lo_i[k] or float(hi[k]) + EDGE > hi_i[k] for k in range(3))
    return lo_i, hi_i, beyond


def _copy_box(dst: torch.Tensor, x: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> None:
    """``dst`` (C, box) = the part of ``x`` (C, X, Y, Z) inside the box starting at ``lo`` (rest untouched)."""
    src, dst_sl = [slice(None)], [slice(None)]
    for k in range(3):
        a, b = max(lo[k], 0), min(hi[k], x.shape[k + 1] - 1)
        src.append(slice(a, b + 1))
        dst_sl.append(slice(a - lo[k], b - lo[k] + 1))
    dst[tuple(dst_sl)] = x[tuple(src)]


def sample_ruled_batch(items: Sequence[tuple[torch.Tensor, RuledGrid]], mode: str, padding: float | torch.Tensor
                       ) -> list[torch.Tensor]:
    """Sample every ``(x, grid)`` pair ((C, X, Y, Z) volumes, same C, on one device) with ONE 3D
    ``grid_sample`` call: each pair's box is copied into one (N, C, block) array filled with
    ``padding`` (one value or (C,)), and ``padding_mode="border"`` clamps points beyond a clipped box
    onto padding voxels. Returns (C, *grid.shape) tensors (float32, float64 if all are float64).
    Autocast is disabled inside (AMP-safe)."""
    if len({x.shape[0] for x, _ in items}) != 1:
        raise ValueError(f"all volumes of a batch need the same channels, got {[x.shape[0] for x, _ in items]}.")
    device, channels = items[0][0].device, items[0][0].shape[0]
    compute = torch.float64 if all(x.dtype == torch.float64 for x, _ in items) else torch.float32
    boxes = [crop_box(grid, x.shape[1:])[:2] for x, grid in items]
    block = [max(h[k] - l_[k] + 1 for l_, h in boxes) for k in range(3)]
    pad = torch.as_tensor(padding, dtype=compute).reshape(-1).expand(channels).to(device)
    count = max(grid.count for _, grid in items)
    with torch.autocast(device.type, enabled=False):
        data = pad.view(1, -1, 1, 1, 1).repeat(len(items), 1, *block)
        coords = torch.zeros(len(items), count, 3, dtype=compute, device=device)
        for i, ((x, grid), (lo, hi)) in enumerate(zip(items, boxes)):
            _copy_box(data[i], x, lo, hi)
            for k, comp in enumerate(grid.components(compute, device, shift=lo)):
                coords[i, : grid.count, 2 - k] = comp.reshape(-1) * (2.0 / (block[k] - 1)) - 1.0  # (z, y, x)
        out = F.grid_sample(data, coords.view(len(items), 1, 1, count, 3), mode=mode, padding_mode="border",
                            align_corners=True).view(len(items), channels, count)
    return [out[i, :, : grid.count].reshape(channels, *grid.shape) for i, (_, grid) in enumerate(items)]


def _sample_box_cpu(x: torch.Tensor, grid: RuledGrid, mode: str, pad: torch.Tensor, lo: list[int],
                    hi: list[int], clamp: bool) -> torch.Tensor:
    """The box as a mosaic of its x-slices (``tiles`` per row; each slice a (Y, Z) tile, copied as
    contiguous rows), sampled with the vectorized 2D kernel; the next slice is a second channel block."""
    compute = _compute_dtype(x.dtype)
    channels = x.shape[0]
    sx, sy, sz = (h - l_ + 1 for l_, h in zip(lo, hi))
    tiles = math.ceil(math.sqrt(sx))
    rows = math.ceil(sx / tiles)
    blocks = 1 if mode == "nearest" else 2  # bilinear: slice x and slice x + 1 as two channel blocks
    x0, x1 = max(lo[0], 0), min(hi[0], x.shape[1] - 1)
    inside = all(lo[k] >= 0 and hi[k] <= x.shape[k + 1] - 1 for k in range(3))
    if inside:  # every used tile is copied below: only the unused ones need finite values
        mosaic = torch.empty(blocks, channels, rows, sy, tiles, sz, dtype=compute, device=x.device)
        for r in range(rows):
            first = max(sx - r * tiles - 1, 0)  # block 1 of the last slice reads one slice beyond: padding
            if first < tiles:
                mosaic[:, :, r, :, first:, :] = pad.view(1, -1, 1, 1, 1)
    else:
        mosaic = pad.view(1, -1, 1, 1, 1, 1).repeat(blocks, 1, rows, sy, tiles, sz)  # (B, C, rows, Y, tiles, Z)
    for block in range(blocks):
        for r in range(rows):  # the slices of tile row r that lie in the volume
            a, b = max(r * tiles + block, x0 - lo[0]), min((r + 1) * tiles + block, x1 - lo[0] + 1)
            if a >= b:
                continue
            part = mosaic[block, :, r, :, a - r * tiles - block : b - r * tiles - block, :].permute(0, 2, 1, 3)
            _copy_box(part, x[:, lo[0] + a : lo[0] + b], [0, lo[1], lo[2]], [b - a - 1, hi[1], hi[2]])
    height, width = max(rows * sy - 1, 1), max(tiles * sz - 1, 1)
    # normalized mosaic coordinates: per slice, the offset of its tile (a lookup table), plus y or z scaled
    gx, gy, gz = grid.components(compute, x.device, shift=lo)
    if clamp:
        gx, gy, gz = gx.clamp(0, sx - 1), gy.clamp(0, sy - 1), gz.clamp(0, sz - 1)
    xf = torch.round(gx) if mode == "nearest" else torch.floor(gx)
    slices = torch.arange(sx + 1, device=x.device, dtype=torch.float64)
    row_of = torch.floor(slices / tiles)
    col_of = slices - row_of * tiles
    table = torch.stack([col_of * (sz * 2.0 / width) - 1.0, row_of * (sy * 2.0 / height) - 1.0], 1).to(compute)
    g = table.index_select(0, xf.to(torch.int32).view(-1))  # (P, 2) tile offsets
    g[:, 0].add_(gz.view(-1), alpha=2.0 / width)
    g[:, 1].add_(gy.view(-1), alpha=2.0 / height)
    image = mosaic.view(blocks * channels, rows * sy, tiles * sz).unsqueeze(0)
    out = F.grid_sample(image, g.view(1, -1, grid.shape[-1], 2), mode=mode, padding_mode="zeros",
                        align_corners=True)[0]  # (B * C, rows, Wv)
    out = out.reshape(blocks, channels, -1)
    if mode == "nearest":
        return out[0]
    return torch.lerp(out[0], out[1], (gx - xf).reshape(1, -1))


def sample_ruled(x: torch.Tensor, grid: RuledGrid, mode: str, padding: torch.Tensor,
                 strategy: str = "auto", max_threads: int | None = None) -> torch.Tensor:
    """Sample a channel-first (C, X, Y, Z) tensor (any dtype, any strides) at the points of ``grid``
    (voxel coordinates); ``mode`` ``"bilinear"`` (trilinear) or ``"nearest"``; ``padding`` (C,) the
    value outside the volume. ``strategy``: ``"auto"``, ``"gather"`` or ``"box"`` (see the module
    docstring; all give the same values up to float rounding); ``max_threads``: the most torch threads
    to use (default: the current setting), see :func:`sampling_threads`. Returns (C, *grid.shape) in float32
    (float64 for float64 input)."""
    if strategy not in ("auto", "gather", "box"):
        raise ValueError(f"strategy must be 'auto', 'gather' or 'box', got {strategy!r}.")
    shape = x.shape[1:]
    lo_i, hi_i, beyond = crop_box(grid, shape)
    box_voxels = math.prod(max(h - l_ + 1, 1) for l_, h in zip(lo_i, hi_i))
    neighbours = 1 if mode == "nearest" else 8
    if strategy == "auto":
        strategy = _strategy(grid, box_voxels, mode)
    work = grid.count * neighbours * x.shape[0]
    ctx = sampling_threads(work, max_threads) if x.device.type == "cpu" else contextlib.nullcontext()
    with ctx, torch.autocast(x.device.type, enabled=False):
        if strategy == "gather":
            out = _gather(x, [grid], mode, padding, _fast(grid, shape, mode))
        elif x.device.type != "cpu":
            out = sample_ruled_batch([(x, grid)], mode, padding)[0]
        else:
            out = _sample_box_cpu(x, grid, mode, padding.to(_compute_dtype(x.dtype)), lo_i, hi_i, beyond)
    return out.view(x.shape[0], *grid.shape)


def _strategy(grid: RuledGrid, box_voxels: int, mode: str) -> str:
    """``"gather"`` for sparse grids (fewer neighbours to read than voxels in their box), else ``"box"``."""
    return "gather" if grid.count * (1 if mode == "nearest" else 8) <= box_voxels else "box"


def _fast(grid: RuledGrid, shape: Sequence[int], mode: str) -> bool:
    """Whether every neighbour of every point lies inside the volume (with the ``EDGE`` margin)."""
    lo, hi = grid.bounds()
    size = np.asarray(shape, dtype=np.float64)
    if mode == "nearest":
        return bool((lo > -0.5 + EDGE).all() and (hi < size - 0.5 - EDGE).all())
    return bool((lo >= EDGE).all() and (hi < size - 1 - EDGE).all())


def sample_ruled_many(x: torch.Tensor, grids: Sequence[RuledGrid], mode: str, padding: torch.Tensor,
                      max_threads: int | None = None) -> list[torch.Tensor]:
    """:func:`sample_ruled` of several grids of one volume (e.g. one per artery): the sparse ones whose
    neighbours all lie inside the volume are gathered in one pass (sharing the per-operation costs), the
    others one by one. Returns one (C, *grid.shape) tensor per grid, in order."""
    shape = x.shape[1:]
    joint = [i for i, g in enumerate(grids) if x.device.type == "cpu" and _fast(g, shape, mode)
             and _strategy(g, math.prod(h - l_ + 1 for l_, h in zip(*crop_box(g, shape)[:2])), mode) == "gather"]
    out: list[torch.Tensor | None] = [None] * len(grids)
    if len(joint) > 1:
        chosen = [grids[i] for i in joint]
        work = sum(g.count for g in chosen) * (1 if mode == "nearest" else 8) * x.shape[0]
        with sampling_threads(work, max_threads), torch.autocast(x.device.type, enabled=False):
            flat = _gather(x, chosen, mode, padding, True)
        for i, part in zip(joint, flat.split([g.count for g in chosen], dim=1)):
            out[i] = part.reshape(x.shape[0], *grids[i].shape)
    for i, g in enumerate(grids):
        if out[i] is None:
            out[i] = sample_ruled(x, g, mode, padding, max_threads=max_threads)
    return out
