"""Synthetic coronary CT angiography (CCTA) phantoms of a left anterior descending (LAD) artery.

A phantom is described by a JSON-serialisable parameter dictionary (:func:`sample_phantom_params`)
from which :func:`render_phantom` deterministically renders a cropped CCTA-like volume (int16 HU),
its ground-truth label map (uint8: 0 background, 1 lumen, 2 calcified plaque, 3 non-calcified
plaque), the NIfTI affine (voxel index -> world mm, RAS) and the vessel centreline (world mm, RAS,
ostium first). Saving the parameters next to a case is enough to re-render it exactly.

Model (numbers and their sources in ``docs/data.md`` and the project reference, section 2):

* **Heart and centreline.** The epicardial surface is an ellipsoid with semi-axes ``(a, b, c)``
  in a heart frame (long axis ``z``, base at ``+z``, apex at ``-z``; ``y`` anterior). The
  centreline runs at height ``h`` above that surface from the base over the anterior surface
  towards (and possibly around) the apex, ``S(theta, phi) + h n``, with smooth random lateral meanders and height variations
  (sums of sinusoids whose curvature is bounded), cut at a length of 100-130 mm. Curvature comes
  from the heart surface and the meanders, torsion from the meanders across the curved surface;
  because the running angle is monotone and stays below a full turn, the curve never crosses itself.
* **Vessel.** Lumen diameter tapers smoothly (monotone PCHIP) through proximal / mid / distal
  values; a thin wall surrounds it. Plaques are placed independently per third of the first
  ``scpr_length_mm`` (96 mm, the sCPR field of view) and per type; each is an eccentric raised-cosine
  bump (length, angular width, thickness) of which a fraction ``remodelling`` grows outwards and
  the rest narrows the lumen. Non-calcified plaque lies next to the lumen, calcium outside it.
* **Tissue.** Epicardial fat around the vessel, myocardium below the surface (with a blood-filled
  cavity deeper inside), lung outside the fat layer. Contrast decreases linearly along the vessel.
* **Imaging.** White noise is added to the sharp HU volume before a Gaussian blur that models
  the scanner's point spread function (partial volume), so the noise is spatially correlated like
  reconstructed CT noise; it is scaled so its standard deviation after blurring is
  ``noise_sd_hu``. The grid is cropped to the vessel's bounding box plus a margin and written with a scanner-like affine (x and y flipped, as DICOM LPS -> NIfTI RAS,
  with an origin offset).

Rendering is vectorised: only voxels in a narrow band around the centreline (found with a KD-tree
on a densely resampled centreline) are evaluated against the vessel model.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.interpolate import PchipInterpolator
from scipy.ndimage import gaussian_filter, gaussian_filter1d
from scipy.spatial import cKDTree

from monai_cft.variables import DEFAULT_REGIONS, DEFAULT_STRUCTURES

__all__ = [
    "PHANTOM_VERSION",
    "LABELS",
    "PhantomConfig",
    "PhantomCase",
    "sample_phantom_params",
    "render_phantom",
    "phantom_centerline",
    "lumen_diameter_mm",
    "validate_phantom_params",
    "calibre_factor",
    "fat_mask",
    "phantom_geometry",
    "label_voxels",
    "vessel_geometry",
]

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
#: Gaussian truncation (in standard deviations) of the point spread function.
_PSF_TRUNCATE = 3.0
#: length (mm) of the transition of a per-third lumen calibre change, and its distance from the third's ends.
_CALIBRE_TAPER_MM = 3.0
_CALIBRE_MARGIN_MM = 1.0
#: flat central part of a plaque's thickness profile (fraction of its half length / half width).
_PLAQUE_PLATEAU = 0.5


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


def _grid(world_pts: np.ndarray, spacing: Sequence[float], margin: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Scanner-like affine (x, y flipped as LPS -> RAS) covering the points plus a margin."""
    lo = world_pts.min(0) - margin
    hi = world_pts.max(0) + margin
    sx, sy, sz = (float(v) for v in spacing)
    shape = tuple(int(math.ceil((hi[i] - lo[i]) / (sx, sy, sz)[i])) + 1 for i in range(3))
    affine = np.array(
        [[-sx, 0.0, 0.0, hi[0]], [0.0, -sy, 0.0, hi[1]], [0.0, 0.0, sz, lo[2]], [0.0, 0.0, 0.0, 1.0]],
        dtype=np.float64,
    )
    return affine, shape  # type: ignore[return-value]


