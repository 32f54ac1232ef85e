"""Known-answer tests of the counterfactual metrics, with hand-made stand-ins instead of trained models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monai_cft.metrics import (
    FeatureExtractor,
    Interventions,
    composition,
    counterfactual_per_sample,
    effectiveness_errors,
    frechet_distance,
    gaussian_frechet_distance,
    image_l1,
    kernel_distance,
    locality,
    measure_with_segmentor,
    reversibility,
    run_counterfactual,
    summarize,
    to_pixel_range,
)
from monai_cft.variables import variable_names

STRUCTURES = ("lumen", "calcified", "noncalcified")
REGIONS = ("proximal", "mid", "distal")
VARIABLES = variable_names(STRUCTURES, REGIONS)


# ----------------------------------------------------------------------------------------- stand-ins
class IntensitySegmentor(torch.nn.Module):
    """Segmentor stand-in: a pixel of value c (0..3) belongs to class c, with near one-hot softmax."""

    def __init__(self, sharpness: float = 200.0) -> None:
        super().__init__()
        self.sharpness = torch.nn.Parameter(torch.tensor(sharpness))
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        classes = torch.arange(4, dtype=x.dtype).view(1, 4, *([1] * (x.ndim - 2)))
        return -self.sharpness * (x - classes) ** 2


def _apply(parents: torch.Tensor, intervention: dict) -> torch.Tensor:
    out = parents.clone()
    for name, value in intervention.items():
        out[:, VARIABLES.index(name)] = torch.as_tensor(value, dtype=out.dtype)
    return out


class ShiftSCM:
    """x_cf = x + shift (shift = 0: identity SCM); parents_cf = intervened parents."""

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift
        self.calls: list[dict] = []

    def counterfactual(self, x, parents, intervention, **kwargs):
        self.calls.append({"intervention": intervention, "kwargs": kwargs, "x": x})
        return {"x_cf": x + self.shift, "parents_cf": _apply(parents, intervention)}


class LinearSCM(torch.nn.Module):
    """x_cf = x + sum_v w_v (pa_cf_v - pa_v): exactly invertible (leaky=False) or not (leaky=True: |.|)."""

    def __init__(self, weights: torch.Tensor, leaky: bool = False) -> None:
        super().__init__()
        self.register_buffer("weights", weights)
        self.leaky = leaky
        self.variables = tuple(VARIABLES)

    def counterfactual(self, x, parents, intervention, **kwargs):
        assert not self.training and not torch.is_grad_enabled()
        pa_cf = _apply(parents, intervention)
        delta = pa_cf - parents
        if self.leaky:
            delta = delta.abs()
        shift = (delta * self.weights).sum(1)
        return {"x_cf": x + shift.view(-1, *([1] * (x.ndim - 1))), "parents_cf": pa_cf, "uncertainty": shift.abs()}


def _region_masks(h: int, w: int) -> torch.Tensor:
    masks = torch.zeros(3, h, w)
    for k in range(3):
        masks[k, :, k * w // 3 : (k + 1) * w // 3] = 1.0
    return masks


# --------------------------------------------------------------------------------------- interventions
def test_per_sample_grouping_gives_each_sample_its_own_intervention():
    parents = torch.arange(4 * 9, dtype=torch.float32).view(4, 9)
    iv = Interventions(torch.tensor([3, 0, 3, 8]), torch.tensor([-1.0, -2.0, -3.0, -4.0]), tuple(VARIABLES))
    expected = parents.clone()
    expected[0, 3], expected[1, 0], expected[2, 3], expected[3, 8] = -1.0, -2.0, -3.0, -4.0
    assert iv.names[:2] == [VARIABLES[3], VARIABLES[0]] and iv.to_dicts()[3] == {VARIABLES[8]: -4.0}
    assert torch.equal(iv.select(slice(1, 3)).index, torch.tensor([0, 3]))
    scm = LinearSCM(torch.linspace(0.01, 0.09, 9))
    x = torch.zeros(4, 1, 2, 3)
    out = counterfactual_per_sample(scm, x, parents, iv)
    assert torch.equal(out["parents_cf"], expected)
    shift = ((expected - parents) * scm.weights).sum(1)
    assert torch.allclose(out["x_cf"], shift.view(4, 1, 1, 1).expand_as(x))
    assert torch.allclose(out["uncertainty"], shift.abs())


# --------------------------------------------------------------------------------------- effectiveness
def _label_image(calc_mid_cols: int, calc_prox_cols: int = 0) -> torch.Tensor:
    """(1, 6, 24) label image: lumen rows 2-3 everywhere, a 2-row calcified block in mid (cols 8..)."""
    img = torch.zeros(1, 6, 24)
    img[:, 2:4] = 1.0
    img[:, 0:2, 8 : 8 + calc_mid_cols] = 2.0
    img[:, 5, 0:calc_prox_cols] = 2.0
    img[:, 4, 18:22] = 3.0  # non-calcified 1 x 4 in distal
    return img


def test_measure_with_segmentor_exact_areas():
    seg = IntensitySegmentor()
    seg.train()
    images = torch.stack([_label_image(3), _label_image(5, calc_prox_cols=2)])
    masks = _region_masks(6, 24)
    measured = measure_with_segmentor(seg, images, masks, [1, 2, 3], element_size=0.25, batch_size=1)
    assert measured.shape == (2, 3, 3) and not measured.requires_grad
    assert seg.training and seg.modes == [False, False]  # eval mode inside, restored after
    seg.modes.clear()
    expected0 = torch.tensor([[4.0, 4.0, 4.0], [0.0, 1.5, 0.0], [0.0, 0.0, 1.0]])
    expected1 = torch.tensor([[4.0, 4.0, 4.0], [0.5, 2.5, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(measured, torch.stack([expected0, expected1]), atol=1e-5)
    # per-image masks and spacings give the same physical answer
    per_case = measure_with_segmentor(seg, images, masks.expand(2, -1, -1, -1), [1, 2, 3], torch.tensor([0.25, 1.0]))
    assert torch.allclose(per_case[0], expected0, atol=1e-5) and torch.allclose(per_case[1], 4 * expected1, atol=1e-5)
    from monai.data import MetaTensor

    meta = measure_with_segmentor(seg, MetaTensor(images), MetaTensor(masks), [1, 2, 3], 0.25)
    assert type(meta) is torch.Tensor and torch.allclose(meta, measured)  # geometry-free plain tensor
    whole = measure_with_segmentor(seg, images, None, [2], 0.25)
    assert torch.allclose(whole.view(2), torch.tensor([1.5, 3.0]), atol=1e-5)
    with pytest.raises(ValueError, match="element_size"):
        measure_with_segmentor(seg, images, masks, [1], torch.ones(3))


def test_effectiveness_exact_mm2_errors():
    """do(calcified_mid := 3.0 mm^2) on an image with 1.5 mm^2: the counterfactual grows it to 2.5 mm^2
    and leaks 0.5 mm^2 into the proximal third: errors 0.5 in both, 0 elsewhere."""
    seg = IntensitySegmentor()
    x = _label_image(3)[None]
    x_cf = _label_image(5, calc_prox_cols=2)[None]
    masks = _region_masks(6, 24)
    factual = measure_with_segmentor(seg, x, masks, [1, 2, 3], 0.25).flatten(1)
    target = factual.clone()
    target[0, VARIABLES.index("calcified_mid")] = 3.0  # the counterfactual parents of an independent graph
    err = effectiveness_errors(measure_with_segmentor(seg, x_cf, masks, [1, 2, 3], 0.25).flatten(1), target)
    expected = torch.zeros(1, 9)
    expected[0, VARIABLES.index("calcified_mid")] = 0.5
    expected[0, VARIABLES.index("calcified_proximal")] = 0.5
    assert torch.allclose(err, expected, atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        effectiveness_errors(err, target[:, :8])


def test_summarize_known_values():
    vals = torch.tensor([[1.0, 2.0], [3.0, math.nan], [5.0, 4.0], [7.0, math.nan]])
    s = summarize(vals)
    assert s["n"].tolist() == [4, 2]
    assert s["mean"].tolist() == pytest.approx([4.0, 3.0])
    assert s["std"].tolist() == pytest.approx([np.std([1, 3, 5, 7], ddof=1), np.std([2, 4], ddof=1)])
    half = 1.959963984540054 * s["std"] / torch.sqrt(s["n"].double())
    assert torch.allclose(s["ci_high"] - s["mean"], half) and torch.allclose(s["mean"] - s["ci_low"], half)
    one = summarize(torch.tensor([[2.0, math.nan]]))
    assert one["mean"][0] == 2.0 and torch.isnan(one["std"][0]) and torch.isnan(one["mean"][1]) and one["n"][1] == 0
    with pytest.raises(ValueError, match="method"):
        summarize(vals, method="t")


# ------------------------------------------------------------------------------ composition / reversibility
def test_composition_identity_and_constant_shift():
    x = -0.5 * torch.rand(3, 1, 4, 6, generator=torch.Generator().manual_seed(1))
    parents = torch.rand(3, 9)
    ident = composition(ShiftSCM(0.0), x, parents, variables=VARIABLES)
    assert set(ident) == {1, 10} and all(torch.equal(v, torch.zeros(3)) for v in ident.values())
    c = 0.04
    scm = ShiftSCM(c)
    out = composition(scm, x, parents, cycles=(10, 1, 4), variables=VARIABLES, noise_temperature=0.1)
    assert len(scm.calls) == 10  # one chain of max(cycles) cycles
    for k in (1, 4, 10):
        assert torch.allclose(out[k], torch.full((3,), 127.5 * c * k), atol=1e-3)
    null = scm.calls[0]["intervention"]
    assert list(null) == VARIABLES and torch.equal(torch.stack(list(null.values()), 1), parents)
    assert scm.calls[0]["kwargs"] == {"noise_temperature": 0.1}
    assert torch.allclose(scm.calls[1]["x"], x + c)  # each cycle starts from the previous output
    with pytest.raises(ValueError, match="cycles"):
        composition(scm, x, parents, cycles=(0,), variables=VARIABLES)
    with pytest.raises(ValueError, match="columns"):
        composition(scm, x, parents[:, :8], variables=VARIABLES)
    with pytest.raises(ValueError, match="variables"):
        composition(scm, x, parents)  # ShiftSCM exposes no variable names
    null_linear = composition(LinearSCM(torch.full((9,), 0.1)), x, parents, cycles=(2,))  # names from scm.variables
    assert torch.equal(null_linear[2], torch.zeros(3))


def test_pixel_range_and_l1():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    assert to_pixel_range(x).tolist() == [0.0, 127.5, 255.0, 255.0]
    assert to_pixel_range(x, clip=False)[-1].item() == pytest.approx(382.5)
    assert to_pixel_range(torch.tensor([-300.0, 1100.0]), value_range=(-300, 1100)).tolist() == [0.0, 255.0]
    assert image_l1(torch.zeros(2, 1, 3), torch.full((2, 1, 3), 0.5)).tolist() == pytest.approx([63.75, 63.75])


def test_reversibility_invertible_and_leaky():
    gen = torch.Generator().manual_seed(2)
    x = 0.3 * torch.rand(4, 1, 5, 7, generator=gen) - 0.15
    parents = torch.rand(4, 9, generator=gen) * 5
    weights = torch.full((9,), 0.02)
    iv = {"calcified_mid": 4.0}
    exact = reversibility(LinearSCM(weights), x, parents, iv)
    assert float(exact.max()) < 1e-4
    forward_only = image_l1(x, run_counterfactual(LinearSCM(weights), x, parents, iv)["x_cf"])
    assert float(forward_only.min()) > 0.1
    delta = (4.0 - parents[:, VARIABLES.index("calcified_mid")]).abs()
    leaky = reversibility(LinearSCM(weights, leaky=True), x, parents, iv, VARIABLES)
    assert torch.allclose(leaky, 2 * 127.5 * 0.02 * delta, atol=1e-3)
    per_sample = Interventions(torch.tensor([0, 4, 4, 8]), torch.tensor([1.0, 2.0, 3.0, 4.0]), tuple(VARIABLES))
    assert float(reversibility(LinearSCM(weights), x, parents, per_sample).max()) < 1e-4
    leaky_ps = reversibility(LinearSCM(weights, leaky=True), x, parents, per_sample)
    d = (per_sample.values - parents[torch.arange(4), per_sample.index]).abs()
    assert torch.allclose(leaky_ps, 2 * 127.5 * 0.02 * d, atol=1e-3)
    with pytest.raises(ValueError, match="intervention"):
        reversibility(LinearSCM(weights), x, parents, {"plaque": 1.0})


# ---------------------------------------------------------------------------------------------- locality
def test_locality_known_fractions():
    masks = _region_masks(4, 12)
    x = torch.zeros(3, 1, 4, 12)
    x_cf = x.clone()
    x_cf[0, :, 1:3, 5:7] = 0.7  # entirely in mid (cols 4..7)
    x_cf[1, :, 0, 4:8] = 0.5  # 4 px x 0.5 in mid
    x_cf[1, :, 0, 0:2] = -1.0  # 2 px x 1.0 in proximal
    loc = locality(x, x_cf, masks[1])
    assert loc[0].item() == pytest.approx(1.0)
    assert loc[1].item() == pytest.approx(2.0 / 4.0)
    assert torch.isnan(loc[2])
    # one mask per sample: sample 1 judged against proximal
    per_sample = locality(x, x_cf, masks[torch.tensor([1, 0, 2])])
    assert per_sample[0].item() == pytest.approx(1.0) and per_sample[1].item() == pytest.approx(0.5)
    uniform = locality(torch.zeros(1, 2, 4, 12), torch.ones(1, 2, 4, 12), masks[2][None, None])
    assert uniform.item() == pytest.approx(1.0 / 3.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        locality(x, x_cf, 2 * masks[1])
    with pytest.raises(ValueError, match="spatial shape"):
        locality(x, x_cf, masks[1, :, :6])


# ----------------------------------------------------------------------------------------------- realism
def test_gaussian_frechet_analytic():
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    va, vb = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    fd = gaussian_frechet_distance(mu_a, torch.diag(va), mu_b, torch.diag(vb))
    expected = 5.0 + float((va + vb - 2 * torch.sqrt(va * vb)).sum())  # 5 + 1 + 1 + 0
    assert fd.item() == pytest.approx(expected, abs=1e-10)
    # non-commuting covariances against scipy's general matrix square root
    scipy_linalg = pytest.importorskip("scipy.linalg")
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 4, generator=gen, dtype=torch.float64), torch.randn(4, 4, generator=gen, dtype=torch.float64)
    ca, cb = a @ a.T + 0.1 * torch.eye(4, dtype=torch.float64), b @ b.T
    cross = np.real(scipy_linalg.sqrtm(ca.numpy() @ cb.numpy())).trace()
    ref = float(torch.trace(ca) + torch.trace(cb)) - 2 * cross
    assert gaussian_frechet_distance(torch.zeros(4), ca, torch.zeros(4), cb).item() == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_samples():
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(300, 16, generator=gen)
    assert abs(frechet_distance(feats, feats).item()) < 1e-8
    singular = torch.randn(10, 16, generator=gen)  # N < F: singular covariance
    assert abs(frechet_distance(singular, singular).item()) < 1e-8
    n = 20000
    scale_a, scale_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([2.0, 1.0, 0.5])
    sa = torch.randn(n, 3, generator=gen, dtype=torch.float64) * scale_a
    sb = torch.randn(n, 3, generator=gen, dtype=torch.float64) * scale_b + torch.tensor([1.0, 0.0, -1.0])
    analytic = 2.0 + float(((scale_a - scale_b) ** 2).sum())  # = 4.0
    assert frechet_distance(sa, sb).item() == pytest.approx(analytic, rel=0.03)
    # agrees with MONAI's FIDMetric (scipy matrix square root) on pre-extracted features
    from monai.metrics import FIDMetric

    pytest.importorskip("scipy")
    fa, fb = torch.randn(200, 8, generator=gen), torch.randn(150, 8, generator=gen) * 1.3 + 0.2
    assert frechet_distance(fa, fb).item() == pytest.approx(FIDMetric()(fa, fb).item(), rel=1e-6)
    with pytest.raises(ValueError, match="feature dimensions"):
        frechet_distance(fa, fb[:, :4])


def test_kernel_distance():
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(7, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)

    def k(u, v):
        return (float(u @ v) / 3 + 1.0) ** 3

    brute = (
        sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / 42
        + sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / 20
        - 2 * sum(k(a[i], b[j]) for i in range(7) for j in range(5)) / 35
    )
    kid, std = kernel_distance(a, b)
    assert kid.item() == pytest.approx(brute, rel=1e-10) and torch.isnan(std)
    same = [
        kernel_distance(torch.randn(400, 8, generator=gen), torch.randn(400, 8, generator=gen))[0].item() for _ in range(5)
    ]
    shifted = kernel_distance(torch.randn(400, 8, generator=gen), torch.randn(400, 8, generator=gen) + 0.5)[0].item()
    assert abs(float(np.mean(same))) < 0.02 and min(same) < 0.0 < shifted and shifted > 20 * max(abs(s) for s in same)
    fa, fb = torch.randn(300, 8, generator=gen), torch.randn(200, 8, generator=gen)
    m1 = kernel_distance(fa, fb, subset_size=100, num_subsets=10, generator=torch.Generator().manual_seed(0))
    m2 = kernel_distance(fa, fb, subset_size=100, num_subsets=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m1[0], m2[0]) and m1[1] > 0
    with pytest.raises(ValueError, match="subset_size"):
        kernel_distance(fa, fb, subset_size=201)


class _TinyEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.encoder(x))


def test_feature_extractor():
    torch.manual_seed(0)
    net = _TinyEncoder()
    images = torch.randn(10, 1, 8, 12)
    fx = FeatureExtractor(net, "encoder")
    with torch.no_grad():
        feats = fx(images)
        manual = net.encoder(images).mean((2, 3))
        assert FeatureExtractor(net)(images).shape == (10, 2)
    assert feats.shape == (10, 4) and torch.allclose(feats, manual, atol=1e-6)
    with pytest.raises(ValueError, match="no sub-module"):
        FeatureExtractor(net, "decoder")


class _GlobalContextSegmentor(torch.nn.Module):
    """Class 1 where a pixel exceeds the image's mean: every output pixel depends on the whole input."""

    def forward(self, x):
        fg = torch.sigmoid(20.0 * (x - x.mean(dim=(-1, -2), keepdim=True)))
        return torch.log(torch.cat([1.0 - fg, fg], 1).clamp_min(1e-6))


