"""HUWindow / HUWindowd: the networks' intensity window, its inverse, and its agreement with MONAI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRange

from monai_cft.constants import HU_WINDOW
from monai_cft.transforms import HUWindow, HUWindowd

HU = torch.tensor([-1000.0, -300.0, 400.0, 1100.0, 3000.0])

VALID = [
    pytest.param(HU_WINDOW, HU, [-1.0, -1.0, 0.0, 1.0, 1.0], id="default-window"),
    pytest.param((0, 100), torch.tensor([-5.0, 0.0, 25.0, 100.0, 150.0]), [-1.0, -1.0, -0.5, 1.0, 1.0], id="int-window"),
    pytest.param([-1024.0, 3071.0], torch.tensor([-1024.0, 1023.5, 3071.0]), [-1.0, 0.0, 1.0], id="list-window"),
]


@pytest.mark.parametrize("window, hu, expected", VALID)
def test_forward_clips_and_maps_to_minus_one_one(window, hu, expected):
    out = HUWindow(window)(hu)
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-6, rtol=0)
    back = HUWindow(window).inverse(out)
    lo, hi = (float(v) for v in window)
    torch.testing.assert_close(back, hu.clamp(lo, hi), atol=1e-3, rtol=0)


def test_the_same_float32_values_as_monai_scale_intensity_range():
    x = torch.cat([torch.linspace(-400, 1200, 200_001), torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 600])
    lo, hi = HU_WINDOW
    monai = ScaleIntensityRange(lo, hi, -1.0, 1.0, clip=True)(MetaTensor(x))
    ours = HUWindow()(MetaTensor(x))
    assert isinstance(ours, MetaTensor) and ours.dtype == torch.float32
    assert torch.equal(ours.as_tensor(), monai.as_tensor())  # bit for bit: the bundle's training data is unchanged


def test_numpy_in_numpy_out_and_metadata_kept():
    arr = HU.numpy()
    out = HUWindow()(arr)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, HUWindow()(HU).numpy())
    img = MetaTensor(HU[None], affine=torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0])), meta={"case": "a"})
    out = HUWindow()(img)
    assert out.meta["case"] == "a" and torch.equal(out.affine, img.affine)
    assert HUWindow().hu_per_unit == 700.0


def test_dictionary_version_maps_the_keys_and_inverts():
    d = HUWindowd(["image", "other"], allow_missing_keys=True)({"image": HU.clone(), "label": torch.ones(3)})
    torch.testing.assert_close(d["image"], HUWindow()(HU))
    assert torch.equal(d["label"], torch.ones(3)) and "other" not in d
    back = HUWindowd("image", inverse=True)(d)
    torch.testing.assert_close(back["image"], HU.clamp(*HU_WINDOW), atol=1e-3, rtol=0)
    with pytest.raises(KeyError):
        HUWindowd("missing")({"image": HU})


@pytest.mark.parametrize(
    "window, shown",
    [
        pytest.param((100, -100), "(100, -100)", id="reversed"),
        pytest.param((5, 5), "(5, 5)", id="empty"),
        pytest.param((0, math.nan), "nan", id="nan"),
        pytest.param((-math.inf, 10), "inf", id="inf"),
        pytest.param((0, 1, 2), "(0, 1, 2)", id="three-values"),
        pytest.param("wide", "wide", id="text"),
        pytest.param(None, "None", id="none"),
    ],
)
def test_bad_windows_are_refused_naming_them(window, shown):
    with pytest.raises(ValueError, match="hu_window") as err:
        HUWindow(window)
    assert shown in str(err.value)
