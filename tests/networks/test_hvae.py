"""Tests of the hierarchical VAE, its likelihood, presets and checkpoint checks."""

from __future__ import annotations

import math

import pytest
import torch

from monai_cft.networks.hvae import (
    HierarchicalVAE,
    beta_schedule,
    discretized_gaussian_nll,
    gaussian_kl,
    level_sizes,
    resolve_strides,
)
from monai_cft.networks.presets import HVAE_PRESETS, build_hvae, match_preset


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(spatial_dims=2, img_size=(16, 32), num_parents=2, **kw):
    args = dict(widths=(8, 16, 16), blocks_per_level=1, z_dim=4, z_max_res=16)
    args.update(kw)
    return HierarchicalVAE(spatial_dims, 1, img_size, num_parents, **args)


def bar_images(n, h=16, w=32, seed=0):
    """Images of a horizontal bar whose thickness (parent 0) and brightness (parent 1) vary."""
    g = torch.Generator().manual_seed(seed)
    pa = torch.rand(n, 2, generator=g) * 2 - 1
    rows = (torch.arange(h).float() - h / 2 + 0.5).abs().view(1, 1, h, 1)
    half_thickness = (1.0 + (pa[:, 0] + 1.0)).view(n, 1, 1, 1)
    bright = (0.5 + 0.4 * pa[:, 1]).view(n, 1, 1, 1)
    img = torch.where(rows < half_thickness, bright, torch.full_like(bright, -0.8)).expand(n, 1, h, w)
    img = img + 0.02 * torch.randn(n, 1, h, w, generator=g)
    return img.clamp(-1, 1), pa


@pytest.mark.parametrize(
    "spatial_dims,img_size,z_max_res",
    [(2, (16, 16), 8), (2, (16, 64), 32), (3, (8, 8, 32), 16), (3, (4, 8, 16), 8)],
)
def test_shapes(spatial_dims, img_size, z_max_res):
    net = tiny(spatial_dims, img_size, 3, z_max_res=z_max_res)
    x = torch.rand(2, 1, *img_size) * 2 - 1
    pa = torch.rand(2, 3) * 2 - 1
    out = net(x, pa, return_latents=True)
    for key in ("elbo", "nll", "kl"):
        assert out[key].shape == () and torch.isfinite(out[key])
    assert out["loc"].shape == x.shape and out["scale"].shape == x.shape and (out["scale"] > 0).all()
    assert [tuple(z.shape[1:]) for z in out["latents"]] == net.latent_shapes
    assert len(net.latent_shapes) == sum(1 for s in net.stochastic if s)  # one block per level
    zs = net.abduct(x, pa)
    assert [tuple(z.shape) for z in zs] == [(2, *s) for s in net.latent_shapes]
    loc, scale = net.decode(zs, pa)
    assert loc.shape == x.shape and scale.shape == x.shape
    sample = net.sample(pa, temperature=0.5)
    assert sample.shape == x.shape and sample.abs().max() <= 1
    out["elbo"].backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_levels_keyed_by_level_not_width():
    strides = resolve_strides((4, 32), 5)
    assert strides == ((2, 2), (2, 2), (1, 2), (1, 2))  # the first axis stops at size 1
    assert level_sizes((4, 32), strides) == [(4, 32), (2, 16), (1, 8), (1, 4), (1, 2)]
    assert resolve_strides((12, 12), 3, strides=[3, (2, 1)]) == ((3, 3), (2, 1))
    with pytest.raises(ValueError, match="does not divide"):
        resolve_strides((12, 12), 2, strides=[5])
    net = tiny(img_size=(16, 64), widths=(8, 8, 8, 8), z_max_res=(4, 16))
    assert net.sizes == [(16, 64), (8, 32), (4, 16), (2, 8)]
    assert net.stochastic == [False, False, True, True]
    with pytest.raises(ValueError, match="no stochastic level"):
        tiny(z_max_res=1)


