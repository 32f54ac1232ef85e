"""Geometry tests of the sCPR transform against analytic tubes, helices and linear fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy.spatial import cKDTree

from monai_cft.transforms import (
    RegionMasks,
    StraightenCPR,
    StraightenCPRd,
    StructureMeasures,
    parallel_transport_frames,
    resample_centerline,
    scpr_to_world,
)
from monai_cft.transforms import cpr as cpr_module

VOX = 0.5  # mm, phantom voxel size
SP = 0.25  # mm, sCPR pixel size


# ------------------------------------------------------------------------------------------------
# analytic phantoms
# ------------------------------------------------------------------------------------------------


def diag_affine(spacing=(VOX, VOX, VOX), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def rotated_affine(shape, spacing, centre, angle_deg=30.0, axis=(1.0, 2.0, 0.5), flip=True) -> np.ndarray:
    """A rotated (and, with ``flip``, mirrored), anisotropic affine whose volume is centred on ``centre``."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(angle_deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * kx @ kx
    if flip:
        rot[:, 0] *= -1
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = np.asarray(centre) - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def voxel_world(shape, affine) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def ramp(dist, radius, width=VOX):
    """Partial-volume edge: 1 inside, 0 outside, linear over one voxel around the surface."""
    return np.clip((radius - dist) / width + 0.5, 0.0, 1.0)


class Tube:
    """A tube of radius ``r`` around a densely sampled curve, with markers at known arc lengths."""

    def __init__(self, curve: np.ndarray, radius: float, marker_s=(), marker_r=1.0, blob_sigma=0.6):
        self.curve = curve
        seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
        self.cum = np.concatenate([[0.0], np.cumsum(seg)])
        self.length = float(self.cum[-1])
        self.radius = radius
        self.marker_s = tuple(marker_s)
        self.markers = np.array([self.point_at(s) for s in marker_s]).reshape(-1, 3)
        self.marker_r, self.blob_sigma = marker_r, blob_sigma
        self._tree = cKDTree(curve)

    def point_at(self, s: float) -> np.ndarray:
        return np.array([np.interp(s, self.cum, self.curve[:, k]) for k in range(3)])

    def distance(self, pts: np.ndarray) -> np.ndarray:
        """Distance to the polyline (exact near the curve: nearest vertex, refined on both segments)."""
        flat = pts.reshape(-1, 3)
        _, i = self._tree.query(flat)
        best = np.full(len(flat), np.inf)
        for j0 in (i - 1, i):
            j0 = np.clip(j0, 0, len(self.curve) - 2)
            a, b = self.curve[j0], self.curve[j0 + 1]
            ab = b - a
            u = np.clip(((flat - a) * ab).sum(1) / (ab * ab).sum(1), 0.0, 1.0)
            best = np.minimum(best, np.linalg.norm(flat - a - u[:, None] * ab, axis=1))
        return best.reshape(pts.shape[:-1])

    def render(self, shape, affine):
        """(2, *shape) float image (tube ramp, marker blobs) and (1, *shape) label (1 tube, 2 markers)."""
        world = voxel_world(shape, affine)
        dist = self.distance(world)
        image = np.zeros((2, *shape), np.float32)
        image[0] = ramp(dist, self.radius)
        label = (dist <= self.radius).astype(np.uint8)
        for m in self.markers:
            dm = np.linalg.norm(world - m, axis=-1)
            image[1] += np.exp(-0.5 * (dm / self.blob_sigma) ** 2)
            label[dm <= self.marker_r] = 2
        return (MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(affine)),
                MetaTensor(torch.from_numpy(label[None]), affine=torch.as_tensor(affine)))


def helix_points(t0=0.0, t1=7.5, a=6.0, pitch=12.0, centre=(12.0, 12.0, 4.0), n=4000) -> np.ndarray:
    t = np.linspace(t0, t1, n)
    b = pitch / (2 * math.pi)
    return np.stack([centre[0] + a * np.cos(t), centre[1] + a * np.sin(t), centre[2] + b * t], 1)


def oblique_points(p0=(8.0, 8.0, 9.0), p1=(24.0, 23.0, 21.0), n=2) -> np.ndarray:
    return np.linspace(p0, p1, n)


