"""Tests of the sCPR sampler's equivalences (cropping, strategies, dtypes, several centrelines) and of
``UnstraightenCPR`` (an edited sCPR written back into the volume) on the analytic tubes of test_cpr."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from test_cpr import SP, VOX, Tube, diag_affine, helix_points, oblique_points, rotated_affine, voxel_world

from monai_cft.transforms import StraightenCPR, StraightenCPRd, UnstraightenCPR, UnstraightenCPRd, scpr_to_world
from monai_cft.transforms import scpr_sampling


@pytest.fixture(scope="module")
def tubes():
    """An oblique and a helical tube, HU-like images (tube 300, background -100) and labels."""
    out = {}
    for name, curve, radius, shape in (("oblique", oblique_points(), 2.6, (64, 64, 64)),
                                       ("helix", helix_points(), 2.0, (48, 48, 48))):
        tube = Tube(curve, radius=radius, marker_s=(8.0, 16.0))
        img, lab = tube.render(shape, diag_affine())
        hu = MetaTensor(img.as_tensor()[:1] * 400.0 - 100.0 + 50.0 * img.as_tensor()[1:], affine=img.affine)
        out[name] = (tube, hu, lab)
    return out


def reference_sample(img: torch.Tensor, plan, mode: str, pad: float) -> torch.Tensor:
    """The uncropped sampling: the whole volume with one padding layer, float64, 3D grid_sample."""
    x = F.pad(img.as_tensor().double().unsqueeze(0), (1, 1, 1, 1, 1, 1), value=pad)
    shape = torch.tensor(img.shape[1:], dtype=torch.float64)
    vox = plan.voxels.points(torch.float64) + 1.0  # in the padded volume
    grid = (2.0 * vox / (shape + 1.0) - 1.0).flip(-1)
    out = F.grid_sample(x, grid.reshape(1, 1, -1, grid.shape[-2], 3), mode=mode, padding_mode="border",
                        align_corners=True)
    out = out.view(img.shape[0], *grid.shape[:-1])
    missing = plan.size[1] - plan.n_valid
    return torch.cat([out, out.new_full((*out.shape[:-1], missing), pad)], -1) if missing else out


CROP_CASES = [  # (tube, out_dims, mode, angle, shift of the volume (mm): moves the vessel to the border)
    ("oblique", 2, "bilinear", 30.0, (0.0, 0.0, 0.0)),
    ("helix", 2, "bilinear", 100.0, (0.0, 0.0, 0.0)),
    ("helix", 3, "bilinear", 10.0, (0.0, 0.0, 0.0)),
    ("oblique", 3, "nearest", 45.0, (0.0, 0.0, 0.0)),
    ("helix", 2, "nearest", 0.0, (0.0, 0.0, 0.0)),
    ("oblique", 2, "bilinear", 60.0, (9.0, 0.0, 0.0)),  # the tube leaves the volume through x = 0
    ("oblique", 3, "bilinear", 60.0, (9.0, 8.0, 0.0)),
    ("helix", 3, "nearest", 200.0, (0.0, 7.0, 0.0)),
]


@pytest.mark.parametrize("name, out_dims, mode, angle, shift", CROP_CASES)
def test_cropping_never_changes_the_result(tubes, name, out_dims, mode, angle, shift):
    tube, hu, lab = tubes[name]
    img = hu if mode == "bilinear" else lab
    aff = diag_affine(origin=shift)
    vol = MetaTensor(img.as_tensor(), affine=torch.as_tensor(aff))
    pad = -1024.0 if mode == "bilinear" else 0.0
    cpr = StraightenCPR((24, 112), SP, angle, mode, pad, out_dims)
    plan = cpr.plan(tube.curve, vol.affine, vol.shape[1:])
    ref = reference_sample(vol, plan, mode, pad)
    outside = plan.voxels.count_inside(vol.shape[1:]) < plan.voxels.count
    assert outside == (shift != (0.0, 0.0, 0.0))  # the border cases really sample outside the volume
    # float32 coordinates: ~2e-5 voxel, at edges of up to 1300 HU per voxel (tube to padding)
    tol = 5e-2 if mode == "bilinear" else 0.0
    for strategy in ("gather", "box", "auto"):
        out = plan.sample(vol, mode, pad, strategy=strategy)
        if mode == "nearest":  # exact ties may round differently: at most a few pixels
            assert float((out != ref).float().mean()) < 2e-3, strategy
        else:
            torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0, msg=strategy)
    full = cpr(vol, tube.curve)
    worst = float((full.double() - ref).abs().max())
    assert full.shape == ref.shape and worst <= max(tol, 1.0 if mode == "nearest" else 0)


def test_int16_and_float_inputs_agree_and_the_volume_is_not_converted(tubes, monkeypatch):
    tube, hu, _ = tubes["helix"]
    as_int = MetaTensor(hu.as_tensor().round().to(torch.int16), affine=hu.affine)
    as_float = MetaTensor(as_int.as_tensor().float(), affine=hu.affine)
    for out_dims in (2, 3):
        cpr = StraightenCPR((24, 120), SP, 20.0, out_dims=out_dims)
        a, b = cpr(as_int, tube.curve), cpr(as_float, tube.curve)
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a.as_tensor(), b.as_tensor(), atol=1e-3, rtol=0)
        assert float(a.std()) > 50  # not a constant image
    # a non-contiguous int16 view is read in place (no copy of the whole volume)
    big = torch.zeros(1, 48, 48, 96, dtype=torch.int16)[..., ::2]
    big[:] = as_int.as_tensor()
    view = MetaTensor(big, affine=hu.affine)
    assert not view.is_contiguous()
    torch.testing.assert_close(StraightenCPR((24, 120), SP)(view, tube.curve).as_tensor(),
                               StraightenCPR((24, 120), SP)(as_float, tube.curve).as_tensor(), atol=1e-3, rtol=0)


def test_several_centerlines_in_one_call_equal_the_single_calls(tubes, tmp_path):
    tube_o, hu, lab = tubes["oblique"]
    lines = [tube_o.curve, tube_o.curve[::-1].copy(), oblique_points((10.0, 20.0, 8.0), (22.0, 9.0, 20.0))]
    for out_dims in (2, 3):
        cpr = StraightenCPR((16, 96), SP, 15.0, out_dims=out_dims)
        many = cpr(hu, lines)
        assert isinstance(many, list) and len(many) == 3
        for out, line in zip(many, lines):
            single = cpr(hu, line)
            assert torch.equal(out.as_tensor(), single.as_tensor())
            torch.testing.assert_close(out.meta["scpr_grid_world"], single.meta["scpr_grid_world"], equal_nan=True)
        assert not torch.equal(many[0].as_tensor(), many[1].as_tensor())
    stacked = StraightenCPR((16, 96), SP)(hu, np.stack([tube_o.curve, tube_o.curve[::-1]]))  # (K, N, 3)
    assert len(stacked) == 2
    d = StraightenCPRd(("image", "label"), output_size=(16, 96), spacing=SP, mode=("bilinear", "nearest"),
                       padding_value=(-1024.0, 0))({"image": hu, "label": lab, "centerline": lines})
    assert len(d["image"]) == len(d["label"]) == 3
    for k, line in enumerate(lines):
        torch.testing.assert_close(d["image"][k].as_tensor(), StraightenCPR((16, 96), SP)(hu, line).as_tensor())
        assert torch.equal(d["label"][k].as_tensor(),
                           StraightenCPR((16, 96), SP, mode="nearest", padding_value=0)(lab, line).as_tensor())
    with pytest.raises(ValueError, match="centreline 1 of 2"):
        StraightenCPR((16, 96), SP)(hu, [tube_o.curve, np.array([[1.0, 1, 1]] * 3)])


def test_threads_are_chosen_for_the_work_and_restored(monkeypatch):
    before = torch.get_num_threads()
    with scpr_sampling.sampling_threads(10):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setattr(scpr_sampling, "free_cores", lambda: 1)  # the other cores are busy
    with scpr_sampling.sampling_threads(10**9, limit=8) as n:
        assert n == 1
    monkeypatch.setattr(scpr_sampling, "free_cores", lambda: 64)
    with scpr_sampling.sampling_threads(10**9, limit=2) as n:
        assert n == 2  # never more than the limit (torch's setting)
    assert torch.get_num_threads() == before
    assert 1 <= scpr_sampling.free_cores()


# ------------------------------------------------------------------------------------------------
# UnstraightenCPR
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int16])
def test_unchanged_scpr_gives_back_the_volume_exactly(tubes, out_dims, dtype):
    tube, hu, lab = tubes["helix"]
    vol = MetaTensor(hu.as_tensor().round().to(dtype), affine=hu.affine, meta={"filename_or_obj": "ct.nii.gz"})
    scpr = StraightenCPR((24, 120), SP, 40.0, out_dims=out_dims)(vol, tube.curve)
    back = UnstraightenCPR("bilinear")(vol, scpr.clone(), scpr)
    assert isinstance(back, MetaTensor) and back.dtype == dtype and torch.equal(back.as_tensor(), vol.as_tensor())
    assert torch.equal(back.affine, vol.affine) and back.meta["filename_or_obj"] == "ct.nii.gz"
    lab_scpr = StraightenCPR((24, 120), SP, 40.0, "nearest", 0, out_dims)(lab, tube.curve)
    assert torch.equal(UnstraightenCPR("nearest")(lab, lab_scpr, lab_scpr).as_tensor(), lab.as_tensor())


@pytest.mark.parametrize("name, angle", [("oblique", 0.0), ("oblique", 70.0), ("helix", 130.0)])
def test_a_band_painted_into_the_scpr_lands_at_its_world_positions(tubes, name, angle):
    tube, hu, _ = tubes[name]
    cpr = StraightenCPR((32, 120), SP, angle, padding_value=-1024.0)
    scpr = cpr(hu, tube.curve)
    edited = scpr.clone()
    rows, cols = slice(20, 26), slice(30, 70)  # a band beside the lumen
    edited[:, rows, cols] += 500.0
    back = UnstraightenCPR()(hu, edited, scpr)
    change = (back - hu).as_tensor()[0].double()
    assert float(change.min()) >= 0.0 and float(change.max()) <= 500.0 + 1e-3
    world = voxel_world(hu.shape[1:], hu.affine.numpy())
    moved = change.numpy() > 5.0
    rr, cc = np.meshgrid(np.arange(20, 26), np.arange(30, 70), indexing="ij")
    painted = scpr_to_world(scpr, np.stack([rr, cc], -1).reshape(-1, 2)).numpy()
    # every changed voxel lies within one voxel of a painted pixel, and every painted pixel has one nearby
    d_vox = np.linalg.norm(world[moved][:, None] - painted[None], axis=-1).min(1)
    assert d_vox.max() <= math.sqrt(3) * VOX
    d_pix = np.linalg.norm(painted[:, None] - world[moved][None], axis=-1).min(1)
    assert d_pix.max() <= math.sqrt(3) * VOX / 2 + 1e-9
    w = change.numpy()[moved]
    centroid = (world[moved] * w[:, None]).sum(0) / w.sum()
    assert np.linalg.norm(centroid - painted.mean(0)) < VOX
    # far from the band nothing changed, and straightening the new volume shows the band again
    assert np.count_nonzero(change.numpy()) < 4 * painted.shape[0]
    again = cpr(back, tube.curve)
    assert float((again - scpr)[0, 21:25, 32:68].mean()) > 400.0
    assert torch.equal(again[0, :12], scpr[0, :12])  # rows more than two voxels away are untouched


def test_labels_keep_their_values(tubes):
    tube, _, lab = tubes["oblique"]
    cpr = StraightenCPR((32, 120), SP, 25.0, "nearest", 0, dtype=torch.uint8)
    scpr = cpr(lab, tube.curve)
    edited = scpr.clone()
    edited[:, 12:20, 40:80] = torch.where(edited[:, 12:20, 40:80] == 1, 3, edited[:, 12:20, 40:80])  # lumen -> 3
    back = UnstraightenCPR("nearest")(lab, edited, scpr)
    assert back.dtype == lab.dtype
    assert set(torch.unique(back).tolist()) == {0, 1, 2, 3}
    assert torch.equal(back.as_tensor()[lab.as_tensor() != 1], lab.as_tensor()[lab.as_tensor() != 1])
    again = cpr(back, tube.curve)
    agree = float((again[:, 13:19, 42:78] == edited[:, 13:19, 42:78]).float().mean())  # away from the window's edge
    assert agree > 0.97, agree
    assert torch.equal(again[:, :, :30], scpr[:, :, :30])


def test_dictionary_version_and_several_scprs(tubes):
    tube, hu, lab = tubes["oblique"]
    lines = [tube.curve, oblique_points((10.0, 20.0, 8.0), (22.0, 9.0, 20.0))]
    scprs = StraightenCPR((16, 96), SP)(hu, lines)
    edited = [s + 100.0 for s in scprs]
    one = UnstraightenCPR()(UnstraightenCPR()(hu, edited[0], scprs[0]), edited[1], scprs[1])
    both = UnstraightenCPR()(hu, edited, scprs)
    assert torch.equal(one.as_tensor(), both.as_tensor())
    d = UnstraightenCPRd("image", "cf", "scpr", output_keys="image_cf")({"image": hu, "cf": edited, "scpr": scprs})
    assert torch.equal(d["image_cf"].as_tensor(), both.as_tensor()) and d["image"] is hu


def test_unstraighten_errors(tubes):
    tube, hu, _ = tubes["oblique"]
    scpr = StraightenCPR((16, 96), SP)(hu, tube.curve)
    bare = StraightenCPR((16, 96), SP, record_grid=False)(hu, tube.curve)
    with pytest.raises(ValueError, match="record_grid=True"):
        UnstraightenCPR()(hu, bare + 1.0, bare)
    with pytest.raises(ValueError, match=r"shape \(1, 16, 95\)"):
        UnstraightenCPR()(hu, scpr[..., :95], scpr)
    with pytest.raises(ValueError, match="pair up"):
        UnstraightenCPR()(hu, [scpr, scpr], [scpr])
    with pytest.raises(ValueError, match="mode"):
        UnstraightenCPR("cubic")
    with pytest.raises(KeyError, match="'cf'"):
        UnstraightenCPRd("image", "cf", "scpr")({"image": hu, "scpr": scpr})


def test_rotated_volume_round_trip(tubes):
    tube, _, _ = tubes["helix"]
    aff = rotated_affine((40, 40, 40), (0.6, 0.55, 0.65), (12.0, 12.0, 11.0))
    img, _ = tube.render((40, 40, 40), aff)
    scpr = StraightenCPR((24, 120), SP, 10.0, padding_value=0.0)(img, tube.curve)
    assert torch.equal(UnstraightenCPR()(img, scpr, scpr).as_tensor(), img.as_tensor())
    edited = scpr.clone()
    edited[:, 2:6, 40:80] = 3.0
    back = UnstraightenCPR()(img, edited, scpr)
    again = StraightenCPR((24, 120), SP, 10.0, padding_value=0.0)(back, tube.curve)
    assert float(again[0, 3:5, 45:75].mean()) > 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_matches_cpu_under_autocast(tubes):
    cases = [(tubes[n][1], tubes[n][0].curve) for n in ("oblique", "helix")]
    cpr = StraightenCPR((24, 112), SP, 20.0, out_dims=3)
    cpu = [cpr(img, line) for img, line in cases]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = cpr.batch([img.cuda() for img, _ in cases], [line for _, line in cases])
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda" and b.dtype == torch.float32
        torch.testing.assert_close(b.cpu().as_tensor(), a.as_tensor(), atol=1e-2, rtol=0)


def test_batch_on_cpu_equals_single_calls(tubes):
    cases = [(tubes[n][1], [tubes[n][0].curve]) for n in ("oblique", "helix")]
    cpr = StraightenCPR((16, 96), SP)
    out = cpr.batch([img for img, _ in cases], [lines for _, lines in cases])
    for (img, lines), res in zip(cases, out):
        assert isinstance(res, list) and torch.equal(res[0].as_tensor(), cpr(img, lines[0]).as_tensor())
    with pytest.raises(ValueError, match="pair up"):
        cpr.batch([cases[0][0]], [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu(tubes):
    tube, img, lab = tubes["oblique"]
    tr = StraightenCPRd(keys=("image", "label"), output_size=(32, 112), spacing=SP, angle=25.0,
                        mode=("bilinear", "nearest"), padding_value=(0.0, 0))
    cpu = tr({"image": img, "label": lab, "centerline": tube.curve})
    gpu = tr({"image": img.cuda(), "label": lab.cuda(), "centerline": tube.curve})
    assert gpu["image"].device.type == "cuda"
    torch.testing.assert_close(gpu["image"].cpu().as_tensor(), cpu["image"].as_tensor(), atol=1e-2, rtol=0)  # HU
    mismatch = (gpu["label"].cpu().as_tensor() != cpu["label"].as_tensor()).float().mean()
    assert mismatch < 1e-3  # nearest may break exact ties differently


def test_non_finite_voxels_are_refused_only_where_sampled(tubes):
    tube, hu, _ = tubes["oblique"]
    bad = hu.clone()
    bad[0, 0, 0, 0] = float("nan")  # far from the vessel: never read
    cpr = StraightenCPR((16, 96), SP)
    torch.testing.assert_close(cpr(bad, tube.curve).as_tensor(), cpr(hu, tube.curve).as_tensor())
    point = np.round(tube.point_at(10.0) / VOX).astype(int)
    bad[0, point[0], point[1], point[2]] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or infinite voxels where the sCPR samples it \(\d+ of 1536"):
        cpr(bad, tube.curve)
