"""Tensor helpers shared by every layer."""

from __future__ import annotations

from typing import Any

__all__ = ["as_plain_tensor"]


def as_plain_tensor(x: Any) -> Any:
    """Return ``x`` as a plain ``torch.Tensor`` (a ``MetaTensor``'s metadata is dropped; others unchanged).

    Networks' inner loops, metrics and file writers take plain tensors: they carry no geometry.
    """
    return x.as_tensor() if hasattr(x, "as_tensor") else x
