"""Bad-input tables (issue 13): non-finite values never pass silently (sCPR input, noise temperature,
checkpoints), StructureMeasures checks its soft inputs, a 100 %-padding sCPR warns, and epoch counts
must be whole numbers. Each invalid case asserts the exception type and that the message names the
bad value."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cft.engines.common import check_count
from monai_cft.transforms import StraightenCPR, StraightenCPRd, StructureMeasures, StructureMeasuresd
from monai_cft.utils.checkpoint import check_finite, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

CENTERLINE = np.array([[12.0, 12.0, 2.0], [12.0, 12.5, 12.0], [12.0, 12.0, 21.0]])


def _volume(value=None, at=(0, 12, 12, 10), dtype=torch.float32) -> MetaTensor:
    data = torch.linspace(-100, 400, 24**3).reshape(1, 24, 24, 24).to(dtype)
    if value is not None:
        data[at] = value
    return MetaTensor(data, affine=torch.eye(4, dtype=torch.float64))


# ------------------------------------------------------------------------------------ sCPR
def test_scpr_valid_inputs_do_not_warn():
    cpr = StraightenCPR(output_size=(9, 16), spacing=1.0, record_grid=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for vol in (_volume(), _volume(dtype=torch.int16), _volume(dtype=torch.float64)):
            assert torch.isfinite(cpr(vol, CENTERLINE)).all()


SCPR_NONFINITE = [
    # (value, voxels set, whether the sCPR samples them): only sampled voxels are checked (the cost stays
    # proportional to the samples, not to the volume); a sampled one is refused, an unsampled one cannot
    # reach the output
    (float("nan"), [(0, 12, 12, 10)], True),
    (float("inf"), [(0, 12, 12, 11)], True),
    (float("inf"), [(0, 0, 0, 0)], False),
    (float("-inf"), [(0, 1, 2, 3), (0, 3, 2, 1)], False),
]


@pytest.mark.parametrize("value,voxels,sampled", SCPR_NONFINITE)
def test_scpr_refuses_non_finite_voxels(value, voxels, sampled):
    vol = _volume()
    for v in voxels:
        vol[v] = value
    text = r"img has NaN or infinite voxels where the sCPR samples it \(\d+ of 144 output values are not finite\)"
    if not sampled:
        assert torch.isfinite(StraightenCPR(output_size=(9, 16), spacing=1.0)(vol, CENTERLINE)).all()
        return
    with pytest.raises(ValueError, match=text):
        StraightenCPR(output_size=(9, 16), spacing=1.0)(vol, CENTERLINE)
    with pytest.raises(ValueError, match="'image' has NaN or infinite voxels where the sCPR samples it"):
        StraightenCPRd(("image", "label"), output_size=(9, 16), spacing=1.0, mode=("bilinear", "nearest"))(
            {"image": vol, "label": _volume(0.0), "centerline": CENTERLINE})


@pytest.mark.parametrize("spacing,output_size", [(1e6, (8, 16)), (1e6, (9, 16)), (500.0, (8, 8))])
def test_scpr_that_is_all_padding_warns(spacing, output_size):
    with pytest.warns(UserWarning, match=rf"\d+\.\d% of the sCPR's .*padding.*spacing {spacing}"):
        out = StraightenCPR(output_size=output_size, spacing=spacing, record_grid=False)(_volume(), CENTERLINE)
    assert out.shape[1:] == output_size


# ------------------------------------------------------------------------------------ noise temperature
@pytest.fixture(scope="module")
def tiny_scm():
    from monai_cft.networks.dscm import build_dscm

    torch.manual_seed(0)
    names = ["lumen_mid", "calcified_mid"]
    dscm = build_dscm("quick", 2, (16, 32), names, {"lumen_mid": (2.0, 12.0), "calcified_mid": (0.0, 4.0)},
                      widths=(8, 16, 16), blocks_per_level=1, z_dim=4, z_max_res=16).eval()
    x = torch.rand(2, 1, 16, 32) * 2 - 1
    parents = torch.tensor([[5.0, 1.0], [8.0, 0.5]])
    return dscm, x, parents


@pytest.mark.parametrize("t", [0.0, 0.5, 1, 2.0])
def test_noise_temperature_valid(tiny_scm, t):
    dscm, x, parents = tiny_scm
    with torch.no_grad():
        out = dscm.counterfactual(x, parents, {"calcified_mid": 2.0}, noise_temperature=t)
    assert torch.isfinite(out["x_cf"]).all()


NOISE_INVALID = [(float("nan"), ValueError, "nan"), (float("inf"), ValueError, "inf"), (-1.0, ValueError, "-1.0"),
                 (-math.inf, ValueError, "-inf"), ("abc", TypeError, "'abc'"), (None, TypeError, "None")]


@pytest.mark.parametrize("t,exc,text", NOISE_INVALID, ids=[repr(c[0]) for c in NOISE_INVALID])
def test_noise_temperature_invalid(tiny_scm, t, exc, text):
    dscm, x, parents = tiny_scm
    with pytest.raises(exc, match=f"noise_temperature.*{re.escape(text)}"), torch.no_grad():
        dscm.counterfactual(x, parents, {"calcified_mid": 2.0}, noise_temperature=t)


# ------------------------------------------------------------------------------------ checkpoints
def test_finite_checkpoint_loads(tmp_path):
    path = save_checkpoint(tmp_path / "ok.pt", {"w": torch.ones(3), "step": torch.tensor(3)}, {"kind": "x"})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


CKPT_INVALID = [
    ({"w": torch.tensor([1.0, float("nan")])}, r"'w' \(1 of 2 values\)"),
    ({"a": torch.ones(2), "b.weight": torch.full((2, 2), float("inf"))}, r"'b.weight' \(4 of 4 values\)"),
    ({"h": torch.tensor([-float("inf")], dtype=torch.float16)}, r"'h' \(1 of 1 values\)"),
]


@pytest.mark.parametrize("state,text", CKPT_INVALID, ids=["nan", "inf", "half"])
def test_non_finite_checkpoint_is_refused(tmp_path, state, text):
    path = save_checkpoint(tmp_path / "bad.pt", state, {"kind": "x"})
    with pytest.raises(ValueError, match=text) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_non_finite_dscm_checkpoint_is_refused(tiny_scm, tmp_path):
    from monai_cft.networks.dscm import DeepSCM

    dscm = tiny_scm[0]
    state = {k: v.clone() for k, v in dscm.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key][0] = float("nan")
    path = tmp_path / "dscm.pt"
    torch.save({"model": state, "meta": {**dscm.checkpoint_meta(), "cft_mode": "none"}}, path)
    with pytest.raises(ValueError, match=re.escape(repr(key))) as info:
        DeepSCM.from_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        DeepSCM.from_checkpoint({"model": state, "meta": {}})


def test_check_finite_nested_state():
    check_finite({"opt": {"state": {0: {"exp_avg": torch.zeros(2)}}, "lr": 0.1}}, "x")
    with pytest.raises(ValueError, match=r"resume state holds non-finite .*'opt.state.0.exp_avg' \(1 of 1 values\)"):
        check_finite({"opt": {"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}}, "resume state")
    with pytest.raises(ValueError, match=r"'ema.decay' \(= nan\)"):
        check_finite({"decay": float("nan")}, "resume state", "ema")


# ------------------------------------------------------------------------------------ StructureMeasures
def _meta(t: torch.Tensor) -> MetaTensor:
    return MetaTensor(t, affine=torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64)))


def _label() -> MetaTensor:
    lab = torch.zeros(1, 8, 12)
    lab[0, 3:5, :] = 1
    lab[0, 3, 2:4] = 2
    return _meta(lab)


def _regions() -> torch.Tensor:
    r = torch.zeros(3, 8, 12)
    for k in range(3):
        r[k, :, 4 * k : 4 * k + 4] = 1
    return r


def _soft() -> torch.Tensor:
    return torch.softmax(torch.randn(4, 8, 12, generator=torch.Generator().manual_seed(0)), 0)


SM_VALID = [
    ("label_map", lambda: _label(), lambda: _regions()),
    ("softmax", lambda: _meta(_soft()), lambda: _regions()),
    ("one_hot_uint8",
     lambda: _meta(torch.nn.functional.one_hot(_label()[0].as_tensor().long(), 4).permute(2, 0, 1).to(torch.uint8)),
     lambda: _regions()),
    ("bool_masks", lambda: _label(), lambda: _regions().bool()),
    ("soft_masks_sharing_a_column", lambda: _label(),
     lambda: torch.cat([_regions()[:1] * 0.5, _regions()[:1] * 0.5 + _regions()[1:2], _regions()[2:]])),
    ("masks_not_covering", lambda: _label(), lambda: _regions() * torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1)),
    ("half_precision", lambda: _meta(_soft().half()), lambda: _regions().half()),
]


@pytest.mark.parametrize("name,label,regions", SM_VALID, ids=[c[0] for c in SM_VALID])
def test_structure_measures_valid(name, label, regions):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = StructureMeasures().measure(label(), regions())
    assert out.shape == (9,) and torch.isfinite(out).all() and (out >= 0).all()


def _with(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


SM_INVALID = [
    # (name, label, regions, text)
    ("logits", lambda: _meta(torch.randn(4, 8, 12, generator=torch.Generator().manual_seed(1))), _regions,
     r"probabilities in \[0, 1\], got min -\d.*logits"),
    ("negative", lambda: _meta(_with(_soft(), (1, 0, 0), -0.5)), _regions, "min -0.5"),
    ("nan", lambda: _meta(_with(_soft(), (2, 1, 1), float("nan"))), _regions, r"1 non-finite \(NaN / inf\)"),
    ("above_one", lambda: _meta(_with(_soft(), (0, 0, 0), 2.0)), _regions, "max 2"),
    ("not_summing_to_one", lambda: _meta(_soft() * 0.5), _regions, "sum to 1.*from 0.5 to 0.5"),
    ("overlapping_masks", _label, lambda: _with(_regions(), (1, slice(None), 0), 1.0), "overlap.*reaches 2"),
    ("negative_mask", _label, lambda: _with(_regions(), (0, 0, 0), -1.0), "min -1"),
    ("nan_mask", _label, lambda: _with(_regions(), (2, 0, 11), float("nan")), r"region masks have 1 non-finite"),
]


@pytest.mark.parametrize("name,label,regions,text", SM_INVALID, ids=[c[0] for c in SM_INVALID])
def test_structure_measures_invalid(name, label, regions, text):
    with pytest.raises(ValueError, match=text):
        StructureMeasures().measure(label(), regions())


def test_structure_measures_unlisted_label_values():
    lab = _with(_label(), (0, 0, 0), 7.0)
    with pytest.warns(UserWarning, match=r"label values \[7\].*not measured"):
        StructureMeasures().measure(lab, _regions())
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        StructureMeasures(unlisted="error").measure(lab, _regions())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StructureMeasures(unlisted="ignore").measure(lab, _regions())
        StructureMeasures({"lumen": 1, "calcified": 2}, unlisted="ignore").measure(_label(), _regions())
    with pytest.raises(ValueError, match="unlisted must be one of.*'sometimes'"):
        StructureMeasures(unlisted="sometimes")


@pytest.mark.parametrize("existing", ["variables", "calcified_mid"])
def test_structure_measuresd_does_not_overwrite(existing):
    data = {"label": _label(), "regions": _regions(), existing: "keep me"}
    with pytest.raises(KeyError, match=f"existing key.*'{existing}'"):
        StructureMeasuresd("label")(data)
    out = StructureMeasuresd("label", overwrite=True)(data)
    assert out[existing] != "keep me" and data[existing] == "keep me"


# ------------------------------------------------------------------------------------ epoch counts
@pytest.mark.parametrize("value,expected", [(1, 1), (3.0, 3), (np.int64(5), 5), (torch.tensor(2).item(), 2)])
def test_check_count_valid(value, expected):
    assert check_count(value, "max_epochs") == expected


COUNT_INVALID = [(1.5, ValueError, "1.5"), (0, ValueError, "0"), (-2, ValueError, "-2"),
                 (float("nan"), ValueError, "nan"), (float("inf"), ValueError, "inf"), ("3", TypeError, "'3'"),
                 (True, TypeError, "True"), (None, TypeError, "None")]


@pytest.mark.parametrize("value,exc,text", COUNT_INVALID, ids=[repr(c[0]) for c in COUNT_INVALID])
def test_check_count_invalid(value, exc, text):
    with pytest.raises(exc, match=f"max_epochs must be a whole number >= 1, got {re.escape(text)}"):
        check_count(value, "max_epochs")


@pytest.mark.parametrize("key,value,text", [("max_epochs", "1.5", "1.5"), ("train#trainer#max_epochs", "abc", "'abc'"),
                                            ("batch_size", "0", "0"), ("num_workers", "-1", "-1")])
def test_bundle_count_overrides_are_checked(key, value, text):
    from monai_cft.utils.bundle import check_override_values, check_overrides

    argv = ["run", "training", "--config_file", "['nope.json']", f"--{key}", value]
    with pytest.raises(ValueError, match=rf"override '{key}' from the command line: .* got {re.escape(text)}"):
        check_overrides(argv)
    check_override_values({"max_epochs": "2", "dataset_dir": "x", "batch_size": "$@other", "lr": "abc"})


@pytest.mark.parametrize("epochs", ['{"dscm": 1.5}', '{"finetune": 0}', '{"dscm": "3"}', '{"dscms": 3}', "[3]"])
def test_pipeline_epochs_must_be_whole_numbers(epochs, tmp_path):
    from monai_cft import pipeline

    args = pipeline.parse_args(["--epochs", epochs, "--data-dir", str(tmp_path), "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match=re.escape(epochs)):
        pipeline.build_stages(args)


def test_root_cause_and_readable_error():
    from monai_cft.utils.bundle import readable_error, root_cause

    try:
        try:
            raise ValueError("unknown cft_mode 'posseg'; expected one of [...]\nsecond line")
        except ValueError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression") from inner
    except RuntimeError as outer:
        assert isinstance(root_cause(outer), ValueError)
        assert readable_error(outer) == "error: ValueError: unknown cft_mode 'posseg'; expected one of [...]"


@pytest.mark.parametrize("debug", [False, True])
def test_bundle_run_error_is_one_readable_line(tmp_path, debug):
    """``python -m monai.bundle run`` with a bad override: the root cause in one line, no traceback
    (unless MONAI_CFT_DEBUG=1), exit status 1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = root / "bundle" / "configs"
    env = dict(os.environ, MONAI_CFT_DEBUG="1" if debug else "0")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "finetune",
           "--config_file", f"['{cfg / 'common.json'}','{cfg / 'finetune.json'}']",
           "--meta_file", str(cfg / "metadata.json"), "--dataset_dir", str(tmp_path), "--cft_mode", "posseg"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1
    if debug:
        assert "Traceback" in res.stderr
    else:
        assert "Traceback" not in res.stderr, res.stderr[-2000:]
        assert "error: ValueError: unknown cft_mode 'posseg'" in res.stderr
