"""Rebuild the bundle's predictor networks (segmentors, parent regressor) from their checkpoints.

A checkpoint written by the bundle (:mod:`monai_cft.utils.checkpoint`) holds a plain ``state_dict``
and a ``meta`` dict with everything needed to rebuild the network: ``meta["network_config"]``, the
network's full constructor config (``network_config`` of :func:`~monai_cft.networks.predictors.build_segmentor`
and :class:`~monai_cft.networks.predictors.ParentRegressor`), plus its role and sizes; no code or
pickled objects travel with the weights. Checkpoints without ``network_config`` (earlier versions)
are rebuilt from ``spatial_dims``, ``arch``, ``in_channels`` and ``out_channels`` / ``num_outputs``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from monai_cft.networks.predictors import ParentRegressor, build_segmentor
from monai_cft.utils.checkpoint import load_checkpoint

__all__ = ["load_segmentor", "load_regressor"]


def _load_network(path: str | os.PathLike, kind: str, expect: Mapping[str, Any] | None, build: Callable,
                  return_meta: bool = False) -> nn.Module | tuple[nn.Module, dict]:
    payload = load_checkpoint(path, expect={"kind": kind, **dict(expect or {})})
    net = build(payload["meta"])
    net.load_state_dict(payload["model"])
    return (net.eval(), payload["meta"]) if return_meta else net.eval()


def load_segmentor(path: str | os.PathLike, expect: Mapping[str, Any] | None = None,
                   return_meta: bool = False) -> nn.Module | tuple[nn.Module, dict]:
    """Rebuild a segmentor saved by the bundle (``train_segmentor.json``) from its checkpoint meta, in eval mode.

    Args:
        path: ``segmentor_guidance.pt`` / ``segmentor_eval.pt``.
        expect: meta values to check (e.g. ``{"preset": "quick", "role": "guidance"}``); ``kind`` is
            always checked to be ``"segmentor"``.
        return_meta: also return the checkpoint's meta (one read of the file).
    """

    def build(meta):
        if "network_config" in meta:  # every constructor argument (checkpoints of this version)
            return build_segmentor(**meta["network_config"])
        return build_segmentor(
            spatial_dims=int(meta["spatial_dims"]),
            arch=meta["arch"],
            in_channels=int(meta.get("in_channels", 1)),
            out_channels=int(meta["out_channels"]),
            img_size=meta.get("img_size"),
        )

    return _load_network(path, "segmentor", expect, build, return_meta)


def load_regressor(path: str | os.PathLike, expect: Mapping[str, Any] | None = None) -> nn.Module:
    """Rebuild the parent regressor saved by the bundle (``train_regressor.json``), in eval mode."""

    def build(meta):
        if "network_config" in meta:
            return ParentRegressor(**meta["network_config"])
        return ParentRegressor(
            spatial_dims=int(meta["spatial_dims"]),
            in_channels=int(meta.get("in_channels", 1)),
            num_outputs=int(meta["num_outputs"]),
        )

    return _load_network(path, "regressor", expect, build)