@pytest.fixture(scope="module")
def oblique():
    tube = Tube(oblique_points(), radius=2.6, marker_s=(5.0, 12.5, 20.0))
    img, lab = tube.render((64, 64, 64), diag_affine())
    return tube, img, lab


@pytest.fixture(scope="module")
def helix():
    tube = Tube(helix_points(), radius=2.0, marker_s=(8.0, 20.0, 32.0))
    img, lab = tube.render((48, 48, 48), diag_affine())
    return tube, img, lab


# ------------------------------------------------------------------------------------------------
# measurement helpers on straightened images
# ------------------------------------------------------------------------------------------------


def band_stats(plane: torch.Tensor, valid: int):
    """Per column width (mm) and centre row of a (H, W) band given as fractional occupancy."""
    p = plane[:, :valid].double()
    rows = torch.arange(p.shape[0], dtype=torch.float64).unsqueeze(1)
    width = p.sum(0) * SP
    centre = (p * rows).sum(0) / p.sum(0)
    return width, centre


def marker_centroids(plane: torch.Tensor, cols: list[float], half: int = 12):
    """Weighted (row, col) centroid of ``plane`` in a window of +-half columns around each guess."""
    out = []
    rows = torch.arange(plane.shape[0], dtype=torch.float64)
    for c in cols:
        lo, hi = max(int(round(c)) - half, 0), min(int(round(c)) + half + 1, plane.shape[1])
        w = plane[:, lo:hi].double()
        cc = torch.arange(lo, hi, dtype=torch.float64)
        out.append(((w.sum(1) * rows).sum() / w.sum(), (w.sum(0) * cc).sum() / w.sum()))
    return out


def straighten_pair(img, lab, points, size, angle, out_dims=2):
    d = StraightenCPRd(keys=("image", "label"), output_size=size, spacing=SP, angle=angle,
                       mode=("bilinear", "nearest"), padding_value=(0.0, 0), out_dims=out_dims)({
                           "image": img, "label": lab, "centerline": points})
    return d["image"], d["label"]


# ------------------------------------------------------------------------------------------------
# centreline and frames
# ------------------------------------------------------------------------------------------------


def test_resample_centerline_equal_arc_length_on_a_polyline_with_a_corner_and_repeats():
    pts = np.array([[0, 0, 0], [4, 0, 0], [4, 0, 0], [10, 0, 0], [10, 10, 0], [10, 10, 0]], float)
    out = resample_centerline(pts, 0.3).numpy()
    s = np.arange(out.shape[0]) * 0.3
    assert out.shape[0] == int(20 / 0.3) + 1
    expected = np.where(s[:, None] <= 10, np.stack([s, 0 * s, 0 * s], 1), np.stack([10 + 0 * s, s - 10, 0 * s], 1))
    np.testing.assert_allclose(out, expected, atol=1e-12)
    assert resample_centerline(pts, 0.3, num=5).shape == (5, 3)
    # an exact multiple of the step includes the distal end
    assert np.allclose(resample_centerline(pts, 0.5).numpy()[-1], [10, 10, 0])


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((1, 3)), "two distinct"),
        (np.array([[1.0, 2, 3]] * 4), "two distinct"),
        (np.array([[0.0, 0, 0], [1, np.nan, 0]]), "NaN"),
        (np.array([[0.0, 0, 0], [np.inf, 0, 0]]), "NaN or infinite"),
        (np.zeros((5, 2)), r"\(N, 3\)"),
    ],
)
def test_bad_centerlines_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        resample_centerline(bad, 0.25)
    with pytest.raises(ValueError, match=match):
        parallel_transport_frames(bad)


