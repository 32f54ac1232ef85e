"""Differences between two state dicts, for error messages that say what does not fit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["state_dict_problems"]


def state_dict_problems(
    own: Mapping[str, torch.Tensor], other: Mapping[str, Any], strict: bool, prefix: str
) -> list[str]:
    """Key / shape differences between a model's state dict and ``other`` (keys under ``prefix``)."""
    problems = []
    theirs = {k: v for k, v in other.items() if k.startswith(prefix)}
    for key, ref in own.items():
        if key not in theirs:
            if strict:
                problems.append(f"missing {key}")
        elif isinstance(theirs[key], torch.Tensor) and tuple(theirs[key].shape) != tuple(ref.shape):
            problems.append(f"{key}: {tuple(theirs[key].shape)} vs {tuple(ref.shape)}")
    if strict:
        problems.extend(f"unexpected {key}" for key in theirs if key not in own)
    return problems
