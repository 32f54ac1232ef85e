"""Engines: gradient clipping / skipping, EMA, LR warm-up, checkpoints, Gaussian NLL, parent
normalization, and the DSCM trainer / evaluator / handlers on a tiny random dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from monai_cft.engines.common import (
    ModelEMA,
    PrepareBatchKeys,
    autocast,
    clip_and_check,
    linear_warmup,
    step_or_skip,
)
from monai_cft.losses.nll import GaussianNLLLoss
from monai_cft.transforms.parents import NormalizeParents, NormalizeParentsd
from monai_cft.utils.checkpoint import load_checkpoint, load_model_weights, save_checkpoint

VARIABLES = ["lumen_proximal", "calcified_mid", "noncalcified_distal"]
RANGES = {"lumen_proximal": [5.0, 15.0], "calcified_mid": [0.0, 4.0], "noncalcified_distal": [0.0, 2.0]}


pytestmark = pytest.mark.usefixtures("single_thread")


def _params_with_grads(*grads):
    params = []
    for g in grads:
        p = nn.Parameter(torch.zeros_like(torch.as_tensor(g, dtype=torch.float32)))
        p.grad = torch.as_tensor(g, dtype=torch.float32).clone()
        params.append(p)
    return params


# ---------------------------------------------------------------- clip_and_check / step_or_skip
def test_clip_and_check_measures_and_clips():
    params = _params_with_grads([3.0, 0.0], [4.0])  # total norm 5
    norm, skipped = clip_and_check(params, clip=1.0, skip=10.0)
    assert norm == pytest.approx(5.0) and not skipped
    total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    assert float(total) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_clip_and_check_skips_non_finite(bad):
    norm, skipped = clip_and_check(_params_with_grads([1.0, bad]), clip=350.0, skip=500.0)
    assert skipped and not math.isfinite(norm)


def test_clip_and_check_skips_huge_norm_and_boundary():
    assert clip_and_check(_params_with_grads([600.0]), 350.0, 500.0) == (pytest.approx(600.0), True)
    assert clip_and_check(_params_with_grads([500.0]), 350.0, 500.0)[1], "norm == skip must skip"
    assert not clip_and_check(_params_with_grads([499.0]), 350.0, 500.0)[1]
    assert not clip_and_check(_params_with_grads([1e6]), None, None)[1], "skip=None only skips non-finite norms"
    assert clip_and_check([nn.Parameter(torch.zeros(2))]) == (0.0, False), "no gradients: nothing to do"
    with pytest.raises(ValueError, match="clip"):
        clip_and_check(_params_with_grads([1.0]), clip=0.0)


def test_step_or_skip_leaves_weights_untouched_when_skipping():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.full((3,), float("nan"))
    norm, skipped = step_or_skip(opt, [p])
    assert skipped and p.grad is None and torch.equal(p.detach(), torch.ones(3))
    p.grad = torch.ones(3)
    _, skipped = step_or_skip(opt, [p])
    assert not skipped and torch.allclose(p.detach(), torch.full((3,), 0.9))


# ---------------------------------------------------------------- EMA, warm-up, autocast, prepare_batch
def test_model_ema_averages_parameters_and_copies_buffers():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(net, decay=0.9, warmup=False)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    w0 = net[0].weight.detach().clone()
    ema.update(net)  # first update copies
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()
    net(torch.randn(4, 2))  # changes BatchNorm running stats and the integer counter
    ema.update(net)
    assert torch.allclose(ema.module[0].weight, 0.9 * w0 + 0.1 * (w0 + 1.0), atol=1e-6)
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)
    assert int(ema.module[1].num_batches_tracked) == int(net[1].num_batches_tracked) == 1
    assert set(ema.module.state_dict()) == set(net.state_dict())
    ema.train()
    assert not ema.module.training, "the averaged copy stays in eval mode"
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(net, decay=1.0)


def test_model_ema_decay_warmup():
    net = nn.Linear(1, 1, bias=False)
    ema = ModelEMA(net, decay=0.999)
    decays = []
    for step in range(4):
        decays.append(ema.current_decay())
        w_ema = float(ema.module.weight)
        with torch.no_grad():
            net.weight.fill_(float(step + 1))
        ema.update(net)
        if step > 0:  # the first update copies the model
            assert float(ema.module.weight) == pytest.approx(decays[-1] * w_ema + (1 - decays[-1]) * (step + 1))
    assert decays[1:] == pytest.approx([2 / 11, 3 / 12, 4 / 13])
    assert ModelEMA(net, decay=0.5).current_decay() == pytest.approx(0.1)
    late = ModelEMA(net, decay=0.999)
    late.n_averaged.fill_(100000)
    assert late.current_decay() == 0.999


def test_linear_warmup_and_autocast_and_prepare_batch():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = linear_warmup(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        linear_warmup(opt, -1)

    with autocast("cpu", True):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32, "autocast must be a no-op on the CPU"

    prep = PrepareBatchKeys("image", "parents", dtype=torch.float32)
    img, lab = prep({"image": torch.zeros(2, 1, 4, 4), "parents": torch.zeros(2, 3, dtype=torch.float64)}, "cpu")
    assert img.shape == (2, 1, 4, 4) and lab.dtype == torch.float32
    with pytest.raises(KeyError, match="parents"):
        prep({"image": torch.zeros(1)})


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_weights_only(tmp_path):
    net = nn.Linear(3, 2)
    meta = {"kind": "regressor", "preset": "quick", "variables": tuple(VARIABLES), "ranges": RANGES, "cft_mode": "none"}
    path = save_checkpoint(tmp_path / "sub" / "reg.pt", net, meta)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "meta"} and raw["meta"]["variables"] == VARIABLES
    other = nn.Linear(3, 2)
    got = load_model_weights(other, path, expect={"kind": "regressor", "variables": VARIABLES, "ranges": RANGES})
    assert got["preset"] == "quick"
    assert torch.equal(other.weight, net.weight)
    assert not list(tmp_path.joinpath("sub").glob(".tmp*")), "no temporary file may be left behind"


def test_checkpoint_mismatch_and_bad_input(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", nn.Linear(1, 1), {"kind": "dscm", "preset": "quick", "cft_mode": "none",
                                                               "variables": VARIABLES})
    with pytest.raises(ValueError, match=r"'preset'.*'quick'.*'paper'") as err:
        load_checkpoint(path, expect={"preset": "paper", "kind": "dscm"})
    assert "kind" not in str(err.value), "only differing keys are listed"
    with pytest.raises(ValueError, match="cft_mode.*variables"):
        load_checkpoint(path, expect={"cft_mode": "seg", "variables": VARIABLES[:2]})
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(path, expect={"graph": {}})
    with pytest.raises(TypeError, match=r"meta\.bad"):
        save_checkpoint(tmp_path / "x.pt", nn.Linear(1, 1), {"kind": "dscm", "bad": object()})
    with pytest.raises(ValueError, match="kind"):
        save_checkpoint(tmp_path / "x.pt", nn.Linear(1, 1), {"preset": "quick"})
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a monai-cft checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


# ---------------------------------------------------------------- Gaussian NLL, parent normalization
def test_gaussian_nll_matches_torch_and_forms_agree():
    torch.manual_seed(0)
    mean, target, log_var = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    ref = nn.GaussianNLLLoss(full=True, eps=0.0)(mean, target, log_var.exp())
    loss = GaussianNLLLoss()
    assert loss(mean, target, log_var) == pytest.approx(float(ref), rel=1e-5)
    assert loss(torch.cat([mean, log_var], 1), target) == pytest.approx(float(ref), rel=1e-5)
    assert GaussianNLLLoss(reduction="none")(mean, target, log_var).shape == (5, 3)
    clamped = GaussianNLLLoss(reduction="none", log_var_clamp=(-1.0, 1.0))(mean, target, torch.full((5, 3), -20.0))
    assert torch.allclose(clamped, GaussianNLLLoss(reduction="none")(mean, target, torch.full((5, 3), -1.0)))
    with pytest.raises(ValueError, match="2V"):
        loss(torch.randn(5, 3), target)
    with pytest.raises(ValueError, match="target"):
        loss(torch.randn(5, 4), target)


def test_normalize_parents_round_trip_and_errors():
    norm = NormalizeParents(RANGES, VARIABLES)
    v = torch.tensor([[5.0, 2.0, 2.0], [15.0, 0.0, 1.0]])
    n = norm(v)
    assert torch.allclose(n, torch.tensor([[-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]]))
    assert torch.allclose(NormalizeParents(RANGES, VARIABLES, inverse=True)(n), v)
    assert isinstance(norm(np.array([10.0, 1.0, 0.5])), np.ndarray)
    d = NormalizeParentsd("variables", RANGES, VARIABLES, output_keys="parents")({"variables": [10.0, 1.0, 0.5]})
    assert torch.allclose(d["parents"], torch.tensor([0.0, -0.5, -0.5])) and d["variables"] == [10.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="no range"):
        NormalizeParents(RANGES, VARIABLES + ["lumen_mid"])
    with pytest.raises(ValueError, match="min < max"):
        NormalizeParents({**RANGES, "calcified_mid": [1.0, 1.0]}, VARIABLES)
    with pytest.raises(ValueError, match="last axis"):
        norm(torch.zeros(2, 2))


# ---------------------------------------------------------------- DSCM trainer / evaluator / handlers
def _tiny_dscm(img_size=(8, 16)):
    from monai_cft.networks.dscm import DeepSCM
    from monai_cft.transforms.parents import ParentNormalizer
    from monai_cft.networks.flows import AttributeMechanisms
    from monai_cft.networks.hvae import HierarchicalVAE

    hvae = HierarchicalVAE(2, 1, img_size, len(VARIABLES), widths=(8, 8, 8), blocks_per_level=1, z_dim=4,
                           z_max_res=8, embed_dim=8)
    flows = AttributeMechanisms(VARIABLES, None, hidden=(8,), transforms=1, bins=4)
    return DeepSCM(hvae, flows, ParentNormalizer(RANGES, VARIABLES))


def _tiny_loader(n=16, batch_size=8, img_size=(8, 16), seed=0):
    """Images whose brightness follows the first variable: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([r[0] for r in RANGES.values()])
    hi = torch.tensor([r[1] for r in RANGES.values()])
    v = lo + (hi - lo) * torch.rand(n, len(VARIABLES), generator=g)
    level = (v[:, :1] - 10.0) / 5.0
    x = (level[:, :, None, None] * 0.8 + 0.05 * torch.randn(n, 1, *img_size, generator=g)).clamp(-1, 1)
    data = [{"image": x[i], "variables": v[i]} for i in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


@pytest.fixture(scope="module")
def dscm_run():
    """Train a tiny DSCM for 15 epochs x 2 iterations, validating every epoch (shared by the tests below)."""
    pytest.importorskip("monai_cft.networks.dscm")
    from monai_cft.engines.dscm_trainer import DSCMEvaluator, DSCMTrainer

    torch.manual_seed(0)
    net = _tiny_dscm()
    ema = ModelEMA(net, decay=0.5)
    evaluator = DSCMEvaluator("cpu", _tiny_loader(8, 4, seed=1), ema, hu_window=(-300, 1100))
    losses = []
    from monai.handlers import ValidationHandler

    trainer = DSCMTrainer("cpu", 15, _tiny_loader(), net, ema=ema, lr_warmup_steps=2,
                          train_handlers=[ValidationHandler(interval=1, validator=evaluator, epoch_level=True)])
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output))
    trainer.run()
    return trainer, evaluator, losses


