"""Predictors of the variables from images: segmentors (Seg-CFT guidance, evaluation) and regressors (Reg-CFT).

* :func:`build_segmentor` wraps MONAI's ``UNet`` or ``SegResNet`` with small default widths and
  returns logits ``(B, out_channels, *spatial)``; structure areas are measured on its softmax by
  :func:`monai_cft.transforms.measures.measure_structures`.
* :class:`ParentRegressor` is a MONAI ``ResNet`` predicting a Gaussian over the normalised
  variables: ``(B, 2V)`` = V means then V log-variances. :class:`monai_cft.losses.GaussianNLLLoss` is its training loss
  and the Reg-CFT guidance term ``-log q(pa_cf | x_cf)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets import ResNet, SegResNet, UNet

__all__ = ["build_segmentor", "segmentor_divisor", "ParentRegressor"]

_UNET_DEFAULTS = {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 1}
_SEGRESNET_DEFAULTS = {"init_filters": 8, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1)}


def segmentor_divisor(arch: str, strides: Sequence[int] | None = None, blocks_down: Sequence[int] | None = None) -> int:
    """Number every spatial size must be divisible by for :func:`build_segmentor` with these settings."""
    if arch == "unet":
        return int(math.prod(strides if strides is not None else _UNET_DEFAULTS["strides"]))
    if arch == "segresnet":
        return 2 ** (len(blocks_down if blocks_down is not None else _SEGRESNET_DEFAULTS["blocks_down"]) - 1)
    raise ValueError(f"unknown segmentor arch {arch!r}; valid ones are ['unet', 'segresnet'].")


def build_segmentor(
    spatial_dims: int,
    arch: str = "unet",
    in_channels: int = 1,
    out_channels: int = 4,
    channels: Sequence[int] | None = None,
    img_size: Sequence[int] | None = None,
    **kwargs,
) -> nn.Module:
    """Build a segmentation network returning logits ``(B, out_channels, *spatial)``.

    Args:
        spatial_dims: 2 or 3.
        arch: ``"unet"`` (MONAI ``UNet``; default channels (16, 32, 64, 128), strides (2, 2, 2),
            one residual unit) or ``"segresnet"`` (MONAI ``SegResNet``; ``channels[0]`` is its
            ``init_filters``, default 8).
        in_channels: image channels.
        out_channels: classes, background included (4: background, lumen, calcified, non-calcified).
        channels: UNet channels per level, or (init_filters,) for SegResNet.
        img_size: optional image size, checked for divisibility by the network's total stride.
        kwargs: further arguments of the MONAI network (e.g. ``strides``, ``norm``, ``dropout``).

    The returned network's ``network_config`` holds these arguments (JSON-able), so a checkpoint
    that stores it (``meta["network_config"]``) is rebuilt exactly by
    :func:`monai_cft.networks.loading.load_segmentor`.

    Raises:
        ValueError: unknown ``arch``, bad ``spatial_dims`` or an ``img_size`` the network cannot take.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if arch == "unet":
        args = dict(_UNET_DEFAULTS)
        if channels is not None:
            args["channels"] = tuple(channels)
            args["strides"] = (2,) * (len(channels) - 1)
        args.update(kwargs)
        divisor = segmentor_divisor(arch, args["strides"])
        net: nn.Module = UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **args)
    elif arch == "segresnet":
        args = dict(_SEGRESNET_DEFAULTS)
        if channels is not None:
            args["init_filters"] = int(channels[0])
        args.update(kwargs)
        divisor = segmentor_divisor(arch, blocks_down=args["blocks_down"])
        net = SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **args)
    else:
        raise ValueError(f"unknown segmentor arch {arch!r}; valid ones are ['unet', 'segresnet'].")
    if img_size is not None:
        bad = [int(s) for s in img_size if int(s) % divisor]
        if len(img_size) != spatial_dims or bad:
            raise ValueError(
                f"img_size {tuple(img_size)} does not fit a {spatial_dims}D {arch}: every one of the "
                f"{spatial_dims} sizes must be divisible by {divisor}."
            )
    net.network_config = _jsonable({"spatial_dims": spatial_dims, "arch": arch, "in_channels": in_channels,
                                    "out_channels": out_channels, "channels": channels, "img_size": img_size, **kwargs})
    return net


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    """Tuples as lists, so that a constructor config survives a JSON / checkpoint-meta round trip."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


class ParentRegressor(nn.Module):
    """ResNet regressor of the normalised variables with a Gaussian output.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_outputs: number V of variables.
        layers: residual blocks of the four ResNet stages.
        block_inplanes: widths of the four stages.
        block: ``"basic"`` or ``"bottleneck"``.
        conv1_t_size, conv1_t_stride: kernel and stride of the stem convolution (stride 2 plus the
            max-pool reduce a 32 x 192 image to 8 x 48 before the first stage).
        logvar_range: clamp of the predicted log-variance (normalised units squared).

    Shapes: (B, in_channels, *spatial) -> (B, 2V): V means, then V log-variances.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        num_outputs: int = 9,
        layers: Sequence[int] = (1, 1, 1, 1),
        block_inplanes: Sequence[int] = (16, 32, 64, 128),
        block: str = "basic",
        conv1_t_size: int = 7,
        conv1_t_stride: int = 2,
        logvar_range: tuple[float, float] = (-9.0, 4.0),
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if not isinstance(num_outputs, int) or num_outputs < 1:
            raise ValueError(f"num_outputs must be a positive int, got {num_outputs!r}.")
        if logvar_range[0] >= logvar_range[1]:
            raise ValueError(f"logvar_range must be (low, high) with low < high, got {logvar_range}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_outputs = num_outputs
        self.logvar_range = (float(logvar_range[0]), float(logvar_range[1]))
        #: every constructor argument (JSON-able): ``ParentRegressor(**network_config)`` rebuilds it
        self.network_config = _jsonable({
            "spatial_dims": spatial_dims, "in_channels": in_channels, "num_outputs": num_outputs, "layers": layers,
            "block_inplanes": block_inplanes, "block": block, "conv1_t_size": conv1_t_size,
            "conv1_t_stride": conv1_t_stride, "logvar_range": logvar_range})
        self.trunk = ResNet(
            block=block,
            layers=list(layers),
            block_inplanes=list(block_inplanes),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=conv1_t_size,
            conv1_t_stride=conv1_t_stride,
            num_classes=2 * num_outputs,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict (B, 2V): means then clamped log-variances of the normalised variables."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected (B, {self.in_channels}, *spatial) with {self.spatial_dims} spatial dims, "
                f"got {tuple(x.shape)}."
            )
        mean, logvar = self.trunk(x).chunk(2, dim=1)
        return torch.cat([mean, logvar.clamp(*self.logvar_range)], dim=1)

    @staticmethod
    def split(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a (B, 2V) prediction into ``(mean, logvar)``, each (B, V)."""
        if pred.ndim != 2 or pred.shape[1] % 2:
            raise ValueError(f"prediction must be (B, 2V), got {tuple(pred.shape)}.")
        return pred.chunk(2, dim=1)
