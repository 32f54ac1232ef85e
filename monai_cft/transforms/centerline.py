"""Centreline geometry of the sCPR: cleaning, equal arc-length resampling, parallel-transport frames.

Conventions (see also :mod:`monai_cft.transforms.cpr` and ``docs/transforms.md``): points are world
millimetres, ostium first; the polyline is resampled piecewise linearly at equal arc-length steps;
tangents are central differences (one-sided at the ends); frames are rotation-minimizing (double
reflection, Wang et al., ACM TOG 27(1), 2008), the first normal being the world axis least aligned
with the first tangent unless one is given. Everything here is vectorized over the points.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "clean_centerline",
    "centerline_length",
    "resample_centerline",
    "parallel_transport_frames",
]

DUPLICATE_TOL_MM = 1e-6


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
    keep = torch.cat([torch.ones(1, dtype=torch.bool), step > DUPLICATE_TOL_MM])
    pts = pts[keep]
    if pts.shape[0] < 2:
        raise ValueError(f"{name} needs at least two distinct points, got {pts.shape[0]} after dropping repeats.")
    return pts


def centerline_length(points: Any) -> float:
    """Arc length (mm) of the polyline through ``points`` ((N, 3), world mm)."""
    pts = clean_centerline(points)
    return float((pts[1:] - pts[:-1]).norm(dim=1).sum())


def resample_clean(pts: torch.Tensor, step: float, num: int | None = None) -> torch.Tensor:
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
    step = positive_float(step, "step")
    return resample_clean(clean_centerline(points), step, num)


def _tangents(points: torch.Tensor) -> torch.Tensor:
    """Unit tangents by central differences (one-sided at the ends) of (M, 3) points, M >= 2."""
    d = torch.empty_like(points)
    d[1:-1] = points[2:] - points[:-2]
    d[0] = points[1] - points[0]
    d[-1] = points[-1] - points[-2]
    return d / d.norm(dim=1, keepdim=True)


def check_vector(value: Any, name: str) -> torch.Tensor | None:
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
    ref = check_vector(initial_normal, "initial_normal")
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


def positive_float(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a number, got {value!r}.") from e
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return v
