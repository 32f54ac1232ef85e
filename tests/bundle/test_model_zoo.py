"""Model-zoo conformance of the bundle: metadata against MONAI's published schema, the training
configs' required properties, handler order, and the multi-process configs stacking on each workflow."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from helpers import make_scpr_dataset

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bundle" / "configs"
SCHEMA = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"
TRAINING = ["train.json", "train_segmentor.json", "train_regressor.json", "finetune.json"]


@pytest.mark.skipif(not SCHEMA.is_file(), reason=f"MONAI's metadata schema is not provided at {SCHEMA}")
def test_metadata_passes_the_model_zoo_schema(tmp_path):
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["variables"]["num_channels"] == 9 and len(fmt["inputs"]["variables"]["channel_def"]) == 9
    assert fmt["outputs"]["pred"]["channel_def"]["0"] == "counterfactual image"
    broken = dict(meta)
    del broken["version"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(Exception, match="version"):  # the check can fail
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


@pytest.fixture(scope="module")
def tiny_bundle_inputs(tmp_path_factory):
    """A prepared dataset and tiny stand-ins for the pretrained DSCM and the guidance segmentor."""
    from monai_cft.data.presets import HU_WINDOW
    from monai_cft.networks.dscm import build_dscm
    from monai_cft.networks.predictors import build_segmentor
    from monai_cft.utils.checkpoint import save_checkpoint
    from monai_cft.variables import DEFAULT_REGIONS, DEFAULT_STRUCTURES, variable_names

    root = tmp_path_factory.mktemp("zoo")
    scpr = make_scpr_dataset(root / "scpr_quick")
    prep = json.loads((scpr / "prepare_config.json").read_text())
    names = variable_names(DEFAULT_STRUCTURES, DEFAULT_REGIONS)
    torch.manual_seed(0)
    dscm = build_dscm("quick", 2, (32, 192), names, prep["ranges"], widths=(4, 8, 8, 8), blocks_per_level=1,
                      z_max_res=24, flow_kwargs={"hidden": (8,), "transforms": 1, "bins": 4})
    base = {"preset": "quick", "variables": names, "ranges": prep["ranges"], "structures": dict(DEFAULT_STRUCTURES),
            "regions": list(DEFAULT_REGIONS), "spatial_dims": 2, "img_size": [32, 192], "in_channels": 1}
    save_checkpoint(root / "models" / "dscm.pt", dscm,
                    {**base, **dscm.checkpoint_meta(), "kind": "dscm", "cft_mode": "none", "hu_window": list(HU_WINDOW)})
    save_checkpoint(root / "models" / "dscm_cft_pos_seg.pt", dscm,
                    {**base, **dscm.checkpoint_meta(), "kind": "dscm", "cft_mode": "pos_seg", "hu_window": list(HU_WINDOW)})
    save_checkpoint(root / "models" / "segmentor_guidance.pt", build_segmentor(2, "unet", 1, 4),
                    {**base, "kind": "segmentor", "role": "guidance", "arch": "unet", "out_channels": 4})
    return root, scpr


@pytest.mark.parametrize("config", TRAINING)
def test_training_configs_have_the_train_properties(config, tiny_bundle_inputs):
    from monai.bundle import ConfigWorkflow

    root, scpr = tiny_bundle_inputs
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "common.json"), str(CONFIGS / config)],
                        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, workflow_type="train",
                        dataset_dir=str(scpr), ckpt_dir=str(root / "models"), output_dir=str(root / "out"))
    wf.initialize()
    assert wf.check_properties() == []


@pytest.mark.parametrize("config", TRAINING)
def test_train_handlers_end_with_stats_then_tensorboard(config):
    handlers = json.loads((CONFIGS / config).read_text())["train"]["handlers"]
    assert [h["_target_"] for h in handlers[-2:]] == ["monai.handlers.StatsHandler",
                                                        "monai.handlers.TensorBoardStatsHandler"]
    if config != "finetune.json":  # validation handlers as well
        val = json.loads((CONFIGS / config).read_text())["validate"]["handlers"]
        assert {"monai.handlers.StatsHandler", "monai.handlers.TensorBoardStatsHandler"} <= {h["_target_"] for h in val}


@pytest.mark.parametrize("config", TRAINING)
def test_multi_gpu_configs_stack_on_every_training_config(config, tiny_bundle_inputs):
    """The documented stacking parses (one process: the distributed parts are no-ops until torchrun)."""
    from monai.bundle import ConfigParser

    files = [str(CONFIGS / "common.json"), str(CONFIGS / config), str(CONFIGS / "multi_gpu.json")]
    if config != "finetune.json":
        files.append(str(CONFIGS / "multi_gpu_validate.json"))
    parser = ConfigParser()
    parser.read_config(files)
    assert parser["train"]["dataloader"]["shuffle"] is False
    assert parser["train"]["dataloader"]["sampler"] == "@train#sampler"
    assert parser["train"]["sampler"]["even_divisible"] is True
    if config != "finetune.json":
        assert parser["validate"]["sampler"]["even_divisible"] is False
    assert any("init_distributed" in e for e in parser["initialize"])
    assert parser["finalize"] == ["$monai_cft.engines.distributed.finalize_distributed()"]


def test_rank_handlers_keep_only_the_collective_ones_off_rank_zero(monkeypatch):
    from monai.handlers import StatsHandler, ValidationHandler

    import monai_cft.engines.distributed as D

    sync, val, stats = D.SyncGradients(), ValidationHandler(validator=None, interval=1), StatsHandler()
    assert D.rank_handlers([sync, val, stats]) == [sync, val, stats]  # one process
    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(D, "rank", lambda: 1)
    assert D.rank_handlers([sync, val, stats]) == [sync, val]
    monkeypatch.setattr(D, "rank", lambda: 0)
    assert D.rank_handlers([sync, val, stats]) == [sync, val, stats]


def test_init_distributed_outside_torchrun_names_the_missing_variables(monkeypatch):
    from monai_cft.engines.distributed import init_distributed

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match=r"torchrun.*'RANK'"):
        init_distributed("cpu")


def test_inference_config_has_the_infer_properties_and_runs_a_datalist(tiny_bundle_inputs, tmp_path):
    """inference.json: MONAI's InferProperties (dataset, evaluator, inferer, network_def, ...), and its
    evaluator runs every case of a ``--datalist`` (here two cases, relative paths)."""
    from monai.bundle import ConfigWorkflow

    root, scpr = tiny_bundle_inputs
    items = json.loads((scpr / "dataset.json").read_text())["test"][:2]
    cases = [{"image": str(scpr / it["image"]), "intervention": {"lumen_mid": "+0.5"},
              "variables": it["variables"], "name": it["id"]}
             for it in items]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "common.json"), str(CONFIGS / "inference.json")],
                        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, workflow_type="infer",
                        dataset_dir=str(scpr), ckpt_dir=str(root / "models"), output_dir=str(tmp_path),
                        datalist=str(tmp_path / "cases.json"), allow_extrapolation=True,
                        device="$torch.device('cpu')", run_id="inference")
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    out = tmp_path / "inference" / "pos_seg"
    for it in items:
        for suffix in ("_cf.nii.gz", "_diff.nii.gz", "_panel.png", "_values.json"):
            assert (out / f"{it['id']}{suffix}").is_file(), (it["id"], suffix)


@pytest.mark.parametrize("cases,text", [
    ("[]", "non-empty JSON list"),
    ('[{"image": "a.nii.gz"}]', "'image' and 'intervention'"),
    ('[{"image": "a.nii.gz", "intervention": {}, "colour": 1}]', "['colour']"),
    ('[{"image": "a.nii.gz", "intervention": {}}, {"image": "b/a.nii.gz", "intervention": {}}]', "'a' is used twice"),
    ('[{"image": "a.nii.gz", "intervention": {}, "name": "../x"}]', "'../x'"),
    ("{bad", "not valid JSON"),
])
def test_inference_datalist_errors(tmp_path, cases, text):
    from monai_cft.inference_engine import inference_items

    (tmp_path / "cases.json").write_text(cases)
    with pytest.raises(ValueError, match=re.escape(text)):
        inference_items(datalist=str(tmp_path / "cases.json"))
    with pytest.raises(ValueError, match="no input image"):
        inference_items(image="")


def test_finetune_writes_the_main_network_as_model_pt(tiny_bundle_inputs, tmp_path):
    """``extra_output_paths`` (the pipeline passes models/model.pt for Pos-Seg-CFT): the same export twice."""
    from monai_cft.utils.bundle import run_bundle

    root, scpr = tiny_bundle_inputs
    models = tmp_path / "models"
    models.mkdir()
    for name in ("dscm.pt", "segmentor_guidance.pt"):
        (models / name).write_bytes((root / "models" / name).read_bytes())
    run_bundle("finetune", [str(CONFIGS / "common.json"), str(CONFIGS / "finetune.json")],
               meta_file=str(CONFIGS / "metadata.json"), dataset_dir=str(scpr), ckpt_dir=str(models),
               output_dir=str(tmp_path), cft_mode="none", device="$torch.device('cpu')", torch_threads=1,
               extra_output_paths=[str(models / "model.pt")])
    a = torch.load(models / "dscm_cft_none.pt", weights_only=True)
    b = torch.load(models / "model.pt", weights_only=True)
    assert a["meta"] == b["meta"] and a["meta"]["cft_mode"] == "none"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    from monai_cft import pipeline

    args = pipeline.parse_args(["--data-dir", str(tmp_path), "--output-dir", str(tmp_path)])
    args.torch_threads = 1
    stages = {s.name: s.command for s in pipeline.build_stages(args)}
    assert any("model.pt" in c for c in stages[f"finetune_{pipeline.MAIN_MODE}"])
    assert not any("model.pt" in c for n, cmd in stages.items() if n != f"finetune_{pipeline.MAIN_MODE}"
                   for c in (cmd or []))
