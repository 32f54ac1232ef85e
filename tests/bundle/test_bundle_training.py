"""The bundle's training configs: metadata, properties, override checking and 1-epoch smoke runs of
the segmentors, the regressor and the DSCM on a tiny hand-made sCPR dataset (same layout as
``python -m monai_cft.data.prepare`` writes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_cft.data.presets import HU_WINDOW, SCPR_PRESETS
from monai_cft.utils.bundle import (
    check_overrides,
    config_ids,
    find_bundle_root,
    parse_run_argv,
    run_bundle,
    validate_overrides,
)
from monai_cft.utils.checkpoint import load_checkpoint

from helpers import COMMON, CONFIGS, ROOT, VARIABLES, make_scpr_dataset

BUNDLE = ROOT / "bundle"


@pytest.fixture(scope="module")
def scpr_dir(tmp_path_factory):
    return make_scpr_dataset(tmp_path_factory.mktemp("scpr_quick"))


@pytest.fixture(scope="module")
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _common_overrides(scpr_dir: Path, out: Path) -> dict:
    return {
        "dataset_dir": str(scpr_dir),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "eval"),
        "device": "$torch.device('cpu')",
        "batch_size": 8,
        "torch_threads": 1,
        "train#trainer#max_epochs": 1,
    }


def _causes(exc: BaseException) -> str:
    """Messages of an exception and of every exception it was raised from."""
    out = []
    while exc is not None:
        out.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("MONAI_CFT_BUNDLE_ROOT", None)
    return env


def _cli(run_id: str, configs: list[str], overrides: dict) -> list[str]:
    import importlib.util

    assert importlib.util.find_spec("fire") is not None, "`python -m monai.bundle` needs the package 'fire'"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", repr([str(CONFIGS / c) for c in configs])]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    return cmd


# ---------------------------------------------------------------- metadata, properties, bundle root
def test_metadata_has_every_mandatory_field_and_matches_common():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"):
        assert meta.get(key), f"metadata.json lacks {key!r}"
    assert meta["version"] in meta["changelog"]
    assert meta["schema"].startswith("https://") and meta["schema"].endswith(".json")
    for pkg in ("pytorch-ignite", "nibabel", "itk", "zuko"):
        assert pkg in meta["required_packages_version"]
    fmt = meta["network_data_format"]
    keys = {"type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
            "channel_def"}
    for section in ("inputs", "outputs"):
        for name, tensor in fmt[section].items():
            assert keys <= set(tensor), f"{section}.{name} lacks {keys - set(tensor)}"
    common = json.loads(Path(COMMON).read_text())
    preset = SCPR_PRESETS[common["preset"]]
    image = fmt["inputs"]["image"]
    assert image["spatial_shape"] == list(preset["output_size"]) == fmt["outputs"]["pred"]["spatial_shape"]
    assert image["value_range"] == [-1, 1] and image["num_channels"] == 1
    variables = fmt["inputs"]["variables"]
    assert [variables["channel_def"][str(i)] for i in range(len(VARIABLES))] == VARIABLES
    assert variables["num_channels"] == len(VARIABLES)


def test_bundle_root_lookup(tmp_path, monkeypatch):
    assert Path(find_bundle_root()) == BUNDLE.resolve()
    monkeypatch.setenv("MONAI_CFT_BUNDLE_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="MONAI_CFT_BUNDLE_ROOT"):
        find_bundle_root()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "metadata.json").write_text("{}")
    assert find_bundle_root() == str(tmp_path.resolve())


@pytest.mark.parametrize("config", ["train.json", "train_segmentor.json", "train_regressor.json"])
def test_required_training_properties(config, scpr_dir):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[COMMON, str(CONFIGS / config)], meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=False, workflow_type="train", dataset_dir=str(scpr_dir))
    wf.initialize()
    assert wf.check_properties() == []
    assert wf.parser.get_parsed_content("dataset_dir") == str(scpr_dir)
    assert wf.parser.get_parsed_content("bundle_root") == str(BUNDLE.resolve())
    assert wf.parser.get_parsed_content("variables") == VARIABLES
    assert wf.parser.get_parsed_content("img_size") == list(SCPR_PRESETS["quick"]["output_size"])


# ---------------------------------------------------------------- override checking
def test_validate_overrides_accepts_known_and_names_close_matches():
    files = [COMMON, str(CONFIGS / "train.json")]
    ok = ["train#trainer#max_epochs", "train::trainer::max_epochs", "dataset_dir", "train#handlers#0#interval",
          "train#trainer#non_blocking", "_meta_#version"]
    assert validate_overrides(files, ok) == ok  # non_blocking: a DSCMTrainer parameter left at its default
    with pytest.raises(ValueError, match=r"'train#trainer#max_epoch'.*did you mean 'train#trainer#max_epochs'"):
        validate_overrides(files, ["train#trainer#max_epoch"])
    with pytest.raises(ValueError, match=r"'datset_dir'.*'dataset_dir'"):
        validate_overrides(files, ["dataset_dir", "datset_dir"])
    with pytest.raises(ValueError, match="train#handlers#9"):
        validate_overrides(files, ["train#handlers#9#interval"])
    assert "train#trainer#max_epochs" in config_ids({"train": {"trainer": {"max_epochs": 1}}})


def test_parse_run_argv_and_check_overrides():
    argv = ["run", "training", "--config-file", repr([COMMON, str(CONFIGS / "train.json")]), "--meta_file", "m.json",
            "--train#trainer#max_epochs=2", "--dataset-dir", "/data", "--seed", "-3", "--", "--verbose"]
    run_args, overrides = parse_run_argv(argv)
    assert run_args["config_file"] == [COMMON, str(CONFIGS / "train.json")] and run_args["meta_file"] == "m.json"
    assert overrides == {"train#trainer#max_epochs": "2", "dataset_dir": "/data", "seed": "-3"}
    assert check_overrides(argv) == ["train#trainer#max_epochs", "dataset_dir", "seed"]
    with pytest.raises(ValueError, match="lr_warmup_step'"):
        check_overrides(["run", "training", "--config_file", f"{COMMON},{CONFIGS / 'train.json'}", "--lr_warmup_step", "5"])
    assert check_overrides(None) == [], "outside `python -m monai.bundle` the process argv is not checked"


def test_misspelled_override_fails_on_the_command_line(scpr_dir, tmp_path):
    cmd = _cli("training", ["common.json", "train.json"], {"dataset_dir": scpr_dir, "train#trainer#max_epoch": 1})
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "unknown config override(s): 'train#trainer#max_epoch'" in res.stderr + res.stdout
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------- 1-epoch smoke runs
def test_segmentor_roles_train_and_save(scpr_dir, tmp_path, restore_threads):
    for role, arch, seed in (("guidance", "unet", 0), ("eval", "segresnet", 1)):
        run_bundle("training", [COMMON, str(CONFIGS / "train_segmentor.json")], logging_file=False,
                   segmentor_role=role, **_common_overrides(scpr_dir, tmp_path))
        ck = load_checkpoint(tmp_path / "models" / f"segmentor_{role}.pt",
                             expect={"kind": "segmentor", "role": role, "arch": arch, "preset": "quick", "seed": seed})
        assert ck["meta"]["metric_name"] == "val_mean_dice" and ck["meta"]["variables"] == VARIABLES
        from monai_cft.networks.predictors import build_segmentor

        net = build_segmentor(2, arch, 1, 4)
        net.load_state_dict(ck["model"])
        assert net(torch.zeros(1, 1, 32, 192)).shape == (1, 4, 32, 192)
    with pytest.raises(RuntimeError) as err:  # MONAI wraps errors of config expressions
        run_bundle("training", [COMMON, str(CONFIGS / "train_segmentor.json")], logging_file=False,
                   segmentor_role="evaluation", **_common_overrides(scpr_dir, tmp_path))
    assert "unknown segmentor_role 'evaluation'; valid choices are ['eval', 'guidance']" in _causes(err.value)


def test_regressor_trains_and_saves(scpr_dir, tmp_path, restore_threads):
    run_bundle("training", [COMMON, str(CONFIGS / "train_regressor.json")], logging_file=False,
               **_common_overrides(scpr_dir, tmp_path))
    ck = load_checkpoint(tmp_path / "models" / "regressor.pt", expect={"kind": "regressor", "variables": VARIABLES})
    assert ck["meta"]["metric_name"] == "val_mae" and ck["meta"]["metric"] > 0
    from monai_cft.networks.predictors import ParentRegressor

    net = ParentRegressor(2, 1, len(VARIABLES))
    net.load_state_dict(ck["model"])


def test_dscm_training_from_another_directory(scpr_dir, tmp_path):
    """The documented command, run from an unrelated working directory with relative-free paths."""
    overrides = _common_overrides(scpr_dir, tmp_path)
    cmd = _cli("training", ["common.json", "train.json"], overrides)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "val_elbo" in res.stdout + res.stderr
    for name in ("dscm.pt", "dscm_last.pt"):
        raw = torch.load(tmp_path / "models" / name, weights_only=True)
        meta = raw["meta"]
        assert meta["kind"] == "dscm" and meta["cft_mode"] == "none" and meta["preset"] == "quick"
        assert meta["variables"] == VARIABLES and meta["img_size"] == [32, 192] and meta["spatial_dims"] == 2
        assert set(meta["ranges"]) == set(VARIABLES)
    from monai_cft.networks.dscm import DeepSCM

    model = DeepSCM.from_checkpoint(tmp_path / "models" / "dscm.pt", expected_preset="quick")
    assert model.variables == VARIABLES
    assert list((tmp_path / "eval" / "tensorboard" / "dscm").glob("events.out.tfevents.*"))
    assert HU_WINDOW == tuple(raw["meta"]["hu_window"])
