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


def clean_points(points: Any, name: str = "centerline") -> np.ndarray:
    """:func:`clean_centerline` as a float64 NumPy array (the planning works on NumPy: small arrays)."""
    try:
        pts = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{name} must be an (N, 3) array of world coordinates in mm, got {type(points).__name__}."
        ) from e
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3), got {tuple(pts.shape)}.")
    finite = np.isfinite(pts).all(1)
    if not finite.all():
        raise ValueError(f"{name} has NaN or infinite coordinates at point(s) {np.flatnonzero(~finite)[:10].tolist()}.")
    if pts.shape[0] == 0:
        raise ValueError(f"{name} is empty; at least two distinct points are needed.")
    d = pts[1:] - pts[:-1]
    pts = pts[np.concatenate([[True], np.einsum("ij,ij->i", d, d) > DUPLICATE_TOL_MM**2])]
    if pts.shape[0] < 2:
        raise ValueError(f"{name} needs at least two distinct points, got {pts.shape[0]} after dropping repeats.")
    return pts


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
    return torch.from_numpy(clean_points(points, name))


def centerline_length(points: Any) -> float:
    """Arc length (mm) of the polyline through ``points`` ((N, 3), world mm)."""
    pts = clean_points(points)
    return float(np.linalg.norm(pts[1:] - pts[:-1], axis=1).sum())


def resample_points(pts: np.ndarray, step: float, num: int | None = None) -> np.ndarray:
    """Piecewise-linear points of a cleaned (M, 3) polyline at arc lengths ``k * step`` (k < num, inside it)."""
    d = pts[1:] - pts[:-1]
    seg = np.sqrt(np.einsum("ij,ij->i", d, d))
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    length = float(cum[-1])
    count = int(math.floor(length / step + 1e-9)) + 1
    if num is not None:
        count = min(count, int(num))
    s = np.minimum(np.arange(count, dtype=np.float64) * step, length)
    idx = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, seg.size - 1)
    frac = ((s - cum[idx]) / seg[idx])[:, None]
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
    return torch.from_numpy(resample_points(clean_points(points), step, num))


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of two (..., 3) arrays, (..., 1)."""
    return np.einsum("...j,...j->...", a, b)[..., None]


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cross products of two (..., 3) arrays (faster than ``np.cross`` for small arrays)."""
    return np.stack([a[..., 1] * b[..., 2] - a[..., 2] * b[..., 1], a[..., 2] * b[..., 0] - a[..., 0] * b[..., 2],
                     a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]], -1)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.sqrt(_dot(a, a))


def _tangents(points: np.ndarray) -> np.ndarray:
    """Unit tangents by central differences (one-sided at the ends) of (..., M, 3) points, M >= 2."""
    d = np.empty_like(points)
    d[..., 1:-1, :] = points[..., 2:, :] - points[..., :-2, :]
    d[..., 0, :] = points[..., 1, :] - points[..., 0, :]
    d[..., -1, :] = points[..., -1, :] - points[..., -2, :]
    return _unit(d)


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


def _least_aligned_axes(t: np.ndarray) -> np.ndarray:
    """(..., 3) unit vectors orthogonal to the rows of ``t``: each row's least aligned world axis (first on
    ties), projected."""
    axes = np.zeros_like(t)
    np.put_along_axis(axes, np.argmin(np.abs(t), axis=-1)[..., None], 1.0, axis=-1)
    return _unit(axes - _dot(axes, t) * t)


def _initial_normal(t0: np.ndarray, initial_normal: Any | None) -> np.ndarray:
    """First frame normals (..., 3): ``initial_normal`` (or the least aligned world axis) orthogonal to ``t0``."""
    checked = check_vector(initial_normal, "initial_normal")
    ref = np.eye(3)[np.argmin(np.abs(t0), axis=-1)] if checked is None else np.broadcast_to(checked.numpy(), t0.shape)
    n0 = ref - _dot(ref, t0) * t0
    norm = np.sqrt(_dot(n0, n0))
    if (norm < 1e-6 * np.sqrt(_dot(ref, ref))).any():
        raise ValueError(f"initial_normal {initial_normal!r} is parallel to the first tangent {t0.tolist()}.")
    return n0 / norm


