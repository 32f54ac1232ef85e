"""Bad-input tables, one per public surface (issue 13): the prepare, synthetic and pipeline CLIs, the
inference API and its bundle run, checkpoints, bundle overrides and transforms.

Each case gives the input, the expected exception type (or, for a CLI, its exit status and the type
named in its one-line message) and a text the message must contain: the bad value itself, so that a
person can see what to fix. Valid neighbours of the cases run too, so that a table cannot pass by
refusing everything. More tables: tests/test_reliability_inputs.py, tests/data/test_reliability_data.py.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cft.utils.cli import run_cli

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"


def _cli(main, argv, capsys) -> tuple[int, str]:
    """Exit status and the error line of a CLI run in-process through :func:`run_cli`."""
    try:
        rc = run_cli(main, argv)
    except SystemExit as exit_:  # argparse usage error
        rc = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err  # one readable line, no traceback
    assert "Traceback" not in err
    return rc, lines[0]


def _check_cli(main, argv, capsys, rc, kind, text):
    got_rc, line = _cli(main, argv, capsys)
    assert got_rc == rc, line
    if kind == "usage":
        assert "error: argument" in line or "error: the following" in line, line
    else:
        assert line.startswith(f"error: {kind}: "), line
    assert text in line, line


# ----------------------------------------------------------------------------- prepare CLI
GOOD_DATALIST = None  # a valid raw dataset made by the fixture
PREPARE_CASES = [
    pytest.param(None, ["--angle", "nan"], 2, "usage", "'nan'", id="angle-nan"),
    pytest.param(None, ["--angle", "abc"], 2, "usage", "'abc'", id="angle-text"),
    pytest.param(None, ["--angle", "inf"], 2, "usage", "'inf'", id="angle-inf"),
    pytest.param(None, ["--workers", "-1"], 2, "usage", "'-1'", id="workers-negative"),
    pytest.param(None, ["--workers", "1.5"], 2, "usage", "'1.5'", id="workers-fraction"),
    pytest.param(None, ["--preset", "huge"], 2, "usage", "'huge'", id="unknown-preset"),
    pytest.param("{not json", [], 1, "ValueError", "is not valid JSON", id="datalist-not-json"),
    pytest.param("[1, 2]", [], 1, "ValueError", "got list", id="datalist-not-object"),
    pytest.param({"training": [{"id": "a", "image": "images/nope.nii.gz", "centerline": "centerlines/case_0000.csv"}]},
                 [], 1, "FileNotFoundError", "images/nope.nii.gz", id="datalist-missing-image"),
    pytest.param({"training": [{"id": "../../evil", "image": "IMAGE", "centerline": "CENTERLINE"}]},
                 [], 1, "ValueError", "'../../evil'", id="case-id-traversal"),
    pytest.param({"training": [{"id": "", "image": "IMAGE", "centerline": "CENTERLINE"}]},
                 [], 1, "ValueError", "''", id="case-id-empty"),
]


@pytest.fixture(scope="module")
def raw_case(tmp_path_factory):
    """A synthetic raw dataset of 2 cases (the files the bad datalists point at)."""
    from monai_cft.data.synthetic import main as synthetic_main

    root = tmp_path_factory.mktemp("raw")
    assert synthetic_main(["--out", str(root / "raw"), "--num-cases", "2", "--workers", "1", "--no-progress"]) == 0
    return root / "raw"


@pytest.mark.parametrize("datalist,argv,rc,kind,text", PREPARE_CASES)
def test_prepare_cli_bad_inputs(raw_case, tmp_path, capsys, datalist, argv, rc, kind, text):
    from monai_cft.data.prepare import main

    data_dir = raw_case
    if datalist is not None:
        data_dir = tmp_path / "raw"
        data_dir.mkdir()
        for sub in ("images", "centerlines", "labels"):
            os.symlink(raw_case / sub, data_dir / sub)
        if not isinstance(datalist, str):
            item = json.loads((raw_case / "dataset.json").read_text())["training"][0]
            text_ = json.dumps(datalist).replace('"IMAGE"', json.dumps(item["image"]))
            datalist = text_.replace('"CENTERLINE"', json.dumps(item["centerline"]))
        (data_dir / "dataset.json").write_text(datalist)
    out = tmp_path / "scpr"
    _check_cli(main, ["--data-dir", str(data_dir), "--out", str(out), "--no-progress", *argv], capsys, rc, kind, text)
    assert not any(out.glob("images/*")) and not (tmp_path.parent / "evil.nii.gz").exists()  # nothing half-written


def test_prepare_cli_missing_data_dir(tmp_path, capsys):
    from monai_cft.data.prepare import main

    _check_cli(main, ["--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys, 1,
               "FileNotFoundError", "nope/dataset.json")


def test_prepare_cli_valid_neighbour(raw_case, tmp_path, capsys):
    from monai_cft.data.prepare import main

    assert run_cli(main, ["--data-dir", str(raw_case), "--out", str(tmp_path / "o"), "--angle", "0", "--workers", "1",
                          "--no-progress"]) == 0


# --------------------------------------------------------------------------- synthetic CLI
SYNTHETIC_CASES = [
    pytest.param(["--num-cases", "0"], 2, "usage", "'0'", id="num-cases-0"),
    pytest.param(["--num-cases", "-3"], 2, "usage", "'-3'", id="num-cases-negative"),
    pytest.param(["--num-cases", "abc"], 2, "usage", "'abc'", id="num-cases-text"),
    pytest.param(["--num-cases", "2.5"], 2, "usage", "'2.5'", id="num-cases-fraction"),
    pytest.param(["--num-cases", "2", "--seed", "-1"], 2, "usage", "'-1'", id="seed-negative"),
    pytest.param(["--num-cases", "2", "--seed", "x"], 2, "usage", "'x'", id="seed-text"),
    pytest.param(["--num-cases", "2", "--workers", "-2"], 2, "usage", "'-2'", id="workers-negative"),
    pytest.param(["--num-cases", "2", "--out", "AFILE"], 1, "FileExistsError", "AFILE", id="out-is-a-file"),
]


@pytest.mark.parametrize("argv,rc,kind,text", SYNTHETIC_CASES)
def test_synthetic_cli_bad_inputs(tmp_path, capsys, argv, rc, kind, text):
    from monai_cft.data.synthetic import main

    (tmp_path / "AFILE").write_text("")
    argv = [a.replace("AFILE", str(tmp_path / "AFILE")) for a in argv]
    if "--out" not in argv:
        argv = ["--out", str(tmp_path / "raw"), *argv]
    _check_cli(main, argv, capsys, rc, kind, text)
    assert not (tmp_path / "raw").exists()


# ---------------------------------------------------------------------------- pipeline CLI
PIPELINE_CASES = [
    pytest.param(["--jobs", "0"], 2, "usage", "'0'", id="jobs-0"),
    pytest.param(["--jobs", "1.5"], 2, "usage", "'1.5'", id="jobs-fraction"),
    pytest.param(["--finetune-lr", "-1"], 2, "usage", "'-1'", id="lr-negative"),
    pytest.param(["--finetune-lr", "nan"], 2, "usage", "'nan'", id="lr-nan"),
    pytest.param(["--finetune-lr", "abc"], 2, "usage", "'abc'", id="lr-text"),
    pytest.param(["--torch-threads", "0"], 2, "usage", "'0'", id="threads-0"),
    pytest.param(["--num-cases", "abc"], 2, "usage", "'abc'", id="num-cases-text"),
    pytest.param(["--preset", "huge"], 2, "usage", "'huge'", id="unknown-preset"),
    pytest.param(["--epochs", "{bad"], 1, "ValueError", "'{bad'", id="epochs-not-json"),
    pytest.param(["--epochs", '{"dscm": 1.5}'], 1, "ValueError", "1.5", id="epochs-fraction"),
    pytest.param(["--epochs", '{"dscms": 3}'], 1, "ValueError", "'dscms'", id="epochs-unknown-kind"),
    pytest.param(["--stages", "nope"], 1, "ValueError", "'nope'", id="unknown-stage"),
    pytest.param(["--force", "dscmm"], 1, "ValueError", "'dscmm'", id="unknown-forced-stage"),
    pytest.param(["--device", "gpu7", "--stages", "dscm"], 1, "ValueError", "'gpu7'", id="bad-device"),
]


@pytest.mark.parametrize("argv,rc,kind,text", PIPELINE_CASES)
def test_pipeline_cli_bad_inputs(tmp_path, capsys, argv, rc, kind, text):
    from monai_cft.pipeline import main

    _check_cli(main, ["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"), *argv], capsys,
               rc, kind, text)
    assert not (tmp_path / "out" / "stages").exists()  # nothing ran


def test_pipeline_cli_valid_neighbour(tmp_path, capsys):
    from monai_cft.pipeline import main

    assert run_cli(main, ["--data-dir", str(tmp_path), "--output-dir", str(tmp_path), "--jobs", "1", "--finetune-lr",
                          "0.002", "--epochs", '{"dscm": 2}', "--device", "cpu", "--list"]) == 0


# --------------------------------------------------------------------------- inference API
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny DSCM (quick 32 x 192) and untrained guidance segmentor, saved as a bundle's models, plus an sCPR."""
    from monai_cft.data.presets import HU_WINDOW
    from monai_cft.networks.dscm import build_dscm
    from monai_cft.networks.predictors import build_segmentor
    from monai_cft.utils.checkpoint import save_checkpoint
    from monai_cft.variables import DEFAULT_REGIONS, DEFAULT_STRUCTURES, variable_names

    names = variable_names(DEFAULT_STRUCTURES, DEFAULT_REGIONS)
    ranges = {v: [0.0, 40.0] for v in names}
    torch.manual_seed(0)
    dscm = build_dscm("quick", 2, (32, 192), names, ranges, widths=(4, 8, 8, 8), blocks_per_level=1, z_max_res=24,
                      flow_kwargs={"hidden": (8,), "transforms": 1, "bins": 4}).eval()
    seg = build_segmentor(2, "unet", 1, 4).eval()
    root = tmp_path_factory.mktemp("tiny_models")
    base = {"preset": "quick", "variables": names, "ranges": ranges, "structures": dict(DEFAULT_STRUCTURES),
            "regions": list(DEFAULT_REGIONS), "spatial_dims": 2, "img_size": [32, 192], "in_channels": 1}
    save_checkpoint(root / "models" / "dscm_cft_pos_seg.pt", dscm,
                    {**base, **dscm.checkpoint_meta(), "kind": "dscm", "cft_mode": "pos_seg", "hu_window": list(HU_WINDOW)})
    save_checkpoint(root / "models" / "segmentor_guidance.pt", seg,
                    {**base, "kind": "segmentor", "role": "guidance", "arch": "unet", "out_channels": 4})
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    image = np.full((32, 192), -80.0, np.float32)
    image[14:18] = 350.0
    nib.save(nib.Nifti1Image(image, affine), root / "case.nii.gz")
    variables = {v: 10.0 for v in names}
    return {"root": root, "dscm": dscm, "seg": seg, "names": names, "variables": variables,
            "image": MetaTensor(torch.from_numpy(image)[None], affine=torch.from_numpy(affine))}


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from monai_cft.inference import CounterfactualPipeline
    from monai_cft.variables import DEFAULT_STRUCTURES

    return CounterfactualPipeline(tiny_models["dscm"], tiny_models["seg"], dict(DEFAULT_STRUCTURES), 0.5, mode="pos_seg")