def test_dscm_trainer_lowers_the_loss(dscm_run):
    trainer, evaluator, outs = dscm_run
    assert len(outs) == 30
    first = np.mean([o["elbo"] for o in outs[:4]])
    last = np.mean([o["elbo"] for o in outs[-4:]])
    assert last < first - 0.05, (first, last)
    first_flow = np.mean([o["flow_nll"] for o in outs[:4]])
    last_flow = np.mean([o["flow_nll"] for o in outs[-4:]])
    assert last_flow < first_flow, (first_flow, last_flow)
    keys = {"loss", "elbo", "nll", "kl", "flow_nll", "grad_norm", "flow_grad_norm", "beta", "lr", "skipped"}
    assert keys <= set(outs[-1]) and all(math.isfinite(outs[-1][k]) for k in keys)
    assert trainer.state.skipped_updates == 0 and trainer.state.hvae_steps == 30


def test_dscm_evaluator_metrics(dscm_run):
    trainer, evaluator, _ = dscm_run
    m = evaluator.state.metrics
    assert {"val_elbo", "val_nll", "val_kl", "val_flow_nll", "val_recon_l1", "val_recon_l1_hu"} <= set(m)
    assert m["val_elbo"] == pytest.approx(m["val_nll"] + m["val_kl"], rel=1e-5)
    assert m["val_recon_l1_hu"] == pytest.approx(m["val_recon_l1"] * 700.0, rel=1e-5)
    assert 0 < m["val_recon_l1"] < 2.0
    assert evaluator.state.best_metric <= m["val_elbo"] + 1e-9


