"""Counterfactual fine-tuning: objective, frozen/trainable parameters, ELBO target, resume, export, learning.

A tiny world: 8 x 24 images with a bright band whose height in each third of the columns is random;
the three variables are the band areas per third (what a hand-made frozen segmentor measures).
"""

from __future__ import annotations

import copy

import pytest
import torch
from ignite.engine import Events
from torch import nn
from torch.utils.data import DataLoader

from monai_cft.constants import check_cft_mode
from monai_cft.engines.cft_trainer import CFTTrainer, ConstrainedELBO
from monai_cft.losses import RegressorGuidanceLoss, SegmentorGuidanceLoss, ranges_to_scales
from monai_cft.networks.dscm import DeepSCM
from monai_cft.transforms.parents import ParentNormalizer
from monai_cft.networks.flows import AttributeMechanisms
from monai_cft.networks.hvae import HierarchicalVAE

H, W, K = 8, 24, 3
NAMES = ["band_proximal", "band_mid", "band_distal"]


class BandSegmentor(nn.Module):
    """Frozen stand-in segmentor: band probability ``(x + 1) / 2`` (no saturation), background the rest."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(1, affine=False)  # eval mode with fresh statistics: identity
        self.conv = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(0.5)
            self.conv.bias.fill_(0.5)

    def forward(self, x):
        p = self.conv(self.bn(x)).clamp(0.0, 1.0)
        return torch.cat([1.0 - p, p], 1)


def region_masks() -> torch.Tensor:
    masks = torch.zeros(K, H, W)
    for k in range(K):
        masks[k, :, 8 * k : 8 * k + 8] = 1.0
    return masks


def make_items(n: int, seed: int) -> list[dict]:
    """Images with a band of random height per third; variables = the band areas the segmentor measures."""
    g = torch.Generator().manual_seed(seed)
    seg = BandSegmentor().eval()
    items = []
    for _ in range(n):
        heights = torch.randint(1, 7, (K,), generator=g)
        img = torch.full((1, H, W), -0.9) + 0.03 * torch.randn(1, H, W, generator=g)
        for k in range(K):
            img[0, 1 : 1 + heights[k], 8 * k : 8 * k + 8] = 0.9
        with torch.no_grad():
            areas = (seg(img[None])[:, 1:] * region_masks()).flatten(2).sum(-1)[0]
        items.append({"image": img.clamp(-1, 1), "variables": areas})
    return items


RANGES = {n: [8.0, 48.0] for n in NAMES}


def seg_loss(masks=True, reduction="none") -> SegmentorGuidanceLoss:
    scales = ranges_to_scales(RANGES, NAMES) if masks else torch.tensor([120.0])
    return SegmentorGuidanceLoss(
        BandSegmentor(), {"band": 1}, region_masks() if masks else None, "l1", 1.0, scales, softmax=False,
        reduction=reduction,
    )


@pytest.fixture(scope="module")
def world():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    hvae = HierarchicalVAE(2, 1, (H, W), K, widths=(8, 16), blocks_per_level=1, z_dim=2, z_max_res=W)
    flows = AttributeMechanisms(NAMES, None, hidden=(8,), transforms=1, bins=4)
    dscm = DeepSCM(hvae, flows, ParentNormalizer(RANGES, NAMES))
    train = make_items(48, 1)
    loader = DataLoader(train, batch_size=16, shuffle=True)
    opt = torch.optim.AdamW(dscm.parameters(), lr=1e-2)
    for _ in range(30):  # short likelihood pre-training (HVAE and flows)
        for batch in loader:
            pa = dscm.normalizer.normalize(batch["variables"])
            out = dscm(batch["image"], pa)
            opt.zero_grad()
            (out["elbo"] + out["flow_nll"] / (H * W)).backward()
            opt.step()
    dscm.eval()
    yield {"dscm": dscm, "train": train, "test": make_items(16, 2)}
    torch.set_num_threads(threads)


def loader_of(items, shuffle=False, batch_size=8):
    return DataLoader(items, batch_size=batch_size, shuffle=shuffle)


def trainer_for(world, mode="pos_seg", loss=None, max_epochs=1, **kw) -> CFTTrainer:
    if loss is None and mode in ("seg", "pos_seg"):
        loss = seg_loss(masks=mode == "pos_seg")
    kw.setdefault("elbo_target_batches", 2)
    return CFTTrainer(
        "cpu", max_epochs, loader_of(world["train"], kw.pop("shuffle", False), kw.pop("batch_size", 8)),
        copy.deepcopy(world["dscm"]), mode,
        loss, **kw,
    )


def test_constrained_elbo_value_and_gradients():
    c = ConstrainedELBO(damping=100.0, lagrange_init=0.5, elbo_target=2.5)
    nelbo = torch.tensor(3.0, requires_grad=True)
    loss = c(torch.tensor(2.0), nelbo)
    assert loss.item() == pytest.approx(2.0 + (0.5 + 100 * 0.5) * 0.5)
    loss.backward()
    assert nelbo.grad.item() == pytest.approx(0.5 + 100 * 0.5)  # lambda + damping * (nelbo - eps)
    assert c.lmbda.grad.item() == pytest.approx(0.5)  # nelbo - eps: ascent raises lambda
    with pytest.raises(RuntimeError, match="eps"):
        ConstrainedELBO()(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="finite"):
        ConstrainedELBO().set_target(float("nan"))


def test_modes_and_guidance_checks(world):
    assert check_cft_mode("pos_seg") == "pos_seg"
    with pytest.raises(ValueError, match=r"'posseg'.*\['none', 'reg', 'seg', 'pos_seg'\]"):
        trainer_for(world, "posseg", seg_loss())
    # the trainer checks that the injected loss fits the DSCM's variables, not which mode it is
    two_masks = SegmentorGuidanceLoss(BandSegmentor(), {"band": 1}, region_masks()[:2], softmax=False)
    with pytest.raises(ValueError, match="measures 2 regions"):
        trainer_for(world, "pos_seg", two_masks)
    with pytest.raises(ValueError, match="predicts 4 parents but the DSCM has 3"):
        trainer_for(world, "reg", RegressorGuidanceLoss(nn.Linear(2, 8), num_outputs=4))
    with pytest.raises(TypeError, match="from_parents"):
        trainer_for(world, "reg", nn.L1Loss())
    with pytest.raises(ValueError, match="needs a guidance loss"):
        CFTTrainer("cpu", 1, loader_of(world["train"]), copy.deepcopy(world["dscm"]), "seg", None)
    with pytest.raises(ValueError, match="needs no guidance loss"):
        CFTTrainer("cpu", 1, loader_of(world["train"]), copy.deepcopy(world["dscm"]), "none", seg_loss())
    dscm = copy.deepcopy(world["dscm"])
    bad_opt = torch.optim.AdamW(dscm.parameters(), lr=1e-4)  # would train the flows too
    with pytest.raises(ValueError, match="exactly the HVAE"):
        CFTTrainer("cpu", 1, loader_of(world["train"]), dscm, "pos_seg", seg_loss(), optimizer=bad_opt)
    with pytest.raises(ValueError, match="intervention_sampling"):
        trainer_for(world, intervention_sampling="all")


def test_trainable_and_frozen_parameters(world):
    trainer = trainer_for(world, epoch_length=2)
    trainable, frozen = trainer.trainable_parameters(), trainer.frozen_parameters()
    assert set(trainable) == {f"dscm.hvae.{n}" for n, _ in trainer.dscm.hvae.named_parameters()}
    expected_frozen = {f"dscm.mechanisms.{n}" for n, _ in trainer.dscm.mechanisms.named_parameters()}
    expected_frozen |= {"guidance_loss.segmentor.conv.weight", "guidance_loss.segmentor.conv.bias"}
    assert set(frozen) == expected_frozen
    assert all(p.requires_grad for p in trainable.values()) and not any(p.requires_grad for p in frozen.values())
    before_t = {k: p.detach().clone() for k, p in trainable.items()}
    before_f = {k: p.detach().clone() for k, p in frozen.items()}
    bn_stats = trainer.guidance_loss.segmentor.bn.running_mean.clone()
    modes = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: modes.append((e.hvae.training, e.dscm.mechanisms.training, e.guidance_loss.segmentor.training)),
    )
    trainer.run()
    assert modes == [(True, False, False)] * 2
    assert all(torch.equal(p, before_f[k]) for k, p in frozen.items())
    assert torch.equal(trainer.guidance_loss.segmentor.bn.running_mean, bn_stats)
    changed = [k for k, p in trainable.items() if not torch.equal(p, before_t[k])]
    assert len(changed) > 0.5 * len(trainable)
    out = trainer.state.output
    assert set(out) >= {"loss", "aux", "nelbo", "eps", "lambda", "grad_norm", "skipped", "aux_intervened", "aux_others"}
    assert out["lambda"] >= 0.0 and not out["skipped"]


def test_update_skipped_when_gradient_norm_too_large(world, caplog):
    trainer = trainer_for(world, epoch_length=20, grad_skip=1e-12, lagrange_init=1.0)
    before = {k: p.detach().clone() for k, p in trainer.trainable_parameters().items()}
    with caplog.at_level("WARNING"):
        trainer.run()
    assert trainer.state.output["skipped"] is True
    assert all(torch.equal(p, before[k]) for k, p in trainer.trainable_parameters().items())
    assert trainer.constraint.lmbda.item() == 1.0
    assert trainer.ema.n_averaged.item() == 0
    assert "20 consecutive CFT updates skipped" in caplog.text


def test_intervention_sampling_one_variable_per_sample(world):
    pa = torch.rand(64, K) * 2 - 1
    for sampling in ("uniform", "permute"):
        trainer = trainer_for(world, intervention_sampling=sampling)
        mask, values = trainer.sample_interventions(pa)
        assert mask.dtype == torch.bool and mask.sum(1).eq(1).all()
        assert mask.sum(0).min() > 5  # every variable gets chosen
        chosen = values[mask]
        assert chosen.min() >= -1 and chosen.max() <= 1
        if sampling == "permute":  # each target is the same variable's value in some sample of the batch
            col = mask.float().argmax(1)
            assert all(bool((pa[:, c] == v).any()) for c, v in zip(col.tolist(), chosen.tolist()))
        else:
            assert chosen.std() > 0.4  # spread over the range, not the factual values


@pytest.mark.parametrize("nelbo_value, one_sided, grad", [(3.0, True, 0.5 + 100 * 0.5), (2.0, True, 0.5),
                                                          (2.0, False, 0.5 - 100 * 0.5), (3.0, False, 0.5 + 100 * 0.5)])
def test_one_sided_damping_only_acts_on_violations(nelbo_value, one_sided, grad):
    c = ConstrainedELBO(damping=100.0, lagrange_init=0.5, elbo_target=2.5, one_sided=one_sided)
    nelbo = torch.tensor(nelbo_value, requires_grad=True)
    c(torch.tensor(0.0), nelbo).backward()
    assert nelbo.grad.item() == pytest.approx(grad)


def test_elbo_slack_is_added_to_the_measured_target(world):
    slack = trainer_for(world, epoch_length=1, elbo_target_batches=3, elbo_slack=0.25)
    torch.manual_seed(5)
    expected = slack.measure_elbo_target()
    torch.manual_seed(5)
    slack.run()
    assert slack.constraint.eps.item() == pytest.approx(expected + 0.25, rel=1e-6)
    with pytest.raises(ValueError, match="elbo_slack"):
        trainer_for(world, elbo_slack=float("nan"))


def test_elbo_target_measured_at_start_or_given(world):
    trainer = trainer_for(world, epoch_length=1, elbo_target_batches=3)
    torch.manual_seed(5)
    expected = trainer.measure_elbo_target()
    assert not trainer.constraint.has_target
    torch.manual_seed(5)
    trainer.run()
    assert trainer.constraint.eps.item() == pytest.approx(expected, rel=1e-6)
    # independent check: mean negative ELBO of the pretrained HVAE over the first 3 batches
    torch.manual_seed(5)
    dscm, vals, n = world["dscm"], [], 0
    with torch.no_grad():
        for i, b in enumerate(loader_of(world["train"])):
            if i == 3:
                break
            vals.append(dscm.hvae(b["image"], dscm.normalizer.normalize(b["variables"]))["elbo"] * b["image"].shape[0])
            n += b["image"].shape[0]
    assert expected == pytest.approx(float(sum(vals) / n), rel=1e-6)
    given = trainer_for(world, epoch_length=1, elbo_target=1.234)
    given.run()
    assert given.constraint.eps.item() == pytest.approx(1.234)


def test_resume_restores_step_lambda_and_weights(world, tmp_path):
    first = trainer_for(world, epoch_length=4, checkpoint_dir=tmp_path, checkpoint_interval=2, lagrange_init=0.3,
                        lr_warmup_steps=10)
    first.run()
    state_file = tmp_path / "cft_pos_seg_state.pt"
    assert state_file.is_file()
    saved = torch.load(state_file, weights_only=True)
    assert saved["engine"]["iteration"] == 4
    lam, eps = first.constraint.lmbda.item(), first.constraint.eps.item()
    assert lam != pytest.approx(0.3)  # the multiplier moved

    second = trainer_for(world, max_epochs=2, epoch_length=4, checkpoint_dir=tmp_path, lagrange_init=0.0,
                         lr_warmup_steps=10)
    seen = {}

    def record(engine):
        seen.update(
            iteration=engine.state.iteration,
            lam=engine.constraint.lmbda.item(),
            eps=engine.constraint.eps.item(),
            same=all(torch.equal(a, b) for a, b in zip(engine.hvae.parameters(), first.hvae.parameters())),
            ema=all(torch.equal(a, b) for a, b in zip(engine.ema.parameters(), first.ema.parameters())),
            lr=engine.optimizer.param_groups[0]["lr"],
        )

    second.add_event_handler(Events.STARTED, record)
    second.run()
    lr = first.optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(1e-4 * 5 / 10)  # linear warm-up after 4 updates
    assert seen == {"iteration": 4, "lam": lam, "eps": eps, "same": True, "ema": True, "lr": lr}
    assert second.state.iteration == 8 and second.state.epoch == 2
    assert torch.load(state_file, weights_only=True)["engine"]["iteration"] == 8

    other = trainer_for(world, "seg", epoch_length=1, checkpoint_dir=tmp_path)
    (tmp_path / "cft_seg_state.pt").write_bytes(state_file.read_bytes())
    with pytest.raises(ValueError, match="cft_mode 'pos_seg'"):
        other.run()


def test_none_mode_exports_pretrained_and_export_uses_ema(world, tmp_path):
    base = world["dscm"]
    meta = base.checkpoint_meta()
    none = trainer_for(world, "none", epoch_length=2)
    none.run()
    assert none.state.iteration == 0
    path = none.export(tmp_path / "dscm_cft_none.pt", meta)
    payload = torch.load(path, weights_only=True)
    assert payload["meta"]["cft_mode"] == "none" and payload["meta"]["kind"] == "dscm"
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in payload["model"].items())

    tuned = trainer_for(world, epoch_length=2, ema_decay=0.5)
    tuned.run()
    path = tuned.export(tmp_path / "dscm_cft_pos_seg.pt", meta)
    loaded = DeepSCM.from_checkpoint(path)
    ema_state = tuned.ema.module.state_dict()
    assert all(torch.equal(v, ema_state[k]) for k, v in loaded.hvae.state_dict().items())
    assert not all(torch.equal(v, tuned.hvae.state_dict()[k]) for k, v in ema_state.items())
    assert torch.load(path, weights_only=True)["meta"]["cft"]["iterations"] == 2


def _held_out_guidance(dscm: DeepSCM, items, seed: int = 0) -> tuple[float, float]:
    """Mean L1 guidance error (normalized) of random single-variable interventions, and held-out nelbo."""
    loss = seg_loss(reduction="none")
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([it["image"] for it in items])
    pa = torch.stack([it["variables"] for it in items])
    idx = torch.randint(K, (len(items),), generator=g)
    target = 8.0 + 40.0 * torch.rand(len(items), generator=g)
    torch.manual_seed(seed)
    dscm.eval()
    with torch.no_grad():
        pa_n = dscm.normalizer.normalize(pa)
        out = dscm.hvae(x, pa_n, return_latents=True)
        mask = torch.nn.functional.one_hot(idx, K).bool()
        vals = dscm.normalizer.normalize(torch.where(mask, target[:, None], pa))
        pa_cf = dscm.counterfactual_parents(pa_n, mask, vals)
        x_cf = dscm.predict_counterfactual(x, out["latents"], out["loc"], out["scale"], pa_cf)
        err = loss(x_cf, dscm.normalizer.denormalize(pa_cf)).sum(1).mean()
    return float(err), float(out["elbo"])


@pytest.mark.slow
def test_short_fine_tuning_lowers_held_out_guidance_loss(world):
    before, _ = _held_out_guidance(world["dscm"], world["test"])
    torch.manual_seed(0)
    # batches of 16 tiny images give a noisy ELBO: a lighter damping than the default 100 keeps the
    # constraint from drowning the guidance signal in this short run
    trainer = trainer_for(world, max_epochs=40, lr=3e-3, damping=3.0, ema_decay=0.9, shuffle=True, batch_size=16)
    trainer.run()
    eps = trainer.constraint.eps.item()
    tuned = copy.deepcopy(trainer.dscm)
    tuned.hvae.load_state_dict(trainer.ema.module.state_dict())
    after, nelbo = _held_out_guidance(tuned, world["test"])
    assert after < 0.9 * before, (before, after)
    assert abs(nelbo - eps) < 0.1, (nelbo, eps)


class TinySegmentor(nn.Module):
    """A small trained segmentor (two 3x3 convolutions), standing in for the bundle's guidance UNet."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def _train_tiny_segmentor(items) -> TinySegmentor:
    torch.manual_seed(1)
    seg = TinySegmentor()
    x = torch.stack([it["image"] for it in items])
    label = (x[:, 0] > 0.0).long()  # the band
    opt = torch.optim.Adam(seg.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(seg(x), label).backward()
        opt.step()
    return seg.eval()


def test_fine_tuning_learns_under_the_production_settings(world):
    """Pos-Seg-CFT with finetune.json's constraint and schedule (lr after a 20-step warm-up, damping 100,
    one-sided, 0.05 nats/px ELBO slack, guidance weight 30, EMA 0.999) and a *trained* segmentor: the
    held-out guidance error falls and the counterfactuals follow the intervention, with the ELBO kept
    within the slack."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(__file__).resolve().parents[2] / "bundle" / "configs" / "finetune.json").read_text())
    seg = _train_tiny_segmentor(world["train"])
    scales = ranges_to_scales(RANGES, NAMES) / float(cfg["seg_guidance_weight"])
    loss = SegmentorGuidanceLoss(seg, {"band": 1}, region_masks(), cfg["seg_loss"], 1.0, scales, reduction="none")
    held_out = SegmentorGuidanceLoss(_train_tiny_segmentor(world["train"]), {"band": 1}, region_masks(), "l1", 1.0,
                                     ranges_to_scales(RANGES, NAMES), reduction="none")

    def guidance_error(dscm) -> tuple[float, float]:
        g = torch.Generator().manual_seed(0)
        items = world["test"]
        x = torch.stack([it["image"] for it in items])
        pa = torch.stack([it["variables"] for it in items])
        idx = torch.randint(K, (len(items),), generator=g)
        target = 8.0 + 40.0 * torch.rand(len(items), generator=g)
        dscm.eval()
        with torch.no_grad():
            pa_n = dscm.normalizer.normalize(pa)
            out = dscm.hvae(x, pa_n, return_latents=True)
            mask = torch.nn.functional.one_hot(idx, K).bool()
            pa_cf = dscm.counterfactual_parents(pa_n, mask, dscm.normalizer.normalize(torch.where(mask, target[:, None], pa)))
            x_cf = dscm.predict_counterfactual(x, out["latents"], out["loc"], out["scale"], pa_cf)
            err = held_out(x_cf, dscm.normalizer.denormalize(pa_cf)).sum(1).mean()
        return float(err), float(out["elbo"])

    before, nelbo0 = guidance_error(world["dscm"])
    torch.manual_seed(0)
    keys = ("lr_warmup_steps", "weight_decay", "lagrange_lr", "damping", "elbo_slack", "one_sided_damping",
            "ema_decay", "grad_clip", "grad_skip", "noise_temperature")
    settings = {k: cfg[k] for k in keys}
    trainer = trainer_for(world, "pos_seg", loss, max_epochs=40, lr=1e-3, shuffle=True, batch_size=16, **settings)
    trainer.run()
    tuned = copy.deepcopy(trainer.dscm)
    tuned.load_state_dict(trainer.dscm_state_dict(use_ema=True))
    after, nelbo = guidance_error(tuned)
    print(f'production-settings CFT: held-out guidance error {before:.3f} -> {after:.3f}, nelbo {nelbo0:.3f} -> {nelbo:.3f}')
    assert after < 0.85 * before, (before, after)
    assert nelbo < trainer.constraint.eps.item() + 0.1, (nelbo, trainer.constraint.eps.item())


def test_fine_tuning_is_deterministic_for_a_seed(world):
    """Two runs with the same seed give bit-identical weights and logs (CPU; docs/cft.md, Determinism)."""
    from monai.utils import set_determinism

    runs = []
    for _ in range(2):
        set_determinism(seed=0)
        trainer = trainer_for(world, "pos_seg", seg_loss(), max_epochs=2, lr=1e-3, shuffle=True, batch_size=16)
        logs = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: logs.append(dict(e.state.output)))
        trainer.run()
        runs.append((trainer.dscm_state_dict(use_ema=True), logs))
    set_determinism(seed=None)
    (w0, l0), (w1, l1) = runs
    assert l0 == l1 and len(l0) == 6
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_snapshots_and_curves(world, tmp_path):
    """The trainer keeps EMA snapshots at 0, every snapshot_interval and at the end (a fresh run clears
    the old ones); snapshot_curves evaluates each and measures gap closure against iteration 0."""
    from monai_cft.cft_curves import list_snapshots, snapshot_curves

    (tmp_path / "cft_pos_seg_snapshots").mkdir()
    (tmp_path / "cft_pos_seg_snapshots" / "iter_000999.pt").write_bytes(b"stale")
    trainer = trainer_for(world, "pos_seg", seg_loss(), max_epochs=2, checkpoint_dir=tmp_path, snapshot_interval=4,
                          resume=False)
    trainer.run()  # 2 epochs x 6 batches = 12 updates
    snaps = list_snapshots(tmp_path / "cft_pos_seg_snapshots")
    assert [it for it, _ in snaps] == [0, 4, 8, 12]
    first = torch.load(snaps[0][1], weights_only=True)
    assert all(torch.equal(first["model"][k], v) for k, v in world["dscm"].hvae.state_dict().items())

    def fake_evaluate(model, images, variables, **kw):
        drift = sum(float((p - q).abs().sum()) for p, q in zip(model.hvae.parameters(), world["dscm"].hvae.parameters()))
        err = 10.0 - min(drift, 8.0)  # error falls as the weights move away from the pretrained ones
        return [], {"intervened_error": {n: {"err_mode": err, "err_ground_truth": 2.0} for n in NAMES},
                    "response_slope": {n: {n: 1.0 - err / 10.0} for n in NAMES}}

    c = snapshot_curves(trainer.dscm, snaps, fake_evaluate, torch.zeros(5, 1, H, W), torch.zeros(5, K), None,
                        n_cases=3, mode="pos_seg")
    assert c["iterations"] == [0, 4, 8, 12] and c["n_cases"] == 3
    assert c["median_gap_closure"][0] == 0.0 and c["median_gap_closure"][-1] > 0.0
    assert c["err"]["band_mid"][0] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="start at iteration 0"):
        snapshot_curves(trainer.dscm, snaps[1:], fake_evaluate, torch.zeros(5, 1, H, W), torch.zeros(5, K), None, 3, "pos_seg")
    with pytest.raises(ValueError, match="snapshot_interval"):
        trainer_for(world, "pos_seg", seg_loss(), checkpoint_dir=tmp_path, snapshot_interval=0)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", [3, 6, 10])  # mid-epoch, at an epoch boundary, mid-epoch of the second epoch
def test_resume_is_bit_exact(world, tmp_path, kill_at):
    """A run stopped after iteration ``kill_at`` (its state saved every iteration) and resumed in a fresh
    trainer, with the random generators scrambled in between, ends with the uninterrupted run's weights."""
    from monai.utils import set_determinism

    def make(folder):
        return trainer_for(world, "pos_seg", seg_loss(), max_epochs=2, lr=1e-3, shuffle=True, checkpoint_dir=folder,
                           checkpoint_interval=1, grad_skip=None, damping=3.0)  # no update skipped

    set_determinism(seed=0)
    full = make(tmp_path / "full")
    full.run()
    reference = full.dscm_state_dict(use_ema=True)

    set_determinism(seed=0)
    first = make(tmp_path / "killed")

    def kill(engine):
        if engine.state.iteration == kill_at:
            raise _Killed()

    first.add_event_handler(Events.ITERATION_COMPLETED, kill)
    with pytest.raises(_Killed):
        first.run()
    torch.manual_seed(12345)  # whatever ran in between must not matter
    import random

    import numpy as np

    random.seed(7)
    np.random.seed(7)
    resumed = make(tmp_path / "killed")
    skipped = []
    resumed.add_event_handler(Events.ITERATION_COMPLETED, lambda e: skipped.append(e.state.output["skipped"]))
    resumed.run()
    assert not any(skipped)  # every update counts (a skipped one would hide a difference)
    assert resumed.state.iteration == 12
    state = resumed.dscm_state_dict(use_ema=True)
    different = [k for k in reference if not torch.equal(reference[k], state[k])]
    set_determinism(seed=None)
    assert not different, different[:5]
