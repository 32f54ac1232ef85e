"""The networks' intensity window: Hounsfield units clipped to a window and mapped to [-1, 1], and back.

Every network of monai-cft (segmentors, regressor, HVAE) sees an image as::

    x = 2 * (clip(hu, lo, hi) - lo) / (hi - lo) - 1          hu = lo + (x + 1) * (hi - lo) / 2

with the window ``(lo, hi)`` of :data:`monai_cft.constants.HU_WINDOW` (-300 to 1100 HU) unless a
checkpoint records another. :class:`HUWindow` is the one implementation: the training transforms
(:class:`HUWindowd` in ``common.json``), inference, evaluation, figures and the MONAI Label tasks all
call it. Its forward map gives the same float32 values as MONAI's
``ScaleIntensityRange(a_min=lo, a_max=hi, b_min=-1, b_max=1, clip=True)``, bit for bit.
:meth:`HUWindow.inverse` undoes it on [-1, 1]; HU outside the window were clipped and cannot be recovered.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, Transform

from monai_cft.constants import HU_WINDOW

__all__ = ["HUWindow", "HUWindowd"]


def _plain_unless_tracking(img: Any) -> Any:
    """``img`` without its metadata when ``MetaTensor`` tracking is off, else unchanged."""
    return img.as_tensor() if isinstance(img, MetaTensor) and not get_track_meta() else img


class HUWindow(Transform):
    """Clip HU to a window and map it linearly to [-1, 1]; :meth:`inverse` maps [-1, 1] back to HU.

    Args:
        window: ``(low, high)`` in HU, finite, ``low < high``.

    Input: a tensor, a numpy array or a number, any shape (e.g. (C, H, W) or (B, 1, H, W)); output:
    the same type and shape, in [-1, 1] (forward) or HU (inverse). A ``MetaTensor`` keeps its
    metadata, or becomes a plain tensor under ``monai.data.set_track_meta(False)``, as in MONAI's
    intensity transforms.

    Raises:
        ValueError: a window that is not two finite numbers with ``low < high`` (the message names it).
    """

    backend = ["torch", "numpy"]

    def __init__(self, window: Sequence[float] = HU_WINDOW) -> None:
        try:
            low, high = (float(v) for v in window)
        except (TypeError, ValueError):
            raise ValueError(f"hu_window must be (low, high) finite HU with low < high, got {window!r}.") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"hu_window must be (low, high) finite HU with low < high, got {tuple(window)!r}.")
        self.window = (low, high)

    @property
    def hu_per_unit(self) -> float:
        """HU per unit of the network's scale: ``(high - low) / 2`` (e.g. to express an L1 error in HU)."""
        return (self.window[1] - self.window[0]) / 2.0

    def __call__(self, img: Any) -> Any:
        """HU -> [-1, 1] (values outside the window clipped to its ends)."""
        low, high = self.window
        img = _plain_unless_tracking(img)
        clipped = img.clamp(low, high) if isinstance(img, torch.Tensor) else np.clip(img, low, high)
        return (clipped - low) / (high - low) * 2.0 - 1.0

    def inverse(self, img: Any) -> Any:
        """[-1, 1] -> HU (the inverse of :meth:`__call__` inside the window)."""
        low, high = self.window
        return (_plain_unless_tracking(img) + 1.0) * 0.5 * (high - low) + low


class HUWindowd(MapTransform):
    """Dictionary version of :class:`HUWindow`.

    Args:
        keys: keys of the images to map.
        window: see :class:`HUWindow`.
        inverse: map [-1, 1] back to HU instead.
        allow_missing_keys: skip absent keys instead of raising.
    """

    backend = HUWindow.backend

    def __init__(self, keys: KeysCollection, window: Sequence[float] = HU_WINDOW, inverse: bool = False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = HUWindow(window)
        self.inverse_map = bool(inverse)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter.inverse(d[key]) if self.inverse_map else self.converter(d[key])
        return d