_V = {"missing": "lumen_mid"}
API_CASES = [
    pytest.param({"intervention": {"plaque_mid": 1.0}}, ValueError, "'plaque_mid'", id="unknown-variable"),
    pytest.param({"intervention": {"calcified_mid": math.nan}}, ValueError, "nan", id="target-nan"),
    pytest.param({"intervention": {"calcified_mid": math.inf}}, ValueError, "inf", id="target-inf"),
    pytest.param({"intervention": {"calcified_mid": "abc"}}, ValueError, "'abc'", id="target-text"),
    pytest.param({"intervention": {"calcified_mid": "+x"}}, ValueError, "'+x'", id="relative-text"),
    pytest.param({"intervention": {"calcified_mid": 1e6}}, ValueError, "1e+06", id="target-out-of-range"),
    pytest.param({"intervention": {}}, ValueError, "{}", id="empty-intervention"),
    pytest.param({"intervention": [1, 2]}, ValueError, "[1, 2]", id="intervention-list"),
    pytest.param({"intervention": "{calcified_mid: 1"}, ValueError, "'{calcified_mid: 1'", id="intervention-bad-json"),
    pytest.param({"variables": "drop"}, ValueError, "lumen_mid", id="variables-missing-one"),
    pytest.param({"variables": {"lumen_mid": math.nan}}, ValueError, "'lumen_mid'", id="variables-nan"),
    pytest.param({"variables": [1.0, 2.0]}, ValueError, "got 2", id="variables-too-few"),
    pytest.param({"image": torch.zeros(1, 20, 20, 20)}, ValueError, "(1, 20, 20, 20)", id="volume-without-centreline"),
    pytest.param({"image": torch.zeros(1, 16, 96)}, ValueError, "(1, 16, 96)", id="image-wrong-size"),
    pytest.param({"image": torch.full((1, 32, 192), math.nan)}, ValueError, "6144 NaN", id="image-nan"),
    pytest.param({"image": "/nonexistent/x.nii.gz"}, FileNotFoundError, "/nonexistent/x.nii.gz", id="image-missing-file"),
    pytest.param({"image": torch.zeros(1, 20, 20, 20), "centerline": [[0, 0, math.nan], [1, 1, 1]]}, ValueError,
                 "point(s) [0]", id="centreline-nan"),
]


