"""Tests of the synthetic coronary CCTA phantom (monai_cft.data.phantom)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from scipy.spatial import cKDTree

from monai_cft.utils.io import save_nifti
from monai_cft.data.phantom import (
    LABELS,
    PhantomConfig,
    fat_mask,
    lumen_diameter_mm,
    phantom_centerline,
    render_phantom,
    sample_phantom_params,
)
from monai_cft.data.presets import get_scpr_preset
from monai_cft.transforms.cpr import StraightenCPR
from monai_cft.transforms.measures import StructureMeasures
from monai_cft.transforms.regions import RegionMasks
from monai_cft.variables import DEFAULT_REGIONS, DEFAULT_STRUCTURES, variable_names

SEED = [11, 3]


@pytest.fixture(scope="module")
def params():
    return sample_phantom_params(SEED)


@pytest.fixture(scope="module")
def case(params):
    return render_phantom(params)


def _without_noise(params, blur=0.0):
    p = copy.deepcopy(params)
    p["imaging"]["noise_sd_hu"] = 0.0
    p["imaging"]["blur_sigma_mm"] = blur
    p["imaging"]["bloom_fraction"] = 0.0
    return p


def test_sampling_is_deterministic_and_json_serialisable(params):
    again = sample_phantom_params(SEED)
    assert again == params
    assert json.loads(json.dumps(params)) == params
    assert sample_phantom_params([11, 4]) != params
    with pytest.raises(ValueError, match="seed"):
        sample_phantom_params(-1)


def test_render_is_deterministic_and_rerenders_from_json(params, case):
    again = render_phantom(json.loads(json.dumps(params)))
    np.testing.assert_array_equal(again.image, case.image)
    np.testing.assert_array_equal(again.label, case.label)
    np.testing.assert_array_equal(again.affine, case.affine)
    np.testing.assert_array_equal(again.centerline, case.centerline)
    label_only = render_phantom(params, with_image=False)
    np.testing.assert_array_equal(label_only.label, case.label)
    other = render_phantom(sample_phantom_params([11, 4]), with_image=False)
    assert other.label.shape != case.label.shape or not np.array_equal(other.label, case.label)


def test_outputs_types_and_label_values(case):
    assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
    assert case.image.shape == case.label.shape and case.image.ndim == 3
    assert set(np.unique(case.label).tolist()) <= {0, 1, 2, 3}
    assert np.count_nonzero(case.label == LABELS["lumen"]) > 1000
    # scanner-like affine: x and y flipped (LPS -> RAS), an origin offset, voxels of the configured size
    assert case.affine[0, 0] < 0 and case.affine[1, 1] < 0 and case.affine[2, 2] > 0
    assert np.abs(case.affine[:3, 3]).max() > 10
    cfg = PhantomConfig()
    spacing = np.abs(np.diag(case.affine)[:3])
    assert np.all((spacing >= cfg.spacing_xy_mm[0]) & (spacing <= cfg.spacing_xy_mm[1]))


def test_render_rejects_bad_params(params):
    bad = copy.deepcopy(params)
    bad["version"] = 99
    with pytest.raises(ValueError, match="version"):
        render_phantom(bad)
    bad = copy.deepcopy(params)
    del bad["tissue"]["fat_hu"]
    with pytest.raises(ValueError, match="fat_hu"):
        render_phantom(bad)
    bad = copy.deepcopy(params)
    bad["plaques"] = [dict(params["plaques"][0], type="soft")] if params["plaques"] else [{"type": "soft"}]
    with pytest.raises(ValueError, match="plaque 0"):
        render_phantom(bad)
    with pytest.raises(ValueError, match="p_none"):
        PhantomConfig(p_none=1.5)


def test_centerline_length_smoothness_and_no_self_intersection():
    for i in range(12):
        p = sample_phantom_params([2, i])
        pts, _ = phantom_centerline(p, step=0.5)
        length = float(np.sum(np.linalg.norm(np.diff(pts, axis=0), axis=1)))
        assert 100.0 <= length <= 130.0
        assert abs(length - p["geometry"]["length_mm"]) < 0.05
        dense, _ = phantom_centerline(p, step=0.2)
        dense = dense[:-1]  # equal steps (the last one is shorter)
        d1 = np.gradient(dense, axis=0)
        d2 = np.gradient(d1, axis=0)
        kappa = np.linalg.norm(np.cross(d1, d2), axis=1) / np.linalg.norm(d1, axis=1) ** 3
        assert kappa[1:-1].max() < 0.13  # radius of curvature > 7.7 mm: smooth, a well-defined tube
        # points more than 15 mm apart along the vessel stay more than 10 mm apart in space
        pairs = cKDTree(pts).query_pairs(10.0, output_type="ndarray")
        assert pairs.size == 0 or np.abs(pairs[:, 0] - pairs[:, 1]).max() * 0.5 <= 15.0
        # a space curve, not a planar one (torsion from the meanders over the heart surface)
        assert np.linalg.svd(pts - pts.mean(0), compute_uv=False)[-1] > 1.0


def _cross_section_diameter(label, affine, centerline, s, step=0.5, res=0.05):
    """Equivalent lumen diameter (mm) of the label in the plane perpendicular to the centreline at s."""
    i = int(round(s / step))
    p, t = centerline[i], centerline[i + 1] - centerline[i - 1]
    t /= np.linalg.norm(t)
    u = np.cross(t, [1.0, 0.0, 0.0] if abs(t[0]) < 0.9 else [0.0, 1.0, 0.0])
    u /= np.linalg.norm(u)
    v = np.cross(t, u)
    g = np.arange(-4.0, 4.0 + 1e-9, res)
    a, b = np.meshgrid(g, g, indexing="ij")
    world = p + a[..., None] * u + b[..., None] * v
    inv = np.linalg.inv(affine)
    idx = np.rint(world @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    values = label[idx[..., 0], idx[..., 1], idx[..., 2]]
    area = np.count_nonzero(values == LABELS["lumen"]) * res**2
    return 2.0 * np.sqrt(area / np.pi)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_lumen_diameters_match_the_taper(index):
    params = sample_phantom_params([4, index])
    params["plaques"] = []  # nominal lumen
    case = render_phantom(params, with_image=False)
    ranges = [(2.8, 4.7), (1.6, 3.3), (1.0, 2.8)]  # Dodge et al. 1992 +- 2 SD
    for k, s in enumerate(params["lumen"]["knots_mm"]):
        measured = _cross_section_diameter(case.label, case.affine, case.centerline, s)
        expected = float(lumen_diameter_mm(params, s))
        assert abs(measured - expected) < 0.3, (s, measured, expected)
        assert ranges[k][0] <= measured <= ranges[k][1]


def test_lumen_diameter_distribution():
    d = np.array([sample_phantom_params([9, i])["lumen"]["diameter_mm"] for i in range(200)])
    np.testing.assert_allclose(d.mean(0), [3.7, 2.4, 1.9], atol=0.15)
    assert 0.3 < d[:, 0].std() < 0.5
    assert np.all(d[:, 0] > d[:, 1]) and np.all(d[:, 1] > d[:, 2])


def _plaque_params():
    """A case with at least one calcified and one non-calcified plaque."""
    for i in range(50):
        p = sample_phantom_params([6, i])
        kinds = {q["type"] for q in p["plaques"]}
        if kinds == {"calcified", "noncalcified"}:
            return p
    raise AssertionError("no case with both plaque types in 50 draws")


def test_attenuation_values_without_blur_and_noise():
    p = _plaque_params()
    case = render_phantom(_without_noise(p))
    tis = p["tissue"]
    calc = case.image[case.label == LABELS["calcified"]]
    soft = case.image[case.label == LABELS["noncalcified"]]
    lumen = case.image[case.label == LABELS["lumen"]]
    assert calc.size > 0 and soft.size > 0
    cfg = PhantomConfig()
    assert calc.min() >= cfg.calcified_hu[0] - 1 and calc.max() <= cfg.calcified_hu[1] + 1
    assert soft.min() >= cfg.noncalcified_hu[2] - 1 and soft.max() <= cfg.noncalcified_hu[3] + 1
    assert lumen.min() >= np.floor(tis["lumen_hu_distal"]) and lumen.max() <= np.ceil(tis["lumen_hu_ostium"])
    background = set(np.unique(case.image[case.label == 0]).tolist())
    tissues = {round(tis[k]) for k in ("fat_hu", "myocardium_hu", "blood_hu", "lung_hu", "wall_hu")}
    assert background <= tissues and round(tis["fat_hu"]) in background and round(tis["wall_hu"]) in background
    # contrast falls off distally: the lumen's first and last centimetre
    inv = np.linalg.inv(case.affine)
    idx = np.rint(case.centerline @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    along = case.image[idx[:, 0], idx[:, 1], idx[:, 2]][case.label[idx[:, 0], idx[:, 1], idx[:, 2]] == 1]
    assert along[:20].mean() > along[-20:].mean()


def test_blooming_spreads_calcium_but_keeps_its_mean_and_label():
    p = _plaque_params()
    sharp = render_phantom(_without_noise(p))
    no_bloom, bloom = _without_noise(p, blur=0.35), _without_noise(p, blur=0.35)
    bloom["imaging"]["bloom_fraction"] = 0.35
    a, b = render_phantom(no_bloom), render_phantom(bloom)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(sharp.label, b.label)
    calc = b.label == LABELS["calcified"]
    # the bright region grows beyond the true plaque: more voxels above 600 HU outside the label
    ring = ~calc & (b.label != LABELS["calcified"])
    assert np.count_nonzero(b.image[ring] > 600) > np.count_nonzero(a.image[ring] > 600)
    # total attenuation is conserved (the excess is moved, not added): sums agree to rounding
    assert abs(float(b.image.astype(np.float64).sum() - a.image.astype(np.float64).sum())) < 1e-3 * a.image.size


#: rendered HU per class (median after blur, blooming and noise) must lie in these reference ranges of real
#: contrast CCTA (docs/data.md): calcified 622-919, non-calcified 28-69, lumen 284-367, epicardial fat -190 to -30
REFERENCE_HU = {"calcified": (622, 919), "noncalcified": (28, 69), "lumen": (284, 367), "fat": (-190, -30)}


def test_rendered_hu_per_class_in_reference_ranges():
    geometry = get_scpr_preset("quick")
    values3, values2 = {k: [] for k in REFERENCE_HU}, {k: [] for k in REFERENCE_HU if k != "fat"}
    for i in range(6):
        p = sample_phantom_params([123, i])
        c = render_phantom(p)
        for k in ("calcified", "noncalcified", "lumen"):
            values3[k].append(c.image[c.label == LABELS[k]])
        values3["fat"].append(c.image[fat_mask(p, c.affine, c.label.shape, label=c.label)])
        aff = torch.as_tensor(c.affine)
        img = StraightenCPR(geometry["output_size"], geometry["spacing"], record_grid=False)(
            torch.from_numpy(c.image[None].astype(np.float32)), c.centerline, aff)[0].numpy()
        lab = StraightenCPR(geometry["output_size"], geometry["spacing"], mode="nearest", padding_value=0,
                            record_grid=False)(torch.from_numpy(c.label[None].astype(np.float32)), c.centerline, aff)[0]
        for k in values2:
            values2[k].append(img[lab.numpy() == LABELS[k]])
    for where, values in (("volume", values3), ("sCPR", values2)):
        for k, v in values.items():
            med = float(np.median(np.concatenate(v)))
            lo, hi = REFERENCE_HU[k]
            assert lo <= med <= hi, f"{k} median {med:.0f} HU in the {where} outside {lo}-{hi}"


def test_noise_standard_deviation_after_blur(params):
    p = copy.deepcopy(params)
    for key in ("fat_hu", "myocardium_hu", "blood_hu", "lung_hu"):
        p["tissue"][key] = 0.0
    case = render_phantom(p)
    idx = np.argwhere(np.ones(case.image.shape, bool)[3:-3, 3:-3, 3:-3]) + 3
    world = idx @ case.affine[:3, :3].T + case.affine[:3, 3]
    far = cKDTree(case.centerline).query(world, distance_upper_bound=9.0)[0] == np.inf
    values = case.image[tuple(idx[far].T)].astype(np.float64)
    assert values.size > 10000
    assert abs(values.mean()) < 3.0
    np.testing.assert_allclose(values.std(), p["imaging"]["noise_sd_hu"], rtol=0.1)


def test_nifti_affine_round_trip_puts_centerline_in_lumen(tmp_path, case):
    path = save_nifti(case.label, case.affine, tmp_path / "label.nii.gz")
    loaded = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    assert isinstance(loaded, MetaTensor)
    affine = np.asarray(loaded.affine, dtype=np.float64)
    np.testing.assert_allclose(affine, case.affine, atol=1e-5)
    inv = np.linalg.inv(affine)
    idx = np.rint(case.centerline @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    values = loaded[0].numpy()[idx[:, 0], idx[:, 1], idx[:, 2]]
    assert np.mean(values == LABELS["lumen"]) > 0.9
    # and a point 8 mm off the vessel is background
    normal = np.cross(case.centerline[101] - case.centerline[99], [1.0, 0.0, 0.0])
    off = case.centerline[100] + 8.0 * normal / np.linalg.norm(normal)
    j = np.rint(inv[:3, :3] @ off + inv[:3, 3]).astype(int)
    assert loaded[0, j[0], j[1], j[2]] == 0


def test_nine_variables_span_a_range_from_zero():
    """Across 30 cases, each plaque variable of the sCPR is 0 at least once and > 0 at least once."""
    geom = get_scpr_preset("quick")
    cpr = StraightenCPR(geom["output_size"], geom["spacing"], mode="nearest", padding_value=0.0, record_grid=False)
    masks = RegionMasks()
    measure = StructureMeasures(DEFAULT_STRUCTURES, DEFAULT_REGIONS)
    names = variable_names(DEFAULT_STRUCTURES, DEFAULT_REGIONS)
    rows = []
    for i in range(30):
        case = render_phantom(sample_phantom_params([21, i]), with_image=False)
        lab = MetaTensor(torch.from_numpy(case.label[None].astype(np.float32)), affine=torch.from_numpy(case.affine))
        straight = cpr(lab, case.centerline)
        values = measure(straight, masks(straight))
        rows.append([values[n] for n in names])
    v = np.asarray(rows)
    for j, name in enumerate(names):
        if name.startswith("lumen"):
            assert v[:, j].min() > 0 and v[:, j].max() > 1.3 * v[:, j].min(), name
        else:
            assert (v[:, j] == 0).any() and (v[:, j] > 0).any(), name
    # the lumen tapers: proximal > mid > distal on average
    assert v[:, 0].mean() > v[:, 1].mean() > v[:, 2].mean()


def test_label_voxels_equals_the_rendered_label():
    from monai_cft.data.phantom import label_voxels

    p = _plaque_params()
    case = render_phantom(p, with_image=False)
    rng = np.random.default_rng(0)
    vox = np.concatenate([np.argwhere(case.label > 0), rng.integers(-2, np.asarray(case.label.shape) + 2, (4000, 3))])
    inside = np.all((vox >= 0) & (vox < np.asarray(case.label.shape)), axis=1)
    got = label_voxels(p, vox)
    np.testing.assert_array_equal(got[inside], case.label[tuple(vox[inside].T)])
    assert not got[~inside].any()
