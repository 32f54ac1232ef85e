"""Guidance losses: analytic values on hand-made masks, frozen networks, reductions, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from monai_cft.losses import RegressorGuidanceLoss, SegmentorGuidanceLoss, ranges_to_scales

STRUCTURES = {"lumen": 1, "calcified": 2, "noncalcified": 3}


class ScaledIdentity(nn.Module):
    """Segmentor stand-in: returns its input (already probabilities) times a frozen-able gain."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.gain


def _probs() -> torch.Tensor:
    """(1, 4, 4, 6) one-hot probabilities with known areas per third of the 6 columns."""
    lab = torch.zeros(4, 6, dtype=torch.long)
    lab[1:3, 0:2] = 1  # lumen, proximal: 4 px
    lab[1:3, 2:6] = 1  # lumen, mid 4 px + distal 4 px
    lab[0, 3] = 2  # calcified, mid: 1 px
    lab[3, 4:6] = 3  # non-calcified, distal: 2 px
    lab[0, 0] = 3  # non-calcified, proximal: 1 px
    return torch.nn.functional.one_hot(lab, 4).permute(2, 0, 1)[None].float()


def _thirds(h=4, w=6) -> torch.Tensor:
    masks = torch.zeros(3, h, w)
    for k in range(3):
        masks[k, :, 2 * k : 2 * k + 2] = 1
    return masks


# pixel 0.5 x 0.5 mm -> 0.25 mm^2; measured (S, K) areas of _probs() in mm^2:
AREAS = torch.tensor([[4, 4, 4], [0, 1, 0], [1, 0, 2]], dtype=torch.float32) * 0.25


def test_pos_seg_l1_analytic_value_and_per_variable_terms():
    loss_fn = SegmentorGuidanceLoss(ScaledIdentity(), STRUCTURES, _thirds(), "l1", element_size=0.25, softmax=False)
    assert torch.allclose(loss_fn.measure(_probs()), AREAS.flatten()[None])
    target = AREAS.flatten()[None].clone()
    target[0, 4] += 0.75  # calcified_mid off by 0.75 mm^2
    target[0, 0] -= 0.5  # lumen_proximal off by 0.5 mm^2
    assert loss_fn(_probs(), target).item() == pytest.approx(1.25)
    terms = SegmentorGuidanceLoss(
        ScaledIdentity(), STRUCTURES, _thirds(), "l1", element_size=0.25, softmax=False, reduction="none"
    )(_probs(), target)
    expected = torch.zeros(1, 9)
    expected[0, 4], expected[0, 0] = 0.75, 0.5
    assert torch.allclose(terms, expected)


def test_range_normalization_l1_and_l2():
    scales = torch.tensor([10.0, 10, 10, 2, 2, 2, 4, 4, 4])
    target = AREAS.flatten()[None].clone()
    target[0, 4] += 1.0  # calcified: 1 / 2
    target[0, 0] += 3.0  # lumen: 3 / 10
    kw = dict(element_size=0.25, scales=scales, softmax=False)
    l1 = SegmentorGuidanceLoss(ScaledIdentity(), STRUCTURES, _thirds(), "l1", **kw)(_probs(), target)
    l2 = SegmentorGuidanceLoss(ScaledIdentity(), STRUCTURES, _thirds(), "l2", **kw)(_probs(), target)
    assert l1.item() == pytest.approx(0.5 + 0.3)
    assert l2.item() == pytest.approx(0.25 + 0.09)


def test_ranges_to_scales_order_and_errors():
    ranges = {"a": [0.0, 2.0], "b": [1.0, 5.0]}
    assert ranges_to_scales(ranges, ["b", "a"]).tolist() == [4.0, 2.0]
    with pytest.raises(ValueError, match="'c'"):
        ranges_to_scales(ranges, ["a", "c"])
    with pytest.raises(ValueError, match="min < max"):
        ranges_to_scales({"a": [3.0, 3.0]}, ["a"])


def test_seg_cft_global_areas_and_one_region_equals_seg():
    seg = SegmentorGuidanceLoss(ScaledIdentity(), STRUCTURES, None, "l2", element_size=0.25, softmax=False)
    one = SegmentorGuidanceLoss(
        ScaledIdentity(), STRUCTURES, torch.ones(1, 4, 6), "l2", element_size=0.25, softmax=False
    )
    assert torch.allclose(seg.measure(_probs()), AREAS.sum(1)[None])
    regional = torch.rand(3, 9) * 3
    target = seg.targets_from_parents(regional)
    assert torch.allclose(target, regional.view(3, 3, 3).sum(-1))
    x = _probs().repeat(3, 1, 1, 1) * torch.rand(3, 1, 1, 1)
    assert torch.allclose(seg(x, target), one(x, one.targets_from_parents(regional)))
    # mean over batch of the sum over variables
    per_sample = ((seg.measure(x) - target) ** 2).sum(1)
    assert seg(x, target).item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    # a pos-seg loss keeps regional parents as they are, a mismatched partition is refused
    pos = SegmentorGuidanceLoss(ScaledIdentity(), STRUCTURES, _thirds(), softmax=False)
    assert torch.equal(pos.targets_from_parents(regional), regional)
    with pytest.raises(ValueError, match="regions"):
        pos.targets_from_parents(torch.zeros(3, 6))


def test_softmax_and_3d_volume_measure():
    logits = torch.zeros(2, 4, 2, 3, 5)  # uniform softmax: each structure 1/4 of every voxel
    loss_fn = SegmentorGuidanceLoss(nn.Identity(), STRUCTURES, None, element_size=0.125)
    assert torch.allclose(loss_fn.measure(logits), torch.full((2, 3), 30 * 0.25 * 0.125))