def _api_call(pipe, tiny_models, image=None, variables=None, intervention=None, centerline=None):
    img = tiny_models["image"] if image is None else image
    var = dict(tiny_models["variables"])
    if variables == "drop":
        var.pop("lumen_mid")
    elif isinstance(variables, dict):
        var.update(variables)
    elif variables is not None:
        var = variables
    from monai_cft.inference_cases import load_case

    case = load_case(img, centerline, **pipe.geometry)  # what a user does: load, then run
    return pipe(case.image, var, {"calcified_mid": 12.0} if intervention is None else intervention)


@pytest.mark.parametrize("kwargs,exc,text", API_CASES)
def test_inference_api_bad_inputs(pipe, tiny_models, kwargs, exc, text):
    with pytest.raises(exc, match=re.escape(text)):
        _api_call(pipe, tiny_models, **kwargs)


def test_inference_api_valid_neighbours(pipe, tiny_models):
    for intervention in ({"calcified_mid": 12.0}, {"calcified_mid": "+2"}, '{"calcified_mid": "-1"}'):
        res = _api_call(pipe, tiny_models, intervention=intervention)
        assert torch.isfinite(res.counterfactual).all()


CONSTRUCTOR_CASES = [
    pytest.param({"noise_temperature": math.nan}, ValueError, "nan", id="temperature-nan"),
    pytest.param({"noise_temperature": -1.0}, ValueError, "-1.0", id="temperature-negative"),
    pytest.param({"noise_temperature": "hot"}, ValueError, "'hot'", id="temperature-text"),
    pytest.param({"num_particles": 0}, ValueError, "0", id="particles-0"),
    pytest.param({"num_particles": 1.5}, ValueError, "1.5", id="particles-fraction"),
    pytest.param({"spacing": math.nan}, ValueError, "nan", id="spacing-nan"),
    pytest.param({"hu_window": (100, -100)}, ValueError, "(100, -100)", id="hu-window-reversed"),
    pytest.param({"structures": {"lumen": 1, "plaque": 2}}, ValueError, "'plaque'", id="structures-mismatch"),
]