def test_parallel_transport_on_a_helix_is_orthonormal_and_rotation_minimizing():
    a, pitch = 6.0, 12.0
    b = pitch / (2 * math.pi)
    w = math.hypot(a, b)
    tau = b / w**2
    pts = resample_centerline(helix_points(0, 12, a, pitch, (0, 0, 0), 20000), SP)
    t, n, bn = (x.numpy() for x in parallel_transport_frames(pts))
    frames = np.stack([t, n, bn], 1)  # (M, 3, 3) rows t, n, b
    np.testing.assert_allclose(frames @ frames.transpose(0, 2, 1), np.broadcast_to(np.eye(3), frames.shape), atol=1e-10)
    np.testing.assert_allclose(np.linalg.det(frames), 1.0, atol=1e-10)  # right-handed: b = t x n
    # Frenet frame of the helix; the RMF normal turns against it at the torsion rate: phi' = -tau
    s = np.arange(len(t)) * SP
    tt = s / w
    fn = np.stack([-np.cos(tt), -np.sin(tt), 0 * tt], 1)
    fb = np.stack([b * np.sin(tt), -b * np.cos(tt), a + 0 * tt], 1) / w
    phi = np.unwrap(np.arctan2((n * fb).sum(1), (n * fn).sum(1)))
    slope = np.polyfit(s[5:-5], phi[5:-5], 1)[0]
    assert abs(slope + tau) < 1e-5 * tau, (slope, -tau)
    # no twist: the normal's derivative has no binormal component
    dn = (n[1:] - n[:-1]) / SP
    twist = np.abs((dn * 0.5 * (bn[1:] + bn[:-1])).sum(1))
    assert twist.max() < 1e-3 * tau


def _frenet_normals(pts: np.ndarray) -> np.ndarray:
    d1 = np.gradient(pts, axis=0)
    t = d1 / np.linalg.norm(d1, axis=1, keepdims=True)
    dt = np.gradient(t, axis=0)
    return dt / np.linalg.norm(dt, axis=1, keepdims=True)


@pytest.mark.parametrize("rise", [0.0, 0.5])
def test_parallel_transport_does_not_flip_at_an_inflection_where_frenet_does(rise):
    x = np.linspace(0, 6 * math.pi, 3000)
    curve = np.stack([x, 3 * np.sin(x / 3), rise * x], 1)  # inflection at x = 3 pi
    pts = resample_centerline(curve, SP).numpy()
    t, n, bn = (v.numpy() for v in parallel_transport_frames(pts))
    pt_dots = (n[1:] * n[:-1]).sum(1)
    fr = _frenet_normals(pts)[3:-3]
    fr_dots = (fr[1:] * fr[:-1]).sum(1)
    assert pt_dots.min() > 0.999
    assert fr_dots.min() < -0.9  # the Frenet normal flips at the inflection
    if rise == 0.0:  # planar curve: the initial normal is the plane normal (least aligned axis z) and stays so
        np.testing.assert_allclose(n, np.broadcast_to([0.0, 0.0, 1.0], n.shape), atol=1e-9)


def test_initial_normal_is_the_least_aligned_world_axis_or_the_given_vector():
    pts = np.array([[0.0, 0, 0], [1.0, 0.2, 3.0]])
    t, n, _ = parallel_transport_frames(pts)
    t0 = t[0].numpy()
    e = np.array([0.0, 1.0, 0.0])  # |t_y| smallest
    expected = e - (e @ t0) * t0
    np.testing.assert_allclose(n[0].numpy(), expected / np.linalg.norm(expected), atol=1e-12)
    _, n2, _ = parallel_transport_frames(pts, initial_normal=(1.0, 0.0, 0.0))
    ex = np.array([1.0, 0, 0]) - t0[0] * t0
    np.testing.assert_allclose(n2[0].numpy(), ex / np.linalg.norm(ex), atol=1e-12)
    with pytest.raises(ValueError, match="parallel"):
        parallel_transport_frames(pts, initial_normal=t0 * 2.0)


# ------------------------------------------------------------------------------------------------
# straightening analytic tubes
# ------------------------------------------------------------------------------------------------


# nearest-neighbour sampling of a voxelized label moves each edge by at most half a voxel diagonal
LABEL_EDGE_BOUND_PX = 0.5 * math.sqrt(3.0) * VOX / SP


