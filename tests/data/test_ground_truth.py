"""Ground-truth counterfactuals of the phantoms (monai_cft.data.ground_truth)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from monai_cft.data.ground_truth import ground_truth_counterfactual, render_scpr
from monai_cft.utils.io import load_datalist
from monai_cft.data.phantom import sample_phantom_params
from monai_cft.data.prepare import prepare_dataset
from monai_cft.data.synthetic import generate_dataset
from monai_cft.transforms.regions import RegionMasks
from monai_cft.variables import DEFAULT_REGIONS, DEFAULT_STRUCTURES, variable_names

NAMES = variable_names(DEFAULT_STRUCTURES, DEFAULT_REGIONS)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt")
    generate_dataset(root / "raw", 10, seed=5, workers=0, progress=False)
    prepare_dataset(root / "raw", root / "scpr", preset="quick", workers=0, progress=False)
    return root


def _params(root, case):
    params = json.loads((root / "raw" / "params" / f"{case}.json").read_text())
    params.pop("derived")
    return params


def test_rerender_reproduces_the_prepared_case_bit_for_bit(prepared):
    loader = LoadImage(image_only=True)
    items = load_datalist(prepared / "scpr" / "dataset.json")["test"]
    for item in items:
        out = render_scpr(_params(prepared, item["id"]), "quick")
        image = np.asarray(loader(str(prepared / "scpr" / item["image"])))
        label = np.asarray(loader(str(prepared / "scpr" / item["label"])))
        np.testing.assert_array_equal(out["image"][0].numpy(), image)
        np.testing.assert_array_equal(out["label"][0].numpy(), label)
        np.testing.assert_allclose(out["variables"], item["variables"], atol=1e-6)


@pytest.mark.parametrize(
    "variable, change",
    [("calcified_mid", 10.0), ("noncalcified_proximal", 15.0), ("lumen_distal", -8.0), ("calcified_distal", None),
     ("noncalcified_distal", None)],
)
def test_targets_hit_and_labels_unchanged_outside_the_region(variable, change):
    params = sample_phantom_params([7, 2])
    factual = render_scpr(params, "quick")
    j = NAMES.index(variable)
    target = 0.0 if change is None else max(float(factual["variables"][j]) + change, 0.0)
    gt = ground_truth_counterfactual(params, {variable: target}, preset="quick")
    tol = max(0.05 * target, 0.25)
    assert gt["hit"][variable] and abs(gt["variables"][variable] - target) <= tol, (gt["variables"][variable], target)
    region = DEFAULT_REGIONS.index(variable.split("_")[-1])
    masks = RegionMasks()(torch.zeros(1, 32, 192)).numpy().astype(bool)
    changed = gt["label"][0].numpy() != factual["label"][0].numpy()
    assert not (changed & ~masks[region]).any()
    assert changed.any() or abs(target - factual["variables"][j]) <= tol
    # every other variable of the other thirds is unchanged
    for k, name in enumerate(NAMES):
        if not name.endswith(DEFAULT_REGIONS[region]):
            assert gt["variables"][name] == pytest.approx(float(factual["variables"][k])), name
    # the noise and the rest of the image: unchanged far from the intervened third
    far = ~masks[region]
    far[:, max(0, 64 * region - 8): 64 * (region + 1) + 8] = False
    np.testing.assert_array_equal(gt["image"][0].numpy()[far], factual["image"][0].numpy()[far])


def test_an_absent_plaque_is_inserted():
    for i in range(40):
        params = sample_phantom_params([8, i])
        if not any(p["type"] == "calcified" and p["region"] == "mid" for p in params["plaques"]):
            break
    gt = ground_truth_counterfactual(params, {"calcified_mid": 6.0})
    assert gt["hit"]["calcified_mid"]
    assert sum(p["type"] == "calcified" and p["region"] == "mid" for p in gt["params"]["plaques"]) == 1
    assert gt["params"]["imaging"] == params["imaging"] and gt["params"]["geometry"] == params["geometry"]


@pytest.mark.parametrize("intervention, message", [({"calcium_mid": 3.0}, "calcium_mid"),
                                                   ({"lumen_mid": -1.0}, "lumen_mid"),
                                                   ({"lumen_mid": float("nan")}, "lumen_mid")])
def test_bad_interventions_name_the_value(intervention, message):
    with pytest.raises(ValueError, match=message):
        ground_truth_counterfactual(sample_phantom_params([7, 2]), intervention)
