"""The guidance-loss factory: one place maps a CFT mode to its loss; the trainer never sees mode names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import monai_cft.engines.guidance as guidance
from monai_cft.engines.guidance import GUIDANCE_BUILDERS, build_guidance_loss
from monai_cft.constants import CFT_MODES
from monai_cft.losses import RegressorGuidanceLoss, SegmentorGuidanceLoss, ranges_to_scales

STRUCTURES = {"lumen": 1, "calcified": 2}
REGIONS = ("proximal", "mid", "distal")
NAMES = [f"{s}_{r}" for s in STRUCTURES for r in REGIONS]
RANGES = {n: [0.0, 10.0 * (i + 1)] for i, n in enumerate(NAMES)}


@pytest.fixture
def spec(monkeypatch):
    loaded = []

    def fake_segmentor(path, expect=None):
        loaded.append(("segmentor", path, dict(expect or {})))
        return nn.Conv2d(1, 3, 1)

    def fake_regressor(path, expect=None):
        loaded.append(("regressor", path, dict(expect or {})))
        return nn.Sequential(nn.Flatten(), nn.Linear(4 * 12, 2 * len(NAMES)))

    monkeypatch.setattr(guidance, "load_segmentor", fake_segmentor)
    monkeypatch.setattr(guidance, "load_regressor", fake_regressor)
    masks = torch.zeros(3, 4, 12)
    for k in range(3):
        masks[k, :, 4 * k : 4 * k + 4] = 1.0
    return loaded, {
        "structures": STRUCTURES, "variables": NAMES, "ranges": RANGES, "region_masks": masks,
        "element_size": 0.25, "segmentor_path": "seg.pt", "regressor_path": "reg.pt",
        "expect": {"preset": "quick"}, "train_variables": [[1.0] * 6, [3.0] * 6, [5.0] * 6],
        "seg_guidance_weight": 30.0,
    }


def test_every_mode_has_a_builder():
    assert tuple(GUIDANCE_BUILDERS) == CFT_MODES


def test_each_mode_builds_its_loss(spec):
    loaded, kw = spec
    assert build_guidance_loss("none", **kw) is None
    assert loaded == []
    reg = build_guidance_loss("reg", **kw)
    assert isinstance(reg, RegressorGuidanceLoss) and reg.num_outputs == len(NAMES)
    assert loaded == [("regressor", "reg.pt", {"preset": "quick"})]  # no segmentor loaded for Reg-CFT
    seg = build_guidance_loss("seg", **kw)
    assert isinstance(seg, SegmentorGuidanceLoss) and seg.num_regions == 1
    pos = build_guidance_loss("pos_seg", **kw)
    assert isinstance(pos, SegmentorGuidanceLoss) and pos.num_regions == 3
    assert loaded[-1] == ("segmentor", "seg.pt", {"role": "guidance", "preset": "quick"})
    # the weight divides the per-variable scales (the observed ranges for Pos-Seg-CFT)
    torch.testing.assert_close(pos.scales, ranges_to_scales(RANGES, NAMES) / 30.0)
    for loss in (reg, seg, pos):
        loss.check_parents(len(NAMES))


def test_from_parents_maps_normalized_parents(spec):
    _, kw = spec
    pos = build_guidance_loss("pos_seg", **kw)
    low = torch.tensor([RANGES[n][0] for n in NAMES])
    high = torch.tensor([RANGES[n][1] for n in NAMES])
    x = torch.randn(2, 1, 4, 12)
    phys = torch.rand(2, len(NAMES)) * high
    norm = (phys - low) / (high - low) * 2.0 - 1.0
    torch.testing.assert_close(pos.from_parents(x, norm, low, high), pos(x, phys))
    seg = build_guidance_loss("seg", **kw)
    totals = phys.view(2, 2, 3).sum(-1)
    torch.testing.assert_close(seg.from_parents(x, norm, low, high), seg(x, totals))


def test_bad_requests(spec):
    _, kw = spec
    with pytest.raises(ValueError, match=r"unknown cft_mode 'posseg'"):
        build_guidance_loss("posseg", **kw)
    with pytest.raises(ValueError, match="regressor_path"):
        build_guidance_loss("reg", **dict(kw, regressor_path=None))
    with pytest.raises(ValueError, match="region_masks"):
        build_guidance_loss("pos_seg", **dict(kw, region_masks=None))
    with pytest.raises(ValueError, match="seg_guidance_weight"):
        build_guidance_loss("pos_seg", **dict(kw, seg_guidance_weight=0.0))
    with pytest.raises(ValueError, match="measures 3 regions"):
        build_guidance_loss("pos_seg", **kw).check_parents(4)