@pytest.mark.parametrize("kwargs,exc,text", CONSTRUCTOR_CASES)
def test_inference_pipeline_constructor_bad_inputs(tiny_models, kwargs, exc, text):
    from monai_cft.inference import CounterfactualPipeline
    from monai_cft.variables import DEFAULT_STRUCTURES

    args = {"structures": dict(DEFAULT_STRUCTURES), "spacing": 0.5, **kwargs}
    with pytest.raises(exc, match=re.escape(text)):
        CounterfactualPipeline(tiny_models["dscm"], tiny_models["seg"], **args)


# ---------------------------------------------------------------------- inference bundle run
BUNDLE_INFERENCE_CASES = [
    pytest.param({"intervention": "{'calcified_mid': 'abc'}"}, ValueError, "'abc'", id="target-text"),
    pytest.param({"intervention": "{'plaque_mid': 5}"}, ValueError, "'plaque_mid'", id="unknown-variable"),
    pytest.param({"cft_mode": "posseg"}, ValueError, "'posseg'", id="unknown-mode"),
    pytest.param({"image": "MISSING"}, FileNotFoundError, "missing.nii.gz", id="image-missing"),
    pytest.param({"noise_temperature": "nan"}, ValueError, "'nan'", id="temperature-nan"),
    pytest.param({"num_particles": 1.5}, ValueError, "1.5", id="particles-fraction"),
    pytest.param({"ckpt_dir": "EMPTY"}, FileNotFoundError, "dscm_cft_pos_seg.pt", id="model-missing"),
    pytest.param({"variables": {"lumen_mid": 1.0}}, ValueError, "lumen_proximal", id="variables-incomplete"),
]


