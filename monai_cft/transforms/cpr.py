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
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, ensure_tuple_rep

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

_SUPPORTED_MODES = ("bilinear", "nearest")
_DUPLICATE_TOL_MM = 1e-6
_MAX_OUTSIDE_FRACTION = 0.5
#: warn when at least this fraction of the output pixels lies outside the volume or past the vessel.
_WARN_PADDING_FRACTION = 0.99


# --------------------------------------------------------------------------------------------
# centreline geometry
# --------------------------------------------------------------------------------------------


def clean_centerline(points: Any, name: str = "centerline") -> torch.Tensor:
    """Validate a centreline and drop repeated consecutive points.

    Args:
        points: (N, 3) array-like of world coordinates in mm, ostium first.
        name: how the value is called in error messages.

    Returns:
        (M, 3) float64 CPU tensor, ``M >= 2``, no two consecutive points closer than 1e-6 mm.

    Raises:
        TypeError: when ``points`` cannot be converted to a numeric tensor.
        ValueError: wrong shape, NaN / inf coordinates, or fewer than two distinct points.
    """
    try:
        pts = torch.as_tensor(np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points,
                                         dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{name} must be an (N, 3) array of world coordinates in mm, got {type(points).__name__}."
        ) from e
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3), got {tuple(pts.shape)}.")
    if not torch.isfinite(pts).all():
        bad = torch.nonzero(~torch.isfinite(pts).all(1)).flatten().tolist()
        raise ValueError(f"{name} has NaN or infinite coordinates at point(s) {bad[:10]}.")
    if pts.shape[0] == 0:
        raise ValueError(f"{name} is empty; at least two distinct points are needed.")
    step = (pts[1:] - pts[:-1]).norm(dim=1)
    keep = torch.cat([torch.ones(1, dtype=torch.bool), step > _DUPLICATE_TOL_MM])
    pts = pts[keep]
    if pts.shape[0] < 2:
        raise ValueError(f"{name} needs at least two distinct points, got {pts.shape[0]} after dropping repeats.")
    return pts


def centerline_length(points: Any) -> float:
    """Arc length (mm) of the polyline through ``points`` ((N, 3), world mm)."""
    pts = clean_centerline(points)
    return float((pts[1:] - pts[:-1]).norm(dim=1).sum())


def _resample_clean(pts: torch.Tensor, step: float, num: int | None = None) -> torch.Tensor:
    """Piecewise-linear points at arc lengths ``k * step`` (k < num, inside the polyline)."""
    seg = (pts[1:] - pts[:-1]).norm(dim=1)
    cum = torch.cat([torch.zeros(1, dtype=pts.dtype), torch.cumsum(seg, 0)])
    length = float(cum[-1])
    count = int(math.floor(length / step + 1e-9)) + 1
    if num is not None:
        count = min(count, int(num))
    s = torch.clamp(torch.arange(count, dtype=pts.dtype) * step, max=length)
    idx = torch.clamp(torch.searchsorted(cum, s, right=True) - 1, 0, seg.numel() - 1)
    frac = ((s - cum[idx]) / seg[idx]).unsqueeze(1)
    return pts[idx] + frac * (pts[idx + 1] - pts[idx])


def resample_centerline(points: Any, step: float, num: int | None = None) -> torch.Tensor:
    """Resample a centreline at equal arc-length steps (piecewise-linear interpolation).

    Args:
        points: (N, 3) world coordinates (mm), ostium first; consecutive repeats are dropped.
        step: arc-length step in mm (> 0).
        num: keep at most this many points (the first ``num``).

    Returns:
        (M, 3) float64 tensor of the points at arc lengths ``0, step, 2 step, ...`` up to the
        polyline's length (the distal end itself is included only when the length is a multiple
        of ``step``).
    """
    step = _positive_float(step, "step")
    return _resample_clean(clean_centerline(points), step, num)


def _tangents(points: torch.Tensor) -> torch.Tensor:
    """Unit tangents by central differences (one-sided at the ends) of (M, 3) points, M >= 2."""
    d = torch.empty_like(points)
    d[1:-1] = points[2:] - points[:-2]
    d[0] = points[1] - points[0]
    d[-1] = points[-1] - points[-2]
    return d / d.norm(dim=1, keepdim=True)