def test_discretized_gaussian_is_normalised_and_finite():
    bins = torch.linspace(-1, 1, 256).view(256, 1)
    for loc, scale in [(0.0, 0.3), (0.9, 0.01), (-0.2, 5.0), (0.5, 1e-4)]:
        mass = torch.exp(-discretized_gaussian_nll(bins, torch.tensor(loc), torch.tensor(scale)))
        assert mass.sum().item() == pytest.approx(1.0, abs=2e-3)
    # agreement with an exact float64 evaluation inside the range
    x, loc, scale = torch.tensor([0.1, -0.5]), torch.tensor([0.0, -0.45]), torch.tensor([0.05, 0.02])
    half = 1 / 255
    normal = torch.distributions.Normal(loc.double(), scale.double())
    ref = -torch.log(normal.cdf(x.double() + half) - normal.cdf(x.double() - half))
    assert torch.allclose(discretized_gaussian_nll(x, loc, scale).double(), ref, rtol=1e-4)
    # far tails and huge scales stay finite, with finite gradients
    loc = torch.tensor([30.0, -30.0, 0.0, 0.0], requires_grad=True)
    scale = torch.tensor([0.01, 0.01, 1e4, 1e-4], requires_grad=True)
    nll = discretized_gaussian_nll(torch.tensor([0.0, 0.3, 0.0, 0.5]), loc, scale)
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()


def test_gaussian_kl_matches_torch():
    q_loc, q_std, p_loc, p_std = torch.randn(10), torch.rand(10) + 0.1, torch.randn(10), torch.rand(10) + 0.1
    normal = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(normal(q_loc, q_std), normal(p_loc, p_std))
    assert torch.allclose(gaussian_kl(q_loc, q_std, p_loc, p_std), ref, atol=1e-5)


def test_beta_schedule_and_free_bits():
    assert beta_schedule(0, 100, 2.0) == 0.0
    assert beta_schedule(50, 100, 2.0) == pytest.approx(1.0)
    assert beta_schedule(500, 100, 2.0) == 2.0 and beta_schedule(3, 0, 0.5) == 0.5
    with pytest.raises(ValueError):
        beta_schedule(-1, 10)
    torch.manual_seed(0)
    x, pa = bar_images(4)
    plain, floored = tiny(), tiny(free_bits=1.0)
    floored.load_state_dict(plain.state_dict())
    a, b = plain(x, pa), floored(x, pa)
    assert torch.allclose(a["elbo"], a["nll"] + a["kl"])
    # the untrained KL is ~0, so the floor of 1 nat per (layer, channel) dominates
    n_channels = sum(s[0] for s in floored.latent_shapes)
    assert b["elbo"].item() == pytest.approx(b["nll"].item() + n_channels / x[0].numel(), rel=1e-3)