def frames(pts: np.ndarray, initial_normal: Any | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`parallel_transport_frames` of cleaned float64 NumPy polylines: (M, 3), or (K, M, 3) for K
    polylines of M points each (one vectorized pass), giving NumPy arrays of the same shape.

    The double reflection of step ``i`` maps the plane normal to ``t_i`` onto the plane normal to
    ``t_(i+1)``. In a reference basis ``(e1_i, e2_i)`` of every such plane (any basis; here the least
    aligned world axis, projected) that map is a rotation by ``delta_i`` (or, when the second reflection
    degenerates and only the first is applied, a reflection: ``s_i = -1``), so the normal's angle obeys
    ``phi_(i+1) = s_i phi_i + delta_i``: a prefix sum, computed for all points at once.
    """
    t = _tangents(pts)
    n0 = _initial_normal(t[..., 0, :], initial_normal)
    e1 = _least_aligned_axes(t)
    e2 = _cross(t, e1)
    v1 = pts[..., 1:, :] - pts[..., :-1, :]
    c1 = _dot(v1, v1)
    t_l = t[..., :-1, :] - (2.0 * _dot(v1, t[..., :-1, :]) / c1) * v1
    v2 = t[..., 1:, :] - t_l
    c2 = _dot(v2, v2)
    safe = c2 > 1e-24
    c2 = np.where(safe, c2, 1.0)
    p = e1[..., :-1, :] - (2.0 * _dot(v1, e1[..., :-1, :]) / c1) * v1  # e1_i through the reflections of step i
    p = np.where(safe, p - (2.0 * _dot(v2, p) / c2) * v2, p)
    delta = np.arctan2(_dot(p, e2[..., 1:, :])[..., 0], _dot(p, e1[..., 1:, :])[..., 0])
    ones = np.ones((*delta.shape[:-1], 1))
    sigma = np.concatenate([ones, np.cumprod(np.where(safe[..., 0], 1.0, -1.0), -1)], -1)  # orientation 0 -> i
    phi0 = np.arctan2(_dot(n0, e2[..., 0, :]), _dot(n0, e1[..., 0, :]))  # (..., 1)
    phi = sigma * (phi0 + np.concatenate([0.0 * ones, np.cumsum(sigma[..., 1:] * delta, -1)], -1))
    cos, sin = np.cos(phi)[..., None], np.sin(phi)[..., None]
    # (e1, e2) is orthonormal and normal to t, so n is too; b = t x n = cos e2 - sin e1
    return t, cos * e1 + sin * e2, cos * e2 - sin * e1


def parallel_transport_frames(
    points: Any, initial_normal: Any | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotation-minimizing (parallel-transport) frames along a polyline.

    Uses the double reflection method (Wang, Juttler, Zheng, Liu 2008): the normal at point
    ``i + 1`` is the normal at ``i`` reflected in the bisector plane of the chord and then in the
    plane that maps the reflected tangent onto the next tangent. The steps are composed for all points
    at once, as a prefix sum of angles in per-point reference bases (no loop over points, see :func:`frames`).

    Args:
        points: (M, 3) points in mm (usually equally spaced, see :func:`resample_centerline`),
            consecutive repeats are dropped; at least two distinct points.
        initial_normal: optional world vector for the first normal (projected orthogonal to the
            first tangent). Default: the world axis least aligned with the first tangent.

    Returns:
        ``(tangents, normals, binormals)``, each (M', 3) float64 with unit rows, ``M'`` the number of
        points after dropping repeats; ``binormal = tangent x normal`` (right-handed frames).
    """
    t, n, b = frames(clean_points(points, "points"), initial_normal)
    return torch.from_numpy(t), torch.from_numpy(n), torch.from_numpy(b)


def positive_float(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a number, got {value!r}.") from e
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return v