def check_straightened_tube(tube: Tube, out_img, out_lab, valid: int) -> None:
    """Band of width 2r centred on row (H - 1) / 2, markers at their arc lengths, label values kept."""
    height = out_img.shape[1]
    centre_row = (height - 1) / 2
    w_img, c_img = band_stats(out_img[0], valid)
    assert ((w_img - 2 * tube.radius).abs() / SP).max() < 1.0  # partial-volume image: every column
    assert (c_img - centre_row).abs().max() < 0.5
    w_lab, c_lab = band_stats((out_lab[0] > 0).float(), valid)
    assert abs(float(w_lab.mean()) - 2 * tube.radius) / SP < 0.25  # voxelized label: on average ...
    assert ((w_lab - 2 * tube.radius).abs() / SP).max() <= 2 * LABEL_EDGE_BOUND_PX  # ... and per column
    assert abs(float((c_lab - centre_row).mean())) < 0.25 and (c_lab - centre_row).abs().max() <= LABEL_EDGE_BOUND_PX
    assert set(torch.unique(out_lab).tolist()) <= {0.0, 1.0, 2.0}
    expected_cols = [s / SP for s in tube.marker_s]
    for (row, col), exp in zip(marker_centroids(out_img[1], expected_cols), expected_cols):
        assert abs(float(col) - exp) < 0.1 and abs(float(row) - centre_row) < 0.25
    for (row, col), exp in zip(marker_centroids((out_lab[0] == 2).float(), expected_cols), expected_cols):
        assert abs(float(col) - exp) <= 1.0 and abs(float(row) - centre_row) <= 1.0


@pytest.mark.parametrize("angle", [0.0, 45.0, 90.0, 217.5])
def test_oblique_tube_straightens_to_a_centred_band(oblique, angle):
    tube, img, lab = oblique
    height, width = 48, 128
    out_img, out_lab = straighten_pair(img, lab, tube.curve, (height, width), angle)
    valid = out_img.meta["scpr_valid_columns"]
    assert valid == int(tube.length / SP) + 1 == 101
    assert out_img.meta["scpr_length_mm"] == pytest.approx(25.0)
    assert out_img.shape == (2, height, width) and out_lab.shape == (1, height, width)
    # a shorter vessel is padded with the padding value
    assert torch.all(out_img[:, :, valid:] == 0) and torch.all(out_lab[:, :, valid:] == 0)
    check_straightened_tube(tube, out_img, out_lab, valid)


@pytest.mark.parametrize("angle", [0.0, 60.0, 135.0, 300.0])
def test_helical_tube_straightens_to_a_centred_band(helix, angle):
    tube, img, lab = helix
    height, width = 32, 160
    out_img, out_lab = straighten_pair(img, lab, tube.curve, (height, width), angle)
    # a longer vessel is cut at the distal end
    assert out_img.meta["scpr_valid_columns"] == width and tube.length > width * SP
    check_straightened_tube(tube, out_img, out_lab, width)


def test_nearest_keeps_label_values_and_bilinear_does_not(helix):
    tube, _, lab = helix
    lab7 = lab.clone()
    lab7[lab7 == 2] = 7
    kw = dict(output_size=(32, 160), spacing=SP, padding_value=0)
    near = StraightenCPR(mode="nearest", **kw)(lab7, tube.curve)
    assert set(torch.unique(near).tolist()) == {0.0, 1.0, 7.0}
    lin = StraightenCPR(mode="bilinear", **kw)(lab7, tube.curve)
    assert len(set(torch.unique(lin).tolist()) - {0.0, 1.0, 7.0}) > 10


def test_band_areas_per_region_match_the_analytic_area(helix):
    tube, img, lab = helix
    height, width = 32, 160
    measures = StructureMeasures({"lumen": 1, "calcified": 2}, ("proximal", "mid", "distal"))
    soft = StructureMeasures({"lumen": 1}, ("proximal", "mid", "distal"))
    errors, soft_errors = [], []
    for angle in (0.0, 90.0, 200.0):
        out_img, out_lab = straighten_pair(img, lab, tube.curve, (height, width), angle)
        regions = RegionMasks()(out_lab)
        v = measures(out_lab, regions)
        # the partial-volume image as a soft (background, tube) probability map
        probs = torch.cat([1.0 - out_img[:1], out_img[:1]], 0)
        soft_v = soft.measure(probs, regions)
        for k, region in enumerate(("proximal", "mid", "distal")):
            columns = int(regions[k, 0].sum())  # 53, 54, 53 of 160 columns
            analytic = 2 * tube.radius * columns * SP  # band area of the region (mm^2)
            total = v[f"lumen_{region}"] + v[f"calcified_{region}"]
            errors.append(100 * (total - analytic) / analytic)
            assert abs(total - analytic) / analytic < 0.02, (region, total, analytic)
            soft_errors.append(100 * (float(soft_v[k]) - analytic) / analytic)
            assert abs(soft_errors[-1]) < 1.0
            # one marker per third (arc lengths 8, 20, 32 of 40 mm): a disc of radius 1 mm
            assert abs(v[f"calcified_{region}"] - math.pi) / math.pi < 0.15
    print(f"band area error per region (%): label {np.round(errors, 2).tolist()}, "
          f"soft {np.round(soft_errors, 2).tolist()}")


