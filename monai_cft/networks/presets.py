"""Named hyper-parameter sets for the hierarchical VAE.

* ``quick``: sized for a CPU quick-start at 32 x 192 (the ``quick`` sCPR preset): narrow levels,
  one block per level at the two finest resolutions (so the decoder can draw plaques), one or two
  blocks per coarser level and latents only at 8 x 48 and coarser.

Both presets use a parent-free prior path (``cond_prior=False``: a latent that encodes what the
parents already say costs KL, so the decoder learns to take it from the parents) and spatial parent
maps (``spatial_parents=True``: each regional variable modulates the decoder inside its region).
docs/experiments.md has the runs behind these choices.
* ``paper``: a GPU-sized network for 64 x 384 (the ``paper`` sCPR preset): wider, deeper, latents
  from 16 x 96 down.

The levels are derived from the image size (every even axis is halved per level), so a preset also
works for other sizes, including 3D volumes such as 32 x 32 x 192, as long as each axis can be halved
often enough for the level sizes to stay integral.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from monai_cft.networks.hvae import HierarchicalVAE

__all__ = ["HVAE_PRESETS", "build_hvae", "match_preset"]

#: architecture hyper-parameters of every preset (arguments of :class:`HierarchicalVAE`).
HVAE_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "widths": (8, 16, 32, 64, 64, 64),
        "blocks_per_level": (1, 1, 1, 2, 2, 1),
        "z_dim": 8,
        "z_max_res": 48,
        "bottleneck": 0.5,
        "embed_dim": 32,
        "cond_prior": False,
        "spatial_parents": True,
    },
    "paper": {
        "widths": (32, 64, 96, 128, 192, 256, 256),
        "blocks_per_level": (1, 2, 3, 4, 4, 4, 2),
        "z_dim": 16,
        "z_max_res": 96,
        "bottleneck": 0.5,
        "embed_dim": 64,
        "cond_prior": False,
        "spatial_parents": True,
    },
}


def build_hvae(
    preset: str,
    spatial_dims: int,
    img_size: Sequence[int],
    num_parents: int,
    in_channels: int = 1,
    **overrides: Any,
) -> HierarchicalVAE:
    """Build a :class:`HierarchicalVAE` from a named preset.

    Args:
        preset: ``"quick"`` or ``"paper"``.
        spatial_dims: 2 or 3.
        img_size: image size, e.g. ``(32, 192)``.
        num_parents: number of parent variables.
        in_channels: image channels.
        overrides: any :class:`HierarchicalVAE` argument replacing the preset's value (the network's
            ``config["preset"]`` then still names the preset it started from; the changed keys are
            provenance, not constructor arguments: they are listed in ``net.preset_overrides`` and
            the DSCM checkpoint's ``meta["hvae_overrides"]``).

    Raises:
        ValueError: unknown preset or unknown override names.
    """
    if preset not in HVAE_PRESETS:
        raise ValueError(f"unknown HVAE preset {preset!r}; valid presets are {sorted(HVAE_PRESETS)}.")
    kwargs = dict(HVAE_PRESETS[preset])
    unknown = set(overrides) - set(_ARGS)
    if unknown:
        raise ValueError(f"unknown HierarchicalVAE arguments {sorted(unknown)}; valid ones are {sorted(_ARGS)}.")
    kwargs.update(overrides)
    net = HierarchicalVAE(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        img_size=img_size,
        num_parents=num_parents,
        preset=preset,
        **kwargs,
    )
    net.preset_overrides = sorted(overrides)
    # a mismatching checkpoint's error then names the preset it matches (hvae imports nothing from here)
    net.preset_matcher = match_preset
    return net


#: HierarchicalVAE arguments a preset may set or a caller may override (all but the data
#: arguments spatial_dims, in_channels, img_size, num_parents and the preset name).
_ARGS = tuple(inspect.signature(HierarchicalVAE).parameters)[4:-1]


def match_preset(
    state_dict: Mapping[str, Any],
    spatial_dims: int,
    img_size: Sequence[int],
    num_parents: int,
    in_channels: int = 1,
) -> str | None:
    """Name of the preset whose network (at this image size) has exactly the state dict's keys and shapes.

    The candidates are built on the ``meta`` device, so this allocates no parameter memory.
    Returns ``None`` when no preset matches.
    """
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    for name in HVAE_PRESETS:
        try:
            with torch.device("meta"):
                net = build_hvae(name, spatial_dims, img_size, num_parents, in_channels)
        except ValueError:
            continue
        if {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes:
            return name
    return None