def test_dscm_trainer_skips_and_counts_bad_updates():
    pytest.importorskip("monai_cft.networks.dscm")
    from monai_cft.engines.dscm_trainer import DSCMTrainer

    torch.manual_seed(0)
    net = _tiny_dscm()
    before = {k: v.clone() for k, v in net.hvae.state_dict().items()}
    trainer = DSCMTrainer("cpu", 1, _tiny_loader(8, 4), net, grad_skip=1e-12, lr_warmup_steps=0)
    trainer.run()
    assert trainer.state.skipped_updates == 2 and trainer.state.output["skipped"] == 1.0
    after = net.hvae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped update must not change the HVAE"
    with pytest.raises(ValueError, match="flow_epochs"):
        DSCMTrainer("cpu", 2, _tiny_loader(8, 4), _tiny_dscm(), schedule="flows_first", flow_epochs=2)
    with pytest.raises(ValueError, match="schedule"):
        DSCMTrainer("cpu", 2, _tiny_loader(8, 4), _tiny_dscm(), schedule="alternating")


def test_dscm_flows_first_schedule():
    pytest.importorskip("monai_cft.networks.dscm")
    from monai_cft.engines.dscm_trainer import DSCMTrainer

    torch.manual_seed(0)
    net = _tiny_dscm()
    hvae0 = {k: v.clone() for k, v in net.hvae.state_dict().items()}
    outs = []
    trainer = DSCMTrainer("cpu", 2, _tiny_loader(8, 4), net, schedule="flows_first", flow_epochs=1)
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outs.append((e.state.epoch, dict(e.state.output))))
    trainer.run()
    assert all(math.isnan(o["elbo"]) and math.isfinite(o["flow_grad_norm"]) for ep, o in outs if ep == 1)
    assert all(math.isfinite(o["elbo"]) and math.isnan(o["flow_grad_norm"]) for ep, o in outs if ep == 2)
    assert trainer.state.hvae_steps == 2
    assert any(not torch.equal(hvae0[k], v) for k, v in net.hvae.state_dict().items())