def test_region_by_region_measurement_is_local():
    from monai_cft.metrics.effectiveness import segmentor_probabilities

    masks = _region_masks(8, 48)  # thirds of 16 columns
    x = torch.zeros(2, 1, 8, 48)
    x[:, :, 2:4, 4:10] = 1.0  # a bright structure in the proximal third
    x_cf = x.clone()
    x_cf[:, :, :, 36:40] = 5.0  # a large change in the distal third only
    seg = _GlobalContextSegmentor()
    whole = measure_with_segmentor(seg, x, masks, [1], 1.0)
    whole_cf = measure_with_segmentor(seg, x_cf, masks, [1], 1.0)
    assert not torch.allclose(whole[..., 0], whole_cf[..., 0])  # the whole-image measure leaks
    local = measure_with_segmentor(seg, x, masks, [1], 1.0, context=2)
    local_cf = measure_with_segmentor(seg, x_cf, masks, [1], 1.0, context=2)
    torch.testing.assert_close(local[..., :2], local_cf[..., :2])  # proximal and mid untouched
    assert abs(float(local_cf[0, 0, 2]) - float(local[0, 0, 2])) > 10.0  # the distal change is measured
    # a pixel-wise segmentor measures the same on windows as on the whole image
    pix = IntensitySegmentor()
    img = _label_image(3)[None]
    m6 = _region_masks(6, 24)
    torch.testing.assert_close(measure_with_segmentor(pix, img, m6, [1, 2, 3], 0.25, context=1),
                               measure_with_segmentor(pix, img, m6, [1, 2, 3], 0.25), atol=1e-5, rtol=0)
    p = segmentor_probabilities(pix, img, m6, context=1)
    torch.testing.assert_close(p.sum(1), torch.ones(1, 6, 24))
    with pytest.raises(ValueError, match="shared"):
        measure_with_segmentor(pix, img, m6[None], [1], 0.25, context=1)
