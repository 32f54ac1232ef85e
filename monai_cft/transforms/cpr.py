"""Straightened curved planar reformation (sCPR) of a tubular structure along its centreline.

The straightened image is sampled on a ruled surface that follows the vessel: column ``j`` lies at
arc length ``s_j = j * spacing`` from the first centreline point (the ostium), row ``i`` at the
signed distance ``(i - (H - 1) / 2) * spacing`` from the centreline along the frame's (rotated)
normal. Frames are carried along the centreline by parallel transport (a rotation-minimizing
frame computed with the double reflection method of Wang et al., ACM TOG 27(1), 2008), so the
image does not twist or flip where the curvature vanishes, as Frenet frames do.

Conventions (also in ``docs/transforms.md``):

* World coordinates are millimetres in the space of the image affine (RAS for ``LoadImage``),
  the centreline is given in the same space, ostium first.
* The centreline is a polyline: consecutive duplicates are dropped, then it is resampled at equal
  arc-length steps by piecewise-linear interpolation. Tangents are central differences of the
  resampled points (one-sided at the ends).
* The initial normal is the world axis least aligned with the first tangent (smallest absolute
  tangent component, lowest axis index on ties), made orthogonal to the tangent; an explicit
  ``initial_normal`` may be given instead. ``binormal = tangent x normal``.
* ``angle`` (degrees) rotates the normal about the tangent towards the binormal (right-hand rule):
  ``n_a = cos(a) n + sin(a) b``, ``b_a = -sin(a) n + cos(a) b``.

The centreline geometry lives in :mod:`monai_cft.transforms.centerline`, the sampling (cost
proportional to the samples: only the sampled neighbourhood of the volume is read, int16 volumes are
never converted as a whole, threads chosen for the work size) in
:mod:`monai_cft.transforms.scpr_sampling`, the inverse (an edited sCPR written back into the volume)
in :mod:`monai_cft.transforms.unstraighten`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, ensure_tuple_rep

from .centerline import (
    DUPLICATE_TOL_MM,
    centerline_length,
    check_vector,
    clean_centerline,
    clean_points,
    frames,
    parallel_transport_frames,
    resample_centerline,
    resample_points,
)
from .scpr_checks import (
    centerline_list,
    check_finite_output,
    check_geometry,
    check_mode,
    check_padding,
    image_and_affine,
)
from .scpr_sampling import RuledGrid, sample_ruled, sample_ruled_many, sampling_threads

__all__ = [
    "SCPR_GRID_KEY",
    "SCPR_SPACING_KEY",
    "SCPR_ANGLE_KEY",
    "SCPR_LENGTH_KEY",
    "SCPR_VALID_COLUMNS_KEY",
    "SCPR_CENTERLINE_KEY",
    "SCPRGeometry",
    "clean_centerline",
    "centerline_length",
    "resample_centerline",
    "parallel_transport_frames",
    "scpr_to_world",
    "StraightenCPR",
    "StraightenCPRd",
]

#: meta key of the world coordinates (mm) of every sampled pixel, (H, W, 3) or (H, H, W, 3).
SCPR_GRID_KEY = "scpr_grid_world"
#: meta key of the pixel spacing of the straightened image (mm).
SCPR_SPACING_KEY = "scpr_spacing"
#: meta key of the rotation of the normal about the tangent (degrees).
SCPR_ANGLE_KEY = "scpr_angle"
#: meta key of the arc length of the whole (cleaned) centreline (mm).
SCPR_LENGTH_KEY = "scpr_length_mm"
#: meta key of the number of columns that lie on the vessel (the rest are padding).
SCPR_VALID_COLUMNS_KEY = "scpr_valid_columns"
#: meta key of the resampled centreline points of the columns (W, 3), NaN in padded columns.
SCPR_CENTERLINE_KEY = "scpr_centerline"

_MAX_OUTSIDE_FRACTION = 0.5
#: warn when at least this fraction of the output pixels lies outside the volume or past the vessel.
_WARN_PADDING_FRACTION = 0.99


class SCPRGeometry:
    """The sampling geometry of one straightening (built by :meth:`StraightenCPR.plan`).

    Attributes: ``curve`` (Wv, 3) float64 world mm, the resampled centreline of the ``n_valid = Wv``
    columns on the vessel; ``tangents``, ``normals``, ``binormals`` (Wv, 3) the frames, normal and
    binormal already rotated by ``angle``; ``offsets`` (H,) the signed distances of the rows (mm);
    ``length`` the centreline's arc length (mm); ``world`` / ``voxels``: the same
    :class:`~monai_cft.transforms.scpr_sampling.RuledGrid` in world mm and in voxel indices of the
    volume. ``grid_world`` ((H, Wv, 3) or (H, H, Wv, 3) float64 mm) and ``sample_grid`` (the
    ``grid_sample`` coordinates of the whole volume, (z, y, x) order) are built on request.
    :meth:`sample` resamples a volume on it at a cost proportional to the pixels.
    """

    def __init__(self, centerline: Any, affine: torch.Tensor, spatial_shape: Sequence[int], size: tuple[int, int],
                 spacing: float, angle: float, out_dims: int, initial_normal: Any | None,
                 _planned: tuple[Any, ...] | None = None) -> None:
        # the planning runs on NumPy float64 (small arrays, no thread pool); ``many`` passes it precomputed
        height, width = size
        pts, frame_pts, n_valid = _resampled(centerline, spacing, width) if _planned is None else _planned[:3]
        self.length = float(np.sqrt(((pts[1:] - pts[:-1]) ** 2).sum(1)).sum())
        curve = frame_pts[:n_valid]
        t, n, b = frames(frame_pts, initial_normal) if _planned is None else _planned[3:]
        t, n, b = t[:n_valid], n[:n_valid], b[:n_valid]
        a = math.radians(angle)
        n_a = math.cos(a) * n + math.sin(a) * b
        b_a = -math.sin(a) * n + math.cos(a) * b
        offsets = (np.arange(height, dtype=np.float64) - (height - 1) / 2.0) * spacing
        self.offsets = torch.from_numpy(offsets)
        self.curve, self.tangents = torch.from_numpy(curve), torch.from_numpy(t)
        self.normals, self.binormals = torch.from_numpy(n_a), torch.from_numpy(b_a)
        self.n_valid, self.size, self.spacing, self.angle, self.out_dims = n_valid, size, spacing, angle, out_dims
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        inv = np.linalg.inv(affine.numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine, np.float64))
        lin, shift = inv[:3, :3], inv[:3, 3]
        shape = np.asarray(self.spatial_shape, dtype=np.float64)
        vox_c = curve @ lin.T + shift
        outside = ((vox_c < -0.5) | (vox_c > shape - 0.5)).any(1)
        frac = float(outside.mean())
        if frac > _MAX_OUTSIDE_FRACTION:
            raise ValueError(
                f"{frac:.0%} of the resampled centreline points ({int(outside.sum())} of {n_valid}) fall outside "
                f"the image volume of shape {self.spatial_shape}; check that the centreline is "
                "in the same world coordinates (mm) as the image affine."
            )
        self.voxels = RuledGrid(vox_c, n_a @ lin.T, b_a @ lin.T, offsets, out_dims)
        total_px = self.voxels.count // n_valid * width
        padded = 1.0 - self.voxels.count_inside(self.spatial_shape) / total_px
        if padded >= _WARN_PADDING_FRACTION:
            warnings.warn(
                f"{padded:.1%} of the sCPR's {total_px} pixels are padding (outside the volume of shape "
                f"{self.spatial_shape} or beyond the vessel's end) with spacing {spacing} mm and "
                f"output size {tuple(size)}; check spacing and output_size (mm per pixel, pixels).",
                stacklevel=3,
            )

    @classmethod
    def many(cls, centerlines: Sequence[Any], affine: torch.Tensor, spatial_shape: Sequence[int],
             size: tuple[int, int], spacing: float, angle: float, out_dims: int, initial_normal: Any | None
             ) -> list[SCPRGeometry]:
        """The geometries of several centrelines, their frames computed together (one vectorized pass per
        group of equally long resampled centrelines)."""
        resampled = [_resampled(c, spacing, size[1]) for c in centerlines]
        framed: list[tuple[np.ndarray, ...] | None] = [None] * len(resampled)
        for m in {r[1].shape[0] for r in resampled}:
            group = [i for i, r in enumerate(resampled) if r[1].shape[0] == m]
            t, n, b = frames(np.stack([resampled[i][1] for i in group]), initial_normal)
            for j, i in enumerate(group):
                framed[i] = (t[j], n[j], b[j])
        return [cls(c, affine, spatial_shape, size, spacing, angle, out_dims, initial_normal, (*r, *f))
                for c, r, f in zip(centerlines, resampled, framed)]

    @property
    def world(self) -> RuledGrid:
        """The pixels' ruled grid in world mm."""
        return RuledGrid(self.curve, self.normals, self.binormals, self.offsets, self.out_dims)

    @property
    def grid_world(self) -> torch.Tensor:
        """(H, Wv, 3) or (H, H, Wv, 3) float64 world mm of the pixels on the vessel."""
        return self.world.points(torch.float64)

    @property
    def sample_grid(self) -> torch.Tensor:
        """``grid_sample`` coordinates (align_corners) of the pixels in the whole volume, (z, y, x) order."""
        shape = torch.as_tensor(self.spatial_shape, dtype=torch.float64)
        return (2.0 * self.voxels.points(torch.float64) / (shape - 1.0) - 1.0).flip(-1)

    def sample(self, data: torch.Tensor, mode: str, padding: Any, strategy: str = "auto",
               max_threads: int | None = None) -> torch.Tensor:
        """Sample (C, X, Y, Z) ``data`` (any dtype and strides, CPU or CUDA) on the grid.

        ``padding``: one value or (C,) values for points outside the volume and the columns beyond the
        vessel's end. ``strategy``, ``max_threads``: see :func:`~monai_cft.transforms.scpr_sampling.sample_ruled`.
        Returns (C, H, W) or (C, H, H, W), float32 (float64 for float64 data), on ``data``'s device.
        """
        x = data.as_tensor() if isinstance(data, MetaTensor) else data
        pad = torch.as_tensor(padding, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return self.pad_columns(sample_ruled(x, self.voxels, mode, pad, strategy, max_threads), pad)

    def pad_columns(self, out: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Append the columns beyond the vessel's end (``pad``: (C,) values) to a sampled (C, ..., Wv)."""
        missing = self.size[1] - self.n_valid
        if missing > 0:
            fill = pad.to(out.device, out.dtype).view(-1, *([1] * (out.ndim - 1)))
            out = torch.cat([out, fill.expand(*out.shape[:-1], missing)], -1)
        return out

    def meta(self, record_grid: bool) -> dict[str, Any]:
        """The ``scpr_*`` metadata of the output (see :class:`StraightenCPR`); grids padded with NaN to W."""
        width, valid = self.size[1], self.n_valid
        curve = np.full((width, 3), np.nan, dtype=np.float32)
        curve[:valid] = self.curve.numpy()
        out: dict[str, Any] = {
            SCPR_SPACING_KEY: self.spacing,
            SCPR_ANGLE_KEY: self.angle,
            SCPR_LENGTH_KEY: self.length,
            SCPR_VALID_COLUMNS_KEY: valid,
            SCPR_CENTERLINE_KEY: torch.from_numpy(curve),
        }
        if record_grid:
            if self.out_dims == 2:  # a plane: NumPy float64, rounded once
                grid = np.full((self.offsets.numel(), width, 3), np.nan, dtype=np.float32)
                grid[:, :valid] = self.curve.numpy()[None] + self.offsets.numpy()[:, None, None] * self.normals.numpy()
                out[SCPR_GRID_KEY] = torch.from_numpy(grid)
            else:  # a straightened volume (H times more): float32 (about 1e-5 mm)
                world = self.world
                grid = torch.empty((*world.shape[:-1], width, 3), dtype=torch.float32)
                grid[..., valid:, :] = float("nan")
                grid[..., :valid, :] = world.coords(torch.float32).permute(1, 2, 3, 0)
                out[SCPR_GRID_KEY] = grid
        return out

    def output_affine(self) -> torch.Tensor:
        """(4, 4) float64 ``diag(spacing, spacing, spacing, 1)``: the straightened image's pixdim."""
        return torch.diag(torch.tensor([self.spacing] * 3 + [1.0], dtype=torch.float64))


def _resampled(centerline: Any, spacing: float, width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The cleaned centreline, its points at arc lengths ``j * spacing`` for the ``n_valid`` columns plus one
    beyond the last column (or the distal end) so that the last tangent is central, and ``n_valid``."""
    pts = clean_points(centerline)
    frame_pts = resample_points(pts, spacing, width + 1)
    n_valid = min(frame_pts.shape[0], width)
    if frame_pts.shape[0] == n_valid and np.linalg.norm(pts[-1] - frame_pts[-1]) > DUPLICATE_TOL_MM:
        frame_pts = np.concatenate([frame_pts, pts[-1:]], 0)
    return pts, frame_pts, n_valid


def _sample_all(data: torch.Tensor, plans: Sequence[SCPRGeometry], mode: str, padding: float,
                max_threads: int) -> list[torch.Tensor]:
    """Every plan's sCPR of one volume; several sparse ones are gathered in one pass."""
    x = data.as_tensor() if isinstance(data, MetaTensor) else data
    pad = torch.full((x.shape[0],), float(padding), dtype=torch.float64)
    if len(plans) == 1:
        return [plans[0].sample(x, mode, pad, max_threads=max_threads)]
    sampled = sample_ruled_many(x, [p.voxels for p in plans], mode, pad, max_threads)
    return [p.pad_columns(s, pad) for p, s in zip(plans, sampled)]


def _wrap(out: torch.Tensor, src: torch.Tensor, plan: SCPRGeometry, record_grid: bool) -> torch.Tensor:
    """Make the output a MetaTensor that keeps the input's meta, with the sCPR geometry."""
    if not get_track_meta():
        return out.as_tensor() if isinstance(out, MetaTensor) else out
    meta = dict(src.meta) if isinstance(src, MetaTensor) else {}
    meta.pop("affine", None)
    meta.update(plan.meta(record_grid))
    ops = list(src.applied_operations) if isinstance(src, MetaTensor) else None
    data = out.as_tensor() if isinstance(out, MetaTensor) else out
    return MetaTensor(data, affine=plan.output_affine(), meta=meta, applied_operations=ops,
                      spatial_ndim=plan.out_dims)


def _output_dtype(data: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The requested dtype, else the input's if floating point, else float32."""
    if dtype is not None:
        return dtype
    return data.dtype if data.is_floating_point() else torch.float32


def scpr_to_world(meta: Any, coords: Any) -> torch.Tensor:
    """Map (continuous) pixel coordinates of a straightened image back to world millimetres.

    The recorded grid is interpolated multilinearly; since rows are straight lines in the world,
    this is exact across the vessel and piecewise linear along it.

    Args:
        meta: the straightened ``MetaTensor`` or its ``meta`` dict (holding ``"scpr_grid_world"``).
        coords: (..., 2) ``(row, col)`` for a 2D sCPR or (..., 3) ``(row, row2, col)`` for a 3D one,
            in pixel units (0-based; fractional values allowed).

    Returns:
        (..., 3) float64 world coordinates in mm; NaN for coordinates outside the image or in padded
        columns (beyond the vessel's end).
    """
    m = meta.meta if isinstance(meta, MetaTensor) else meta
    if not isinstance(m, Mapping) or SCPR_GRID_KEY not in m:
        raise ValueError(
            f"meta has no {SCPR_GRID_KEY!r}: pass the output of StraightenCPR(record_grid=True) or its meta."
        )
    grid = torch.as_tensor(m[SCPR_GRID_KEY]).detach().cpu().to(torch.float64)
    nd = grid.ndim - 1
    c = torch.as_tensor(np.asarray(coords.detach().cpu() if isinstance(coords, torch.Tensor) else coords,
                                   dtype=np.float64))
    if c.shape[-1:] != (nd,):
        raise ValueError(
            f"coords must have shape (..., {nd}) for a grid of shape {tuple(grid.shape)}, got {tuple(c.shape)}."
        )
    lead = c.shape[:-1]
    c = c.reshape(-1, nd)
    size = torch.as_tensor(grid.shape[:-1], dtype=torch.float64)
    inside = ((c >= 0) & (c <= size - 1)).all(1)
    base = torch.clamp(torch.floor(c), min=torch.zeros(nd, dtype=torch.float64), max=size - 1).long()
    frac = c - base
    out = torch.zeros(c.shape[0], 3, dtype=torch.float64)
    for corner in range(2**nd):  # 4 or 8 corners, vectorized over all points
        bits = torch.tensor([(corner >> k) & 1 for k in range(nd)])
        idx = torch.minimum(base + bits, (size - 1).long())
        w = torch.where(bits.bool(), frac, 1.0 - frac).prod(1, keepdim=True)
        val = grid[tuple(idx.T)]
        out = out + torch.where(w > 0, w * val, torch.zeros_like(val))
    out[~inside] = float("nan")
    return out.reshape(*lead, 3)


class StraightenCPR(Transform):
    """Straightened curved planar reformation of a channel-first 3D image along one or several centrelines.

    Args:
        output_size: ``(H, W)``: pixels across the vessel and along it.
        spacing: pixel size of the output in mm, both across and along the vessel.
        angle: rotation (degrees) of the sampling plane about the tangent, from the parallel-transport
            normal towards the binormal.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"`` (label maps).
        padding_value: value of output pixels that fall outside the volume or beyond the vessel's end.
        out_dims: 2 for a (C, H, W) plane, 3 for a (C, H, H, W) straightened volume whose second
            spatial axis follows the (rotated) binormal.
        dtype: output dtype (sampling itself runs in float32, float64 for float64 volumes; ``torch.uint8``
            suits nearest label maps); default: the input's if floating point, else float32.
        initial_normal: optional world vector for the first frame normal (see module docstring).
        record_grid: store the world coordinates of every pixel in ``meta["scpr_grid_world"]`` (needed by
            :func:`scpr_to_world` and :class:`~monai_cft.transforms.unstraighten.UnstraightenCPR`).

    Call ``StraightenCPR(...)(img, centerline, affine=None)``:

    * ``img``: (C, X, Y, Z) ``MetaTensor`` whose affine maps voxel indices to world mm, or a
      tensor / ndarray together with ``affine`` (4 x 4). Any dtype (int16 HU as stored in CCTA files
      is read directly: only the voxels around the sampled points are read and converted), CPU or CUDA.
    * ``centerline``: (N, 3) world mm, ostium first; or several (a list / tuple of such arrays or paths,
      or a (K, N, 3) array: e.g. LAD, LCX and RCA of one scan), giving a list of K outputs in order.

    Returns a ``MetaTensor`` (C, H, W) or (C, H, H, W) on the input's device (a list of them for several
    centrelines; ``torch.stack`` makes a batch). Column ``j`` samples arc length ``j * spacing``; the
    centreline lies at row ``(H - 1) / 2``; a vessel shorter than ``W * spacing`` is padded with
    ``padding_value`` and a longer one is cut at the distal end. The affine is
    ``diag(spacing, spacing, spacing, 1)``; meta records ``scpr_grid_world`` ((H, W, 3) or (H, H, W, 3)
    float32 mm, NaN in padded columns), ``scpr_centerline`` (W, 3), ``scpr_spacing``, ``scpr_angle``,
    ``scpr_length_mm`` (arc length of the whole centreline) and ``scpr_valid_columns``. See
    :func:`scpr_to_world` to map pixels back. :meth:`batch` straightens several volumes at once (one
    ``grid_sample`` call on CUDA).

    Raises ValueError when more than half of the resampled centreline points used lie outside the
    volume (a centreline in the wrong coordinate system); a centreline only slightly outside is
    sampled and the outside pixels get ``padding_value``. Raises ValueError (giving their number)
    when the volume has NaN or infinite voxels where it is sampled: there is no NaN policy, replace
    them before. Warns when at least 99 % of the output pixels would be padding (e.g. a spacing in the
    wrong unit).

    Example::

        >>> import torch; from monai.data import MetaTensor
        >>> ct = MetaTensor(torch.full((1, 64, 64, 64), -100, dtype=torch.int16), affine=torch.diag(
        ...     torch.tensor([0.4, 0.4, 0.4, 1.0], dtype=torch.float64)))
        >>> line = [[12.0, 12.0, 2.0], [12.0, 13.0, 20.0]]
        >>> StraightenCPR((32, 64), 0.25)(ct, line).shape
        torch.Size([1, 32, 64])
        >>> [o.shape[-1] for o in StraightenCPR((32, 64), 0.25)(ct, [line, line])]
        [64, 64]
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        output_size: Sequence[int] = (64, 384),
        spacing: float = 0.25,
        angle: float = 0.0,
        mode: str = "bilinear",
        padding_value: float = -1024.0,
        out_dims: int = 2,
        dtype: torch.dtype | None = None,
        initial_normal: Sequence[float] | None = None,
        record_grid: bool = True,
    ) -> None:
        geometry = check_geometry(output_size, spacing, angle, out_dims)
        self.output_size, self.spacing, self.angle, self.out_dims = geometry
        self.mode = check_mode(mode)
        self.padding_value = check_padding(padding_value)
        self.dtype = dtype
        self.initial_normal = check_vector(initial_normal, "initial_normal")
        self.record_grid = bool(record_grid)

    def plan(self, centerline: Any, affine: torch.Tensor, spatial_shape: Sequence[int]) -> SCPRGeometry:
        """Build the sampling geometry (frames, voxel grid, metadata) without sampling."""
        return SCPRGeometry(centerline, affine, spatial_shape, self.output_size, self.spacing, self.angle,
                            self.out_dims, self.initial_normal)

    def plans(self, centerlines: Sequence[Any], affine: torch.Tensor, spatial_shape: Sequence[int]
              ) -> list[SCPRGeometry]:
        """:meth:`plan` of each centreline; an error names the centreline (its index) it comes from."""
        if len(centerlines) > 1:
            try:
                return SCPRGeometry.many(centerlines, affine, spatial_shape, self.output_size, self.spacing, self.angle,
                                         self.out_dims, self.initial_normal)
            except ValueError:
                pass  # planned one by one below, so that the error names the centreline
        out = []
        for k, line in enumerate(centerlines):
            try:
                out.append(self.plan(line, affine, spatial_shape))
            except ValueError as e:
                if len(centerlines) == 1:
                    raise
                raise ValueError(f"centreline {k} of {len(centerlines)}: {e}") from e
        return out

    def __call__(self, img: Any, centerline: Any, affine: Any | None = None) -> torch.Tensor | list[torch.Tensor]:
        limit = torch.get_num_threads()
        with sampling_threads(0):  # planning and metadata: small tensors, one thread
            data, aff = image_and_affine(img, affine)
            lines, several = centerline_list(centerline)
            src = img if isinstance(img, MetaTensor) else data
            outs = []
            plans = self.plans(lines, aff, data.shape[1:])
            for plan, out in zip(plans, _sample_all(data, plans, self.mode, self.padding_value, limit)):
                check_finite_output(out, data)
                outs.append(_wrap(out.to(_output_dtype(data, self.dtype)), src, plan, self.record_grid))
        return outs if several else outs[0]

    def batch(self, images: Sequence[Any], centerlines: Sequence[Any]) -> list[torch.Tensor | list[torch.Tensor]]:
        """Straighten a batch of cases: ``images[i]`` ((C, X, Y, Z) ``MetaTensor``, same C, shapes may
        differ) along ``centerlines[i]`` (one centreline or several). Returns per case what
        :meth:`__call__` returns. On CUDA every sCPR of the batch is sampled by one 3D ``grid_sample``
        call (the sampled boxes padded into one block; AMP-safe: autocast is off inside, sampling runs in
        float32); elsewhere the cases are straightened one after the other."""
        if len(images) != len(centerlines):
            raise ValueError(f"images and centerlines must pair up, got {len(images)} images and "
                             f"{len(centerlines)} centreline entries.")
        if not images or any(torch.device(getattr(i, "device", "cpu")).type != "cuda" for i in images):
            return [self(img, line) for img, line in zip(images, centerlines)]
        from .scpr_sampling import sample_ruled_batch

        cases = []
        for i, (img, line) in enumerate(zip(images, centerlines)):
            data, aff = image_and_affine(img, None, name=f"images[{i}]")
            lines, several = centerline_list(line)
            cases.append((img, data, self.plans(lines, aff, data.shape[1:]), several))
        grids = [(data.as_tensor() if isinstance(data, MetaTensor) else data, plan.voxels)
                 for _, data, plans, _ in cases for plan in plans]
        sampled = iter(sample_ruled_batch(grids, self.mode, self.padding_value))
        results = []
        for img, data, plans, several in cases:
            outs = []
            for plan in plans:
                out = next(sampled)
                missing = plan.size[1] - plan.n_valid
                if missing > 0:
                    out = torch.cat([out, out.new_full((*out.shape[:-1], missing), self.padding_value)], -1)
                check_finite_output(out, data)
                outs.append(_wrap(out.to(_output_dtype(data, self.dtype)), img, plan, self.record_grid))
            results.append(outs if several else outs[0])
        return results


class StraightenCPRd(MapTransform):
    """Dictionary version of :class:`StraightenCPR`: straighten several keys along the same centreline(s).

    Args:
        keys: keys of the images to straighten (for example ``("image", "label")``); they must share
            spatial shape and affine.
        centerline_key: key of the centreline: an (N, 3) array / tensor in world mm or a path to a
            ``.csv`` / ``.npy`` file (read with ``monai_cft.utils.io.load_centerline``); or several of them
            (a list / tuple, or a (K, N, 3) array), in which case every key gets a list of K outputs.
        output_size, spacing, angle, out_dims, initial_normal, record_grid: as in :class:`StraightenCPR`.
        mode: one interpolation mode or one per key (``("bilinear", "nearest")``).
        padding_value: one value or one per key (``(-1024.0, 0)``).
        dtype: one output dtype or one per key (``None``: input's if floating point, else float32).
        allow_missing_keys: skip keys that are absent.

    The geometry is planned once per centreline and shared by every key; every output gets the same
    sCPR metadata (see :class:`StraightenCPR`).
    """

    backend = StraightenCPR.backend

    def __init__(
        self,
        keys: KeysCollection,
        centerline_key: Hashable = "centerline",
        output_size: Sequence[int] = (64, 384),
        spacing: float = 0.25,
        angle: float = 0.0,
        mode: str | Sequence[str] = "bilinear",
        padding_value: float | Sequence[float] = -1024.0,
        out_dims: int = 2,
        dtype: torch.dtype | Sequence[torch.dtype | None] | None = None,
        initial_normal: Sequence[float] | None = None,
        record_grid: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.centerline_key = centerline_key
        self.modes = tuple(check_mode(m) for m in ensure_tuple_rep(mode, len(self.keys)))
        self.padding_values = tuple(check_padding(p) for p in ensure_tuple_rep(padding_value, len(self.keys)))
        self.dtypes = ensure_tuple_rep(dtype, len(self.keys))
        self.cpr = StraightenCPR(output_size, spacing, angle, self.modes[0], self.padding_values[0], out_dims,
                                 None, initial_normal, record_grid)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        limit = torch.get_num_threads()
        with sampling_threads(0):  # planning and metadata: small tensors, one thread
            return self._straighten(dict(data), limit)

    def _straighten(self, d: dict[Hashable, Any], limit: int) -> dict[Hashable, Any]:
        if self.centerline_key not in d:
            raise KeyError(f"centreline key {self.centerline_key!r} not found; available keys: {list(d)}.")
        items = list(self.key_iterator(d, self.modes, self.padding_values, self.dtypes))
        if not items:
            return d
        tensors, affine, ref_key = {}, None, None
        for key, *_ in items:
            data_k, aff_k = image_and_affine(d[key], None, name=repr(key))
            if affine is None:
                affine, ref_key, shape = aff_k, key, tuple(data_k.shape[1:])
            elif tuple(data_k.shape[1:]) != shape:
                raise ValueError(
                    f"{key!r} has spatial shape {tuple(data_k.shape[1:])} but {ref_key!r} has {shape}; "
                    "all keys straightened together must share their geometry."
                )
            elif not torch.allclose(aff_k, affine, atol=1e-4):
                raise ValueError(f"{key!r} and {ref_key!r} have different affines:\n{aff_k}\n{affine}")
            tensors[key] = data_k
        lines, several = centerline_list(d[self.centerline_key])
        plans = self.cpr.plans(lines, affine, shape)
        outputs: dict[Hashable, list[torch.Tensor]] = {key: [] for key, *_ in items}
        for key, mode, pad, out_dtype in items:
            for plan, out in zip(plans, _sample_all(tensors[key], plans, mode, pad, limit)):
                check_finite_output(out, tensors[key], repr(key))
                outputs[key].append(_wrap(out.to(_output_dtype(tensors[key], out_dtype)), d[key], plan,
                                          self.cpr.record_grid))
        for key, outs in outputs.items():
            d[key] = outs if several else outs[0]
        return d


StraightenCPRD = StraightenCPRDict = StraightenCPRd
