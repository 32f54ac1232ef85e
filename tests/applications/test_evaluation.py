"""evaluate_counterfactuals on stand-in models with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
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


# --------------------------------------------------------------------------------------------
# targets, ground truth, baselines, response slopes and the HU-threshold calcium measure
# --------------------------------------------------------------------------------------------

WINDOW = (-300.0, 1100.0)
MASKS = torch.as_tensor(RegionMasks(names=REGIONS)(torch.zeros(1, H, W)))  # thirds of W: 4 columns each


class BrightSegmentor(torch.nn.Module):
    """Image-dependent logits: calcified where x > 0.5, lumen where 0 < x <= 0.5, background elsewhere."""

    def forward(self, x):
        calc = (x > 0.5).float()
        lum = ((x > 0.0) & (x <= 0.5)).float()
        return torch.cat([1.0 - calc - lum, lum, calc], 1) * 50.0


class LookupSCM(torch.nn.Module):
    """Counterfactual of do(v := t) on a known case = the given image ``cf_unit[case, v]``; otherwise x itself."""

    variables = NAMES

    def __init__(self, images, cf_unit):
        super().__init__()
        self.images, self.cf_unit = images, cf_unit

    def counterfactual(self, x, parents, intervention, **kw):
        pa = parents.clone().float()
        for name, value in intervention.items():
            pa[:, NAMES.index(name)] = torch.as_tensor(value, dtype=pa.dtype).expand(pa.shape[0])
        x_cf = x.clone()
        if len(intervention) == 1:
            vi = NAMES.index(next(iter(intervention)))
            for b in range(x.shape[0]):
                match = (self.images.flatten(1) == x[b].flatten()).all(1).nonzero()
                if len(match):
                    x_cf[b] = self.cf_unit[int(match[0]), vi]
        return {"x_cf": x_cf, "parents_cf": pa}


def _kw(**extra):
    kw = dict(names=NAMES, structures=STRUCTURES, regions=REGIONS, ranges={nm: (0.0, 4.0) for nm in NAMES},
              element_size=0.25, seed=5, batch_size=3, progress=False, hu_window=WINDOW)
    kw.update(extra)
    return kw


def _bright_case(n_bright_mid: int, lumen_rows=(2, 4)) -> torch.Tensor:
    """(H, W) HU: soft tissue 50 HU, contrast lumen 300 HU in some rows, n calcium pixels (1000 HU) in the mid third."""
    img = torch.full((H, W), 50.0)
    img[lumen_rows[0]:lumen_rows[1]] = 300.0
    for j in range(n_bright_mid):
        img[5 + j // 4, 4 + j % 4] = 1000.0
    return img


def _hu_to_unit(hu):
    return (hu.clamp(*WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0]) * 2.0 - 1.0


def test_targets_are_the_ground_truths():
    from monai_cft.metrics import uniform_targets

    x = torch.zeros(4, 1, H, W)
    rows, _ = evaluate_counterfactuals(IdentitySCM(), FixedSegmentor(), x, torch.ones(4, len(NAMES)), MASKS, **_kw())
    expected = uniform_targets(NAMES, {nm: (0.0, 4.0) for nm in NAMES}, 4, 5)
    for r in rows:
        assert r["target"] == float(expected[int(r["case_id"].split("_")[1]), NAMES.index(r["intervened"])])


def test_ground_truth_equal_to_the_counterfactual(single_thread):
    n = 4
    gen = torch.Generator().manual_seed(0)
    x_hu = torch.stack([_bright_case(i) for i in range(n)])[:, None]  # (N, 1, H, W)
    gt_hu = x_hu[:, :1].repeat(1, len(NAMES), 1, 1) + torch.randint(0, 2, (n, len(NAMES), H, W), generator=gen) * 600.0
    x = _hu_to_unit(x_hu)
    variables = torch.rand(n, len(NAMES), generator=gen) * 4.0
    kw = _kw()
    from monai_cft.metrics import uniform_targets

    targets = uniform_targets(NAMES, kw["ranges"], n, kw["seed"])
    gt = {"images": gt_hu.numpy(), "targets": targets.numpy(), "hit": torch.ones(n, len(NAMES), dtype=torch.bool)}
    scm = LookupSCM(x, _hu_to_unit(gt_hu)[:, :, None])
    rows, m = evaluate_counterfactuals(scm, BrightSegmentor(), x, variables, MASKS, ground_truth=gt,
                                       include_identity_rows=True, include_ground_truth_rows=True, **kw)
    by_mode = {mode: [r for r in rows if r["mode"] == mode] for mode in ("", "identity", "ground_truth")}
    assert all(len(v) == n * len(NAMES) ** 2 for v in by_mode.values()) and len(rows) == 3 * n * len(NAMES) ** 2
    for a, b in zip(by_mode[""], by_mode["ground_truth"]):
        assert {**a, "mode": "ground_truth"} == b
    for vname in NAMES:
        e = m["intervened_error"][vname]
        assert e["err_mode"] == pytest.approx(e["err_ground_truth"], abs=1e-6) and e["n"] == n
        l1 = m["pixel_l1_to_ground_truth"][vname]
        assert l1["inside"]["model"] == pytest.approx(0.0, abs=1e-6)
        assert l1["outside"]["model"] == pytest.approx(0.0, abs=1e-6)
        assert l1["inside"]["identity"] > 0.0 and l1["outside"]["identity"] > 0.0
        assert m["response_slope"][vname] == pytest.approx(m["response_slope_ground_truth"][vname], nan_ok=True)
        if e["err_identity"] > e["err_ground_truth"]:
            assert e["gap_closure_identity"] == pytest.approx(1.0)
    assert m["ground_truth"]["hit_fraction"]["lumen_mid"] == 1.0
    # the identity rows measure the unchanged image: the factual measurement against the counterfactual parents
    seg_f = BrightSegmentor()(x).softmax(1)
    for r in by_mode["identity"][: len(NAMES) ** 2]:
        j = NAMES.index(r["measured_variable"])
        s, k = j // 3, j % 3
        area = float((seg_f[0, STRUCTURES[list(STRUCTURES)[s]]] * MASKS[k]).sum() * 0.25)
        assert r["measured_value"] == pytest.approx(area, abs=1e-4)
        assert r["abs_error"] == pytest.approx(abs(area - r["cf_value"]), abs=1e-4)


def test_identity_model_has_zero_response_and_no_gap_closure(single_thread):
    n = 4
    x = _hu_to_unit(torch.stack([_bright_case(i) for i in range(n)])[:, None])
    kw = _kw()
    from monai_cft.metrics import uniform_targets

    targets = uniform_targets(NAMES, kw["ranges"], n, kw["seed"])
    gt_hu = torch.stack([_bright_case(8) for _ in range(n)])[:, None].repeat(1, len(NAMES), 1, 1)
    gt = {"images": gt_hu, "targets": targets, "hit": torch.ones(n, len(NAMES), dtype=torch.bool)}
    _, m = evaluate_counterfactuals(IdentitySCM(), BrightSegmentor(), x, torch.ones(n, len(NAMES)), MASKS,
                                    ground_truth=gt, **kw)
    for vname in NAMES:
        assert all(v == 0.0 for v in m["response_slope"][vname].values()), "x_cf = x: no measured change"
        assert len(m["response_slope"][vname]) == 3 and all(k.split("_")[0] == vname.split("_")[0]
                                                             for k in m["response_slope"][vname])
        e = m["intervened_error"][vname]
        assert e["err_mode"] == pytest.approx(e["err_identity"])
        l1 = m["pixel_l1_to_ground_truth"][vname]
        assert l1["inside"]["model"] == pytest.approx(l1["inside"]["identity"])
    # the ground truth adds 0..8 calcium pixels in the mid third of every case: measured change 2 - 0.25 i mm^2
    # against intended changes target - 1: regress exactly on the cases' values
    from monai_cft.metrics import response_slope

    intended = targets[:, NAMES.index("calcified_mid")] - 1.0
    change = 2.0 - 0.25 * torch.arange(n).float()
    assert m["response_slope_ground_truth"]["calcified_mid"]["calcified_mid"] == pytest.approx(
        response_slope(intended, change), abs=1e-3)
    assert m["response_slope_ground_truth"]["calcified_mid"]["calcified_proximal"] == pytest.approx(0.0, abs=1e-6)


def test_calcium_threshold_errors_on_known_bright_pixels(single_thread):
    n = 4
    # 4 calcium pixels (1 mm^2) in the mid third of every factual image; 0 elsewhere
    x_hu = torch.stack([_bright_case(4) for _ in range(n)])[:, None]
    x = _hu_to_unit(x_hu)
    variables = torch.zeros(n, len(NAMES))
    variables[:, NAMES.index("calcified_mid")] = 1.0
    kw = _kw()
    from monai_cft.metrics import uniform_targets

    targets = uniform_targets(NAMES, kw["ranges"], n, kw["seed"])
    vi = NAMES.index("calcified_mid")
    n_px = (targets[:, vi] / 0.25).floor().long().clamp(max=8)  # the ground truth paints floor(t / 0.25) pixels
    gt_hu = x_hu.repeat(1, len(NAMES), 1, 1)
    for i in range(n):
        gt_hu[i, vi] = _bright_case(int(n_px[i]))
    hit = torch.ones(n, len(NAMES), dtype=torch.bool)
    hit[0, vi] = False  # left out of every comparison with the ground truth
    gt = {"images": gt_hu, "targets": targets, "hit": hit}
    _, m = evaluate_counterfactuals(IdentitySCM(), FixedSegmentor(), x, variables, MASKS, ground_truth=gt,
                                    calcium_threshold_hu=500.0, **kw)
    c = m["calcium_threshold"]
    assert c["threshold_hu"] == 500.0 and c["cases"] == "hit"
    assert c["factual_error"]["mid"]["mean"] == pytest.approx(0.0)
    t = targets[1:, vi]
    mid = c["errors"]["calcified_mid"]["mid"]
    assert mid["model"]["mean"] == pytest.approx(float((1.0 - t).abs().mean()), abs=1e-5) and mid["model"]["n"] == 3
    assert mid["identity"]["mean"] == pytest.approx(mid["model"]["mean"], abs=1e-6)
    assert mid["ground_truth"]["mean"] == pytest.approx(float((n_px[1:] * 0.25 - t).abs().mean()), abs=1e-5)
    assert c["errors"]["calcified_mid"]["proximal"]["model"]["mean"] == pytest.approx(0.0)
    # the segmentor sees 1 mm^2 of calcium in the mid third whatever the image (FixedSegmentor)
    assert c["segmentor_errors"]["calcified_mid"]["mid"]["model"]["mean"] == pytest.approx(
        float((1.0 - t).abs().mean()), abs=1e-4)
    # do(lumen_*) leaves calcium alone: the threshold error is the factual one
    assert c["errors"]["lumen_proximal"]["mid"]["model"]["mean"] == pytest.approx(0.0)
    assert m["intervened_error"]["calcified_mid"]["n"] == 3


def test_ground_truth_is_validated():
    x = torch.zeros(2, 1, H, W)
    from monai_cft.metrics import uniform_targets

    targets = uniform_targets(NAMES, {nm: (0.0, 4.0) for nm in NAMES}, 2, 5)
    good = {"images": torch.zeros(2, len(NAMES), H, W), "targets": targets,
            "hit": torch.ones(2, len(NAMES), dtype=bool)}

    def run(gt, **kw):
        return evaluate_counterfactuals(IdentitySCM(), FixedSegmentor(), x, torch.ones(2, len(NAMES)), MASKS,
                                        ground_truth=gt, **_kw(**kw))

    with pytest.raises(ValueError, match=r"differ .* by up to 0\.5"):
        run({**good, "targets": targets + torch.tensor([0.0] * 5 + [0.5])})
    with pytest.raises(ValueError, match=r"lacks the keys \['hit'\]"):
        run({k: v for k, v in good.items() if k != "hit"})
    with pytest.raises(ValueError, match=r"\(N, V, \*spatial\)"):
        run({**good, "images": torch.zeros(2, len(NAMES), H, W + 1)})
    with pytest.raises(ValueError, match="1100"):
        run(good, calcium_threshold_hu=1200.0)


def test_response_slope_known_answers():
    from monai_cft.metrics import gap_closure, response_slope

    x = torch.tensor([-3.0, 0.0, 1.0, 4.0, 7.5])
    assert response_slope(x, 2.0 * x + 1.0) == pytest.approx(2.0)
    assert response_slope(x.numpy(), [0.0] * 5) == 0.0
    assert math.isnan(response_slope([0.1] * 5, x))  # constant intended change: no slope
    assert math.isnan(response_slope([1.0], [2.0]))
    assert response_slope([1.0, 2.0, float("nan"), 3.0], [2.0, 4.0, 100.0, 6.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same length"):
        response_slope([1.0, 2.0], [1.0])
    assert gap_closure(10.0, 4.0, 2.0) == pytest.approx(0.75)
    assert math.isnan(gap_closure(2.0, 1.0, 2.0)) and math.isnan(gap_closure(1.0, 1.0, 3.0))


def test_load_ground_truth_aligns_by_case_id(tmp_path):
    from monai_cft.evaluation import load_ground_truth

    ids = np.array(["c2", "c0", "c1"])
    images = np.arange(3, dtype=np.float32)[:, None, None, None] * np.ones((3, len(NAMES), H, W), np.float32)
    path = tmp_path / "gt.npz"
    np.savez(path, ids=ids, names=np.array(NAMES), targets=np.zeros((3, len(NAMES)), np.float32), images=images,
             hit=np.ones((3, len(NAMES)), bool), variables=np.zeros((3, len(NAMES), len(NAMES)), np.float32))
    gt = load_ground_truth(path, ["c0", "c1"], NAMES)
    assert gt["images"][:, 0, 0, 0].tolist() == [1.0, 2.0] and gt["hit"].shape == (2, len(NAMES))
    with pytest.raises(ValueError, match=r"1 of the 2 evaluated cases: 'c9'"):
        load_ground_truth(path, ["c0", "c9"], NAMES)
    with pytest.raises(ValueError, match="variables"):
        load_ground_truth(path, ["c0"], NAMES[::-1])


def test_missing_inputs_are_skipped_with_a_warning(tmp_path, capsys):
    from monai_cft.evaluation import CounterfactualEvaluation

    ev = CounterfactualEvaluation("m.pt", str(tmp_path / "models" / "segmentor_eval.pt"), str(tmp_path / "scpr"),
                                  str(tmp_path / "eval" / "pos_seg"), "pos_seg",
                                  ground_truth_path=str(tmp_path / "scpr" / "ground_truth" / "test_seed0.npz"),
                                  measurements_path=str(tmp_path / "eval" / "measurements.json"))
    assert ev._ground_truth(["c0"], NAMES) is None and ev._calcium_threshold() is None
    out = capsys.readouterr().out
    assert "test_seed0.npz" in out and "python -m monai_cft.data.ground_truth" in out
    assert "measurements.json" in out and "python -m monai_cft.segmentor_evaluation" in out
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "measurements.json").write_text(json.dumps({"calcium_threshold": {"threshold_hu": 455.0}}))
    assert ev._calcium_threshold() == 455.0


def test_bundle_passes_the_new_inputs():
    cfg = json.loads((Path(__file__).resolve().parents[2] / "bundle" / "configs" / "evaluate.json").read_text())
    assert cfg["evaluator"]["ground_truth_path"] == "@ground_truth_path"
    assert cfg["evaluator"]["measurements_path"] == "@measurements_path"
    assert "ground_truth" in cfg["ground_truth_path"] and "measurements.json" in cfg["measurements_path"]


def test_ground_truth_equal_to_the_factual_image_closes_no_gap(single_thread):
    n = 3
    x_hu = torch.stack([_bright_case(i) for i in range(n)])[:, None]
    kw = _kw()
    from monai_cft.metrics import uniform_targets

    gt = {"images": x_hu.repeat(1, len(NAMES), 1, 1), "targets": uniform_targets(NAMES, kw["ranges"], n, kw["seed"]),
          "hit": np.ones((n, len(NAMES)), bool)}
    _, m = evaluate_counterfactuals(IdentitySCM(), BrightSegmentor(), _hu_to_unit(x_hu), torch.ones(n, len(NAMES)),
                                    MASKS, ground_truth=gt, **kw)
    for vname in NAMES:
        e = m["intervened_error"][vname]
        assert e["err_ground_truth"] == pytest.approx(e["err_identity"]) and math.isnan(e["gap_closure_identity"])
        assert m["pixel_l1_to_ground_truth"][vname]["inside"]["identity"] == pytest.approx(0.0, abs=1e-6)
        assert all(v == 0.0 for v in m["response_slope_ground_truth"][vname].values())


def test_run_writes_the_baselines(tmp_path, monkeypatch, single_thread):
    """CounterfactualEvaluation.run with stand-ins for the checkpoints and the dataset."""
    import monai_cft.evaluation as ev_mod
    import monai_cft.networks.loading
    import monai_cft.utils.checkpoint
    from monai_cft.metrics import uniform_targets
    from monai_cft.networks.dscm import DeepSCM
    from monai_cft.report import read_effectiveness

    n = 4
    x = _hu_to_unit(torch.stack([_bright_case(i) for i in range(n)])[:, None])
    ranges = {nm: [0.0, 4.0] for nm in NAMES}
    config = {"structures": STRUCTURES, "variables": NAMES, "regions": REGIONS, "ranges": ranges,
              "hu_window": list(WINDOW)}
    ids = [f"c{i}" for i in range(n)]
    data = {"images": x, "variables": torch.ones(n, len(NAMES)), "region_masks": MASKS, "element_size": 0.25,
            "ids": ids, "config": config}
    monkeypatch.setattr(monai_cft.utils.checkpoint, "load_checkpoint", lambda *a, **k: {"meta": {"preset": "quick"}})
    monkeypatch.setattr(DeepSCM, "from_checkpoint", staticmethod(lambda ckpt: IdentitySCM()))
    monkeypatch.setattr(monai_cft.networks.loading, "load_segmentor", lambda *a, **k: (BrightSegmentor(), {"arch": "stub"}))
    monkeypatch.setattr(ev_mod, "load_split_tensors", lambda *a, **k: data)
    monkeypatch.setattr(ev_mod.CounterfactualEvaluation, "_figure", lambda *a: None)
    gt_path = tmp_path / "gt.npz"
    targets = uniform_targets(NAMES, ranges, n + 1, 0).numpy()
    np.savez(gt_path, ids=np.array(["extra", *ids[::-1]]), names=np.array(NAMES), targets=targets[[4, 3, 2, 1, 0]],
             images=np.full((n + 1, len(NAMES), H, W), 50.0, np.float32), hit=np.ones((n + 1, len(NAMES)), bool))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "measurements.json").write_text(json.dumps({"calcium_threshold": {"threshold_hu": 500.0}}))
    ev = ev_mod.CounterfactualEvaluation("m.pt", "s.pt", str(tmp_path), str(tmp_path / "eval" / "none"), "none",
                                         ground_truth_path=str(gt_path),
                                         measurements_path=str(tmp_path / "eval" / "measurements.json"))
    metrics = ev.run()
    for mode in ("none", "identity", "ground_truth"):
        rows = read_effectiveness(tmp_path / "eval" / mode / "effectiveness.csv")
        assert len(rows) == n * len(NAMES) ** 2 and {r["mode"] for r in rows} == {mode}
    assert metrics["calcium_threshold"]["threshold_hu"] == 500.0 and metrics["ground_truth_path"] == str(gt_path)
    saved = json.loads((tmp_path / "eval" / "none" / "metrics.json").read_text())
    assert set(saved["pixel_l1_to_ground_truth"]) == set(NAMES)
    table = (tmp_path / "eval" / "none" / "table1.md").read_text()
    assert "Identity (x unchanged)" in table and "Ground truth" in table