def test_out_dims_3_gives_a_disc_cross_section_and_matches_the_planes(oblique):
    tube, img, lab = oblique
    height, width = 33, 112
    out_img, out_lab = straighten_pair(img, lab, tube.curve, (height, width), 30.0, out_dims=3)
    assert out_img.shape == (2, height, height, width)
    assert out_img.meta["scpr_grid_world"].shape == (height, height, width, 3)
    valid = out_img.meta["scpr_valid_columns"]
    disc = out_img[0, :, :, :valid].double()  # (H, H, Wv) occupancy
    area = disc.sum((0, 1)) * SP**2
    disc_area = math.pi * tube.radius**2
    assert ((area - disc_area).abs() / disc_area).max() < 0.02
    label_area = (out_lab[0, :, :, :valid] > 0).double().sum((0, 1)) * SP**2
    assert abs(float(label_area.mean()) - disc_area) / disc_area < 0.01
    ii, jj = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(height, dtype=torch.float64),
                            indexing="ij")
    c = (height - 1) / 2
    rad = torch.sqrt((ii - c) ** 2 + (jj - c) ** 2) * SP
    inside = (out_lab[0, :, :, :valid] > 0)
    assert bool(inside[rad <= tube.radius - 2 * VOX].all())  # full disc ...
    assert not bool(inside[rad >= tube.radius + 2 * VOX].any())  # ... and nothing beyond it
    # the middle planes of the volume are the 2D sCPRs at the angle and at angle + 90 degrees
    mid = (height - 1) // 2
    plane, _ = straighten_pair(img, lab, tube.curve, (height, width), 30.0)
    plane90, _ = straighten_pair(img, lab, tube.curve, (height, width), 120.0)
    # (float32 coordinates of the 3D sampler's slice mosaic: about 1e-5 voxel)
    torch.testing.assert_close(out_img[:, :, mid, :].as_tensor(), plane.as_tensor(), atol=5e-5, rtol=0)
    torch.testing.assert_close(out_img[:, mid, :, :].as_tensor(), plane90.as_tensor(), atol=5e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# geometry bookkeeping: grid, round trip, affines
# ------------------------------------------------------------------------------------------------


def linear_field(world: np.ndarray) -> np.ndarray:
    return 0.3 * world[..., 0] - 0.2 * world[..., 1] + 0.1 * world[..., 2] + 5.0


@pytest.mark.parametrize(
    "affine",
    [
        diag_affine(),
        rotated_affine((64, 64, 64), (0.5, 0.45, 0.55), (12.0, 12.0, 11.0)),
        rotated_affine((64, 64, 64), (0.45, 0.55, 0.5), (12.0, 12.0, 11.0), angle_deg=130.0, axis=(0, 1, 1)),
    ],
)
def test_grid_records_the_sampled_world_points_for_any_affine(affine):
    """Trilinear interpolation reproduces a linear field exactly, so out == f(grid) pins the mapping."""
    shape = (64, 64, 64) if not np.allclose(affine, diag_affine()) else (48, 48, 48)
    vol = linear_field(voxel_world(shape, affine)).astype(np.float64)
    img = MetaTensor(torch.from_numpy(vol[None]), affine=torch.as_tensor(affine))
    curve = helix_points()
    grids = {}
    for out_dims in (2, 3):
        out = StraightenCPR(output_size=(16, 160), spacing=SP, angle=20.0, out_dims=out_dims)(img, curve)
        grids[out_dims] = out.meta["scpr_grid_world"]
        assert not bool(torch.isnan(grids[out_dims]).any())
        np.testing.assert_allclose(out[0].numpy(), linear_field(grids[out_dims].double().numpy()), atol=1e-6)
    # the grid depends on the centreline only, not on the affine
    far = MetaTensor(torch.zeros(1, 4, 4, 4, dtype=torch.float64),
                     affine=torch.as_tensor(diag_affine(spacing=(10, 10, 10))))
    ref = StraightenCPR(output_size=(16, 160), spacing=SP, angle=20.0)(far, curve)
    torch.testing.assert_close(grids[2], ref.meta["scpr_grid_world"], atol=1e-5, rtol=0)


def test_round_trip_centre_row_and_marker_positions(helix):
    tube, img, lab = helix
    out = StraightenCPR(output_size=(33, 160), spacing=SP, padding_value=0.0)(img, tube.curve)
    grid = out.meta["scpr_grid_world"].double().numpy()
    s = np.arange(160) * SP
    on_curve = np.stack([np.interp(s, tube.cum, tube.curve[:, k]) for k in range(3)], 1)
    np.testing.assert_allclose(grid[16], on_curve, atol=1e-4)  # centre row = centreline at arc length j * spacing
    # ... and lies on the analytic helix (dense input: chord error < 1e-4 mm)
    a, b = 6.0, 12.0 / (2 * math.pi)
    t = (grid[16, :, 2] - 4.0) / b
    analytic = np.stack([12 + a * np.cos(t), 12 + a * np.sin(t), grid[16, :, 2]], 1)
    assert np.abs(grid[16] - analytic).max() < 1e-4
    # even H: the continuous centre row (H - 1) / 2 is recovered by scpr_to_world
    even = StraightenCPR(output_size=(32, 160), spacing=SP, padding_value=0.0)(img, tube.curve)
    coords = np.stack([np.full(160, 15.5), np.arange(160.0)], 1)
    np.testing.assert_allclose(scpr_to_world(even, coords).numpy(), on_curve, atol=1e-4)
    # marker blobs found in the image map back to their world centres
    for (row, col), centre in zip(marker_centroids(even[1], [s_ / SP for s_ in tube.marker_s]), tube.markers):
        world = scpr_to_world(even.meta, torch.stack([row, col])).numpy()
        assert np.linalg.norm(world - centre) < 0.1, (world, centre)
    # out of range / padded coordinates give NaN
    assert torch.isnan(scpr_to_world(even, [[-1.0, 3.0], [0.0, 160.0]])).all()


def test_padded_columns_map_to_nan(oblique):
    tube, img, _ = oblique
    out = StraightenCPR(output_size=(16, 128), spacing=SP, padding_value=-5.0)(img, tube.curve)
    valid = out.meta["scpr_valid_columns"]
    assert torch.isnan(out.meta["scpr_grid_world"][:, valid:]).all()
    assert not torch.isnan(out.meta["scpr_grid_world"][:, :valid]).any()
    assert torch.isnan(scpr_to_world(out, [[3.0, valid + 0.5]])).all()
    assert torch.all(out[:, :, valid:] == -5.0)


def test_axis_flips_and_permutations_give_identical_results(oblique):
    tube, img, lab = oblique
    kw = dict(output_size=(24, 104), spacing=SP, angle=33.0, padding_value=0.0)
    ref_img = StraightenCPR(**kw)(img, tube.curve)
    ref_lab = StraightenCPR(mode="nearest", **kw)(lab, tube.curve)
    aff = img.affine.numpy()
    shape = np.array(img.shape[1:])
    # flip x, then reorder axes (x, y, z) -> (z, x, y); the affine follows the array
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, shape[0] - 1
    perm = np.zeros((4, 4))
    perm[3, 3] = 1
    for new, old in enumerate((2, 0, 1)):
        perm[old, new] = 1
    new_aff = aff @ flip @ perm
    moved_img = MetaTensor(img.as_tensor().flip(1).permute(0, 3, 1, 2).contiguous(), affine=torch.as_tensor(new_aff))
    moved_lab = MetaTensor(lab.as_tensor().flip(1).permute(0, 3, 1, 2).contiguous(), affine=torch.as_tensor(new_aff))
    out_img = StraightenCPR(**kw)(moved_img, tube.curve)
    out_lab = StraightenCPR(mode="nearest", **kw)(moved_lab, tube.curve)
    torch.testing.assert_close(out_img.as_tensor(), ref_img.as_tensor(), atol=1e-5, rtol=0)
    assert torch.equal(out_lab.as_tensor(), ref_lab.as_tensor())


def test_rotated_anisotropic_volume_gives_the_same_straightened_tube(helix):
    tube, img, _ = helix
    aff = rotated_affine((64, 64, 64), (0.5, 0.45, 0.55), (12.0, 12.0, 11.0))
    img_rot, _ = tube.render((64, 64, 64), aff)
    kw = dict(output_size=(32, 160), spacing=SP, angle=15.0, padding_value=0.0)
    ref = StraightenCPR(**kw)(img, tube.curve)
    rot = StraightenCPR(**kw)(img_rot, tube.curve)
    w_rot, c_rot = band_stats(rot[0], 160)
    assert (w_rot - 2 * tube.radius).abs().max() < 0.1 * 2 * tube.radius
    assert (c_rot - 15.5).abs().max() < 0.5
    assert float((rot[0] - ref[0]).abs().mean()) < 0.02
    # the resampling differs only near the tube surface (partial-volume voxels)
    assert float((rot[0] - ref[0]).abs().max()) < 0.35


# ------------------------------------------------------------------------------------------------
# padding, dict version, errors, devices
# ------------------------------------------------------------------------------------------------


def test_partially_outside_centerline_is_padded_and_mostly_outside_is_an_error():
    aff = diag_affine()
    img = MetaTensor(torch.ones(1, 32, 32, 32), affine=torch.as_tensor(aff))  # covers [-0.25, 15.75] mm
    cpr = StraightenCPR(output_size=(8, 80), spacing=SP, padding_value=-1024.0)
    inside_then_out = np.array([[2.0, 8.0, 8.0], [20.0, 8.0, 8.0]])  # 14 of 18 mm inside
    out = cpr(img, inside_then_out)
    cols = np.arange(80) * SP + 2.0
    assert torch.all(out[0, :, cols < 15.5] == 1.0) and torch.all(out[0, :, cols > 16.0] == -1024.0)
    with pytest.raises(ValueError, match="outside the image volume"):
        cpr(img, np.array([[10.0, 8.0, 8.0], [60.0, 8.0, 8.0]]))


def test_dict_version_matches_array_version_with_one_plan_per_centerline(oblique, monkeypatch, tmp_path):
    tube, img, lab = oblique
    plans = []
    original = cpr_module.SCPRGeometry

    def counting(*args, **kw):
        plans.append(args[2])
        return original(*args, **kw)

    monkeypatch.setattr(cpr_module, "SCPRGeometry", counting)
    other = MetaTensor(img.as_tensor()[:1] * 2.0, affine=img.affine)
    data = {"image": img, "label": lab, "other": other, "centerline": torch.as_tensor(tube.curve)}
    tr = StraightenCPRd(keys=("image", "label", "other"), output_size=(16, 112), spacing=SP, angle=10.0,
                        mode=("bilinear", "nearest", "bilinear"), padding_value=(-1024.0, 0, 3.0))
    d = tr(data)
    assert len(plans) == 1  # the geometry is planned once and shared by the keys
    monkeypatch.setattr(cpr_module, "SCPRGeometry", original)
    ref_img = StraightenCPR((16, 112), SP, 10.0, "bilinear", -1024.0)(img, tube.curve)
    ref_lab = StraightenCPR((16, 112), SP, 10.0, "nearest", 0)(lab, tube.curve)
    ref_other = StraightenCPR((16, 112), SP, 10.0, "bilinear", 3.0)(other, tube.curve)
    torch.testing.assert_close(d["image"].as_tensor(), ref_img.as_tensor())
    torch.testing.assert_close(d["label"].as_tensor(), ref_lab.as_tensor())
    torch.testing.assert_close(d["other"].as_tensor(), ref_other.as_tensor())
    assert d["label"].dtype == torch.float32 and d["image"].dtype == torch.float32
    assert d["image"].meta["scpr_valid_columns"] == d["label"].meta["scpr_valid_columns"] == 101
    assert torch.allclose(d["label"].affine, torch.diag(torch.tensor([SP, SP, SP, 1.0], dtype=torch.float64)))
    assert torch.all(d["other"][:, :, 101:] == 3.0)
    # output dtypes per key: nearest labels can stay integer
    typed = StraightenCPRd(keys=("image", "label"), output_size=(16, 112), spacing=SP, mode=("bilinear", "nearest"),
                           padding_value=(0.0, 0), dtype=(torch.float64, torch.uint8))(data)
    assert typed["image"].dtype == torch.float64 and typed["label"].dtype == torch.uint8
    assert set(torch.unique(typed["label"]).tolist()) == {0, 1, 2}
    # the centreline may be a file path (read by monai_cft.utils.io.load_centerline)
    io = pytest.importorskip("monai_cft.utils.io")
    path = tmp_path / "cl.npy"
    np.save(path, tube.curve)
    d2 = tr({"image": img, "label": lab, "other": other, "centerline": str(path)})
    torch.testing.assert_close(d2["image"].as_tensor(), d["image"].as_tensor())
    csv = tmp_path / "cl.csv"
    csv.write_text("x,y,z\n" + "\n".join(",".join(f"{v:.10f}" for v in p) for p in tube.curve) + "\n")
    assert io.load_centerline(csv).shape == tube.curve.shape
    d3 = tr({"image": img, "label": lab, "other": other, "centerline": csv})
    torch.testing.assert_close(d3["label"].as_tensor(), d["label"].as_tensor())


def test_plain_tensors_need_an_explicit_affine(oblique):
    tube, img, _ = oblique
    cpr = StraightenCPR(output_size=(16, 64), spacing=SP)
    with pytest.raises(TypeError, match="MetaTensor"):
        cpr(img.as_tensor(), tube.curve)
    with pytest.raises(TypeError, match="MetaTensor"):
        cpr(img.numpy(), tube.curve)
    ref = cpr(img, tube.curve)
    out = cpr(img.numpy(), tube.curve, affine=img.affine.numpy())
    torch.testing.assert_close(out.as_tensor(), ref.as_tensor())


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(mode="bicubic"), ValueError, "bicubic"),
        (dict(mode="area"), ValueError, "mode"),
        (dict(output_size=(0, 10)), ValueError, "output_size"),
        (dict(output_size=(10,)), ValueError, "output_size"),
        (dict(output_size=(10.5, 10)), ValueError, "output_size"),
        (dict(spacing=0.0), ValueError, "spacing"),
        (dict(spacing=float("nan")), ValueError, "spacing"),
        (dict(out_dims=4), ValueError, "out_dims"),
        (dict(angle=float("inf")), ValueError, "angle"),
        (dict(padding_value="low"), TypeError, "padding_value"),
        (dict(initial_normal=(0.0, 0.0)), ValueError, "initial_normal"),
    ],
)
def test_invalid_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        StraightenCPR(**kwargs)


