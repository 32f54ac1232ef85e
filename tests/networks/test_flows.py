"""Tests of the attribute mechanisms (conditional zuko flows over a causal graph)."""

from __future__ import annotations

import copy

import pytest
import torch

from monai_cft.networks.flows import AttributeMechanisms, topological_order

VARS = ["global_a", "region_b", "region_c", "root_d"]
GRAPH = {"region_b": ["global_a"], "region_c": ["global_a", "region_b"]}


pytestmark = pytest.mark.usefixtures("single_thread")


def scm_data(n: int, g: torch.Generator) -> torch.Tensor:
    """Normalised samples of a toy SCM on VARS: b depends non-linearly on a, c on a and b, d zero-inflated."""
    a = torch.rand(n, generator=g) * 2 - 1
    b = 0.8 * a**2 - 0.4 + 0.1 * torch.randn(n, generator=g)
    c = 0.5 * a - 0.4 * b + 0.1 * torch.randn(n, generator=g)
    d = torch.where(torch.rand(n, generator=g) < 0.3, -1.0, torch.rand(n, generator=g) * 2 - 1)
    return torch.stack([a, b, c, d], 1).clamp(-1, 1)


@pytest.fixture(scope="module")
def trained():
    """Mechanisms with the edges of GRAPH, fitted by maximum likelihood for a few steps."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    mech = AttributeMechanisms(VARS, GRAPH)
    data = scm_data(256, g)
    opt = torch.optim.Adam(mech.parameters(), lr=5e-3)
    losses = []
    for _ in range(60):
        loss = -mech.log_prob(data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # exact likelihood training works: from standard normals (about 4 x 1.2 nats) to well below
    assert losses[-1] < losses[0] - 2.0
    return mech.eval(), scm_data(64, g)


def test_topological_order_and_graph_errors():
    assert topological_order(VARS, None) == [0, 1, 2, 3]
    order = topological_order(["c", "b", "a"], {"c": ["b"], "b": ["a"]})
    assert order == [2, 1, 0]
    with pytest.raises(ValueError, match="cycle"):
        topological_order(["a", "b"], {"a": ["b"], "b": ["a"]})
    with pytest.raises(ValueError, match="unknown parent 'x'"):
        AttributeMechanisms(["a", "b"], {"a": ["x"]})
    with pytest.raises(ValueError, match="unknown variable 'z'"):
        AttributeMechanisms(["a", "b"], {"z": ["a"]})
    with pytest.raises(ValueError, match="own parent"):
        AttributeMechanisms(["a", "b"], {"a": ["a"]})
    with pytest.raises(TypeError, match="string"):
        AttributeMechanisms(["a", "ab"], {"ab": "a"})
    with pytest.raises(ValueError, match="unique"):
        AttributeMechanisms(["a", "a"])


def test_flows_start_as_identity():
    mech = AttributeMechanisms(VARS, GRAPH).eval()
    values = torch.rand(16, 4) * 2 - 1
    assert torch.allclose(mech.abduct(values), values, atol=1e-6)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(values)
    assert torch.allclose(mech.log_prob_per_variable(values), ref, atol=1e-5)


def test_invertibility_and_log_prob(trained):
    mech, values = trained
    noise = mech.abduct(values)
    assert noise.shape == (64, 4)
    # float32 round trip: the spline inverse is exact up to rounding, amplified where a flow is flat
    assert torch.allclose(mech.generate(noise), values, atol=5e-5)
    mech64 = copy.deepcopy(mech).double()
    assert torch.allclose(mech64.generate(mech64.abduct(values.double())), values.double(), atol=1e-10)
    lp = mech.log_prob(values)
    per = mech.log_prob_per_variable(values)
    assert lp.shape == (64,) and per.shape == (64, 4) and torch.isfinite(lp).all()
    assert torch.allclose(per.sum(1), lp)
    # change of variables: log p(v) = log N(u) + log |du/dv|, checked by finite differences
    eps = 1e-3
    du = (mech.abduct(values + eps) - mech.abduct(values - eps)) / (2 * eps)
    # only the diagonal matters for a root; region_b's u depends on itself given global_a fixed
    root = 3
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(noise[:, root]) + torch.log(du[:, root].abs())
    assert torch.allclose(per[:, root], ref, atol=1e-2)
    samples = mech.sample(5)
    assert samples.shape == (5, 4) and torch.isfinite(samples).all()


def test_dequantization_keeps_point_masses_finite():
    torch.manual_seed(0)
    mech = AttributeMechanisms(["area"], dequantize=0.05)
    values = torch.full((256, 1), -1.0)  # zero-inflated: every value at the range minimum
    opt = torch.optim.Adam(mech.parameters(), lr=1e-2)
    mech.train()
    for _ in range(60):
        loss = -mech.log_prob(values).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and loss.item() < 0  # learned a density concentrated near -1
    # with noise width 0.05 the density is bounded by roughly 1 / 0.05
    assert -loss.item() < torch.log(torch.tensor(1 / 0.05)).item() + 0.5
    mech.eval()
    assert torch.isfinite(mech.log_prob(values)).all()


def test_counterfactual_recomputes_children_only(trained):
    mech, values = trained
    values = values[:6]
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[:3, 0] = True  # do(global_a) on the first three samples
    targets = torch.full((6, 4), float("nan"))
    targets[:, 0] = 0.7
    cf = mech.counterfactual(values, mask, targets)
    assert torch.equal(cf[:3, 0], torch.full((3,), 0.7))
    assert torch.equal(cf[3:], values[3:])  # samples without intervention are untouched, bit for bit
    assert torch.equal(cf[:, 3], values[:, 3])  # the unrelated root is untouched
    assert (cf[:3, 1] - values[:3, 1]).abs().min() > 1e-4  # the children moved
    assert (cf[:3, 2] - values[:3, 2]).abs().min() > 1e-4
    # children follow their mechanisms with the abducted noise under the new parents
    assert torch.allclose(mech.abduct(cf)[:, 1:3], mech.abduct(values)[:, 1:3], atol=1e-4)
    # intervening on a child leaves its parent alone and recomputes the grandchild
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[:, 1] = True
    cf = mech.counterfactual(values, mask, torch.full((6, 4), -0.3))
    assert torch.equal(cf[:, 0], values[:, 0]) and torch.equal(cf[:, 1], torch.full((6,), -0.3))
    assert (cf[:, 2] - values[:, 2]).abs().min() > 1e-4


def test_independent_graph_counterfactual_touches_only_the_target():
    mech = AttributeMechanisms(VARS).eval()
    values = torch.rand(4, 4) * 2 - 1
    mask = torch.eye(4, dtype=torch.bool)
    cf = mech.counterfactual(values, mask, torch.full((4, 4), 0.25))
    assert torch.equal(cf[mask], torch.full((4,), 0.25)) and torch.equal(cf[~mask], values[~mask])


def test_input_errors():
    mech = AttributeMechanisms(VARS, GRAPH)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        mech.log_prob(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="region_b"):
        mech.abduct(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    values = torch.zeros(2, 4)
    with pytest.raises(TypeError, match="bool"):
        mech.counterfactual(values, torch.zeros(2, 4), values)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    with pytest.raises(ValueError, match="sample 1, variable 'region_c'"):
        mech.counterfactual(values, mask, torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        mech.counterfactual(values, mask[:1], values)
