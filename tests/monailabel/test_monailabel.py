"""MONAI Label integration (issue 10), tested against a real server through HTTP only.

A session fixture trains tiny models on a hand-made sCPR dataset (segmentor, DSCM, Pos-Seg-CFT
fine-tuning; under a minute on 2 cores), starts ``python -m monai_cft.monailabel serve`` as a
subprocess on 127.0.0.1 with a free port, polls ``/info/`` until it answers and stops the server by
its pid at the end. Every check goes through ``requests``. Skipped, with the reason, when MONAI
Label (the optional extra ``monai-cft[monailabel]``) is not installed; the command-line checks that
need no server run either way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
HAS_MONAILABEL = importlib.util.find_spec("monailabel") is not None
needs_server = pytest.mark.skipif(
    not HAS_MONAILABEL,
    reason="MONAI Label is not installed (optional extra monai-cft[monailabel]; see docs/monailabel.md)",
)
VARIABLES = [f"{s}_{r}" for s in ("lumen", "calcified", "noncalcified") for r in ("proximal", "mid", "distal")]
LABELS = {"lumen": 1, "calcified": 2, "noncalcified": 3}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("MONAI_LABEL_AUTO_UPDATE_SCORING", None)  # serve turns the background scoring off by default
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai_cft.monailabel", "serve", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- the command line (no server)
def test_missing_model_is_one_clear_line(tmp_path):
    res = _serve("--studies", str(tmp_path / "studies"), "--models", str(tmp_path / "models"), "--dry-run")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(tmp_path / "models" / "segmentor_guidance.pt") in lines[0]
    assert "python -m monai_cft.pipeline" in lines[0] and "segmentor_guidance" in lines[0]
    assert not (tmp_path / "studies").exists()  # nothing created before the check


def test_missing_dscm_names_the_fine_tuning(tmp_path):
    models = tmp_path / "outputs" / "models"
    models.mkdir(parents=True)
    (models / "segmentor_guidance.pt").write_bytes(b"")
    res = _serve("--studies", str(tmp_path / "studies"), "--models", str(models), "--dry-run")
    assert res.returncode == 2
    assert "dscm_cft_pos_seg.pt" in res.stderr and f"--output-dir {tmp_path / 'outputs'}" in res.stderr
    assert "finetune_pos_seg" in res.stderr


def test_dry_run_prints_the_offline_start_command(tmp_path):
    models = tmp_path / "outputs" / "models"
    models.mkdir(parents=True)
    for name in ("segmentor_guidance.pt", "dscm_cft_pos_seg.pt", "dscm_cft_seg.pt"):
        (models / name).write_bytes(b"")  # only their presence is checked before the server starts
    res = _serve("--studies", str(tmp_path / "studies"), "--models", str(models), "--port", "8123", "--dry-run")
    if not HAS_MONAILABEL:
        assert res.returncode == 2 and "MONAI Label is not installed" in res.stderr and "--no-deps" in res.stderr
        return
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.strip().splitlines()[-1]
    assert "-m monailabel.main start_server --app " in cmd and f"--studies {tmp_path / 'studies'}" in cmd
    assert f"--conf models {models}" in cmd and "--conf zoo_source github" in cmd and "-i 127.0.0.1 -p 8123" in cmd
    assert "CFT modes ['seg', 'pos_seg']" in res.stdout
    assert not (tmp_path / "studies").exists()  # a dry run writes nothing


def test_importing_the_package_needs_no_monailabel():
    code = ("import sys, monai_cft, monai_cft.monailabel, monai_cft.monailabel.models, monai_cft.monailabel.inputs; "
            "print('monailabel' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


# ---------------------------------------------------------------- request checks (no server)
INVALID_INPUTS = [  # (function, arguments, words in the message)
    ("parse_params", ('{"a": ', "params"), ["params", "not valid JSON"]),
    ("parse_params", ("[1, 2]", "intervention"), ["intervention", "JSON object", "list"]),
    ("get_int", ({"particles": 0}, "particles", 1, 1, 64), ["'particles' = 0", "[1, 64]"]),
    ("get_int", ({"particles": 2.5}, "particles", 1, 1, 64), ["'particles'", "integer", "2.5"]),
    ("get_int", ({"particles": True}, "particles", 1, 1, 64), ["'particles'", "True"]),
    ("resolve_centerline", ({}, None), ["no centreline"]),
    ("resolve_centerline", ({"centerline": [[0, 0, 0]]}, None), ["params 'centerline'", "at least 2 points"]),
    ("resolve_centerline", ({"centerline": "/nowhere/c.csv"}, None), ["/nowhere/c.csv", "does not exist"]),
    ("resolve_centerline", ({}, {"centerline": [[0, 0, float("nan")], [1, 1, 1]]}), ["datastore info", "non-finite"]),
    ("load_scpr", ("", (32, 192)), ["no image given"]),
    ("load_scpr", ("/nowhere/x.nii.gz", (32, 192)), ["/nowhere/x.nii.gz", "does not exist"]),
]


@pytest.mark.parametrize("name, args, words", INVALID_INPUTS, ids=[f"{c[0]}-{i}" for i, c in enumerate(INVALID_INPUTS)])
def test_invalid_request_inputs_name_the_value(name, args, words):
    from monai_cft.monailabel import inputs

    with pytest.raises(inputs.RequestError) as err:
        getattr(inputs, name)(*args)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_valid_request_inputs(tmp_path):
    from monai_cft.utils.io import save_centerline, save_nifti
    from monai_cft.monailabel import inputs

    assert inputs.parse_params('{"a": 1}') == {"a": 1} and inputs.parse_params("") == {}
    assert inputs.get_int({"particles": "3"}, "particles", 1, 1, 64) == 3 and inputs.get_int({}, "p", 1, 1, 2) == 1
    pts = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]])
    path = save_centerline(pts, tmp_path / "c.csv")
    for request, info, source in (({"label": str(path)}, None, "uploaded"), ({"centerline": pts.tolist()}, None, "params"),
                                  ({}, {"centerline": str(path)}, "datastore info")):
        got, where = inputs.resolve_centerline(request, info)
        np.testing.assert_allclose(got, pts)
        assert source in where
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    for shape in ((32, 192), (32, 192, 1)):
        save_nifti(np.zeros(shape, np.float32), affine, tmp_path / "s.nii.gz")
        hu, aff = inputs.load_scpr(tmp_path / "s.nii.gz", (32, 192))
        assert hu.shape == (32, 192) and np.allclose(aff, affine)
        assert inputs.file_shape(tmp_path / "s.nii.gz") == shape
    save_nifti(np.zeros((32, 96), np.float32), affine, tmp_path / "small.nii.gz")
    with pytest.raises(inputs.RequestError, match=r"shape \(32, 96\); the models take \(32, 192\)"):
        inputs.load_scpr(tmp_path / "small.nii.gz", (32, 192))
    save_nifti(np.zeros((8, 8, 8), np.float32), np.eye(4), tmp_path / "vol.nii.gz")
    assert inputs.load_volume(tmp_path / "vol.nii.gz")[0].shape == (8, 8, 8)
    with pytest.raises(inputs.RequestError, match="3 dimensions"):
        inputs.load_scpr(tmp_path / "vol.nii.gz", (32, 192))


# ---------------------------------------------------------------- tiny models and the server
def _train_tiny_models(root: Path) -> dict:
    """A hand-made quick-preset sCPR dataset, a guidance segmentor, a tiny DSCM and its Pos-Seg-CFT."""
    import torch

    from monai_cft.networks.predictors import ParentRegressor
    from monai_cft.utils.bundle import run_bundle
    from monai_cft.utils.checkpoint import save_checkpoint
    from helpers import COMMON, CONFIGS, make_scpr_dataset, model_meta as _meta

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scpr = make_scpr_dataset(root / "scpr_quick", n_train=8, n_val=1, n_test=3)
        prep = json.loads((scpr / "prepare_config.json").read_text())
        models = root / "outputs" / "models"
        common = {"dataset_dir": str(scpr), "ckpt_dir": str(models), "output_dir": str(root / "outputs" / "eval"),
                  "device": "$torch.device('cpu')", "batch_size": 4, "torch_threads": 1}
        run_bundle("training", [COMMON, str(CONFIGS / "train_segmentor.json")], logging_file=False, **common,
                   **{"train#trainer#max_epochs": 40})
        tiny = {"_target_": "monai_cft.networks.dscm.build_dscm", "preset": "@hvae_preset",
                "spatial_dims": "@spatial_dims", "img_size": "@img_size", "variables": "@variables",
                "ranges": "@ranges", "graph": "@graph", "in_channels": 1, "free_bits": "@free_bits",
                "region_masks": "@region_masks", "region_names": "@regions", "widths": [4, 8, 8, 8],
                "blocks_per_level": 1, "z_max_res": 24, "flow_kwargs": {"hidden": [8], "transforms": 1, "bins": 4}}
        run_bundle("training", [COMMON, str(CONFIGS / "train.json")], logging_file=False, **common,
                   **{"train#trainer#max_epochs": 30, "lr": 3e-3, "lr_warmup_steps": 1, "network_def": tiny})
        save_checkpoint(models / "regressor.pt", ParentRegressor(2, 1, 9), _meta(prep, kind="regressor", num_outputs=9))
        run_bundle("finetune", [COMMON, str(CONFIGS / "finetune.json")], logging_file=False, cft_mode="pos_seg",
                   **common, **{"train#trainer#max_epochs": 20, "elbo_target_batches": 1, "lr": 3e-3,
                                "lr_warmup_steps": 1})
    finally:
        torch.set_num_threads(threads)
    return {"scpr": scpr, "prep": prep, "models": models}


def _tube_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D 'CCTA' volume (X, Y, Z) = (40, 40, 120) at 0.5 mm: a contrast lumen (330 HU, radius 1.5 mm)
    along z through (10, 12) mm world, in -80 HU tissue; returns (volume HU, centreline (N, 3) mm)."""
    from monai_cft.utils.io import save_nifti

    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    affine[:3, 3] = [0.0, 2.0, -5.0]
    i, j = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    x, y = i * 0.5, 2.0 + j * 0.5
    lumen = (x - 10.0) ** 2 + (y - 12.0) ** 2 <= 1.5**2
    vol = np.where(lumen[:, :, None], 330.0, -80.0) * np.ones((1, 1, 120))
    save_nifti(vol.astype(np.float32), affine, path, np.float32)
    z = np.linspace(-4.0, 53.0, 58)
    return vol, np.stack([np.full_like(z, 10.0), np.full_like(z, 12.0), z], 1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The running server: ``{"url", "studies", "models", "scpr", "prep", "log"}``."""
    if not HAS_MONAILABEL:
        pytest.skip("MONAI Label is not installed (optional extra monai-cft[monailabel]; see docs/monailabel.md)")
    import requests

    root = tmp_path_factory.mktemp("monailabel")
    env = _train_tiny_models(root)
    studies, port = root / "studies", _free_port()
    log = root / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "monai_cft.monailabel", "serve", "--studies", str(studies), "--models",
             str(env["models"]), "--host", "127.0.0.1", "--port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, env=_env(), start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the server did not answer /info/ within 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "studies": studies, "log": log, "root": root, **env}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


# ---------------------------------------------------------------- HTTP helpers
def _put_image(server, image_id: str, path: Path, params: dict | None = None) -> None:
    import requests

    with open(path, "rb") as fh:
        res = requests.put(f"{server['url']}/datastore/image", params={"image": image_id},
                           files={"file": (path.name, fh)}, data={"params": json.dumps(params or {})}, timeout=60)
    assert res.status_code == 200, res.text


def _infer(server, task: str, image: str, params: dict | None = None, files: dict | None = None,
           raw_params: str | None = None):
    """POST /infer/<task>?output=all -> (result JSON, NIfTI image or None); the HTTP response otherwise."""
    import requests

    data = {"params": raw_params if raw_params is not None else json.dumps(params or {})}
    return requests.post(f"{server['url']}/infer/{task}", params={"image": image, "output": "all"}, data=data,
                         files=files, timeout=300)


def _decode(res, tmp_path: Path, name: str):
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    assert res.status_code == 200, res.text
    parts = MultipartDecoder(res.content, res.headers["content-type"]).parts
    result, image = None, None
    for part in parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            result = json.loads(part.content)
        elif 'name="image"' in disposition:
            path = tmp_path / f"{name}.nii.gz"
            path.write_bytes(part.content)
            image = nib.load(str(path))
    assert result is not None and image is not None, [p.headers for p in parts]
    return result, image


def _datastore(server) -> dict:
    import requests

    res = requests.get(f"{server['url']}/datastore/", params={"output": "all"}, timeout=60)
    assert res.status_code == 200, res.text
    return res.json()


def _stored_files(server) -> list[str]:
    """The datastore's image and label files (MONAI Label's own lock and index files aside)."""
    studies = server["studies"]
    return sorted(str(p.relative_to(studies)) for p in studies.rglob("*.nii*") if ".monai_cft" not in p.parts)


def _scpr_path(server, index: int) -> Path:
    """Images of the test split of make_scpr_dataset (0: case_0010, 1: case_0009, 2: case_0011)."""
    return server["scpr"] / "images" / f"case_{(10, 9, 11)[index]:04d}.nii.gz"


# ---------------------------------------------------------------- tests
@needs_server
def test_info_lists_the_tasks(server):
    import requests

    info = requests.get(f"{server['url']}/info/", timeout=60).json()
    models = info["models"]
    assert models["segmentation"]["type"] == "segmentation" and models["segmentation"]["labels"] == LABELS
    assert models["straighten"]["type"] == "others" and models["counterfactual"]["type"] == "others"
    assert models["counterfactual"]["config"]["mode"] == "pos_seg"
    assert list(info["trainers"]) == ["segmentation"] and list(info["scoring"]) == ["measure"]
    assert info["labels"] == LABELS


@needs_server
def test_segmentation_keeps_the_geometry_and_names_the_labels(server, tmp_path):
    path = _scpr_path(server, 0)
    _put_image(server, "scpr_a", path)
    result, label = _decode(_infer(server, "segmentation", "scpr_a"), tmp_path, "label")
    ref = nib.load(str(path))
    np.testing.assert_allclose(label.affine, ref.affine)
    values = np.asarray(label.dataobj)
    assert values.shape == ref.shape and values.dtype == np.uint8
    assert set(np.unique(values).tolist()) <= {0, 1, 2, 3} and 1 in values  # the lumen band is found
    truth = np.asarray(nib.load(str(server["scpr"] / "labels" / path.name)).dataobj)
    assert (values == truth).mean() > 0.9
    assert result["labels"] == LABELS and result["label_names"] == LABELS
    assert list(result["variables"]) == VARIABLES
    assert _datastore(server)["objects"]["scpr_a"]["labels"] == {}  # an infer result is not saved by itself
    # an (H, W, 1) sCPR, as 3D Slicer saves 2D images, gets an (H, W, 1) label map with its affine
    from monai_cft.utils.io import save_nifti

    slab = save_nifti(np.asarray(ref.dataobj)[:, :, None], ref.affine, tmp_path / "slab.nii.gz", np.float32)
    with open(slab, "rb") as fh:
        _, label3 = _decode(_infer(server, "segmentation", "", files={"file": ("slab.nii.gz", fh)}), tmp_path, "label3")
    assert label3.shape == (*ref.shape, 1)
    np.testing.assert_array_equal(np.asarray(label3.dataobj)[:, :, 0], values)
    np.testing.assert_allclose(label3.affine, ref.affine)


@needs_server
def test_straighten_a_volume_with_an_uploaded_or_named_centreline(server, tmp_path):
    from monai_cft.utils.io import save_centerline

    vol_path = tmp_path / "volume.nii.gz"
    _, centerline = _tube_volume(vol_path)
    csv = save_centerline(centerline, tmp_path / "centerline.csv")
    _put_image(server, "volume_a", vol_path)
    with open(csv, "rb") as fh:
        result, scpr = _decode(_infer(server, "straighten", "volume_a", files={"label": ("centerline.csv", fh)}),
                               tmp_path, "scpr")
    img = np.asarray(scpr.dataobj)
    assert img.shape == (32, 192)
    np.testing.assert_allclose(scpr.affine, np.diag([0.5, 0.5, 0.5, 1.0]))
    valid = result["geometry"]["valid_columns"]
    assert valid == 115  # 57 mm of centreline at 0.5 mm
    np.testing.assert_allclose(img[15:17, 2:valid - 2], 330.0, atol=1.0)  # the lumen runs along the centre rows
    np.testing.assert_allclose(img[:3, 2:valid - 2], -80.0, atol=1.0)
    assert (img[:, valid + 1:] == -1024.0).all()  # past the vessel's end
    assert list(result["variables"]) == VARIABLES and result["variables"]["lumen_proximal"] > 0
    # the same centreline as params points, and stored in the image's info at upload: the same sCPR
    for image_id, params in (("volume_a", {"centerline": centerline.tolist()}), ("volume_b", {})):
        if image_id == "volume_b":
            _put_image(server, "volume_b", vol_path, {"centerline": centerline.tolist()})
        again, scpr2 = _decode(_infer(server, "straighten", image_id, params), tmp_path, "scpr2")
        np.testing.assert_allclose(np.asarray(scpr2.dataobj), img, atol=1e-3)
        assert again["variables"] == pytest.approx(result["variables"], abs=1e-3)


@needs_server
def test_counterfactual_follows_the_intervention(server, tmp_path):
    path = _scpr_path(server, 1)
    _put_image(server, "scpr_b", path)
    ref = nib.load(str(path))
    before = _datastore(server)["objects"]["scpr_b"]
    var = "calcified_mid"
    target = server["prep"]["ranges"][var][0]  # remove the mid third's calcium
    # the hand-made dataset's ranges are narrow: other measured variables of the case lie outside them
    params = {"intervention": {var: target}, "mode": "pos_seg", "particles": 1, "allow_extrapolation": True}
    result, cf = _decode(_infer(server, "counterfactual", "scpr_b", params), tmp_path, "cf")
    np.testing.assert_allclose(cf.affine, ref.affine)
    factual = result["variables"][var]["factual"]
    assert factual > 1.0  # the case has mid calcium to remove
    assert result["variables"][var]["intended"] == pytest.approx(target, abs=1e-4)
    assert result["intervention"] == {var: pytest.approx(target)}
    measured = result["variables"][var]["measured"]
    assert measured < factual - 0.1, result["variables"][var]  # the measured change follows the intervention
    assert result["change"][var] == pytest.approx(measured - factual)
    # and up: a relative intervention raises the mid third's measured calcium
    up, _ = _decode(_infer(server, "counterfactual", "scpr_b", dict(params, intervention={var: "+2"})), tmp_path, "up")
    assert up["intervention"][var] == pytest.approx(factual + 2.0, abs=1e-3)
    assert up["variables"][var]["measured"] > factual + 0.05, up["variables"][var]
    assert set(result["variables"]) == set(VARIABLES) and result["maps"] == ["counterfactual", "difference"]
    cf_hu = np.asarray(cf.dataobj)
    assert cf_hu.dtype == np.float32 and cf_hu.min() >= -300.5 and cf_hu.max() <= 1100.5  # HU, the network window
    # the difference map of the same request: counterfactual - factual (clipped to the HU window)
    diff_res, diff = _decode(_infer(server, "counterfactual", "scpr_b", dict(params, output_map="difference")),
                             tmp_path, "diff")
    factual_hu = np.clip(np.asarray(ref.dataobj, dtype=np.float32), -300.0, 1100.0)
    np.testing.assert_allclose(np.asarray(diff.dataobj), cf_hu - factual_hu, atol=0.05)
    assert diff_res["variables"] == result["variables"]
    # several particles: an uncertainty map (HU, >= 0, not all zero)
    unc_res, unc = _decode(_infer(server, "counterfactual", "scpr_b", dict(params, particles=3, output_map="uncertainty")),
                           tmp_path, "unc")
    u = np.asarray(unc.dataobj)
    assert unc_res["maps"] == ["counterfactual", "difference", "uncertainty"] and u.min() >= 0 and u.max() > 0
    np.testing.assert_allclose(unc.affine, ref.affine)
    assert _datastore(server)["objects"]["scpr_b"] == before  # generated images are never stored as labels


@needs_server
def test_scoring_stores_the_nine_variables_in_the_image_info(server, tmp_path):
    import requests

    _put_image(server, "scpr_c", _scpr_path(server, 2))
    _tube_volume(tmp_path / "volume.nii.gz")
    _put_image(server, "volume_c", tmp_path / "volume.nii.gz")
    res = requests.post(f"{server['url']}/scoring/measure", params={"run_sync": "true"}, timeout=300)
    assert res.status_code == 200, res.text
    assert "scpr_c" in res.json()["measured"] and "3 dimensions" in res.json()["skipped"]["volume_c"]
    info = requests.get(f"{server['url']}/datastore/image/info", params={"image": "volume_c"}, timeout=60).json()
    assert "monai_cft_variables" not in info
    info = requests.get(f"{server['url']}/datastore/image/info", params={"image": "scpr_c"}, timeout=60).json()
    assert list(info["monai_cft_variables"]) == VARIABLES
    result, _ = _decode(_infer(server, "segmentation", "scpr_c"), tmp_path, "seg")
    assert info["monai_cft_variables"] == pytest.approx(result["variables"], rel=1e-4)


BAD_REQUESTS = [  # (what, method, path, query, params form field, status, words in the message)
    ("unknown task", "post", "/infer/plaque", {"image": "scpr_a"}, "{}", 404, ["'plaque'", "counterfactual"]),
    ("unknown variable", "post", "/infer/counterfactual", {"image": "scpr_a"},
     '{"intervention": {"calcified_middle": 5}}', 400, ["calcified_middle", "calcified_mid"]),
    ("target out of range", "post", "/infer/counterfactual", {"image": "scpr_a"},
     '{"intervention": {"calcified_mid": 1000}}', 400, ["calcified_mid", "1000", "range"]),
    ("no intervention", "post", "/infer/counterfactual", {"image": "scpr_a"}, "{}", 400, ["intervention"]),
    ("unknown mode", "post", "/infer/counterfactual", {"image": "scpr_a"},
     '{"intervention": {"calcified_mid": "+1"}, "mode": "seg_pos"}', 400, ["seg_pos", "pos_seg"]),
    ("bad particles", "post", "/infer/counterfactual", {"image": "scpr_a"},
     '{"intervention": {"calcified_mid": "+1"}, "particles": 0}', 400, ["particles", "0"]),
    ("uncertainty of one particle", "post", "/infer/counterfactual", {"image": "scpr_a"},
     '{"intervention": {"calcified_mid": "+1"}, "output_map": "uncertainty"}', 400, ["particles > 1"]),
    ("malformed params JSON", "post", "/infer/counterfactual", {"image": "scpr_a"},
     '{"intervention": {calcified_mid: 5}', 400, ["malformed", "JSON"]),
    ("missing centreline", "post", "/infer/straighten", {"image": "volume_a"}, "{}", 400, ["no centreline"]),
    ("bad centreline", "post", "/infer/straighten", {"image": "volume_a"}, '{"centerline": [[1, 2]]}', 400,
     ["centreline", "shape"]),
    ("3D volume to segmentation", "post", "/infer/segmentation", {"image": "volume_a"}, "{}", 400,
     ["3 dimensions", "straighten"]),
    ("3D volume to counterfactual", "post", "/infer/counterfactual", {"image": "volume_a"},
     '{"intervention": {"calcified_mid": "+1"}}', 400, ["3 dimensions"]),
    ("2D sCPR to straighten", "post", "/infer/straighten", {"image": "scpr_a"},
     '{"centerline": [[0, 0, 0], [1, 1, 1]]}', 400, ["3D CCTA volume", "(32, 192)"]),
    ("unknown image", "post", "/infer/segmentation", {"image": "nope"}, "{}", 404, ["'nope'"]),
    ("unknown scoring method", "post", "/scoring/dice", {"run_sync": "true"}, None, 404, ["'dice'", "measure"]),
    ("unknown train task", "post", "/train/lumen", {"run_sync": "true"}, None, 404, ["'lumen'", "segmentation"]),
    ("batch counterfactuals (stored as labels)", "post", "/batch/infer/counterfactual", {"run_sync": "true"}, None,
     400, ["batch", "labels", "'counterfactual'"]),
]


@pytest.fixture(scope="session")
def bad_request_images(server, tmp_path_factory):
    """The images the bad requests name (uploaded here unless an earlier test did)."""
    present = _datastore(server)["objects"]
    if "scpr_a" not in present:
        _put_image(server, "scpr_a", _scpr_path(server, 0))
    if "volume_a" not in present:
        path = tmp_path_factory.mktemp("volume") / "volume.nii.gz"
        _tube_volume(path)
        _put_image(server, "volume_a", path)
    return server


@needs_server
@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_clear_http_error_and_change_nothing(bad_request_images, case):
    import requests

    server = bad_request_images
    _, method, path, query, params, status, words = case
    before = _datastore(server)
    files_before = _stored_files(server)
    data = None if params is None else {"params": params}
    res = requests.request(method, server["url"] + path, params=query, data=data, timeout=300)
    assert res.status_code == status, res.text
    detail = res.json()["detail"]
    assert all(w in detail for w in words), detail
    assert _datastore(server) == before
    assert _stored_files(server) == files_before


@needs_server
def test_one_train_round_fine_tunes_the_segmentor_on_final_labels(server, tmp_path):
    import requests

    url = server["url"]
    res = requests.post(f"{url}/train/segmentation", params={"run_sync": "true"}, json={"max_epochs": 0}, timeout=60)
    assert res.status_code == 400 and "max_epochs" in res.json()["detail"]
    present = _datastore(server)["objects"]
    for image_id, index in (("scpr_a", 0), ("scpr_b", 1)):
        if image_id not in present:
            _put_image(server, image_id, _scpr_path(server, index))
        label = server["scpr"] / "labels" / _scpr_path(server, index).name
        with open(label, "rb") as fh:
            res = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"},
                               files={"label": (label.name, fh)}, timeout=60)
        assert res.status_code == 200, res.text
    res = requests.post(f"{url}/train/segmentation", params={"run_sync": "true"},
                        json={"max_epochs": 2, "lr": 1e-4}, timeout=600)
    assert res.status_code == 200, res.text
    out = res.json()
    finals = sum("final" in o["labels"] for o in _datastore(server)["objects"].values())
    assert out["images"] == finals >= 2 and out["epochs"] == 2 and len(out["loss"]) == 2
    assert all(np.isfinite(out["loss"])) and 0.0 <= out["dice_after"] <= 1.0
    assert Path(out["model"]).is_file() and out["model"].endswith("segmentor_finetuned.pt")
    stats = requests.get(f"{url}/info/", timeout=60).json()["train_stats"]["segmentation"]
    assert stats["epoch"] == stats["total_epochs"] == 2 and stats["best_metric"] == pytest.approx(out["dice_after"])
    assert stats["total_time"] >= 0  # what 3D Slicer's progress and accuracy bars read
    result, _ = _decode(_infer(server, "segmentation", "scpr_a"), tmp_path, "seg")
    assert result["segmentor"] == out["model"]  # the segmentation task now uses the fine-tuned segmentor
    assert not (server["models"] / "segmentor_finetuned.pt").exists()  # the main job's models are not touched


# ---------------------------------------------------------------- the documented calls, as written
def _doc_blocks() -> list[str]:
    """The fenced bash blocks of the 'REST calls' section of docs/monailabel.md."""
    import re

    text = (ROOT / "docs" / "monailabel.md").read_text(encoding="utf-8")
    section = text[text.index("## REST calls"): text.index("## 3D Slicer")]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


@needs_server
@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
def test_documented_rest_calls_run_as_written(server, tmp_path):
    """Each REST block of docs/monailabel.md runs with curl failing on any HTTP error, in a folder laid
    out like the repository after the main job (tiny stand-ins for data/raw and data/scpr_quick), except
    the last block, whose documented error answer is checked. The one change: the tiny models' training
    ranges are narrow, so the counterfactual params get "allow_extrapolation": true (the commands run as
    written on the main job's models)."""
    from monai_cft.utils.io import save_centerline

    blocks = _doc_blocks()
    assert len(blocks) >= 8 and "http://127.0.0.1:8000" in blocks[0]
    raw, scpr = tmp_path / "data" / "raw", tmp_path / "data" / "scpr_quick"
    _, centerline = _tube_volume(raw / "images" / "case_0007.nii.gz")
    save_centerline(centerline, raw / "centerlines" / "case_0007.csv")
    for sub in ("images", "labels"):
        (scpr / sub).mkdir(parents=True)
        shutil.copy(server["scpr"] / sub / "case_0009.nii.gz", scpr / sub / "case_0007.nii.gz")
    prologue = 'set -euo pipefail\ncurl() { command curl --fail-with-body "$@"; }\n'
    for i, block in enumerate(blocks):
        script = block.replace("http://127.0.0.1:8000", server["url"]).replace(
            '"particles": 4', '"particles": 4, "allow_extrapolation": true')
        last = i == len(blocks) - 1
        script = ("S=" + server["url"] + "\n" if i else "") + (script if last else prologue + script)
        res = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"block {i}:\n{block}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        if last:
            assert "is outside its observed range" in res.stdout, res.stdout
    out = tmp_path / "outputs" / "monailabel"
    names = ["scpr_0007", "scpr_0007_label", "cf_0007", "cf_0007_diff", "cf_0007_uncertainty"]
    shapes = {n: nib.load(str(out / f"{n}.nii.gz")).shape for n in names}
    assert set(shapes.values()) == {(32, 192)}, shapes
    import requests

    requests.delete(f"{server['url']}/train/", timeout=60)  # stop the documented background training
