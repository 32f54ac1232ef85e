"""Tests of the segmentors and the parent regressor."""

from __future__ import annotations

import math

import pytest
import torch

from monai_cft.losses.nll import GaussianNLLLoss
from monai_cft.networks.predictors import ParentRegressor, build_segmentor, segmentor_divisor


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("arch", ["unet", "segresnet"])
@pytest.mark.parametrize("spatial_dims,size", [(2, (32, 192)), (2, (64, 384)), (3, (16, 16, 64))])
def test_segmentor_shapes(arch, spatial_dims, size):
    net = build_segmentor(spatial_dims, arch, img_size=size).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 1, *size) * 2 - 1)
    assert out.shape == (1, 4, *size)


def test_segmentor_options_and_errors():
    net = build_segmentor(2, "unet", channels=(8, 16, 32), out_channels=3)
    assert net(torch.zeros(1, 1, 32, 64)).shape == (1, 3, 32, 64)
    assert segmentor_divisor("unet") == 8 and segmentor_divisor("segresnet") == 8
    with pytest.raises(ValueError, match="divisible by 8"):
        build_segmentor(2, "unet", img_size=(36, 192))
    with pytest.raises(ValueError, match="unknown segmentor arch 'vnet'"):
        build_segmentor(2, "vnet")
    with pytest.raises(ValueError, match="spatial_dims"):
        build_segmentor(4)


@pytest.mark.parametrize("spatial_dims,size", [(2, (32, 192)), (3, (16, 16, 64))])
def test_regressor_shapes(spatial_dims, size):
    reg = ParentRegressor(spatial_dims, num_outputs=9, logvar_range=(-5.0, 2.0))
    out = reg(torch.rand(3, 1, *size))
    assert out.shape == (3, 18)
    mean, logvar = reg.split(out)
    assert mean.shape == logvar.shape == (3, 9)
    assert logvar.min() >= -5.0 and logvar.max() <= 2.0
    with pytest.raises(ValueError, match="spatial dims"):
        reg(torch.rand(3, 1, 32))


def test_regressor_output_is_the_gaussian_nll_input():
    """ParentRegressor's (B, 2V) output is what GaussianNLLLoss takes: V means then V log-variances."""
    pred = torch.cat([torch.randn(4, 3), torch.randn(4, 3)], dim=1)
    target = torch.randn(4, 3)
    mean, logvar = ParentRegressor.split(pred)
    ref = torch.nn.functional.gaussian_nll_loss(mean, target, logvar.exp(), full=True, reduction="none")
    assert torch.allclose(GaussianNLLLoss(reduction="none")(pred, target), ref, atol=1e-5)
    assert GaussianNLLLoss()(pred, target).item() == pytest.approx(ref.mean().item(), rel=1e-5)
    # minimised at the target with a small variance
    exact = torch.cat([target, torch.full_like(target, -4.0)], dim=1)
    assert GaussianNLLLoss()(exact, target).item() == pytest.approx(0.5 * (-4.0 + math.log(2 * math.pi)))
    with pytest.raises(ValueError, match="2V"):
        ParentRegressor.split(pred[:, :5])


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: build_segmentor(2, "unet", 1, 4, channels=(4, 8, 16, 16), img_size=(32, 192)), id="unet-custom"),
        pytest.param(lambda: build_segmentor(2, "segresnet", 1, 4, channels=(16,)), id="segresnet-custom"),
        pytest.param(lambda: ParentRegressor(2, 1, 9, block_inplanes=(4, 8, 8, 8), logvar_range=(-5.0, 3.0)), id="regressor"),
    ],
)
def test_checkpoints_rebuild_the_network_from_its_constructor_config(build, tmp_path):
    """The loaders rebuild a predictor from ``meta["network_config"]`` (non-default widths included)."""
    from monai_cft.networks.loading import load_regressor, load_segmentor
    from monai_cft.utils.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = build()
    kind = "regressor" if isinstance(net, ParentRegressor) else "segmentor"
    meta = {"kind": kind, "network_config": net.network_config, "spatial_dims": 2, "arch": "unet",
            "out_channels": 4, "num_outputs": 9}
    save_checkpoint(tmp_path / "net.pt", net, meta)
    again = (load_regressor if kind == "regressor" else load_segmentor)(tmp_path / "net.pt")
    assert type(again) is type(net)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
    # without the constructor config (checkpoints of earlier versions) only the default widths fit
    del meta["network_config"]
    save_checkpoint(tmp_path / "old.pt", net, meta)
    with pytest.raises(Exception, match="size mismatch|does not fit|Error"):
        (load_regressor if kind == "regressor" else load_segmentor)(tmp_path / "old.pt")
