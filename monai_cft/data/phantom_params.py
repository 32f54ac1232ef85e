"""Parameters of the synthetic LAD phantoms and the vessel geometry they define.

:class:`PhantomConfig` holds the distributions, :func:`sample_phantom_params` draws a JSON-serialisable
parameter dictionary that fully determines a case, :func:`validate_phantom_params` checks one, and
:func:`phantom_centerline`, :func:`lumen_diameter_mm` and :func:`calibre_factor` evaluate the vessel
it describes. :mod:`monai_cft.data.phantom` renders the volume (model: its module docstring).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.interpolate import PchipInterpolator

from monai_cft.variables import DEFAULT_REGIONS, DEFAULT_STRUCTURES

__all__ = ["PHANTOM_VERSION", "LABELS", "PhantomConfig", "PhantomCase", "sample_phantom_params",
           "validate_phantom_params", "phantom_centerline", "lumen_diameter_mm", "calibre_factor"]

#: version of the parameter format; :func:`render_phantom` refuses other versions.
PHANTOM_VERSION = 2
#: label values of the ground-truth maps (background 0).
LABELS: dict[str, int] = dict(DEFAULT_STRUCTURES)
#: step of the dense centreline used for rendering (mm).
_DENSE_STEP_MM = 0.2
#: step of the centreline written to disk (mm).
_SAVE_STEP_MM = 0.5
#: smallest remaining lumen radius as a fraction of the nominal radius (limits stenosis to 75 %).
_MIN_LUMEN_FRACTION = 0.25
#: length (mm) of the transition of a per-third lumen calibre change, and its distance from the third's ends.
_CALIBRE_TAPER_MM = 3.0
_CALIBRE_MARGIN_MM = 1.0


@dataclass(frozen=True)
class PhantomConfig:
    """Distributions from which :func:`sample_phantom_params` draws a case.

    Ranges are ``(low, high)`` of uniform distributions; ``(mean, sd, low, high)`` tuples are
    normal distributions clipped to ``[low, high]``. Lengths in mm, angles in degrees, HU for
    attenuation; plaque thicknesses (``*_thickness``) are fractions of the nominal lumen radius at
    the plaque's centre (plaque burden scales with the vessel). Defaults follow the coronary
    numbers of the project reference (section 2): LAD lumen diameter proximal 3.7 +- 0.4, mid
    ~2.4, distal 1.9 +- 0.4 mm (Dodge et al. 1992); lumen ~326 HU (IQR 284-367), non-calcified
    plaque ~48 HU (28-69), calcified plaque ~770 HU (622-919), epicardial fat ~-80 HU, myocardium
    80-105 HU. See ``docs/data.md`` for every field.
    """

    length_mm: tuple[float, float] = (100.0, 130.0)
    scpr_length_mm: float = 96.0
    spacing_xy_mm: tuple[float, float] = (0.35, 0.45)
    spacing_z_mm: tuple[float, float] = (0.35, 0.45)
    margin_mm: float = 8.0
    heart_axes_mm: tuple[tuple[float, float], ...] = ((40.0, 48.0), (34.0, 42.0), (52.0, 64.0))
    heart_tilt_deg: float = 10.0
    start_angle_deg: tuple[float, float] = (22.0, 38.0)
    lateral_slant_mm: tuple[float, float] = (-12.0, 12.0)
    meander_wavelength_mm: tuple[float, float] = (25.0, 70.0)
    meander_amplitude_mm: tuple[float, float] = (0.5, 5.0)
    meander_count: int = 3
    max_meander_curvature: float = 0.04
    max_curvature: float = 0.12
    height_gap_mm: tuple[float, float] = (1.5, 3.0)
    height_wave_mm: tuple[float, float] = (0.0, 0.8)
    height_wavelength_mm: tuple[float, float] = (30.0, 80.0)
    diameter_mm: tuple[tuple[float, float, float, float], ...] = (
        (3.7, 0.4, 2.9, 4.6),
        (2.4, 0.35, 1.7, 3.2),
        (1.9, 0.4, 1.1, 2.7),
    )
    wall_thickness_mm: tuple[float, float] = (0.2, 0.4)
    wall_hu: tuple[float, float] = (10.0, 40.0)
    lumen_hu: tuple[float, float, float, float] = (420.0, 40.0, 340.0, 520.0)
    distal_contrast_drop: tuple[float, float] = (0.05, 0.30)
    fat_hu: tuple[float, float] = (-100.0, -60.0)
    fat_cover_mm: tuple[float, float] = (3.0, 8.0)
    myocardium_hu: tuple[float, float] = (80.0, 105.0)
    myocardium_thickness_mm: tuple[float, float] = (8.0, 12.0)
    lung_hu: tuple[float, float] = (-870.0, -700.0)
    p_none: float = 0.35
    noncalcified_length_mm: tuple[float, float] = (8.0, 28.0)
    noncalcified_thickness: tuple[float, float] = (0.9, 1.8)
    noncalcified_half_width_deg: tuple[float, float] = (90.0, 180.0)
    noncalcified_hu: tuple[float, float, float, float] = (28.0, 10.0, 8.0, 52.0)
    calcified_length_mm: tuple[float, float] = (3.0, 16.0)
    calcified_thickness: tuple[float, float] = (0.8, 1.5)
    calcified_half_width_deg: tuple[float, float] = (45.0, 150.0)
    calcified_hu: tuple[float, float] = (950.0, 1450.0)
    remodelling: tuple[float, float] = (0.3, 0.7)
    blur_sigma_mm: tuple[float, float] = (0.30, 0.40)
    bloom_sigma_mm: tuple[float, float] = (0.7, 1.0)
    bloom_fraction: tuple[float, float] = (0.25, 0.40)
    noise_sd_hu: tuple[float, float] = (20.0, 40.0)
    world_center_mm: tuple[tuple[float, float], ...] = ((-40.0, 10.0), (-30.0, 30.0), (-180.0, -100.0))
    plaque_types: tuple[str, ...] = field(default=("calcified", "noncalcified"))

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_none <= 1.0:
            raise ValueError(f"p_none must be a probability in [0, 1], got {self.p_none}.")
        if self.length_mm[0] < self.scpr_length_mm:
            raise ValueError(
                f"the shortest vessel ({self.length_mm[0]} mm) must cover scpr_length_mm ({self.scpr_length_mm} mm)."
            )
        bad = [t for t in self.plaque_types if t not in ("calcified", "noncalcified")]
        if bad:
            raise ValueError(f"unknown plaque types {bad}; expected 'calcified' and/or 'noncalcified'.")


@dataclass
class PhantomCase:
    """One rendered phantom.

    Attributes:
        image: (X, Y, Z) int16 CT values in HU, voxel order of ``affine``.
        label: (X, Y, Z) uint8 labels (0 background, 1 lumen, 2 calcified, 3 non-calcified).
        affine: (4, 4) float64 voxel index -> world mm (RAS).
        centerline: (N, 3) float64 world mm (RAS), ostium first, 0.5 mm arc-length steps
            (the last point is the distal end).
        params: the parameters it was rendered from (a deep copy).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    centerline: np.ndarray
    params: dict[str, Any]


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------


