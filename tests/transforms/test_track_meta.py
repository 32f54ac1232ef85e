"""Every transform of monai-cft under ``monai.data.set_track_meta(False)``: plain tensors out, same values.

MONAI users switch metadata tracking off for speed (e.g. inside a ``CacheDataset`` of tensors); a
transform must then return plain tensors with exactly the values it returns with tracking on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, set_track_meta

from monai_cft.transforms import (
    HUWindow,
    HUWindowd,
    RegionMasks,
    RegionMasksd,
    StraightenCPR,
    StraightenCPRd,
    StructureMeasures,
    UnstraightenCPR,
)
from monai_cft.transforms.parents import NormalizeParents, NormalizeParentsd


@pytest.fixture
def untracked():
    set_track_meta(False)
    yield
    set_track_meta(True)


def _volume() -> MetaTensor:
    """A 24 x 24 x 40 volume at 0.5 mm with a bright straight tube along z."""
    x, y, z = torch.meshgrid(*(torch.arange(n) * 0.5 for n in (24, 24, 40)), indexing="ij")
    hu = torch.where((x - 6.0) ** 2 + (y - 6.0) ** 2 < 4.0, 400.0, -50.0) + z  # a ramp along z
    return MetaTensor(hu[None].float(), affine=torch.diag(torch.tensor([0.5, 0.5, 0.5, 1.0], dtype=torch.float64)))


LINE = np.stack([np.full(30, 6.0), np.full(30, 6.0), np.linspace(2.0, 17.0, 30)], 1)

CASES = [
    pytest.param(lambda: HUWindow(), lambda: MetaTensor(torch.linspace(-500, 1500, 50)[None, None]), id="HUWindow"),
    pytest.param(lambda: HUWindow().inverse, lambda: MetaTensor(torch.linspace(-1, 1, 50)[None, None]), id="HUWindow.inverse"),
    pytest.param(lambda: RegionMasks(), lambda: MetaTensor(torch.zeros(1, 8, 30)), id="RegionMasks"),
    pytest.param(lambda: RegionMasks(units="mm", boundaries=(3.0, 6.0)),
                 lambda: MetaTensor(torch.zeros(1, 8, 30), affine=torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0]))),
                 id="RegionMasks-mm"),
    pytest.param(lambda: (lambda img: StraightenCPR((12, 28), 0.5)(img, LINE)), _volume, id="StraightenCPR-2d"),
    pytest.param(lambda: (lambda img: StraightenCPR((12, 28), 0.5, out_dims=3)(img, LINE)), _volume, id="StraightenCPR-3d"),
    pytest.param(lambda: NormalizeParents({"a": [0.0, 10.0], "b": [1.0, 3.0]}, ["a", "b"]),
                 lambda: MetaTensor(torch.tensor([[5.0, 2.0], [0.0, 3.0]])), id="NormalizeParents"),
]


def _plain(x):
    return x.as_tensor() if isinstance(x, MetaTensor) else x


@pytest.mark.parametrize("make, data", CASES)
def test_plain_tensors_and_the_same_values_without_metadata_tracking(make, data, untracked):
    set_track_meta(True)
    tracked = make()(data())
    set_track_meta(False)
    plain = make()(data())
    assert type(plain) is torch.Tensor, type(plain)
    assert torch.equal(plain, _plain(tracked))


DICT_CASES = [
    pytest.param(lambda: HUWindowd("image"), lambda: {"image": MetaTensor(torch.linspace(-500, 1500, 50)[None])}, "image",
                 id="HUWindowd"),
    pytest.param(lambda: RegionMasksd("image", output_key="regions"), lambda: {"image": MetaTensor(torch.zeros(1, 8, 30))},
                 "regions", id="RegionMasksd"),
    pytest.param(lambda: StraightenCPRd("image", "centerline", (12, 28), 0.5),
                 lambda: {"image": _volume(), "centerline": LINE}, "image", id="StraightenCPRd"),
    pytest.param(lambda: NormalizeParentsd("v", {"a": [0.0, 10.0]}, ["a"], output_keys="p"),
                 lambda: {"v": MetaTensor(torch.tensor([4.0]))}, "p", id="NormalizeParentsd"),
]


@pytest.mark.parametrize("make, data, key", DICT_CASES)
def test_dictionary_transforms_without_metadata_tracking(make, data, key, untracked):
    set_track_meta(True)
    tracked = make()(data())[key]
    set_track_meta(False)
    plain = make()(data())[key]
    assert type(plain) is torch.Tensor, type(plain)
    assert torch.equal(plain, _plain(tracked))


def test_measures_need_no_metadata(untracked):
    label = torch.zeros(1, 8, 30)
    label[0, 2:4, :] = 1
    label[0, 4, 12:15] = 2
    masks = RegionMasks()(label)
    assert type(masks) is torch.Tensor
    values = StructureMeasures({"lumen": 1, "calcified": 2}, element_size=0.25)(label, masks)
    assert values["lumen_mid"] == pytest.approx(20 * 0.25) and values["calcified_mid"] == pytest.approx(3 * 0.25)


def test_writing_back_without_the_recorded_grid_is_a_clear_error(untracked):
    vol = _volume()
    scpr = StraightenCPR((12, 28), 0.5, record_grid=True)(vol, LINE)  # untracked: no grid travels with it
    assert type(scpr) is torch.Tensor
    with pytest.raises((ValueError, TypeError, KeyError), match="grid|MetaTensor|meta"):
        UnstraightenCPR()(vol, scpr, scpr)