class BNSegmentor(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)))


def test_frozen_segmentor_gradients_reach_image_only_and_stay_in_eval():
    seg = BNSegmentor()
    stats = seg.bn.running_mean.clone()
    loss_fn = SegmentorGuidanceLoss(seg, STRUCTURES, _thirds(8, 12), "l1", element_size=0.25)
    loss_fn.train()
    assert loss_fn.training and not seg.training and not seg.bn.training and not seg.drop.training
    assert all(not p.requires_grad for p in loss_fn.frozen_parameters())
    x = torch.randn(2, 1, 8, 12, requires_grad=True)
    out1 = loss_fn(x, torch.full((2, 9), 3.0))
    out1.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in seg.parameters())
    assert torch.equal(seg.bn.running_mean, stats)  # BatchNorm statistics untouched
    assert out1.item() == pytest.approx(loss_fn(x, torch.full((2, 9), 3.0)).item())  # no dropout noise


class LinearRegressor(nn.Module):
    """Regressor stand-in: mean = mean pixel value per output, log-variance fixed by a parameter."""

    def __init__(self, v, log_var):
        super().__init__()
        self.v = v
        self.log_var = nn.Parameter(torch.full((v,), float(log_var)))
        self.bn = nn.BatchNorm1d(v)
        self.bn.eval()

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True).expand(-1, self.v)
        return torch.cat([m, self.log_var.expand(x.shape[0], -1)], 1)


def test_regressor_l1_l2_nll_analytic():
    x = torch.full((2, 1, 4, 4), 0.5)
    target = torch.tensor([[0.5, 0.0, 1.0], [-0.5, 0.5, 0.5]])
    err = (0.5 - target).abs()
    l1 = RegressorGuidanceLoss(LinearRegressor(3, 0.0), 3, "l1")(x, target)
    l2 = RegressorGuidanceLoss(LinearRegressor(3, 0.0), 3, "l2")(x, target)
    assert l1.item() == pytest.approx(err.sum(1).mean().item())
    assert l2.item() == pytest.approx(err.square().sum(1).mean().item())
    log_var = math.log(0.25)
    nll = RegressorGuidanceLoss(LinearRegressor(3, log_var), 3, "gaussian_nll", reduction="none")(x, target)
    # -log N(t; mu, sigma^2) = 0.5 * (log(2 pi) + log_var + (t - mu)^2 / sigma^2)
    expected = 0.5 * (math.log(2 * math.pi) + log_var + err.square() / 0.25)
    assert torch.allclose(nll, expected, atol=1e-5)


def test_regressor_frozen_and_gradient_to_image():
    reg = LinearRegressor(3, 0.0)
    loss_fn = RegressorGuidanceLoss(reg, 3)
    loss_fn.train()
    assert not reg.training and not reg.bn.training
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    loss_fn(x, torch.zeros(2, 3)).backward()
    assert x.grad.abs().sum() > 0 and reg.log_var.grad is None


def test_bad_input_errors():
    with pytest.raises(ValueError, match="'huber'"):
        SegmentorGuidanceLoss(ScaledIdentity(), STRUCTURES, loss="huber")
    with pytest.raises(ValueError, match="reduction"):
        SegmentorGuidanceLoss(ScaledIdentity(), STRUCTURES, reduction="max")
    with pytest.raises(ValueError, match="scales"):
        SegmentorGuidanceLoss(ScaledIdentity(), STRUCTURES, _thirds(), scales=[1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        SegmentorGuidanceLoss(ScaledIdentity(), STRUCTURES, None, scales=[1.0, 0.0, 2.0])
    with pytest.raises(TypeError, match="mapping"):
        SegmentorGuidanceLoss(ScaledIdentity(), [1, 2, 3])
    with pytest.raises(TypeError, match="Module"):
        SegmentorGuidanceLoss(lambda x: x, STRUCTURES)
    loss_fn = SegmentorGuidanceLoss(ScaledIdentity(), STRUCTURES, _thirds(), softmax=False)
    with pytest.raises(ValueError, match=r"\(1, 9\)"):
        loss_fn(_probs(), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="2V"):
        RegressorGuidanceLoss(LinearRegressor(3, 0.0), 4, "l1")(torch.zeros(1, 1, 2, 2), torch.zeros(1, 4))


def test_per_call_region_masks_override_stored_ones():
    loss_fn = SegmentorGuidanceLoss(ScaledIdentity(), STRUCTURES, _thirds(), "l1", element_size=0.25, softmax=False)
    x = _probs().repeat(2, 1, 1, 1)
    target = torch.zeros(2, 9)
    per_case = _thirds()[None].repeat(2, 1, 1, 1)
    assert torch.allclose(loss_fn(x, target, region_masks=per_case), loss_fn(x, target))
    swapped = per_case.flip(1)  # distal <-> proximal masks: the measured areas follow the masks
    assert torch.allclose(loss_fn.measure(x, swapped)[0], AREAS.flip(1).flatten())
    with pytest.raises(ValueError, match="expected 3 region masks"):
        loss_fn(x, target, region_masks=torch.ones(2, 1, 4, 6))


def test_structure_total_scales():
    from monai_cft.losses import structure_total_scales

    values = [[1.0, 2.0, 3.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 4.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0, 0.5, 0.5]]
    assert structure_total_scales(values, 2).tolist() == [4.0, 3.0]  # totals (6, 6, 2) and (1, 4, 1)
    with pytest.raises(ValueError, match="S = 4"):
        structure_total_scales(values, 4)
    with pytest.raises(ValueError, match="vary"):
        structure_total_scales([[1.0, 1.0], [1.0, 1.0]], 1)