def test_invalid_inputs(oblique):
    tube, img, lab = oblique
    cpr = StraightenCPR(output_size=(16, 64), spacing=SP)
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        cpr(MetaTensor(torch.zeros(64, 64, 64)), tube.curve)
    with pytest.raises(ValueError, match="two distinct"):
        cpr(img, np.array([[10.0, 10, 10]] * 3))
    with pytest.raises(ValueError, match="NaN"):
        cpr(img, np.array([[10.0, 10, 10], [np.nan, 1, 1]]))
    # repeated consecutive points are dropped, not an error
    repeated = np.repeat(tube.curve, 3, axis=0)
    torch.testing.assert_close(cpr(img, repeated).as_tensor(), cpr(img, tube.curve).as_tensor())
    small = MetaTensor(lab.as_tensor()[:, :32], affine=lab.affine)
    with pytest.raises(ValueError, match="spatial shape"):
        StraightenCPRd(keys=("image", "label"))({"image": img, "label": small, "centerline": tube.curve})
    shifted = MetaTensor(lab.as_tensor(), affine=torch.as_tensor(diag_affine(origin=(1.0, 0, 0))))
    with pytest.raises(ValueError, match="different affines"):
        StraightenCPRd(keys=("image", "label"))({"image": img, "label": shifted, "centerline": tube.curve})
    with pytest.raises(KeyError, match="centerline"):
        StraightenCPRd(keys="image")({"image": img})