def test_exact_abduction_and_training():
    """Pixel-noise abduction reproduces x exactly; a short training lowers the ELBO and the reconstruction error."""
    torch.manual_seed(0)
    x, pa = bar_images(8)
    net = tiny()

    def check():
        with torch.no_grad():
            out = net(x, pa, return_latents=True)
            loc, scale = net.decode(out["latents"], pa)
            x_cf = loc + scale * (x - out["loc"]) / out["scale"]
            recon = (net.decode(net.abduct(x, pa, mean=True), pa)[0] - x).abs().mean()
        return out["elbo"].item(), (x_cf - x).abs().max().item(), recon.item()

    elbo0, identity0, recon0 = check()
    assert identity0 < 1e-5
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(80):
        loss = net(x, pa)["elbo"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    elbo1, identity1, recon1 = check()
    print(f"untrained: elbo {elbo0:.3f} recon MAE {recon0:.3f} |x_cf - x| {identity0:.2e}; "
          f"trained: elbo {elbo1:.3f} recon MAE {recon1:.3f} |x_cf - x| {identity1:.2e}")
    assert elbo1 < elbo0 - 1.0
    assert recon1 < 0.5 * recon0
    assert identity1 < 1e-5


def test_parents_change_the_decoding():
    torch.manual_seed(0)
    net = tiny()
    for block in (b for level in net.dec_blocks for b in level):  # give FiLM non-zero weights
        torch.nn.init.normal_(block.film.weight, std=0.5)
    x, pa = bar_images(2)
    zs = net.abduct(x, pa)
    loc_a, _ = net.decode(zs, pa)
    loc_b, _ = net.decode(zs, -pa)
    assert (loc_a - loc_b).abs().max() > 1e-3


def test_input_validation():
    net = tiny(num_parents=3)
    x, pa = torch.zeros(2, 1, 16, 32), torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 32\).*\(2, 1, 16, 16\)"):
        net(torch.zeros(2, 1, 16, 16), pa)
    with pytest.raises(ValueError, match="spatial_dims=2"):
        net(torch.zeros(2, 1, 4, 16, 32), pa)
    with pytest.raises(ValueError, match=r"\(2, 2, 16, 32\)"):
        net(torch.zeros(2, 2, 16, 32), pa)
    with pytest.raises(ValueError, match=r"\(B, 3\).*\(2, 2\)"):
        net(x, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="batch size"):
        net(x, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        net(x, torch.tensor([[0.0, float("nan"), 0.0]] * 2))
    with pytest.raises(TypeError):
        net(x.long(), pa)
    with pytest.raises(ValueError, match="latent"):
        net.decode(net.abduct(x, pa)[:-1], pa)
    with pytest.raises(ValueError, match="spatial_dims"):
        HierarchicalVAE(1, 1, (16,), 2)
    with pytest.raises(ValueError, match="blocks_per_level"):
        tiny(blocks_per_level=(1, 1))


def test_presets_and_checkpoint_compatibility():
    quick = build_hvae("quick", 2, (32, 192), 9)
    assert quick.config["preset"] == "quick" and quick.config["widths"] == list(HVAE_PRESETS["quick"]["widths"])
    assert max(max(s) for s, st in zip(quick.sizes, quick.stochastic) if st) <= 48  # latents at 8 x 48 and below
    with torch.device("meta"):
        paper = build_hvae("paper", 2, (32, 192), 9)
    # a state dict of another preset is refused with a message naming both presets
    with pytest.raises(ValueError, match=r"preset 'quick'.*matches preset 'paper'"):
        quick.load_state_dict(paper.state_dict())
    with pytest.raises(ValueError, match=r"preset 'paper'.*preset 'quick'"):
        quick.check_compatible({"hvae_config": paper.config})
    with pytest.raises(ValueError, match="'paper'"):
        quick.check_compatible({"preset": "paper"})
    quick.check_compatible({"hvae_config": dict(quick.config)})
    assert match_preset(quick.state_dict(), 2, (32, 192), 9) == "quick"
    assert match_preset(tiny().state_dict(), 2, (32, 192), 9) is None
    # a round trip through config and a weights-only load works
    clone = HierarchicalVAE.from_config(quick.config)
    clone.load_state_dict(quick.state_dict())
    with pytest.raises(ValueError, match="unknown HVAE preset"):
        build_hvae("huge", 2, (32, 192), 9)
    with pytest.raises(ValueError, match="unknown HierarchicalVAE arguments"):
        build_hvae("quick", 2, (32, 192), 9, width=3)
    net = build_hvae("quick", 2, (32, 192), 9, z_dim=4)
    assert net.preset_overrides == ["z_dim"] and "overrides" not in net.config  # provenance is not an argument


def test_quick_preset_3d_builds():
    net = build_hvae("quick", 3, (32, 32, 192), 9)
    assert net.latent_shapes[-1] == (8, 8, 8, 48)
    assert math.isfinite(sum(p.numel() for p in net.parameters()))


def test_from_config_round_trips_a_preset_network_with_overrides():
    """A bundle-trained DSCM's HVAE config holds constructor arguments only: from_config rebuilds it; the
    ``overrides`` key of checkpoints written by earlier versions is skipped."""
    net = build_hvae("quick", 2, (32, 192), 9, widths=(8, 16, 16, 16), blocks_per_level=1, z_max_res=24)
    assert net.preset_overrides == ["blocks_per_level", "widths", "z_max_res"]
    again = HierarchicalVAE.from_config(net.config)
    again.load_state_dict(net.state_dict())
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    legacy = HierarchicalVAE.from_config({**net.config, "overrides": ["widths"]})
    assert legacy.config == net.config
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        HierarchicalVAE.from_config({**net.config, "colour": 1})
