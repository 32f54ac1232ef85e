"""Tests of StructureMeasures / StructureMeasuresd against analytic areas and volumes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cft.transforms import RegionMasks, StructureMeasures, StructureMeasuresd
from monai_cft.variables import variable_names


def meta(x, spacing) -> MetaTensor:
    spatial = x.ndim - 1
    return MetaTensor(x, affine=torch.as_tensor(np.diag([*spacing, *([1.0] * (4 - spatial))])))


def rectangles_label():
    """(1, 40, 90) label at 0.5 x 0.2 mm: rectangles with hand-computed per-third areas."""
    lab = torch.zeros(1, 40, 90, dtype=torch.uint8)
    lab[0, 10:30, :] = 1  # lumen band: 20 rows x 30 columns per third
    lab[0, 12:16, 20:40] = 2  # calcified: 4 x 10 in the first third (cols 20-29), 4 x 10 in the mid
    lab[0, 20:25, 70:90] = 3  # non-calcified: 5 x 20 in the distal third
    return meta(lab, (0.5, 0.2))


def expected_rectangles() -> dict[str, float]:
    px = 0.5 * 0.2
    return {
        "lumen_proximal": (600 - 40) * px, "lumen_mid": (600 - 40) * px, "lumen_distal": (600 - 100) * px,
        "calcified_proximal": 40 * px, "calcified_mid": 40 * px, "calcified_distal": 0.0,
        "noncalcified_proximal": 0.0, "noncalcified_mid": 0.0, "noncalcified_distal": 100 * px,
    }


def test_label_map_areas_per_region_are_exact():
    lab = rectangles_label()
    regions = RegionMasks()(lab)
    v = StructureMeasures()(lab, regions)
    assert list(v) == variable_names({"lumen": 1, "calcified": 2, "noncalcified": 3}, ("proximal", "mid", "distal"))
    for name, value in expected_rectangles().items():
        assert v[name] == pytest.approx(value, abs=1e-9), name
    tensor = StructureMeasures().measure(lab, regions)
    assert tensor.shape == (9,)
    assert torch.allclose(tensor, torch.tensor(list(v.values()), dtype=tensor.dtype))


def test_one_hot_and_probabilities_match_the_label_map_and_are_differentiable():
    lab = rectangles_label()
    regions = RegionMasks()(lab)
    onehot = torch.nn.functional.one_hot(lab[0].long(), 4).permute(2, 0, 1).float()
    v_map = StructureMeasures().measure(lab, regions)
    v_hot = StructureMeasures().measure(meta(onehot, (0.5, 0.2)), regions)
    assert torch.allclose(v_hot.double(), v_map, atol=1e-5)
    logits = torch.randn(4, 40, 90, requires_grad=True)
    probs = meta(torch.softmax(logits, 0), (0.5, 0.2))
    out = StructureMeasures().measure(probs, regions)
    assert out.requires_grad
    out[StructureMeasures().names.index("calcified_mid")].backward()
    assert logits.grad is not None and logits.grad[:, :, :30].abs().max() == 0  # proximal third untouched
    assert logits.grad[:, :, 30:60].abs().max() > 0


def test_disc_crossing_a_boundary_matches_the_analytic_area():
    # disc of radius 6 mm centred on the 1/2 boundary at 0.1 mm pixels: each half pi r^2 / 2
    n = 200
    c = (np.arange(n) + 0.5) * 0.1 - 10.0
    yy, xx = np.meshgrid(c, c, indexing="ij")
    lab = torch.as_tensor((xx**2 + yy**2 <= 36.0).astype(np.uint8))[None]
    lab = meta(lab, (0.1, 0.1))
    regions = RegionMasks(boundaries=(0.5,), names=("left", "right"))(lab)
    v = StructureMeasures({"lumen": 1}, ("left", "right"))(lab, regions)
    for name in ("lumen_left", "lumen_right"):
        assert abs(v[name] - math.pi * 18.0) / (math.pi * 18.0) < 0.005


def test_volumes_in_3d_and_global_measures():
    lab = torch.zeros(1, 30, 20, 12, dtype=torch.uint8)
    lab[0, 0:10, 5:15, 2:8] = 2  # 10 x 10 x 6 voxels of calcified in the first third of axis 0
    lab = meta(lab, (0.5, 0.4, 2.0))  # 0.4 mm^3 voxels
    regions = RegionMasks(axis=0)(lab)
    v = StructureMeasures(("calcified",), ("proximal", "mid", "distal"))(lab, regions)
    assert v == pytest.approx({"calcified_proximal": 600 * 0.4, "calcified_mid": 0.0, "calcified_distal": 0.0})
    glob = StructureMeasures(region_names=None)(lab)
    assert glob == pytest.approx({"lumen": 0.0, "calcified": 240.0, "noncalcified": 0.0})


def test_batched_path_for_losses_with_per_sample_spacing():
    lab = rectangles_label()
    regions = RegionMasks()(lab).as_tensor()
    onehot = torch.nn.functional.one_hot(lab[0].long(), 4).permute(2, 0, 1).float()
    batch = torch.stack([onehot, onehot.flip(-1)])
    sizes = torch.tensor([0.1, 0.2])
    out = StructureMeasures().measure_batch(batch, regions, sizes)
    assert out.shape == (2, 9)
    first = torch.tensor(list(expected_rectangles().values()))
    assert torch.allclose(out[0], first.float(), atol=1e-5)
    # flipped along W: proximal and distal swap, areas doubled by the pixel size
    flipped = first.view(3, 3).flip(1).flatten() * 2.0
    assert torch.allclose(out[1], flipped.float(), atol=1e-5)
    maps = StructureMeasures().measure_batch(torch.stack([lab.as_tensor(), lab.as_tensor()]), regions, 0.1)
    assert torch.allclose(maps[0], first.double(), atol=1e-9)


def test_dict_version_stores_tensor_and_named_floats():
    lab = rectangles_label()
    d = RegionMasks()(lab)
    data = StructureMeasuresd(keys="label")({"label": lab, "regions": d})
    assert data["variables"].dtype == torch.float32 and data["variables"].shape == (9,)
    for k, (name, value) in enumerate(expected_rectangles().items()):
        assert isinstance(data[name], float) and data[name] == pytest.approx(value, rel=1e-6)
        assert float(data["variables"][k]) == pytest.approx(value, rel=1e-6)
    glob = StructureMeasuresd(keys="label", region_names=None, output_key="areas")({"label": lab})
    assert glob["areas"].tolist() == pytest.approx([162.0, 8.0, 10.0], rel=1e-6)  # (1800 - 80 - 100) px


def test_errors():
    lab = rectangles_label()
    regions = RegionMasks()(lab)
    with pytest.raises(ValueError, match="unknown structure names"):
        StructureMeasures(("lumen", "wall"))
    with pytest.raises(ValueError, match="channels beyond"):
        StructureMeasures().measure(meta(torch.rand(3, 40, 90), (0.5, 0.2)), regions)
    with pytest.raises(ValueError, match="integer label map"):
        StructureMeasures().measure(meta(torch.rand(1, 40, 90), (0.5, 0.2)), regions)
    with pytest.raises(ValueError, match="region names"):
        StructureMeasures(region_names=("a", "b")).measure(lab, regions.as_tensor())
    with pytest.raises(ValueError, match="masks are of regions"):
        StructureMeasures(region_names=("a", "b", "c")).measure(lab, regions)
    with pytest.raises(ValueError, match="region masks are needed"):
        StructureMeasures().measure(lab)
    with pytest.raises(TypeError, match="element_size"):
        StructureMeasures().measure(lab.as_tensor(), regions.as_tensor())
    with pytest.raises(ValueError, match="do not match"):
        StructureMeasures().measure(lab, RegionMasks()(meta(torch.zeros(1, 40, 60), (0.5, 0.2))))
    with pytest.raises(ValueError, match="element_size"):
        StructureMeasures(element_size=0.0)
    with pytest.raises(ValueError, match="one label key"):
        StructureMeasuresd(keys=("label", "pred"))
    with pytest.raises(ValueError, match="clash"):
        StructureMeasuresd(keys="label", structures={"x": 1}, region_names=None, output_key="x")
    with pytest.raises(KeyError, match="regions"):
        StructureMeasuresd(keys="label")({"label": lab})
    # an explicit element size replaces the geometry of plain tensors
    v = StructureMeasures(element_size=0.1).measure(lab.as_tensor(), regions.as_tensor())
    assert torch.allclose(v, torch.tensor(list(expected_rectangles().values()), dtype=v.dtype))