@pytest.mark.parametrize("override,exc,text", BUNDLE_INFERENCE_CASES)
def test_inference_bundle_bad_inputs(tiny_models, tmp_path, override, exc, text):
    from monai_cft.utils.bundle import run_bundle

    root = tiny_models["root"]
    args = {"ckpt_dir": str(root / "models"), "output_dir": str(tmp_path), "image": str(root / "case.nii.gz"),
            "intervention": "{'calcified_mid': 12.0}", "device": "$torch.device('cpu')", "torch_threads": 1}
    args.update(override)
    args = {k: (str(tmp_path / "missing.nii.gz") if v == "MISSING" else str(tmp_path) if v == "EMPTY" else v)
            for k, v in args.items()}
    with pytest.raises(Exception) as err:
        run_bundle("inference", [str(CONFIGS / "common.json"), str(CONFIGS / "inference.json")],
                   meta_file=str(CONFIGS / "metadata.json"), **args)
    from monai_cft.utils.cli import root_cause

    cause = root_cause(err.value)
    assert isinstance(cause, exc), repr(cause)
    assert text in str(cause), str(cause)
    assert not (tmp_path / "inference").exists() or not any((tmp_path / "inference").rglob("*.nii.gz"))


# ------------------------------------------------------------------------------- checkpoints
def _write(path: Path, kind: str) -> Path:
    from monai_cft.utils.checkpoint import save_checkpoint

    good = torch.nn.Linear(2, 3)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        save_checkpoint(path, good, {"kind": "dscm"})
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("hello")
    elif kind == "pickle":
        class Evil:
            def __reduce__(self):
                return (os.system, ("true",))

        with open(path, "wb") as f:
            pickle.dump({"model": Evil(), "meta": {}}, f)
    elif kind == "evil-torch":
        import datetime

        torch.save({"model": {"w": torch.ones(1)}, "meta": {"kind": "dscm", "saved": datetime.date(2026, 1, 1)}}, path)
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "no-meta":
        torch.save({"model": good.state_dict()}, path)
    elif kind == "other-kind":
        save_checkpoint(path, good, {"kind": "regressor"})
    elif kind == "nan":
        state = good.state_dict()
        state["weight"][0, 0] = math.nan
        save_checkpoint(path, state, {"kind": "dscm"})
    elif kind == "other-shape":
        save_checkpoint(path, torch.nn.Linear(2, 5), {"kind": "dscm"})
    return path


CHECKPOINT_CASES = [
    pytest.param("missing", FileNotFoundError, "ckpt.pt", id="missing"),
    pytest.param("empty", ValueError, "(0 bytes) is not a readable torch file", id="empty"),
    pytest.param("truncated", ValueError, "is not a readable torch file", id="truncated"),
    pytest.param("text", ValueError, "is not a readable torch file", id="text"),
    pytest.param("pickle", ValueError, "refused", id="code-in-pickle"),
    pytest.param("evil-torch", ValueError, "refused", id="object-in-meta"),
    pytest.param("list", ValueError, "got list", id="not-a-dict"),
    pytest.param("no-meta", ValueError, "'model'", id="no-meta"),
    pytest.param("other-kind", ValueError, "'regressor'", id="other-kind"),
    pytest.param("nan", ValueError, "weight", id="nan-weights"),
    pytest.param("other-shape", ValueError, "size mismatch for weight", id="other-shape"),
]


@pytest.mark.parametrize("kind,exc,text", CHECKPOINT_CASES)
def test_checkpoint_bad_files(tmp_path, kind, exc, text):
    from monai_cft.utils.checkpoint import load_model_weights

    path = _write(tmp_path / "ckpt.pt", kind)
    with pytest.raises(exc, match=re.escape(text)) as err:
        load_model_weights(torch.nn.Linear(2, 3), path, expect={"kind": "dscm"})
    assert "ckpt.pt" in str(err.value)  # names the file


@pytest.mark.parametrize("kind", ["empty", "truncated", "pickle"])
def test_dscm_and_resume_loaders_name_the_file(tmp_path, kind):
    from monai_cft.networks.dscm import DeepSCM

    path = _write(tmp_path / "dscm.pt", kind)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        DeepSCM.from_checkpoint(path)


def test_checkpoint_valid_neighbour(tmp_path):
    from monai_cft.utils.checkpoint import load_model_weights, save_checkpoint

    save_checkpoint(tmp_path / "ok.pt", torch.nn.Linear(2, 3), {"kind": "dscm"})
    assert load_model_weights(torch.nn.Linear(2, 3), tmp_path / "ok.pt", expect={"kind": "dscm"})["kind"] == "dscm"