def _apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 3) points mapped by a (4, 4) affine, with broadcasting (no BLAS threads for tall-thin products)."""
    pts = np.asarray(points, dtype=np.float64)
    return affine[:3, 3] + pts[:, 0:1] * affine[:3, 0] + pts[:, 1:2] * affine[:3, 1] + pts[:, 2:3] * affine[:3, 2]


def _bump(x: np.ndarray, plateau: float = _PLAQUE_PLATEAU) -> np.ndarray:
    """Plaque profile: 1 on ``|x| <= plateau``, a raised-cosine taper to 0 at ``|x| = 1``, 0 outside."""
    u = np.clip((np.abs(x) - plateau) / (1.0 - plateau), 0.0, 1.0)
    return np.where(np.abs(x) < 1.0, np.cos(0.5 * np.pi * u) ** 2, 0.0)


def _psf_noise_gain(sigma_vox: Sequence[float]) -> float:
    """Standard deviation of unit white noise after the Gaussian blur (product over axes)."""
    gain = 1.0
    for s in sigma_vox:
        if s <= 0:
            continue
        radius = int(_PSF_TRUNCATE * s + 0.5)
        impulse = np.zeros(2 * radius + 1)
        impulse[radius] = 1.0
        kernel = gaussian_filter1d(impulse, s, truncate=_PSF_TRUNCATE, mode="constant")
        gain *= float(np.sqrt(np.sum(kernel**2)))
    return gain


def _tube_voxels(
    dense: np.ndarray, radius_dense: np.ndarray, affine: np.ndarray, shape: Sequence[int], step: float = 1.0
) -> np.ndarray:
    """Indices (M, 3) of all voxels within ``radius_dense[i]`` of the dense centreline points.

    Balls of index offsets are stamped around centreline points every ``step`` mm; each ball's
    radius is the largest local radius plus half a step and half a voxel (a superset of the tube).
    Radii are rounded up to 0.25 mm so that few distinct offset sets are built.
    """
    spacing = np.abs(np.diag(affine)[:3])
    inv = np.linalg.inv(affine)
    k = max(1, int(round(step / _DENSE_STEP_MM)))
    starts = np.append(np.arange(0, len(dense), k), len(dense) - 1)
    local = np.array([radius_dense[max(0, i - k) : i + k + 1].max() for i in starts])
    radii = np.ceil((local + 0.5 * step + 0.5 * float(spacing.max())) / 0.25) * 0.25
    centers = np.rint(dense[starts] @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    upper = np.asarray(shape)
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    mask = np.zeros(int(np.prod(shape)), dtype=bool)
    for radius in np.unique(radii):
        half = np.ceil(radius / spacing).astype(int)
        grid = np.stack(np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), -1).reshape(-1, 3)
        offsets = grid[np.sum((grid * spacing) ** 2, axis=1) <= radius**2]
        group = centers[radii == radius]
        fits = np.all((group - half >= 0) & (group + half < upper), axis=1)
        # balls inside the grid: flat indices; balls crossing its border: clip in 3D first
        mask[((group[fits] @ strides)[:, None] + (offsets @ strides)[None, :]).ravel()] = True
        if not fits.all():
            cand = (group[~fits][:, None, :] + offsets[None, :, :]).reshape(-1, 3)
            cand = cand[np.all((cand >= 0) & (cand < upper), axis=1)]
            mask[cand @ strides] = True
    return np.stack(np.unravel_index(np.flatnonzero(mask), tuple(shape)), axis=1)


def _separable_quadratic(m: np.ndarray, coords: Sequence[np.ndarray], offset: float = 0.0) -> np.ndarray:
    """``x^T m x + offset`` on the grid of 1D axis coordinates ``coords`` (float32, 3D).

    Every term couples at most two axes, so the 3D result is the sum of three 2D tables (two
    broadcast additions over the volume instead of a dozen full-volume passes).
    """
    x0, x1, x2 = (np.asarray(c, dtype=np.float64) for c in coords)
    p01 = m[0, 0] * x0[:, None] ** 2 + 2.0 * m[0, 1] * np.outer(x0, x1) + offset
    p02 = m[2, 2] * x2[None, :] ** 2 + 2.0 * m[0, 2] * np.outer(x0, x2)
    p12 = m[1, 1] * x1[:, None] ** 2 + 2.0 * m[1, 2] * np.outer(x1, x2)
    out = p01.astype(np.float32)[:, :, None] + p02.astype(np.float32)[:, None, :]
    out += p12.astype(np.float32)[None, :, :]
    return out


def _tissue_hu(
    geometry: Mapping[str, Any], tissue: Mapping[str, Any], affine: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
    """Sharp (X, Y, Z) float32 HU of lung / epicardial fat / myocardium / blood around the heart.

    With ``x`` the voxel position relative to the heart centre and ``M = R diag(a, b, c)^-2 R^T``,
    the ellipsoid is ``f(x) = x^T M x - 1 = 0`` and ``f / |grad f| = f / (2 sqrt(x^T M^2 x))``
    approximates the signed distance (mm, > 0 outside). ``affine`` must be diagonal.
    """
    if np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))):
        raise ValueError("internal: the phantom grid affine must be diagonal.")
    rot = _rotation(geometry["heart_tilt_deg"])
    m = rot @ np.diag(1.0 / np.asarray(geometry["heart_axes_mm"], dtype=np.float64) ** 2) @ rot.T
    coords = [affine[i, i] * np.arange(shape[i]) + affine[i, 3] - geometry["world_center_mm"][i] for i in range(3)]
    f = _separable_quadratic(m, coords, offset=-1.0)
    two_grad = _separable_quadratic(m @ m, coords)
    np.sqrt(two_grad, out=two_grad)
    two_grad *= 2.0
    hu = np.full(shape, tissue["fat_hu"], dtype=np.float32)
    hu[f < 0.0] = tissue["myocardium_hu"]
    hu[f < -float(tissue["myocardium_thickness_mm"]) * two_grad] = tissue["blood_hu"]
    hu[f > float(tissue["fat_thickness_mm"]) * two_grad] = tissue["lung_hu"]
    return hu


def phantom_geometry(params: Mapping[str, Any]) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """The grid and centreline of a phantom without rendering it: ``(affine (4, 4), shape, centreline (N, 3))``.

    Identical to the ``affine``, ``image.shape`` and ``centerline`` of :func:`render_phantom` (the grid
    depends on the centreline only, not on the lumen, plaques or tissue).
    """
    dense, _ = phantom_centerline(params, step=_DENSE_STEP_MM)
    centerline, _ = phantom_centerline(params, step=_SAVE_STEP_MM)
    affine, shape = _grid(dense, params["imaging"]["spacing_mm"], float(params["imaging"]["margin_mm"]))
    return affine, tuple(int(v) for v in shape), centerline


def fat_mask(params: Mapping[str, Any], affine: np.ndarray, shape: Sequence[int], clearance_mm: float = 1.5,
             label: np.ndarray | None = None) -> np.ndarray:
    """(X, Y, Z) bool: voxels of a phantom's epicardial fat, at least ``clearance_mm`` from any vessel label.

    Args:
        params: the phantom's parameters; ``affine`` / ``shape``: its grid (as rendered).
        clearance_mm: distance kept from the labelled vessel (where blur mixes fat with the vessel).
        label: the rendered label map (default: rendered here, label only).
    """
    from scipy.ndimage import binary_dilation

    tissue = _tissue_hu(params["geometry"], params["tissue"], np.asarray(affine, dtype=np.float64), shape)
    if label is None:
        label = render_phantom(params, with_image=False).label
    steps = int(math.ceil(clearance_mm / float(np.abs(np.diag(np.asarray(affine))[:3]).min())))
    near = binary_dilation(label > 0, iterations=steps) if steps > 0 else label > 0
    return (tissue == np.float32(params["tissue"]["fat_hu"])) & ~near


def _add_bloom(hu: np.ndarray, vox: np.ndarray, excess: np.ndarray, affine: np.ndarray, sigma_mm: float) -> None:
    """Add ``excess`` (HU at voxel indices ``vox``) blurred by a Gaussian of ``sigma_mm`` to ``hu`` in place.

    The blur runs on the bounding box of ``vox`` plus the kernel's reach, not on the whole volume.
    """
    sigma_vox = [sigma_mm / abs(affine[i, i]) for i in range(3)]
    reach = [int(math.ceil(_PSF_TRUNCATE * s)) + 1 for s in sigma_vox]
    lo = np.maximum(vox.min(0) - reach, 0)
    hi = np.minimum(vox.max(0) + reach + 1, hu.shape)
    crop = np.zeros(tuple(int(v) for v in hi - lo), dtype=np.float32)
    np.add.at(crop, tuple((vox - lo).T), excess.astype(np.float32))
    if sigma_mm > 0:
        crop = gaussian_filter(crop, sigma_vox, mode="constant", truncate=_PSF_TRUNCATE)
    hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += crop


def _vessel_geometry(params: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the vessel model that only the geometry and imaging parameters fix (dense centreline,
    frames, grid): unchanged by plaque and calibre edits, so it can be reused across them."""
    geo, img = params["geometry"], params["imaging"]
    length = float(geo["length_mm"])
    dense, normals = phantom_centerline(params, step=_DENSE_STEP_MM)
    s_dense = np.minimum(np.arange(len(dense)) * _DENSE_STEP_MM, length)
    centerline, _ = phantom_centerline(params, step=_SAVE_STEP_MM)
    affine, shape = _grid(dense, img["spacing_mm"], float(img["margin_mm"]))

    # frame along the vessel: tangent, surface-normal axis (angle 0 = epicardial side), binormal
    tangent = np.gradient(dense, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    e1 = normals - np.sum(normals * tangent, axis=1, keepdims=True) * tangent
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(tangent, e1)
    return {"length": length, "dense": dense, "s_dense": s_dense, "centerline": centerline, "affine": affine,
            "shape": shape, "tangent": tangent, "e1": e1, "e2": e2,
            "key": json.dumps([params["geometry"], params["imaging"]], sort_keys=True)}


def _vessel_frame(params: Mapping[str, Any], vessel: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything the vessel model needs besides the voxels: dense centreline, frames, grid, outer radius.

    ``vessel``: a :func:`_vessel_geometry` of parameters with the same geometry and imaging (e.g.
    the case before a plaque edit), reused instead of recomputed; it is checked to match.
    """
    validate_phantom_params(params)
    if vessel is None:
        vessel = _vessel_geometry(params)
    elif vessel["key"] != json.dumps([params["geometry"], params["imaging"]], sort_keys=True):
        raise ValueError("the cached vessel geometry belongs to other geometry / imaging parameters.")
    lum = params["lumen"]
    s_dense = vessel["s_dense"]
    # conservative outer radius of the vessel (lumen + plaque + wall) along the dense centreline
    plaques = list(params.get("plaques", []))
    band_dense = 0.5 * lumen_diameter_mm(params, s_dense) + lum["wall_thickness_mm"] + 0.25
    for p in plaques:
        covered = np.abs(s_dense - p["center_mm"]) < 0.5 * p["length_mm"]
        band_dense[covered] += p["thickness_mm"]
    return {**vessel, "band_dense": band_dense, "plaques": plaques}


def _vessel_classes(params: Mapping[str, Any], fr: Mapping[str, Any], vox: np.ndarray) -> dict[str, Any]:
    """Vessel model at voxel indices ``vox`` (M, 3): the voxels on the vessel, their class and layers.

    Returns ``{"vox": (K, 3), "index": (K,) rows of ``vox`` they are, "cls": (K,) uint8 (1 lumen, 2
    calcified, 3 non-calcified, 4 wall), "s": (K,) arc length, "t_plaque" / "hu_weighted": per plaque
    type (K,)}`` for the K voxels inside the vessel.
    """
    dense, tangent, band_dense = fr["dense"], fr["tangent"], fr["band_dense"]
    world = _apply_affine(fr["affine"], vox)
    dist, idx = cKDTree(dense).query(world, k=1, distance_upper_bound=float(band_dense.max()) + _DENSE_STEP_MM)
    keep = np.isfinite(dist)
    rows = np.flatnonzero(keep)
    vox, world, idx = vox[keep], world[keep], idx[keep]
    vec = world - dense[idx]
    along = np.sum(vec * tangent[idx], axis=1)
    s = fr["s_dense"][idx] + along
    radial = vec - along[:, None] * tangent[idx]
    r = np.linalg.norm(radial, axis=1)
    inside = (s >= 0.0) & (s <= fr["length"]) & (r < band_dense[idx])
    vox, idx, s, r, radial, rows = vox[inside], idx[inside], s[inside], r[inside], radial[inside], rows[inside]
    psi = np.arctan2(np.sum(radial * fr["e2"][idx], axis=1), np.sum(radial * fr["e1"][idx], axis=1))

    # vessel model at (s, psi): nominal radius, plaque layers, lumen narrowing
    r0 = 0.5 * lumen_diameter_mm(params, s)
    t_plaque = {"calcified": np.zeros_like(s), "noncalcified": np.zeros_like(s)}
    hu_weighted = {"calcified": np.zeros_like(s), "noncalcified": np.zeros_like(s)}
    narrowing = np.zeros_like(s)
    for p in fr["plaques"]:
        dpsi = np.remainder(psi - math.radians(p["angle_deg"]) + math.pi, 2.0 * math.pi) - math.pi
        t = p["thickness_mm"] * _bump((s - p["center_mm"]) / (0.5 * p["length_mm"])) * _bump(
            dpsi / math.radians(p["half_width_deg"])
        )
        t_plaque[p["type"]] += t
        hu_weighted[p["type"]] += t * p["hu"]
        narrowing += (1.0 - p["remodelling"]) * t
    inner = np.maximum(r0 - narrowing, _MIN_LUMEN_FRACTION * r0)
    nc_outer = inner + t_plaque["noncalcified"]
    ca_outer = nc_outer + t_plaque["calcified"]
    wall_outer = ca_outer + params["lumen"]["wall_thickness_mm"]

    cls = np.zeros(len(s), dtype=np.uint8)
    cls[r < wall_outer] = 4  # wall (not labelled)
    cls[r < ca_outer] = LABELS["calcified"]
    cls[r < nc_outer] = LABELS["noncalcified"]
    cls[r < inner] = LABELS["lumen"]
    return {"vox": vox, "index": rows, "cls": cls, "s": s, "t_plaque": t_plaque, "hu_weighted": hu_weighted}


def label_voxels(params: Mapping[str, Any], vox: np.ndarray, vessel: Mapping[str, Any] | None = None) -> np.ndarray:
    """Labels (M,) uint8 of a phantom at voxel indices ``vox`` (M, 3) of its grid, without rendering it.

    Equal to ``render_phantom(params).label[vox[:, 0], vox[:, 1], vox[:, 2]]`` for voxels inside the
    grid (the vessel model is evaluated at those voxel centres only); indices outside the grid give 0.
    ``vessel``: :func:`vessel_geometry` of the same geometry, to skip recomputing it (many edits
    of one case).
    """
    fr = _vessel_frame(params, vessel)
    vox = np.asarray(vox, dtype=np.int64).reshape(-1, 3)
    out = np.zeros(len(vox), dtype=np.uint8)
    valid = np.all((vox >= 0) & (vox < np.asarray(fr["shape"])), axis=1)
    uniq, inverse = np.unique(vox[valid], axis=0, return_inverse=True)
    model = _vessel_classes(params, fr, uniq)
    lab = np.zeros(len(uniq), dtype=np.uint8)
    lab[model["index"]] = np.where(model["cls"] == 4, 0, model["cls"])
    out[valid] = lab[inverse.reshape(-1)]
    return out


def vessel_geometry(params: Mapping[str, Any]) -> dict[str, Any]:
    """The geometry part of a phantom's vessel model, reusable by :func:`label_voxels` and
    :func:`render_phantom` for parameters that differ only in plaques and lumen calibre."""
    validate_phantom_params(params)
    return _vessel_geometry(params)


def render_phantom(params: Mapping[str, Any], with_image: bool = True,
                   vessel: Mapping[str, Any] | None = None) -> PhantomCase:
    """Render the volume, label map, affine and centreline of one phantom.

    Args:
        params: parameters from :func:`sample_phantom_params` (or loaded from its JSON file).
        with_image: ``False`` skips the HU image (tissue, noise and blur) and returns an empty
            ``image`` array; the label, affine and centreline are identical to a full render.
        vessel: :func:`vessel_geometry` of parameters with the same geometry and imaging, reused.

    Returns:
        :class:`PhantomCase` with ``image`` (X, Y, Z) int16 HU, ``label`` (X, Y, Z) uint8,
        ``affine`` (4, 4) voxel -> world mm (RAS) and the 0.5 mm centreline (N, 3) world mm.
    """
    fr = _vessel_frame(params, vessel)
    tis, img = params["tissue"], params["imaging"]
    length, affine, shape, centerline = fr["length"], fr["affine"], fr["shape"], fr["centerline"]

    # candidate voxels: union of index-space balls around coarse centreline points (a tube a little
    # wider than the vessel), then the exact nearest dense point from a KD-tree query
    model = _vessel_classes(params, fr, _tube_voxels(fr["dense"], fr["band_dense"], affine, shape))
    vox, cls, s, t_plaque, hu_weighted = (model[k] for k in ("vox", "cls", "s", "t_plaque", "hu_weighted"))
    label = np.zeros(shape, dtype=np.uint8)
    vessel = cls != 0
    vi = vox[vessel]
    label[vi[:, 0], vi[:, 1], vi[:, 2]] = np.where(cls[vessel] == 4, 0, cls[vessel])

    if not with_image:
        return PhantomCase(np.zeros((0, 0, 0), np.int16), label, affine, centerline, copy.deepcopy(dict(params)))

    # tissue background from the (first-order) signed distance to the epicardial ellipsoid
    hu = _tissue_hu(params["geometry"], tis, affine, shape)

    lumen_hu = tis["lumen_hu_ostium"] + (tis["lumen_hu_distal"] - tis["lumen_hu_ostium"]) * s / length
    values = np.full(len(s), np.nan)
    values[cls == 4] = tis["wall_hu"]
    values[cls == LABELS["lumen"]] = lumen_hu[cls == LABELS["lumen"]]
    for kind in ("calcified", "noncalcified"):
        sel = cls == LABELS[kind]
        values[sel] = hu_weighted[kind][sel] / np.maximum(t_plaque[kind][sel], 1e-9)
    # blooming: a fraction of calcium's excess attenuation (over the soft tissue around it) is spread
    # by the wide tail of the scanner's PSF instead of its core; the label stays the true plaque
    calc = cls == LABELS["calcified"]
    bloom_excess = img["bloom_fraction"] * (values[calc] - tis["wall_hu"])
    values[calc] -= bloom_excess
    hu[vi[:, 0], vi[:, 1], vi[:, 2]] = values[vessel]

    # correlated noise + point spread function in one blur: white uniform noise (cheaper to draw
    # than normal noise) becomes Gaussian after the blur by the central limit theorem; it is scaled
    # so that its standard deviation after the blur is noise_sd_hu
    sigma_vox = [img["blur_sigma_mm"] / abs(affine[i, i]) for i in range(3)]
    if img["noise_sd_hu"] > 0:
        noise = np.random.default_rng(int(img["noise_seed"])).random(shape, dtype=np.float32)
        noise -= np.float32(0.5)
        noise *= np.float32(math.sqrt(12.0) * img["noise_sd_hu"] / _psf_noise_gain(sigma_vox))
        hu += noise
        del noise
    if img["blur_sigma_mm"] > 0:
        hu = gaussian_filter(hu, sigma_vox, mode="nearest", truncate=_PSF_TRUNCATE)
    if calc.any() and img["bloom_fraction"] > 0:
        _add_bloom(hu, vox[calc], bloom_excess, affine, img["bloom_sigma_mm"])
    np.clip(np.rint(hu, out=hu), -32768, 32767, out=hu)
    image = hu.astype(np.int16)
    return PhantomCase(image, label, affine, centerline, copy.deepcopy(dict(params)))