def _u(rng: np.random.Generator, lo_hi: Sequence[float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _clipped_normal(rng: np.random.Generator, spec: Sequence[float]) -> float:
    mean, sd, lo, hi = spec
    return float(np.clip(rng.normal(mean, sd), lo, hi))


def _as_seed_sequence(seed: int | Sequence[int]) -> list[int]:
    seq = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    if not seq or any(s < 0 for s in seq):
        raise ValueError(f"seed must be a non-negative int or a non-empty list of them, got {seed!r}.")
    return seq


def sample_phantom_params(seed: int | Sequence[int], config: PhantomConfig | None = None) -> dict[str, Any]:
    """Draw the parameters of one phantom.

    Args:
        seed: non-negative int or list of ints (e.g. ``[dataset_seed, case_index]``) seeding a
            ``numpy.random.Generator``; the same seed and config always give the same parameters.
        config: the distributions; default :class:`PhantomConfig`.

    Returns:
        A JSON-serialisable dict (plain floats / ints / lists) accepted by :func:`render_phantom`.
    """
    cfg = config or PhantomConfig()
    seed_list = _as_seed_sequence(seed)
    rng = np.random.default_rng(seed_list)

    axes = [_u(rng, r) for r in cfg.heart_axes_mm]
    tilt = [float(rng.uniform(-cfg.heart_tilt_deg, cfg.heart_tilt_deg)) for _ in range(3)]
    center = [_u(rng, r) for r in cfg.world_center_mm]
    spacing_xy = _u(rng, cfg.spacing_xy_mm)
    spacing = [spacing_xy, spacing_xy, _u(rng, cfg.spacing_z_mm)]

    diameters = [_clipped_normal(rng, spec) for spec in cfg.diameter_mm]
    # the artery tapers: each segment at most as wide as the one before (minus a little)
    diameters[1] = min(diameters[1], diameters[0] - 0.3)
    diameters[2] = min(diameters[2], diameters[1] - 0.1)
    wall = _u(rng, cfg.wall_thickness_mm)

    meanders = []
    for _ in range(cfg.meander_count):
        wavelength = _u(rng, cfg.meander_wavelength_mm)
        cap = cfg.max_meander_curvature * (wavelength / (2.0 * math.pi)) ** 2  # A k^2 <= kappa
        amp = min(_u(rng, cfg.meander_amplitude_mm), cap)
        meanders.append([amp, wavelength, float(rng.uniform(0.0, 2.0 * math.pi))])
    height_waves = [
        [_u(rng, cfg.height_wave_mm), _u(rng, cfg.height_wavelength_mm), float(rng.uniform(0.0, 2.0 * math.pi))]
    ]
    height = 0.5 * diameters[0] + wall + _u(rng, cfg.height_gap_mm)

    geometry = {
        "heart_axes_mm": axes,
        "heart_tilt_deg": tilt,
        "world_center_mm": center,
        "start_angle_deg": _u(rng, cfg.start_angle_deg),
        "length_mm": _u(rng, cfg.length_mm),
        "lateral_slant_mm": _u(rng, cfg.lateral_slant_mm),
        "meanders": meanders,
        "height_mm": height,
        "height_waves": height_waves,
    }
    # keep the curve's curvature bounded (no kinks, a well-defined distance band)
    for _ in range(20):
        kappa = float(_curvature(phantom_centerline({"geometry": geometry}, step=_DENSE_STEP_MM)[0]).max())
        if kappa <= cfg.max_curvature:
            break
        for m in geometry["meanders"]:
            m[0] *= 0.8

    lumen_hu = _clipped_normal(rng, cfg.lumen_hu)
    tissue = {
        "lumen_hu_ostium": lumen_hu,
        "lumen_hu_distal": lumen_hu * (1.0 - _u(rng, cfg.distal_contrast_drop)),
        "wall_hu": _u(rng, cfg.wall_hu),
        "fat_hu": _u(rng, cfg.fat_hu),
        "fat_thickness_mm": height + 0.5 * diameters[0] + wall + _u(rng, cfg.fat_cover_mm),
        "myocardium_hu": _u(rng, cfg.myocardium_hu),
        "myocardium_thickness_mm": _u(rng, cfg.myocardium_thickness_mm),
        "blood_hu": lumen_hu,
        "lung_hu": _u(rng, cfg.lung_hu),
    }

    third = cfg.scpr_length_mm / len(DEFAULT_REGIONS)
    lumen = {"diameter_mm": diameters, "knots_mm": [(k + 0.5) * third for k in range(3)], "wall_thickness_mm": wall}
    partial = {"lumen": lumen, "geometry": geometry}
    plaques = []
    for r, region in enumerate(DEFAULT_REGIONS):
        for kind in cfg.plaque_types:
            if rng.uniform() < cfg.p_none:
                continue
            length = _u(rng, getattr(cfg, f"{kind}_length_mm"))
            length = min(length, 0.9 * third)
            lo = r * third + 0.5 * length
            hi = (r + 1) * third - 0.5 * length
            center = _u(rng, (lo, hi))
            local_radius = 0.5 * float(lumen_diameter_mm(partial, center))
            plaque = {
                "type": kind,
                "region": region,
                "center_mm": center,
                "length_mm": length,
                "angle_deg": float(rng.uniform(-180.0, 180.0)),
                "half_width_deg": _u(rng, getattr(cfg, f"{kind}_half_width_deg")),
                "thickness_mm": _u(rng, getattr(cfg, f"{kind}_thickness")) * local_radius,
                "remodelling": _u(rng, cfg.remodelling),
                "hu": _u(rng, cfg.calcified_hu) if kind == "calcified" else _clipped_normal(rng, cfg.noncalcified_hu),
            }
            plaques.append(plaque)

    imaging = {
        "spacing_mm": spacing,
        "margin_mm": float(cfg.margin_mm),
        "blur_sigma_mm": _u(rng, cfg.blur_sigma_mm),
        "noise_sd_hu": _u(rng, cfg.noise_sd_hu),
        "noise_seed": int(rng.integers(0, 2**63 - 1)),
        "bloom_sigma_mm": _u(rng, cfg.bloom_sigma_mm),
        "bloom_fraction": _u(rng, cfg.bloom_fraction),
    }
    params = {
        "version": PHANTOM_VERSION,
        "seed": seed_list,
        "scpr_length_mm": float(cfg.scpr_length_mm),
        "geometry": geometry,
        "lumen": lumen,
        "plaques": plaques,
        "tissue": tissue,
        "imaging": imaging,
    }
    validate_phantom_params(params)
    return params


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def _rotation(tilt_deg: Sequence[float]) -> np.ndarray:
    """Heart frame -> world rotation: extrinsic rotations about x, y, z (degrees)."""
    ax, ay, az = (math.radians(float(t)) for t in tilt_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _waves(s: np.ndarray, waves: Sequence[Sequence[float]]) -> np.ndarray:
    out = np.zeros_like(s)
    for amp, wavelength, phase in waves:
        out += amp * np.sin(2.0 * math.pi * s / wavelength + phase)
    return out


def _heart_curve(geometry: Mapping[str, Any], phi: np.ndarray, s_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centreline points and outward surface normals in the heart frame at running angles ``phi``.

    The surface point is ``(a cos T, b sin T sin phi, c sin T cos phi)`` (``phi = 0`` at the base,
    ``pi / 2`` anterior, ``pi`` at the apex); the lateral angle ``T`` stays near ``pi / 2``; the
    meanders and height waves are functions of ``s_ref``, the arc length of the plain ``T = pi / 2``
    ellipse from the start angle.
    """
    a, b, c = geometry["heart_axes_mm"]
    lateral = geometry["lateral_slant_mm"] * s_ref / 100.0 + _waves(s_ref, geometry["meanders"])
    theta = 0.5 * math.pi + lateral / a
    height = geometry["height_mm"] + _waves(s_ref, geometry["height_waves"])
    st, ct = np.sin(theta), np.cos(theta)
    surf = np.stack([a * ct, b * st * np.sin(phi), c * st * np.cos(phi)], axis=1)
    normal = surf / np.array([a * a, b * b, c * c])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    return surf + height[:, None] * normal, normal


def phantom_centerline(params: Mapping[str, Any], step: float = _SAVE_STEP_MM) -> tuple[np.ndarray, np.ndarray]:
    """World-space centreline of a phantom, resampled at equal arc-length steps.

    Args:
        params: phantom parameters (only ``params["geometry"]`` is used).
        step: arc-length step (mm); the distal end point is always included.

    Returns:
        ``(points, normals)``: (N, 3) world mm (RAS), ostium first, and the (N, 3) unit outward
        normals of the heart surface at those points (world frame).
    """
    geometry = params["geometry"]
    length = float(geometry["length_mm"])
    phi0 = math.radians(geometry["start_angle_deg"])
    # dense table of the running angle (the curve is far shorter than 1.4 turns of the ellipse)
    a, b, c = geometry["heart_axes_mm"]
    phi = phi0 + np.linspace(0.0, math.radians(340.0) - phi0, 20001)
    ref = np.stack([b * np.sin(phi), c * np.cos(phi)], axis=1)
    s_ref = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(ref, axis=0), axis=1))])
    pts, _ = _heart_curve(geometry, phi, s_ref)
    cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    if cum[-1] < length:
        raise ValueError(f"heart too small for a {length:.1f} mm centreline (at most {cum[-1]:.1f} mm fit).")
    s = np.arange(0.0, length, step)
    s = np.append(s, length) if length - s[-1] > 1e-9 else s
    phi_s = np.interp(s, cum, phi)
    pts, normals = _heart_curve(geometry, phi_s, np.interp(phi_s, phi, s_ref))
    rot = _rotation(geometry["heart_tilt_deg"])
    world = pts @ rot.T + np.asarray(geometry["world_center_mm"], dtype=np.float64)
    return world, normals @ rot.T


def _curvature(points: np.ndarray) -> np.ndarray:
    """Discrete curvature (1/mm) of a polyline with equal steps, except possibly the last one.

    The last point (whose step may be shorter) and the one-sided end estimates are left out.
    """
    points = points[:-1]
    d1 = np.gradient(points, axis=0)
    d2 = np.gradient(d1, axis=0)
    cross = np.linalg.norm(np.cross(d1, d2), axis=1)
    return (cross / np.maximum(np.linalg.norm(d1, axis=1) ** 3, 1e-12))[1:-1]


def lumen_diameter_mm(params: Mapping[str, Any], s: np.ndarray | float) -> np.ndarray:
    """Nominal (plaque-free) lumen diameter (mm) at arc lengths ``s`` (mm from the ostium).

    A monotone PCHIP through the proximal / mid / distal diameters at the centres of the thirds,
    constant before the first knot and continued with the mid -> distal slope (halved, floored at
    70 % of the distal value) beyond the last.
    """
    lumen = params["lumen"]
    knots = list(lumen["knots_mm"])
    diam = list(lumen["diameter_mm"])
    length = float(params["geometry"]["length_mm"])
    slope = (diam[2] - diam[1]) / (knots[2] - knots[1])
    end = max(length, knots[2] + 1.0)
    tail = max(diam[2] + 0.5 * slope * (end - knots[2]), 0.7 * diam[2])
    interp = PchipInterpolator([0.0, *knots, end], [diam[0], *diam, tail], extrapolate=True)
    s = np.clip(np.asarray(s, dtype=np.float64), 0.0, end)
    out = interp(s)
    scale = lumen.get("calibre_scale")
    if scale is not None:
        out = out * calibre_factor(scale, float(params["scpr_length_mm"]), s)
    return out


def calibre_factor(scale: Sequence[float], scpr_length_mm: float, s: np.ndarray) -> np.ndarray:
    """Lumen calibre multiplier at arc lengths ``s`` for per-third factors ``scale`` (one per region).

    Third ``k`` covers ``[k L, (k + 1) L]`` with ``L = scpr_length_mm / len(scale)``; its factor applies
    fully inside it, with raised-cosine transitions of :data:`_CALIBRE_TAPER_MM` that end
    :data:`_CALIBRE_MARGIN_MM` inside the third, so the lumen of the other thirds is unchanged.
    """
    s = np.asarray(s, dtype=np.float64)
    third = scpr_length_mm / len(scale)
    out = np.ones_like(s)
    for k, f in enumerate(scale):
        lo, hi = k * third + _CALIBRE_MARGIN_MM, (k + 1) * third - _CALIBRE_MARGIN_MM
        ramp = np.clip(np.minimum(s - lo, hi - s) / _CALIBRE_TAPER_MM, 0.0, 1.0)
        out += (float(f) - 1.0) * np.sin(0.5 * np.pi * ramp) ** 2
    return out


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

_REQUIRED = {
    "geometry": ("heart_axes_mm", "heart_tilt_deg", "world_center_mm", "start_angle_deg", "length_mm",
                 "lateral_slant_mm", "meanders", "height_mm", "height_waves"),
    "lumen": ("diameter_mm", "knots_mm", "wall_thickness_mm"),
    "tissue": ("lumen_hu_ostium", "lumen_hu_distal", "wall_hu", "fat_hu", "fat_thickness_mm", "myocardium_hu",
               "myocardium_thickness_mm", "blood_hu", "lung_hu"),
    "imaging": ("spacing_mm", "margin_mm", "blur_sigma_mm", "noise_sd_hu", "noise_seed", "bloom_sigma_mm",
                "bloom_fraction"),
}
_PLAQUE_KEYS = ("type", "region", "center_mm", "length_mm", "angle_deg", "half_width_deg", "thickness_mm",
                "remodelling", "hu")


def validate_phantom_params(params: Mapping[str, Any]) -> None:
    """Check that ``params`` has every field :func:`render_phantom` needs, with sane values.

    Raises:
        ValueError: naming the missing field or the bad value.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"phantom params must be a dict, got {type(params).__name__}.")
    if params.get("version") != PHANTOM_VERSION:
        raise ValueError(
            f"phantom params version {params.get('version')!r} is not supported (expected {PHANTOM_VERSION})."
        )
    for group, keys in _REQUIRED.items():
        if not isinstance(params.get(group), Mapping):
            raise ValueError(f"phantom params lack the group {group!r}.")
        missing = [k for k in keys if k not in params[group]]
        if missing:
            raise ValueError(f"phantom params group {group!r} lacks {missing}.")
    spacing = params["imaging"]["spacing_mm"]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"imaging.spacing_mm must be 3 positive numbers, got {spacing}.")
    scale = params["lumen"].get("calibre_scale")
    if scale is not None and (len(scale) != len(DEFAULT_REGIONS) or not all(0 < float(f) < 10 for f in scale)):
        raise ValueError(f"lumen.calibre_scale must be {len(DEFAULT_REGIONS)} factors in (0, 10), got {scale}.")
    if len(params["lumen"]["diameter_mm"]) != 3 or min(params["lumen"]["diameter_mm"]) <= 0:
        raise ValueError(f"lumen.diameter_mm must be 3 positive diameters, got {params['lumen']['diameter_mm']}.")
    if params["imaging"]["blur_sigma_mm"] < 0 or params["imaging"]["noise_sd_hu"] < 0:
        raise ValueError("imaging.blur_sigma_mm and imaging.noise_sd_hu must be >= 0.")
    if params["imaging"]["bloom_sigma_mm"] < 0 or not 0.0 <= params["imaging"]["bloom_fraction"] <= 1.0:
        raise ValueError(
            f"imaging.bloom_sigma_mm must be >= 0 and imaging.bloom_fraction in [0, 1], got "
            f"{params['imaging']['bloom_sigma_mm']} and {params['imaging']['bloom_fraction']}."
        )
    for i, p in enumerate(params.get("plaques", [])):
        missing = [k for k in _PLAQUE_KEYS if k not in p]
        if missing:
            raise ValueError(f"plaque {i} lacks {missing}.")
        if p["type"] not in ("calcified", "noncalcified"):
            raise ValueError(f"plaque {i} has unknown type {p['type']!r}.")
        if p["length_mm"] <= 0 or p["half_width_deg"] <= 0 or p["thickness_mm"] < 0 or not 0 <= p["remodelling"] <= 1:
            raise ValueError(f"plaque {i} has an invalid size or remodelling: {dict(p)}.")


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