# -------------------------------------------------------------------------- bundle overrides
OVERRIDE_CASES = [
    pytest.param("finetune.json", "lr", "abc", "'abc'", id="lr-text"),
    pytest.param("finetune.json", "lr", "True", "'True'", id="lr-bool"),
    pytest.param("finetune.json", "noise_temperature", "nan", "'nan'", id="temperature-nan"),
    pytest.param("finetune.json", "lagrange_lr", "inf", "'inf'", id="lagrange-lr-inf"),
    pytest.param("finetune.json", "max_epochs", "1.5", "1.5", id="epochs-fraction"),
    pytest.param("finetune.json", "max_epoch", "3", "did you mean", id="misspelled"),
    pytest.param("train.json", "batch_size", "0", "0", id="batch-size-0"),
    pytest.param("train.json", "beta", "[1]", "'[1]'", id="beta-list"),
    pytest.param("evaluate.json", "figure_delta", "twenty", "'twenty'", id="figure-delta-text"),
    pytest.param("inference.json", "num_particles", "abc", "'abc'", id="particles-text"),
]


@pytest.mark.parametrize("config,key,value,text", OVERRIDE_CASES)
def test_bundle_override_values(config, key, value, text):
    from monai_cft.utils.bundle import check_overrides

    files = f"['{CONFIGS / 'common.json'}','{CONFIGS / config}']"
    with pytest.raises(ValueError, match=re.escape(text)) as err:
        check_overrides(["run", "x", "--config_file", files, f"--{key}", value])
    assert key in str(err.value)


def test_bundle_override_valid_neighbours():
    from monai_cft.utils.bundle import check_overrides

    files = f"['{CONFIGS / 'common.json'}','{CONFIGS / 'finetune.json'}']"
    argv = ["run", "x", "--config_file", files, "--lr", "2e-3", "--max_epochs", "3", "--noise_temperature", "0",
            "--lagrange_lr", "$@lr * 10"]
    assert set(check_overrides(argv)) == {"lr", "max_epochs", "noise_temperature", "lagrange_lr"}


# -------------------------------------------------------------------------------- transforms
TRANSFORM_CASES = [
    pytest.param("RegionMasks", {"boundaries": "0.3,0.6"}, TypeError, "'0.3,0.6'", id="regions-boundaries-text"),
    pytest.param("RegionMasks", {"boundaries": (0.6, 0.3)}, ValueError, "(0.6, 0.3)", id="regions-decreasing"),
    pytest.param("RegionMasks", {"boundaries": (0.3, math.nan)}, ValueError, "nan", id="regions-nan"),
    pytest.param("RegionMasks", {"boundaries": (0.0, 0.5)}, ValueError, "(0.0, 0.5)", id="regions-at-edge"),
    pytest.param("RegionMasks", {"boundaries": (0.3, "x")}, TypeError, "'x'", id="regions-boundary-text"),
    pytest.param("RegionMasks", {"units": "cm"}, ValueError, "'cm'", id="regions-units"),
    pytest.param("RegionMasks", {"axis": 1.5}, TypeError, "1.5", id="regions-axis"),
    pytest.param("RegionMasks", {"names": ["a"]}, ValueError, "['a']", id="regions-names"),
    pytest.param("StraightenCPR", {"spacing": 0}, ValueError, "0", id="scpr-spacing-0"),
    pytest.param("StraightenCPR", {"spacing": math.nan}, ValueError, "nan", id="scpr-spacing-nan"),
    pytest.param("StraightenCPR", {"spacing": "abc"}, TypeError, "'abc'", id="scpr-spacing-text"),
    pytest.param("StraightenCPR", {"output_size": (0, 8)}, ValueError, "(0, 8)", id="scpr-size-0"),
    pytest.param("StraightenCPR", {"output_size": "abc"}, (TypeError, ValueError), "'abc'", id="scpr-size-text"),
    pytest.param("StraightenCPR", {"mode": "cubic"}, ValueError, "'cubic'", id="scpr-mode"),
    pytest.param("StraightenCPR", {"angle": math.inf}, ValueError, "inf", id="scpr-angle-inf"),
]


@pytest.mark.parametrize("name,kwargs,exc,text", TRANSFORM_CASES)
def test_transform_constructor_bad_inputs(name, kwargs, exc, text):
    import monai_cft.transforms as T

    base = {"StraightenCPR": {"spacing": 0.5, "output_size": (8, 16)}, "RegionMasks": {}}[name]
    with pytest.raises(exc, match=re.escape(text)):
        getattr(T, name)(**{**base, **kwargs})
