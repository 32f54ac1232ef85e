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
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d
from scipy.spatial import cKDTree

from monai_cft.data.phantom_params import (  # noqa: F401  (re-exported: the phantom's public names)
    _DENSE_STEP_MM,
    _MIN_LUMEN_FRACTION,
    _SAVE_STEP_MM,
    LABELS,
    PHANTOM_VERSION,
    PhantomCase,
    PhantomConfig,
    _rotation,
    calibre_factor,
    lumen_diameter_mm,
    phantom_centerline,
    sample_phantom_params,
    validate_phantom_params,
)

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

#: Gaussian truncation (in standard deviations) of the point spread function.
_PSF_TRUNCATE = 3.0
#: flat central part of a plaque's thickness profile (fraction of its half length / half width).
_PLAQUE_PLATEAU = 0.5


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
