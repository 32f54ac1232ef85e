"""Tests of RegionMasks / RegionMasksd: positional splits (fractions, mm) and region maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cft.transforms import RegionMasks, RegionMasksd


def image(shape, spacing=None, affine=None) -> MetaTensor:
    if affine is None:
        affine = np.diag([*(spacing or [1.0] * len(shape)), *([1.0] * (4 - len(shape)))])
    return MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(affine))


def check_partition(masks: torch.Tensor, k: int, spatial) -> None:
    assert masks.shape == (k, *spatial)
    assert set(torch.unique(masks).tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(0), torch.ones(spatial))  # every pixel in exactly one region


def region_index(masks: torch.Tensor) -> torch.Tensor:
    return masks.argmax(0)


@pytest.mark.parametrize(
    "spatial, axis",
    [((64, 384), -1), ((10, 7), 0), ((5, 6, 10), -1), ((11, 4, 9), 0), ((6, 13, 5), 1)],
)
def test_fraction_thirds_follow_pixel_centres_in_2d_and_3d(spatial, axis):
    masks = RegionMasks(axis=axis)(image(spatial))
    check_partition(masks, 3, spatial)
    n = spatial[axis]
    centres = (np.arange(n) + 0.5) / n
    expected = (centres >= 1 / 3).astype(int) + (centres >= 2 / 3).astype(int)
    idx = region_index(masks).movedim(axis, 0).reshape(n, -1)
    assert torch.equal(idx, torch.as_tensor(expected).unsqueeze(1).expand_as(idx))
    assert masks.meta["region_names"] == ["proximal", "mid", "distal"]


def test_known_region_sizes():
    assert RegionMasks()(image((2, 384)))[:, 0].sum(1).tolist() == [128, 128, 128]
    assert RegionMasks()(image((2, 10)))[:, 0].sum(1).tolist() == [3, 4, 3]  # centres .05...95 vs 1/3, 2/3
    four = RegionMasks(boundaries=(0.25, 0.5, 0.75), names=("a", "b", "c", "d"))(image((3, 8, 20), [1, 1, 1]))
    check_partition(four, 4, (3, 8, 20))
    assert four[:, 0, 0].sum(1).tolist() == [5, 5, 5, 5]
    # a pixel centre exactly on a boundary belongs to the upper region: (j + 0.5) / 4 = 0.375 for j = 1
    assert RegionMasks(boundaries=(0.375,), names=("lo", "hi"))(image((1, 4)))[:, 0].sum(1).tolist() == [1, 3]


@pytest.mark.parametrize("spatial, spacing, axis", [((32, 384), (0.3, 0.25), -1), ((40, 12, 30), (0.7, 0.5, 0.4), 0)])
def test_mm_boundaries_use_the_pixel_spacing(spatial, spacing, axis):
    pix = spacing[axis]
    length = spatial[axis] * pix
    bounds = (0.3 * length, 0.55 * length)
    masks = RegionMasks(boundaries=bounds, units="mm", axis=axis, names=("p", "m", "d"))(image(spatial, spacing))
    check_partition(masks, 3, spatial)
    centres = (np.arange(spatial[axis]) + 0.5) * pix
    expected = np.searchsorted(np.asarray(bounds), centres, side="right")
    idx = region_index(masks).movedim(axis, 0).reshape(spatial[axis], -1)[:, 0]
    assert idx.tolist() == expected.tolist()
    # the same split given as fractions of the length is identical
    frac = RegionMasks(boundaries=(0.3, 0.55), axis=axis, names=("p", "m", "d"))(image(spatial, spacing))
    assert torch.equal(frac.as_tensor(), masks.as_tensor())


def test_mm_boundaries_on_an_scpr_and_a_rotated_affine():
    # 96 mm sCPR at 0.25 mm: proximal = first 30 mm of arc length, mid = next 30 mm
    masks = RegionMasks(boundaries=(30.0, 60.0), units="mm", names=("proximal", "mid", "distal"))(
        image((64, 384), [0.25, 0.25])
    )
    assert masks[:, 0].sum(1).tolist() == [120, 120, 144]
    # the spacing of a rotated, anisotropic affine is the length of its columns
    a = math.radians(35)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 0.5, 2.0])
    aff[:3, 3] = (10, -4, 3)
    rot_masks = RegionMasks(boundaries=(6.0,), units="mm", axis=1, names=("a", "b"))(image((4, 20, 3), affine=aff))
    assert rot_masks[:, 0, :, 0].sum(1).tolist() == [12, 8]  # (j + 0.5) * 0.5 < 6 for j < 11.5
    assert torch.allclose(rot_masks.affine, torch.as_tensor(aff))


def test_map_mode_one_mask_per_listed_value():
    rng = np.random.default_rng(0)
    rmap = torch.as_tensor(rng.integers(1, 4, size=(1, 9, 7, 5)))
    masks = RegionMasks(region_values=(3, 1, 2), names=("c", "a", "b"))(rmap)
    check_partition(masks, 3, (9, 7, 5))
    for k, v in enumerate((3, 1, 2)):
        assert torch.equal(masks[k], (rmap[0] == v).float())
    # float maps with integer values (as LoadImage gives them) work the same way
    assert torch.equal(RegionMasks(region_values=(3, 1, 2))(rmap.float()).as_tensor(), masks.as_tensor())
    assert RegionMasks(region_values=(3, 1, 2))(rmap).meta["region_names"] == ["region_3", "region_1", "region_2"]
    assert RegionMasks(boundaries=(0.5,))(rmap).meta["region_names"] == ["region_0", "region_1"]
    assert RegionMasks(boundaries=(1 / 3, 2 / 3))(rmap).meta["region_names"] == ["proximal", "mid", "distal"]
    assert RegionMasks(boundaries=(0.2, 0.6))(rmap).meta["region_names"] == ["region_0", "region_1", "region_2"]


def test_map_mode_unlisted_values():
    rmap = torch.tensor([[[0, 1, 2], [2, 5, 1]]])
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        RegionMasks(region_values=(1, 2), names=("a", "b"))(rmap)
    masks = RegionMasks(region_values=(1, 2), names=("a", "b"), unlisted="ignore")(rmap)
    assert masks.sum(0).tolist() == [[0, 1, 1], [1, 0, 1]]
    with pytest.raises(ValueError, match="integer"):
        RegionMasks(region_values=(1, 2))(rmap.float() + 0.5)
    # values beyond a small integer dtype's range are compared without overflow (300 != 44 in uint8)
    small = torch.tensor([[[44, 1], [1, 44]]], dtype=torch.uint8)
    assert RegionMasks(region_values=(300, 1, 44), unlisted="ignore")(small)[0].sum() == 0
    with pytest.raises(ValueError, match="one channel"):
        RegionMasks(region_values=(1, 2))(torch.zeros(2, 3, 3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(boundaries=(0.6, 0.3), names=("a", "b", "c")), "strictly increasing"),
        (dict(boundaries=(0.3, 0.3), names=("a", "b", "c")), "strictly increasing"),
        (dict(boundaries=(0.0, 0.5), names=("a", "b", "c")), r"\(0, 1\)"),
        (dict(boundaries=(0.5, 1.0), names=("a", "b", "c")), r"\(0, 1\)"),
        (dict(boundaries=(-2.0, 5.0), units="mm", names=("a", "b", "c")), "> 0"),
        (dict(boundaries=(0.5,), names=("a", "b", "c")), "2 regions need 2 names"),
        (dict(region_values=(1, 2), names=("a",)), "2 regions need 2 names"),
        (dict(names=("a", "b")), "3 names"),
        (dict(names=("a", "a", "b")), "distinct"),
        (dict(units="cm"), "units"),
        (dict(boundaries=(0.5,), region_values=(1, 2)), "not both"),
        (dict(region_values=(1, 1)), "distinct"),
        (dict(region_values=(1.5, 2)), "ints"),
        (dict(unlisted="drop"), "unlisted"),
        (dict(boundaries=(float("nan"),), names=("a", "b")), "finite"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegionMasks(**kwargs)


def test_invalid_calls():
    with pytest.raises(ValueError, match="axis 2"):
        RegionMasks(axis=2)(image((4, 5)))
    with pytest.raises(ValueError, match="axis -4"):
        RegionMasks(axis=-4)(image((4, 5, 6)))
    with pytest.raises(ValueError, match=r"inside \(0, 96"):
        RegionMasks(boundaries=(30.0, 100.0), units="mm", names=("a", "b", "c"))(image((8, 384), [0.25, 0.25]))
    with pytest.raises(TypeError, match="MetaTensor"):
        RegionMasks(boundaries=(3.0,), units="mm", names=("a", "b"))(torch.zeros(1, 4, 8))
    with pytest.raises(TypeError, match="axis"):
        RegionMasks(axis=1.0)


def test_dict_version_and_geometry_kept():
    aff = np.diag([0.25, 0.25, 1.0, 1.0])
    aff[:2, 3] = (3.0, -2.0)
    d = {"image": image((16, 48), affine=aff)}
    out = RegionMasksd(keys="image", output_key="regions")(d)
    check_partition(out["regions"], 3, (16, 48))
    assert torch.allclose(out["regions"].affine, torch.as_tensor(aff))
    assert out["image"] is d["image"]
    two = RegionMasksd(keys=("image", "other"), output_key=("r1", "r2"), boundaries=(0.5,), names=("a", "b"))(
        {"image": image((4, 6)), "other": image((3, 3, 8))}
    )
    assert two["r1"].shape == (2, 4, 6) and two["r2"].shape == (2, 3, 3, 8)
    with pytest.raises(ValueError, match="own output key"):
        RegionMasksd(keys=("image", "other"), output_key="regions")


def test_region_windows_cover_each_region_with_context():
    from monai_cft.transforms.regions import context_pixels, region_window_shape, region_windows

    masks = RegionMasks()(torch.zeros(1, 32, 192))  # thirds of 64 columns
    wins = region_windows(masks, context=4)
    assert [(w[0].start, w[0].stop) for w in wins] == [(0, 32)] * 3  # 32 + 8 capped at the image height
    assert [(w[1].start, w[1].stop) for w in wins] == [(0, 72), (60, 132), (120, 192)]
    assert region_window_shape(masks, 4) == [32, 72] and region_window_shape(masks, None) == [32, 192]
    for k, w in enumerate(wins):  # every window holds its whole region
        assert masks[k][w].sum() == masks[k].sum()
    assert [w[1].stop - w[1].start for w in region_windows(masks, context=5)] == [80] * 3  # multiple of 8
    assert [w[1].stop - w[1].start for w in region_windows(masks, context=100)] == [192] * 3  # capped
    assert context_pixels(2.0, 0.5) == 4 and context_pixels(None, 0.5) is None
    with pytest.raises(ValueError, match="context"):
        region_windows(masks, context=-1)
    with pytest.raises(ValueError, match="region 1 .* empty"):
        region_windows(torch.stack([masks[0], torch.zeros_like(masks[0])]), context=2)
    with pytest.raises(ValueError, match="spacing"):
        context_pixels(2.0, 0.0)


def test_an_axis_too_short_for_the_regions_is_an_error():
    with pytest.raises(ValueError, match=r"regions \['mid'\] get no pixel of spatial axis 1 \(2 pixels\)"):
        RegionMasks()(torch.zeros(1, 8, 2))
    assert RegionMasks()(torch.zeros(1, 8, 3)).sum((1, 2)).tolist() == [8.0, 8.0, 8.0]