def _check_vector(value: Any, name: str) -> torch.Tensor | None:
    """``None`` or a finite float64 3-vector with non-zero length."""
    if value is None:
        return None
    try:
        vec = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value,
                                         dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a 3-vector, got {value!r}.") from e
    if vec.shape != (3,) or not torch.isfinite(vec).all() or float(vec.norm()) == 0.0:
        raise ValueError(f"{name} must be a finite, non-zero 3-vector, got {value!r}.")
    return vec


def _initial_normal(t0: torch.Tensor, initial_normal: Any | None) -> torch.Tensor:
    """First frame normal: ``initial_normal`` (or the least aligned world axis) orthogonal to ``t0``."""
    ref = _check_vector(initial_normal, "initial_normal")
    if ref is None:
        axis = int(np.argmin(np.abs(t0.numpy())))  # least aligned world axis, first on ties
        ref = torch.zeros(3, dtype=t0.dtype)
        ref[axis] = 1.0
    n0 = ref - (ref @ t0) * t0
    norm = n0.norm()
    if norm < 1e-6 * float(ref.norm()):
        raise ValueError(f"initial_normal {initial_normal!r} is parallel to the first tangent {t0.tolist()}.")
    return n0 / norm


def _prefix_products(mats: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix products ``out[i] = mats[i] @ ... @ mats[0]`` by a log-depth scan."""
    out = mats.clone()
    d = 1
    while d < out.shape[0]:
        out[d:] = out[d:] @ out[:-d]
        d *= 2
    return out


def parallel_transport_frames(
    points: Any, initial_normal: Any | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotation-minimizing (parallel-transport) frames along a polyline.

    Uses the double reflection method (Wang, Juttler, Zheng, Liu 2008): the normal at point
    ``i + 1`` is the normal at ``i`` reflected in the bisector plane of the chord and then in the
    plane that maps the reflected tangent onto the next tangent. All step rotations are built at
    once and composed with a log-depth prefix product (no loop over points).

    Args:
        points: (M, 3) points in mm (usually equally spaced, see :func:`resample_centerline`),
            consecutive repeats are dropped; at least two distinct points.
        initial_normal: optional world vector for the first normal (projected orthogonal to the
            first tangent). Default: the world axis least aligned with the first tangent.

    Returns:
        ``(tangents, normals, binormals)``, each (M', 3) float64 with unit rows, ``M'`` the number of
        points after dropping repeats; ``binormal = tangent x normal`` (right-handed frames).
    """
    pts = clean_centerline(points, "points")
    t = _tangents(pts)
    n0 = _initial_normal(t[0], initial_normal)
    eye = torch.eye(3, dtype=pts.dtype)
    v1 = pts[1:] - pts[:-1]
    c1 = (v1 * v1).sum(1)
    h1 = eye - 2.0 * v1.unsqueeze(2) * v1.unsqueeze(1) / c1.view(-1, 1, 1)
    t_l = t[:-1] - (2.0 * (v1 * t[:-1]).sum(1) / c1).unsqueeze(1) * v1
    v2 = t[1:] - t_l
    c2 = (v2 * v2).sum(1)
    safe = c2 > 1e-24
    h2 = eye - 2.0 * v2.unsqueeze(2) * v2.unsqueeze(1) / torch.where(safe, c2, 1.0).view(-1, 1, 1)
    h2 = torch.where(safe.view(-1, 1, 1), h2, eye)
    rot = _prefix_products(h2 @ h1)
    n = torch.cat([n0.unsqueeze(0), (rot @ n0).view(-1, 3)], 0)
    n = n - (n * t).sum(1, keepdim=True) * t  # remove round-off drift, keep exact orthogonality
    n = n / n.norm(dim=1, keepdim=True)
    b = torch.linalg.cross(t, n, dim=1)
    return t, n, b


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


def _positive_float(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a number, got {value!r}.") from e
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return v


def _check_mode(mode: Any) -> str:
    m = str(getattr(mode, "value", mode)).lower()
    if m == "bicubic":
        raise ValueError(
            "mode 'bicubic' is not supported: torch grid_sample has no cubic interpolation for 3D "
            "volumes; use 'bilinear' (trilinear) for images or 'nearest' for label maps."
        )
    if m not in _SUPPORTED_MODES:
        raise ValueError(f"mode must be one of {_SUPPORTED_MODES}, got {mode!r}.")
    return m


def _check_padding(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"padding_value must be a number, got {value!r}.") from e
    if math.isnan(v):
        raise ValueError("padding_value must not be NaN.")
    return v


def _check_geometry(
    output_size: Any, spacing: Any, angle: Any, out_dims: Any
) -> tuple[tuple[int, int], float, float, int]:
    try:
        size = tuple(int(s) for s in output_size)
    except TypeError as e:
        raise TypeError(f"output_size must be a pair (H, W) of positive ints, got {output_size!r}.") from e
    if len(size) != 2 or min(size) < 1 or any(float(s) != float(o) for s, o in zip(size, output_size)):
        raise ValueError(f"output_size must be a pair (H, W) of positive ints, got {output_size!r}.")
    try:
        ang = float(angle)
    except (TypeError, ValueError) as e:
        raise TypeError(f"angle must be a number of degrees, got {angle!r}.") from e
    if not math.isfinite(ang):
        raise ValueError(f"angle must be finite, got {angle!r}.")
    if out_dims not in (2, 3) or isinstance(out_dims, bool):
        raise ValueError(f"out_dims must be 2 (a plane) or 3 (a straightened volume), got {out_dims!r}.")
    return size, _positive_float(spacing, "spacing"), ang, int(out_dims)


def _image_and_affine(img: Any, affine: Any | None, name: str = "img") -> tuple[torch.Tensor, torch.Tensor]:
    """Return the image tensor (C, X, Y, Z) and its float64 (4, 4) voxel -> world affine."""
    if not isinstance(img, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a MetaTensor (or a tensor / ndarray with affine=), got {type(img).__name__}.")
    if affine is None:
        if not isinstance(img, MetaTensor):
            raise TypeError(
                f"{name} is a plain {type(img).__name__} without geometry: pass a MetaTensor whose affine maps "
                "voxel indices to world mm (as LoadImage returns it), or give affine= explicitly."
            )
        affine = img.affine
    aff = torch.as_tensor(np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine,
                                     dtype=np.float64))
    if aff.shape != (4, 4) or not torch.isfinite(aff).all():
        raise ValueError(f"the affine of {name} must be a finite 4 x 4 matrix, got shape {tuple(aff.shape)}.")
    if abs(float(torch.linalg.det(aff[:3, :3]))) < 1e-12:
        raise ValueError(f"the affine of {name} is singular: {aff.tolist()}.")
    data = img if isinstance(img, torch.Tensor) else torch.as_tensor(img)
    if data.ndim != 4:
        raise ValueError(f"{name} must be channel-first 3D (C, X, Y, Z), got shape {tuple(data.shape)}.")
    if min(data.shape[1:]) < 2:
        raise ValueError(f"{name} needs at least 2 voxels along every spatial axis, got shape {tuple(data.shape)}.")
    if data.is_floating_point() or data.is_complex():
        finite = torch.isfinite(data)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            nan = int(torch.isnan(data).sum())
            raise ValueError(
                f"{name} has {bad} non-finite voxel(s) ({nan} NaN, {bad - nan} infinite) of {data.numel()}; "
                "straightening would spread them into the sCPR. Replace them first (e.g. with the padding "
                "value, torch.nan_to_num) or fix the file."
            )
    return data, aff


# --------------------------------------------------------------------------------------------
# sampling core
# --------------------------------------------------------------------------------------------


class SCPRGeometry:
    """The sampling geometry of one straightening (built by :meth:`StraightenCPR.plan`).

    Attributes (float64, CPU): ``grid_world`` (H, Wv, 3) or (H, H, Wv, 3) world mm of the pixels of
    the ``n_valid = Wv`` columns on the vessel; ``curve`` (Wv, 3) the resampled centreline;
    ``tangents``, ``normals``, ``binormals`` (Wv, 3) the frames, normal and binormal already
    rotated by ``angle``; ``length`` the centreline's arc length (mm); ``sample_grid`` the
    ``grid_sample`` coordinates. :meth:`sample` resamples a volume on it.
    """

    def __init__(self, centerline: Any, affine: torch.Tensor, spatial_shape: Sequence[int], size: tuple[int, int],
                 spacing: float, angle: float, out_dims: int, initial_normal: Any | None) -> None:
        pts = clean_centerline(centerline)
        height, width = size
        self.length = float((pts[1:] - pts[:-1]).norm(dim=1).sum())
        # one point beyond the last column (or the distal end) so that the last tangent is central
        frame_pts = _resample_clean(pts, spacing, width + 1)
        n_valid = min(frame_pts.shape[0], width)
        curve = frame_pts[:n_valid]
        if frame_pts.shape[0] == n_valid and (pts[-1] - curve[-1]).norm() > _DUPLICATE_TOL_MM:
            frame_pts = torch.cat([curve, pts[-1:]], 0)
        t, n, b = parallel_transport_frames(frame_pts, initial_normal)
        t, n, b = t[:n_valid], n[:n_valid], b[:n_valid]
        a = math.radians(angle)
        n_a = math.cos(a) * n + math.sin(a) * b
        b_a = -math.sin(a) * n + math.cos(a) * b
        offsets = (torch.arange(height, dtype=torch.float64) - (height - 1) / 2.0) * spacing
        grid = curve.view(1, n_valid, 3) + offsets.view(height, 1, 1) * n_a.view(1, n_valid, 3)
        if out_dims == 3:
            grid = grid.unsqueeze(1) + offsets.view(1, height, 1, 1) * b_a.view(1, 1, n_valid, 3)
        self.grid_world = grid  # (H, Wv, 3) or (H, H, Wv, 3), float64
        self.curve, self.tangents, self.normals, self.binormals = curve, t, n_a, b_a
        self.n_valid, self.size, self.spacing, self.angle, self.out_dims = n_valid, size, spacing, angle, out_dims
        inv = torch.linalg.inv(affine)
        shape = torch.as_tensor(list(spatial_shape), dtype=torch.float64)
        vox_c = curve @ inv[:3, :3].T + inv[:3, 3]
        outside = ((vox_c < -0.5) | (vox_c > shape - 0.5)).any(1)
        frac = float(outside.double().mean())
        if frac > _MAX_OUTSIDE_FRACTION:
            raise ValueError(
                f"{frac:.0%} of the resampled centreline points ({int(outside.sum())} of {n_valid}) fall outside "
                f"the image volume of shape {tuple(int(s) for s in spatial_shape)}; check that the centreline is "
                "in the same world coordinates (mm) as the image affine."
            )
        vox = grid @ inv[:3, :3].T + inv[:3, 3]
        inside_px = int(((vox >= -0.5) & (vox <= shape - 0.5)).all(-1).sum())
        total_px = (grid.numel() // 3) // n_valid * width
        padded = 1.0 - inside_px / total_px
        if padded >= _WARN_PADDING_FRACTION:
            warnings.warn(
                f"{padded:.1%} of the sCPR's {total_px} pixels are padding (outside the volume of shape "
                f"{tuple(int(s) for s in spatial_shape)} or beyond the vessel's end) with spacing {spacing} mm and "
                f"output size {tuple(size)}; check spacing and output_size (mm per pixel, pixels).",
                stacklevel=3,
            )
        norm = 2.0 * vox / (shape - 1.0) - 1.0
        self.sample_grid = norm.flip(-1)  # grid_sample wants (z, y, x) order = (W, H, D) of (D, H, W)

    def sample(self, data: torch.Tensor, mode: str, padding: torch.Tensor) -> torch.Tensor:
        """Sample (C, X, Y, Z) ``data`` (float) at the grid; ``padding`` (C,) fills outside values.

        ``grid_sample`` pads with zeros; the weight that fell outside the volume (computed from the
        grid alone, the trilinear weights factorize per axis) is then given to ``padding``. This is
        constant padding without copying the volume.
        """
        grid = self.sample_grid.to(device=data.device, dtype=data.dtype)
        out = F.grid_sample(data.unsqueeze(0), grid.view(1, -1, *grid.shape[-3:]), mode=mode,
                            padding_mode="zeros", align_corners=True)[0]
        out = out.view(data.shape[0], *grid.shape[:-1])
        size = torch.tensor(data.shape[1:][::-1], dtype=grid.dtype, device=grid.device)  # grid order (z, y, x)
        u = (grid + 1.0) / 2.0 * (size - 1.0)  # voxel coordinates as grid_sample computes them
        if mode == "nearest":
            r = torch.round(u)
            inside = ((r >= 0) & (r <= size - 1)).all(-1).to(grid.dtype)
        else:
            u0 = torch.floor(u)
            f = u - u0
            in0 = ((u0 >= 0) & (u0 <= size - 1)).to(grid.dtype)
            in1 = ((u0 >= -1) & (u0 <= size - 2)).to(grid.dtype)
            inside = (in0 * (1.0 - f) + in1 * f).prod(-1)
        pad = padding.to(device=data.device, dtype=data.dtype).view(-1, *([1] * inside.ndim))
        out = out + (1.0 - inside) * pad
        missing = self.size[1] - self.n_valid
        if missing > 0:
            out = torch.cat([out, pad.expand(*out.shape[:-1], missing)], -1)
        return out

    def meta(self, record_grid: bool) -> dict[str, Any]:
        """The ``scpr_*`` metadata of the output (see :class:`StraightenCPR`); grids padded with NaN to W."""
        width = self.size[1]
        pad_shape = (*self.grid_world.shape[:-2], width - self.n_valid, 3)
        nan = torch.full(pad_shape, float("nan"), dtype=torch.float64)
        out: dict[str, Any] = {
            SCPR_SPACING_KEY: self.spacing,
            SCPR_ANGLE_KEY: self.angle,
            SCPR_LENGTH_KEY: self.length,
            SCPR_VALID_COLUMNS_KEY: self.n_valid,
            SCPR_CENTERLINE_KEY: torch.cat(
                [self.curve, torch.full((width - self.n_valid, 3), float("nan"), dtype=torch.float64)], 0
            ).float(),
        }
        if record_grid:
            out[SCPR_GRID_KEY] = torch.cat([self.grid_world, nan], -2).float()
        return out

    def output_affine(self) -> torch.Tensor:
        """(4, 4) float64 ``diag(spacing, spacing, spacing, 1)``: the straightened image's pixdim."""
        return torch.diag(torch.tensor([self.spacing] * 3 + [1.0], dtype=torch.float64))


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


def _to_float(data: torch.Tensor) -> torch.Tensor:
    """The plain tensor to sample: floating inputs as they are, others as float32."""
    data = data.as_tensor() if isinstance(data, MetaTensor) else data
    return data if data.is_floating_point() else data.to(torch.float32)


# --------------------------------------------------------------------------------------------
# public helpers and transforms
# --------------------------------------------------------------------------------------------


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
    """Straightened curved planar reformation of a channel-first 3D image along a centreline.

    Args:
        output_size: ``(H, W)``: pixels across the vessel and along it.
        spacing: pixel size of the output in mm, both across and along the vessel.
        angle: rotation (degrees) of the sampling plane about the tangent, from the parallel-transport
            normal towards the binormal.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"`` (label maps).
        padding_value: value of output pixels that fall outside the volume or beyond the vessel's end.
        out_dims: 2 for a (C, H, W) plane, 3 for a (C, H, H, W) straightened volume whose second
            spatial axis follows the (rotated) binormal.
        dtype: output dtype (sampling itself runs in floating point; ``torch.uint8`` suits nearest
            label maps); default: the input's if floating point, else float32.
        initial_normal: optional world vector for the first frame normal (see module docstring).
        record_grid: store the world coordinates of every pixel in ``meta["scpr_grid_world"]``.

    Call ``StraightenCPR(...)(img, centerline, affine=None)``:

    * ``img``: (C, X, Y, Z) ``MetaTensor`` whose affine maps voxel indices to world mm, or a
      tensor / ndarray together with ``affine`` (4 x 4).
    * ``centerline``: (N, 3) world mm, ostium first.

    Returns a ``MetaTensor`` (C, H, W) or (C, H, H, W) on the input's device. Column ``j`` samples arc
    length ``j * spacing``; the centreline lies at row ``(H - 1) / 2``; a vessel shorter than
    ``W * spacing`` is padded with ``padding_value`` and a longer one is cut at the distal end. The
    affine is ``diag(spacing, spacing, spacing, 1)``; meta records ``scpr_grid_world`` ((H, W, 3)
    or (H, H, W, 3) float32 mm, NaN in padded columns), ``scpr_centerline`` (W, 3),
    ``scpr_spacing``, ``scpr_angle``, ``scpr_length_mm`` (arc length of the whole centreline) and
    ``scpr_valid_columns``. See :func:`scpr_to_world` to map pixels back.

    Raises ValueError when more than half of the resampled centreline points used lie outside the
    volume (a centreline in the wrong coordinate system); a centreline only slightly outside is
    sampled and the outside pixels get ``padding_value``. Raises ValueError (giving their number)
    when the image has NaN or infinite voxels: there is no NaN policy, replace them before. Warns
    when at least 99 % of the output pixels would be padding (e.g. a spacing in the wrong unit).
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
        geometry = _check_geometry(output_size, spacing, angle, out_dims)
        self.output_size, self.spacing, self.angle, self.out_dims = geometry
        self.mode = _check_mode(mode)
        self.padding_value = _check_padding(padding_value)
        self.dtype = dtype
        self.initial_normal = _check_vector(initial_normal, "initial_normal")
        self.record_grid = bool(record_grid)

    def plan(self, centerline: Any, affine: torch.Tensor, spatial_shape: Sequence[int]) -> SCPRGeometry:
        """Build the sampling geometry (world grid, frames, metadata) without sampling."""
        return SCPRGeometry(centerline, affine, spatial_shape, self.output_size, self.spacing, self.angle,
                     self.out_dims, self.initial_normal)

    def __call__(self, img: Any, centerline: Any, affine: Any | None = None) -> torch.Tensor:
        data, aff = _image_and_affine(img, affine)
        plan = self.plan(centerline, aff, data.shape[1:])
        x = _to_float(data)
        out = plan.sample(x, self.mode, torch.full((x.shape[0],), self.padding_value))
        if self.dtype is not None:
            out = out.to(self.dtype)
        return _wrap(out, img if isinstance(img, MetaTensor) else data, plan, self.record_grid)


def _load_centerline_value(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        try:
            from monai_cft.data.io import load_centerline
        except ImportError as e:
            raise ImportError(
                f"the centreline {str(value)!r} is a path, which needs monai_cft.data.io.load_centerline "
                f"(not importable: {e}); pass the (N, 3) points instead."
            ) from e
        return load_centerline(value)
    return value


class StraightenCPRd(MapTransform):
    """Dictionary version of :class:`StraightenCPR`: straighten several keys along one centreline.

    Args:
        keys: keys of the images to straighten (for example ``("image", "label")``); they must share
            spatial shape and affine.
        centerline_key: key of the centreline: an (N, 3) array / tensor in world mm or a path to a
            ``.csv`` / ``.npy`` file (read with ``monai_cft.data.io.load_centerline``).
        output_size, spacing, angle, out_dims, initial_normal, record_grid: as in :class:`StraightenCPR`.
        mode: one interpolation mode or one per key (``("bilinear", "nearest")``).
        padding_value: one value or one per key (``(-1024.0, 0)``).
        dtype: one output dtype or one per key (``None``: input's if floating point, else float32).
        allow_missing_keys: skip keys that are absent.

    Keys with the same mode are sampled together in one ``grid_sample`` call. Every output gets the
    same sCPR metadata (see :class:`StraightenCPR`).
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
        self.modes = tuple(_check_mode(m) for m in ensure_tuple_rep(mode, len(self.keys)))
        self.padding_values = tuple(_check_padding(p) for p in ensure_tuple_rep(padding_value, len(self.keys)))
        self.dtypes = ensure_tuple_rep(dtype, len(self.keys))
        self.cpr = StraightenCPR(output_size, spacing, angle, self.modes[0], self.padding_values[0], out_dims,
                                 None, initial_normal, record_grid)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.centerline_key not in d:
            raise KeyError(f"centreline key {self.centerline_key!r} not found; available keys: {list(d)}.")
        items = [(k, m, p, t) for k, m, p, t in self.key_iterator(d, self.modes, self.padding_values, self.dtypes)]
        if not items:
            return d
        tensors, affine, ref_key = {}, None, None
        for key, *_ in items:
            data_k, aff_k = _image_and_affine(d[key], None, name=repr(key))
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
        plan = self.cpr.plan(_load_centerline_value(d[self.centerline_key]), affine, shape)
        for mode in dict.fromkeys(m for _, m, _, _ in items):  # group keys by mode, first-seen order
            group = [(k, p, t) for k, m, p, t in items if m == mode]
            xs = [_to_float(tensors[k]) for k, _, _ in group]
            dtype = xs[0].dtype
            for x in xs[1:]:
                dtype = torch.promote_types(dtype, x.dtype)
            stacked = xs[0] if len(xs) == 1 else torch.cat([x.to(dtype) for x in xs], 0)
            pads = torch.cat([torch.full((x.shape[0],), p) for x, (_, p, _) in zip(xs, group)])
            out = plan.sample(stacked, mode, pads)
            start = 0
            for x, (key, _, out_dtype) in zip(xs, group):
                part = out[start : start + x.shape[0]].to(x.dtype if out_dtype is None else out_dtype)
                start += x.shape[0]
                d[key] = _wrap(part, d[key], plan, self.cpr.record_grid)
        return d
