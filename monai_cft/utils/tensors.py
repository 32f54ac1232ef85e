"""Tensor helpers shared by every layer."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["as_plain_tensor", "to_plain_tensor"]


def as_plain_tensor(x: Any) -> Any:
    """Return ``x`` as a plain ``torch.Tensor`` (a ``MetaTensor``'s metadata is dropped; others unchanged).

    Networks' inner loops, metrics and file writers take plain tensors: they carry no geometry.
    """
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def to_plain_tensor(x: Any) -> torch.Tensor:
    """:func:`as_plain_tensor`, with arrays, lists and numbers converted to a ``torch.Tensor`` too."""
    return torch.as_tensor(as_plain_tensor(x))
