"""Counterfactual inference (Python API and bundle) and the fine-tuning bundle config, on a tiny model.

The DSCM is a small randomly initialised one at the quick preset's 32 x 192 and the segmentor an
untrained UNet: these tests check plumbing, geometry, units, files and errors, not image quality.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cft.data.presets import HU_WINDOW
from monai_cft.inference import CounterfactualPipeline, CounterfactualResult, parse_intervention
from monai_cft.inference_cases import load_case
from monai_cft.inference_output import describe_result, save_result
from monai_cft.networks.loading import load_segmentor
from monai_cft.transforms.intensity import HUWindow
from monai_cft.networks.dscm import build_dscm
from monai_cft.networks.predictors import ParentRegressor, build_segmentor
from monai_cft.utils.bundle import run_bundle
from monai_cft.utils.checkpoint import load_checkpoint, save_checkpoint
from monai_cft.variables import DEFAULT_REGIONS, DEFAULT_STRUCTURES, variable_names
from helpers import make_scpr_dataset, model_meta

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bundle" / "configs"
COMMON, FINETUNE, INFERENCE = (str(CONFIGS / f) for f in ("common.json", "finetune.json", "inference.json"))
VARIABLES = variable_names(DEFAULT_STRUCTURES, DEFAULT_REGIONS)
SPACING = 0.5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A prepared quick dataset plus pretrained-model stand-ins in <tmp>/models (dscm, segmentor, regressor)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cft_env")
    scpr = make_scpr_dataset(root / "scpr_quick", n_train=4, n_val=1, n_test=1)
    prep = json.loads((scpr / "prepare_config.json").read_text())
    torch.manual_seed(0)
    dscm = build_dscm(
        "quick", 2, (32, 192), VARIABLES, prep["ranges"], widths=(4, 8, 8, 8), blocks_per_level=1, z_max_res=24,
        flow_kwargs={"hidden": (8,), "transforms": 1, "bins": 4},
    )
    models = root / "models"
    save_checkpoint(models / "dscm.pt", dscm, model_meta(prep, **dscm.checkpoint_meta(), kind="dscm", cft_mode="none",
                                                      hu_window=list(HU_WINDOW)))
    save_checkpoint(models / "segmentor_guidance.pt", build_segmentor(2, "unet", 1, 4),
                    model_meta(prep, kind="segmentor", role="guidance", arch="unet", out_channels=4))
    save_checkpoint(models / "regressor.pt", ParentRegressor(2, 1, 9), model_meta(prep, kind="regressor", num_outputs=9))
    yield {"root": root, "scpr": scpr, "prep": prep, "models": models, "dscm": dscm}
    torch.set_num_threads(threads)


def _overrides(env, out: Path) -> dict:
    return {
        "dataset_dir": str(env["scpr"]),
        "ckpt_dir": str(env["models"]),
        "output_dir": str(out),
        "device": "$torch.device('cpu')",
        "batch_size": 2,
        "torch_threads": 1,
    }


def _finetune(env, out: Path, mode: str, **extra) -> None:
    run_bundle("finetune", [COMMON, FINETUNE], logging_file=False, cft_mode=mode,
               **{**_overrides(env, out), "train#trainer#max_epochs": 1, "elbo_target_batches": 1, **extra})


@pytest.fixture(scope="module")
def finetuned(env, tmp_path_factory):
    """Run the finetune bundle once per mode (1 epoch of 2 iterations)."""
    out = tmp_path_factory.mktemp("cft_out")
    for mode in ("none", "reg", "seg", "pos_seg"):
        _finetune(env, out, mode)
    return out


# ---------------------------------------------------------------- fine-tuning bundle
def test_finetune_bundle_writes_every_mode(env, finetuned):
    base = torch.load(env["models"] / "dscm.pt", weights_only=True)["model"]
    for mode in ("none", "reg", "seg", "pos_seg"):
        ck = load_checkpoint(env["models"] / f"dscm_cft_{mode}.pt", expect={"kind": "dscm", "cft_mode": mode,
                                                                            "preset": "quick"})
        meta = ck["meta"]
        assert meta["spacing"] == SPACING and meta["boundaries"] == pytest.approx([1 / 3, 2 / 3])
        assert meta["variables"] == VARIABLES and meta["cft"]["iterations"] == (0 if mode == "none" else 2)
        same = all(torch.equal(v, base[k]) for k, v in ck["model"].items())
        assert same == (mode == "none"), mode  # the No-CFT baseline is the pretrained DSCM
        mech = [k for k in base if k.startswith("mechanisms.")]
        assert all(torch.equal(ck["model"][k], base[k]) for k in mech)  # flows frozen in every mode
        if mode != "none":
            state = torch.load(finetuned / "cft_state" / f"cft_{mode}_state.pt", weights_only=True)
            assert state["engine"]["iteration"] == 2 and state["meta"]["cft_mode"] == mode


def test_finetune_bundle_resumes_and_rejects_unknown_mode(env, finetuned):
    _finetune(env, finetuned, "pos_seg", **{"train#trainer#max_epochs": 2})
    state = torch.load(finetuned / "cft_state" / "cft_pos_seg_state.pt", weights_only=True)
    assert state["engine"]["iteration"] == 4  # continued from iteration 2, not restarted
    assert load_checkpoint(env["models"] / "dscm_cft_pos_seg.pt")["meta"]["cft"]["iterations"] == 4
    with pytest.raises(Exception) as err:
        _finetune(env, finetuned, "posseg")
    chain, exc = [], err.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any("unknown cft_mode 'posseg'" in m and "pos_seg" in m for m in chain), chain


# ---------------------------------------------------------------- interventions
def test_parse_intervention_relative_absolute_and_errors():
    factual = {"a": 10.0, "b": 2.0}
    ranges = {"a": [0.0, 40.0], "b": [0.0, 5.0]}
    assert parse_intervention({"a": "+20", "b": 3.5}, factual, ranges) == {"a": 30.0, "b": 3.5}
    assert parse_intervention('{"a": "-5", "b": "4"}', factual, ranges) == {"a": 5.0, "b": 4.0}
    with pytest.raises(ValueError, match=r"unknown variable\(s\) \['c'\].*\['a', 'b'\]"):
        parse_intervention({"c": 1.0}, factual, ranges)
    with pytest.raises(ValueError, match="not a finite"):
        parse_intervention({"a": float("nan")}, factual, ranges)
    with pytest.raises(ValueError, match="not a finite"):
        parse_intervention({"a": "+inf"}, factual, ranges)
    with pytest.raises(ValueError, match="must be a number"):
        parse_intervention({"a": "more"}, factual, ranges)
    with pytest.raises(ValueError, match=r"outside its observed range \[0, 40\].*allow_extrapolation"):
        parse_intervention({"a": "+40"}, factual, ranges)
    with pytest.warns(UserWarning, match="extrapolating"):
        assert parse_intervention({"a": "+40"}, factual, ranges, allow_extrapolation=True) == {"a": 50.0}
    with pytest.raises(ValueError, match="non-empty"):
        parse_intervention({}, factual, ranges)


# ---------------------------------------------------------------- Python API
@pytest.fixture(scope="module")
def pipe(env, finetuned):
    return CounterfactualPipeline.from_bundle(ROOT / "bundle", mode="pos_seg", ckpt_dir=str(env["models"]),
                                              device="cpu")


def _scpr_case(env) -> tuple[MetaTensor, dict]:
    from monai.transforms import LoadImage

    item = json.loads((env["scpr"] / "dataset.json").read_text())["training"][0]  # values inside the ranges
    img = LoadImage(image_only=True, ensure_channel_first=True)(str(env["scpr"] / item["image"]))
    return img, {k: item[k] for k in VARIABLES}


def test_null_intervention_reproduces_the_image_and_keeps_geometry(pipe, env):
    img, variables = _scpr_case(env)
    res = pipe(img, variables, {"calcified_mid": variables["calcified_mid"]})
    assert res.intended == pytest.approx(variables, abs=1e-3)
    assert torch.allclose(res.counterfactual, res.image, atol=0.5)  # exact abduction, HU
    assert torch.equal(res.counterfactual.affine, img.affine)
    assert torch.allclose(res.image, img.clamp(*HU_WINDOW).float(), atol=1e-3)
    assert set(res.measured) == set(VARIABLES) and all(math.isfinite(v) for v in res.measured.values())


def test_relative_intervention_and_saved_files(pipe, env, tmp_path):
    img, variables = _scpr_case(env)
    lo, hi = env["prep"]["ranges"]["lumen_mid"]
    delta = round((hi - lo) / 4, 3)
    start = lo + (hi - lo) / 8
    res = pipe(img, dict(variables, lumen_mid=start), {"lumen_mid": f"+{delta}"})
    assert res.intervention["lumen_mid"] == pytest.approx(start + delta)
    assert res.intended["lumen_mid"] == pytest.approx(start + delta, rel=1e-5)
    others = [k for k in VARIABLES if k != "lumen_mid"]
    assert all(res.intended[k] == pytest.approx(variables[k], abs=1e-3) for k in others)  # independent graph
    assert torch.allclose(res.difference, res.counterfactual - res.image)
    cf = res.counterfactual
    assert cf.min() >= HU_WINDOW[0] - 1e-3 and cf.max() <= HU_WINDOW[1] + 1e-3

    assert isinstance(res, CounterfactualResult)
    paths = save_result(res, tmp_path, name="case_x")
    nii = nib.load(paths["counterfactual"])
    assert np.allclose(nii.affine, img.affine.numpy()) and nii.shape == (32, 192)
    assert np.allclose(nii.get_fdata(), cf[0].numpy(), atol=1e-3)
    assert np.allclose(nib.load(paths["difference"]).get_fdata(), res.difference[0].numpy(), atol=1e-3)
    png = Path(paths["panel"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    values = json.loads(Path(paths["values"]).read_text())
    assert values["variables"]["lumen_mid"]["intended"] == pytest.approx(start + delta, rel=1e-5)
    assert values["variables"]["lumen_mid"]["measured"] == pytest.approx(res.measured["lumen_mid"])
    assert "do(lumen_mid" in describe_result(res) and "mm²" in describe_result(res)


def test_volume_with_centerline_is_straightened_and_measured(pipe):
    vol = torch.full((1, 40, 40, 120), -80.0)
    vol[:, 18:22, 18:22, :] = 350.0  # a straight lumen along z
    affine = torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64))
    img = MetaTensor(vol, affine=affine)
    centerline = np.stack([np.full(60, 9.75), np.full(60, 9.75), np.linspace(2.0, 110.0, 60)], 1)
    case = load_case(img, centerline, **pipe.geometry)
    assert tuple(case.image.shape) == (1, 32, 192) and case.volume is img
    assert torch.allclose(case.image.affine, torch.diag(torch.tensor([SPACING] * 3 + [1.0], dtype=torch.float64)))
    # an untrained segmentor measures values outside the observed ranges: the factual values themselves
    # (beyond the 5 % tolerance) or, within it, the intervention's target; either error names the value
    with pytest.raises(ValueError, match="measured by the guidance segmentor|outside its observed range"):
        pipe(case.image, None, {"lumen_distal": "+0.0"})
    with pytest.warns(UserWarning, match="extrapolat"):
        res = pipe(case.image, None, {"lumen_distal": "+0.0"}, allow_extrapolation=True)
    assert res.variables == res.measured_factual  # measured by the guidance segmentor
    assert res.counterfactual.shape == (1, 32, 192)


def test_bad_inputs_give_clear_errors(pipe, env, tmp_path):
    img, variables = _scpr_case(env)
    with pytest.raises(ValueError, match=r"unknown variable\(s\) \['plaque_mid'\]"):
        pipe(img, variables, {"plaque_mid": 1.0})
    with pytest.raises(ValueError, match=r"unknown \['foo'\], missing \['lumen_proximal'\]"):
        pipe(img, {**{k: v for k, v in variables.items() if k != "lumen_proximal"}, "foo": 1.0}, {"lumen_mid": 1.0})
    with pytest.raises(ValueError, match="not finite"):
        pipe(img, dict(variables, lumen_mid=float("inf")), {"lumen_distal": "+1"})
    with pytest.raises(ValueError, match="needs a centreline"):
        pipe(torch.zeros(1, 20, 20, 20), variables, {"lumen_mid": "+1"})
    with pytest.raises(TypeError, match="load_case"):
        pipe(str(env["scpr"] / "images" / "case_0000.nii.gz"), variables, {"lumen_mid": "+1"})
    with pytest.raises(ValueError, match="outside its observed range"):
        pipe(img, variables, {"lumen_mid": 1e6})
    shutil.copy(env["models"] / "dscm_cft_pos_seg.pt", tmp_path / "dscm_cft_seg.pt")
    shutil.copy(env["models"] / "segmentor_guidance.pt", tmp_path / "segmentor_guidance.pt")
    with pytest.raises(Exception, match="cft_mode"):  # a pos_seg checkpoint where a seg one was asked for
        CounterfactualPipeline.from_bundle(ROOT / "bundle", mode="seg", ckpt_dir=str(tmp_path), device="cpu")
    with pytest.raises(Exception, match="preset"):
        CounterfactualPipeline.from_bundle(ROOT / "bundle", mode="pos_seg", ckpt_dir=str(env["models"]),
                                           preset="paper", device="cpu")
    with pytest.raises(ValueError, match="unknown cft_mode"):
        CounterfactualPipeline.from_bundle(ROOT / "bundle", mode="posseg")
    with pytest.raises(ValueError, match="'kind'"):
        load_segmentor(env["models"] / "regressor.pt")


def test_inference_bundle_writes_outputs(env, finetuned, tmp_path):
    item = json.loads((env["scpr"] / "dataset.json").read_text())["test"][0]
    run_bundle("inference", [COMMON, INFERENCE], logging_file=False, cft_mode="seg",
               image=str(env["scpr"] / item["image"]), intervention={"calcified_proximal": "+0.5"},
               variables={k: item[k] for k in VARIABLES}, case_name=item["id"], allow_extrapolation=True,
               **_overrides(env, tmp_path))
    out = tmp_path / "inference" / "seg"
    for suffix in ("_cf.nii.gz", "_diff.nii.gz", "_panel.png", "_values.json"):
        assert (out / f"{item['id']}{suffix}").is_file(), suffix
    values = json.loads((out / f"{item['id']}_values.json").read_text())
    assert values["mode"] == "seg"
    assert values["intervention"]["calcified_proximal"] == pytest.approx(item["calcified_proximal"] + 0.5)


def test_fig1_panel(env, tmp_path):
    from monai.transforms import LoadImage

    from monai_cft.transforms.regions import RegionMasks
    from monai_cft.visualize import save_fig1

    items = json.loads((env["scpr"] / "dataset.json").read_text())["training"]
    load = LoadImage(image_only=True, ensure_channel_first=True)
    images = torch.stack([HUWindow()(load(str(env["scpr"] / it["image"])).as_tensor().float()) for it in items])
    data = {
        "images": images,
        "variables": torch.tensor([it["variables"] for it in items]),
        "region_masks": RegionMasks()(torch.zeros(1, 32, 192)).as_tensor(),
        "element_size": SPACING**2,
        "ids": [it["id"] for it in items],
    }
    seg = load_segmentor(env["models"] / "segmentor_guidance.pt")
    path = save_fig1(env["dscm"], seg, data, env["prep"], delta=1.0, mode="none", path=tmp_path / "fig1.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- evaluation bundle
def test_evaluate_bundle_writes_every_output(env, finetuned, tmp_path):
    """evaluate.json on the fine-tuned stand-in: effectiveness rows, metrics, Table 1 and Fig. 1."""
    import csv

    save_checkpoint(env["models"] / "segmentor_eval.pt", build_segmentor(2, "segresnet", 1, 4),
                    model_meta(env["prep"], kind="segmentor", role="eval", arch="segresnet", out_channels=4))
    evaluate = str(CONFIGS / "evaluate.json")
    with pytest.raises(Exception) as err:  # the tiny training split's ranges do not cover the test case
        run_bundle("evaluating", [COMMON, evaluate], logging_file=False, cft_mode="pos_seg", **_overrides(env, tmp_path))
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    assert any("outside its physical range" in m and "allow_extrapolation" in m for m in chain), chain
    run_bundle("evaluating", [COMMON, evaluate], logging_file=False, cft_mode="pos_seg", allow_extrapolation=True,
               **_overrides(env, tmp_path))
    out = tmp_path / "eval" / "pos_seg"
    n_test = len(json.loads((env["scpr"] / "dataset.json").read_text())["test"])
    with (out / "effectiveness.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_test * len(VARIABLES) * len(VARIABLES)
    assert sum(int(r["is_intervened"]) for r in rows) == n_test * len(VARIABLES)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_cases"] == n_test and metrics["mode"] == "pos_seg" and metrics["segmentor"] == "segresnet"
    assert "skipped" in metrics["realism"], "one test case cannot give two independent halves"
    assert (out / "fig1_pos_seg.png").stat().st_size > 0
    assert "Pos-Seg-CFT" in (out / "table1.md").read_text()
    with pytest.raises(Exception, match="cft_mode"):
        run_bundle("evaluating", [COMMON, evaluate], logging_file=False, cft_mode="bogus", **_overrides(env, tmp_path))
