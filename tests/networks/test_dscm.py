"""Tests of the parent normaliser and the deep structural causal model."""

from __future__ import annotations

import warnings

import pytest
import torch

from monai_cft.networks.dscm import DeepSCM, build_dscm
from monai_cft.transforms.parents import ParentNormalizer
from monai_cft.networks.flows import AttributeMechanisms
from monai_cft.networks.hvae import HierarchicalVAE

NAMES = ["lumen_mid", "calcified_mid", "noncalcified_mid"]
RANGES = {"lumen_mid": (2.0, 12.0), "calcified_mid": (0.0, 4.0), "noncalcified_mid": (0.0, 6.0)}
TINY = dict(widths=(8, 16, 16), blocks_per_level=1, z_dim=4, z_max_res=16)


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_dscm(graph=None) -> DeepSCM:
    return build_dscm("quick", 2, (16, 32), NAMES, RANGES, graph=graph, **TINY)


def with_film(dscm: DeepSCM) -> DeepSCM:
    """Give the decoder's FiLM layers non-zero weights so that the parents matter."""
    for block in (b for level in dscm.hvae.dec_blocks for b in level):
        torch.nn.init.normal_(block.film.weight, std=0.5)
    return dscm.eval()


def test_normalizer_round_trip_and_errors():
    norm = ParentNormalizer(RANGES, NAMES)
    phys = torch.tensor([[2.0, 0.0, 6.0], [7.0, 1.0, 3.0]])
    z = norm.normalize(phys)
    assert torch.allclose(z, torch.tensor([[-1.0, -1.0, 1.0], [0.0, -0.5, 0.0]]))
    assert torch.allclose(norm.denormalize(z), phys)
    assert norm.normalize(torch.tensor([7.0, 2.0, 3.0])).shape == (3,)
    assert norm.ranges == {k: list(v) for k, v in RANGES.items()}
    with pytest.raises(ValueError, match=r"'calcified_mid' = 9 .*\[0, 4\]"):
        norm.normalize(torch.tensor([[5.0, 9.0, 1.0]]))
    with pytest.warns(UserWarning, match="calcified_mid"):
        norm.normalize(torch.tensor([[5.0, 9.0, 1.0]]), allow_extrapolation=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norm.normalize(torch.tensor([[5.0, 4.1, 1.0]]))  # inside the 5 % tolerance
    with pytest.raises(ValueError, match="noncalcified_mid"):
        norm.normalize(torch.tensor([[5.0, 1.0, float("nan")]]))
    with pytest.raises(ValueError, match="lumen_mid.*calcified_mid"):
        norm.normalize(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="no range given"):
        ParentNormalizer(RANGES, NAMES + ["other"])
    with pytest.raises(ValueError, match="finite min < max"):
        ParentNormalizer({"a": (1.0, 1.0)}, ["a"])


def test_counterfactual_changes_only_the_intervened_parent():
    torch.manual_seed(0)
    dscm = with_film(tiny_dscm())
    x = torch.rand(3, 1, 16, 32) * 2 - 1
    parents = torch.tensor([[5.0, 1.0, 2.0], [8.0, 0.0, 0.5], [3.0, 3.5, 5.0]])
    out = dscm.counterfactual(x, parents, {"calcified_mid": 2.5})
    assert out["x_cf"].shape == x.shape and "uncertainty" not in out
    assert torch.allclose(out["parents_cf"][:, 1], torch.full((3,), 2.5))
    assert torch.allclose(out["parents_cf"][:, [0, 2]], parents[:, [0, 2]], atol=1e-5)
    assert torch.equal(out["parents_cf_norm"][:, [0, 2]], dscm.normalizer.normalize(parents)[:, [0, 2]])
    assert (out["x_cf"] - x).abs().max() > 1e-3  # the intervention changed the image
    # per-sample targets and uncertainty over particles
    out = dscm.counterfactual(x, parents, {"lumen_mid": torch.tensor([3.0, 4.0, 5.0])}, num_particles=3)
    assert torch.allclose(out["parents_cf"][:, 0], torch.tensor([3.0, 4.0, 5.0]))
    assert out["uncertainty"].shape == x.shape and (out["uncertainty"] >= 0).all()


def test_null_intervention_reproduces_the_image():
    """Exact abduction: intervening with the factual values returns x up to float error."""
    torch.manual_seed(0)
    dscm = with_film(tiny_dscm())
    x = torch.rand(2, 1, 16, 32) * 1.8 - 0.9
    parents = torch.tensor([[5.0, 1.0, 2.0], [8.0, 0.0, 0.5]])
    out = dscm.counterfactual(x, parents, {"lumen_mid": parents[:, 0]})
    assert (out["x_cf"] - x).abs().max() < 1e-5
    # the temperature shrinks the pixel noise towards the decoder mean
    pa = dscm.normalizer.normalize(parents)
    fact = dscm.hvae(x, pa, return_latents=True)
    x0 = dscm.predict_counterfactual(x, fact["latents"], fact["loc"], fact["scale"], pa, noise_temperature=0.0)
    assert torch.allclose(x0, fact["loc"].clamp(-1, 1))
    with pytest.raises(ValueError, match="noise_temperature"):
        dscm.predict_counterfactual(x, fact["latents"], fact["loc"], fact["scale"], pa, noise_temperature=-1.0)


def test_counterfactual_parents_with_an_edge():
    dscm = tiny_dscm(graph={"calcified_mid": ["lumen_mid"]})
    for p in dscm.mechanisms.parameters():  # make the child's mechanism depend on its parent
        torch.nn.init.normal_(p, std=0.1)
    pa = torch.tensor([[0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, False]])
    cf = dscm.counterfactual_parents(pa, mask, torch.tensor([[0.5, 0.0, 0.0]]))
    assert cf[0, 0] == 0.5 and cf[0, 2] == 0.0 and cf[0, 1] != 0.0


def test_bad_inputs():
    dscm = tiny_dscm()
    x = torch.zeros(2, 1, 16, 32)
    parents = torch.tensor([[5.0, 1.0, 2.0], [8.0, 0.0, 0.5]])
    with pytest.raises(ValueError, match=r"unknown variables \['calcium'\].*lumen_mid"):
        dscm.counterfactual(x, parents, {"calcium": 1.0})
    with pytest.raises(ValueError, match=r"'calcified_mid' = 40"):
        dscm.counterfactual(x, parents, {"calcified_mid": 40.0})
    with pytest.raises(ValueError, match=r"'lumen_mid' = 50"):
        dscm.counterfactual(x, torch.tensor([[50.0, 1.0, 2.0]] * 2), {"calcified_mid": 1.0})
    with pytest.raises(ValueError, match="V=3"):
        dscm.counterfactual(x, parents[:, :2], {"calcified_mid": 1.0})
    with pytest.raises(ValueError, match="spatial_dims=2"):
        dscm.counterfactual(torch.zeros(2, 1, 4, 16, 32), parents, {"calcified_mid": 1.0})
    with pytest.raises(ValueError, match=r"\(2,\) tensor"):
        dscm.counterfactual(x, parents, {"calcified_mid": torch.ones(3)})
    with pytest.raises(ValueError, match="num_particles"):
        dscm.counterfactual(x, parents, {"calcified_mid": 1.0}, num_particles=0)
    with pytest.raises(ValueError, match="differ"):
        DeepSCM(dscm.hvae, AttributeMechanisms(["a", "b", "c"]), dscm.normalizer)
    with pytest.raises(ValueError, match="takes 3 parents"):
        DeepSCM(HierarchicalVAE(2, 1, (16, 32), 3, **TINY), AttributeMechanisms(["a", "b"]), ParentNormalizer(
            {"a": (0, 1), "b": (0, 1)}, ["a", "b"]
        ))


def test_checkpoint_round_trip_and_preset_check(tmp_path):
    torch.manual_seed(0)
    dscm = with_film(tiny_dscm(graph={"calcified_mid": ["lumen_mid"]}))
    path = tmp_path / "dscm.pt"
    torch.save({"model": dscm.state_dict(), "meta": {**dscm.checkpoint_meta(), "cft_mode": "none"}}, path)
    loaded = DeepSCM.from_checkpoint(path, expected_preset="quick").eval()
    assert loaded.mechanisms.graph == {"calcified_mid": ["lumen_mid"]}
    assert loaded.hvae.config == dscm.hvae.config
    x = torch.rand(2, 1, 16, 32) * 2 - 1
    pa = torch.zeros(2, 3)
    zs = dscm.hvae.abduct(x, pa, mean=True)
    assert torch.equal(loaded.hvae.decode(zs, pa)[0], dscm.hvae.decode(zs, pa)[0])
    with pytest.raises(ValueError, match="expected preset 'paper'"):
        DeepSCM.from_checkpoint(path, expected_preset="paper")
    # a state dict whose HVAE is of another architecture names the presets
    other = build_dscm("quick", 2, (16, 32), NAMES, RANGES, **{**TINY, "widths": (8, 16, 32)})
    with pytest.raises(ValueError, match="preset 'quick'"):
        dscm.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="DeepSCM"):
        dscm.load_state_dict({**dscm.state_dict(), "normalizer.low": torch.zeros(4)})
    with pytest.raises(ValueError, match="'model' and 'meta'"):
        DeepSCM.from_checkpoint({"model": dscm.state_dict()})
