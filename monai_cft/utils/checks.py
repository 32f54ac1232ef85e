"""Small value checks shared by every layer (no monai-cft imports)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_count"]


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is a whole number >= ``minimum`` (``3`` or ``3.0``), else raise.

    ``max_epochs=1.5`` would otherwise train 2 epochs (ignite rounds up), ``"abc"`` fail in a comparison.

    Raises:
        TypeError: ``value`` is not a number (a bool, a string, None).
        ValueError: ``value`` is not whole, not finite or below ``minimum``; the message names it.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be a whole number >= {minimum}, got {value!r} ({type(value).__name__}).")
    number = float(value)
    if not math.isfinite(number) or not number.is_integer() or number < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}.")
    return int(number)
