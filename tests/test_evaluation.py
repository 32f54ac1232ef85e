"""evaluate_counterfactuals on stand-in models with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from monai_cft.evaluation import evaluate_counterfactuals
from monai_cft.transforms.regions import RegionMasks
from monai_cft.variables import variable_names

STRUCTURES = {"lumen": 1, "calcified": 2}
REGIONS = ["proximal", "mid", "distal"]
NAMES = variable_names(STRUCTURES, REGIONS)
H, W = 8, 12


class IdentitySCM(torch.nn.Module):
    """Counterfactual image = factual image; counterfactual parents = intervened values (independent graph)."""

    variables = NAMES

    def counterfactual(self, x, parents, intervention, **kw):
        pa = parents.clone().float()
        for name, value in intervention.items():
            pa[:, NAMES.index(name)] = torch.as_tensor(value, dtype=pa.dtype).expand(pa.shape[0])
        return {"x_cf": x.clone(), "parents_cf": pa}


class FixedSegmentor(torch.nn.Module):
    """Logits of a fixed label map: lumen in rows 2-3 everywhere, calcified at rows 5 in the mid third."""

    def __init__(self):
        super().__init__()
        lab = torch.zeros(H, W, dtype=torch.long)
        lab[2:4] = 1
        lab[5, 4:8] = 2
        self.register_buffer("logits", torch.nn.functional.one_hot(lab, 3).permute(2, 0, 1).float() * 50.0)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1, -1, -1)


def test_identity_scm_errors_are_exact():
    n = 5
    x = torch.rand(n, 1, H, W) * 2 - 1
    # true areas with pixel area 0.25 mm^2: lumen 2 rows x 4 cols = 8 px = 2 mm^2 per third; calcified mid 4 px = 1 mm^2
    truth = torch.tensor([2.0, 2.0, 2.0, 0.0, 1.0, 0.0])
    variables = truth.repeat(n, 1) + torch.arange(n).float()[:, None] * 0.1  # factual values off by 0.1 * i
    ranges = {nm: (0.0, 10.0) for nm in NAMES}
    masks = torch.as_tensor(RegionMasks(names=REGIONS)(torch.zeros(1, H, W)))
    rows, metrics = evaluate_counterfactuals(
        IdentitySCM(), FixedSegmentor(), x, variables, masks, names=NAMES, structures=STRUCTURES, regions=REGIONS,
        ranges=ranges, element_size=0.25, seed=3, batch_size=2, progress=False, feature_fn=lambda t: t.flatten(1)[:, :4],
    )
    assert len(rows) == n * len(NAMES) * len(NAMES)
    for r in rows:
        i = int(r["case_id"].split("_")[1])
        j = NAMES.index(r["measured_variable"])
        expected_cf = r["target"] if r["is_intervened"] else float(variables[i, j])
        assert r["cf_value"] == pytest.approx(expected_cf, abs=1e-5)
        assert r["measured_value"] == pytest.approx(float(truth[j]), abs=1e-4)
        assert r["abs_error"] == pytest.approx(abs(float(truth[j]) - expected_cf), abs=1e-4)
        assert 0.0 <= r["target"] <= 10.0
    # the measurement floor is the factual offset 0.1 * i, averaged over cases
    assert metrics["factual_segmentor_error"]["lumen_mid"]["mean"] == pytest.approx(0.2, abs=1e-4)
    assert metrics["composition"]["10"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["reversibility"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["locality"]["n"] == 0, "nothing changed: locality is undefined (NaN) and not averaged"
    assert metrics["realism"]["n_real"] == 3 and metrics["realism"]["n_cf"] == 2
    assert math.isfinite(metrics["realism"]["fid"])


def test_targets_are_seeded():
    x = torch.zeros(3, 1, H, W)
    variables = torch.ones(3, len(NAMES))
    masks = torch.as_tensor(RegionMasks(names=REGIONS)(torch.zeros(1, H, W)))
    kw = dict(names=NAMES, structures=STRUCTURES, regions=REGIONS, ranges={nm: (0.0, 5.0) for nm in NAMES},
              element_size=0.25, progress=False)
    a, _ = evaluate_counterfactuals(IdentitySCM(), FixedSegmentor(), x, variables, masks, seed=1, **kw)
    b, _ = evaluate_counterfactuals(IdentitySCM(), FixedSegmentor(), x, variables, masks, seed=1, **kw)
    c, _ = evaluate_counterfactuals(IdentitySCM(), FixedSegmentor(), x, variables, masks, seed=2, **kw)
    assert [r["target"] for r in a] == [r["target"] for r in b]
    assert [r["target"] for r in a] != [r["target"] for r in c]


def test_wrong_number_of_names():
    masks = torch.as_tensor(RegionMasks(names=REGIONS)(torch.zeros(1, H, W)))
    with pytest.raises(ValueError, match="names"):
        evaluate_counterfactuals(IdentitySCM(), FixedSegmentor(), torch.zeros(1, 1, H, W), torch.zeros(1, 5), masks,
                                 names=NAMES, structures=STRUCTURES, regions=REGIONS,
                                 ranges={nm: (0.0, 1.0) for nm in NAMES}, element_size=1.0, progress=False)