def test_checkpoint_writer_and_image_logger(tmp_path, dscm_run):
    from monai_cft.engines.handlers import CheckpointWriter, DSCMImageLogger, image_grid

    trainer, evaluator, _ = dscm_run
    meta = {"kind": "dscm", "preset": "quick", "variables": VARIABLES, "ranges": RANGES, "cft_mode": "none"}
    writer = CheckpointWriter(trainer.ema, tmp_path / "dscm.pt", meta, when="best")
    writer(evaluator)  # the evaluator's last epoch is its best or not: save only if it is
    saved = (tmp_path / "dscm.pt").exists()
    assert saved == (evaluator.state.best_metric_epoch == evaluator.state.epoch)
    CheckpointWriter(trainer.ema, tmp_path / "last.pt", meta, when="completed")(evaluator)
    ck = load_checkpoint(tmp_path / "last.pt", expect={"kind": "dscm", "cft_mode": "none"})
    assert ck["meta"]["metric_name"] == "val_elbo" and ck["meta"]["epoch"] == evaluator.state.epoch
    fresh = _tiny_dscm()
    fresh.load_state_dict(ck["model"])
    assert torch.equal(fresh.hvae.out.weight, trainer.ema.module.hvae.out.weight)
    with pytest.raises(ValueError, match="when"):
        CheckpointWriter(trainer.ema, tmp_path / "x.pt", meta, when="sometimes")

    grid = image_grid([torch.full((2, 1, 3, 4), -1.0), torch.ones(2, 1, 3, 4)])
    assert grid.shape == (1, 6, 8) and grid[0, :, :4].max() == 0 and grid[0, :, 4:].min() == 1

    logger = DSCMImageLogger(trainer.ema, _tiny_loader(4, 4), log_dir=str(tmp_path / "tb"), num_images=2)
    logger(trainer)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
