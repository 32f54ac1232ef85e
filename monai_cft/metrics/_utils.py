"""Small private helpers shared by the metric modules."""

from __future__ import annotations

from typing import Any

import torch
from monai_cft.utils.tensors import as_plain_tensor

__all__ = ["module_device", "check_positive_int", "plain"]


def module_device(module: Any, default: torch.device) -> torch.device:
    """Device of the first parameter of ``module`` (an ``nn.Module``), else ``default``."""
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            return p.device
    return default


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (bools rejected), else raise a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


plain = as_plain_tensor  # metrics carry no geometry
