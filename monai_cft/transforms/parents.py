"""Map physical parent variables to [-1, 1] and back with their observed ranges.

The networks of monai-cft (flows, HVAE, regressor) see every variable ``v`` min-max normalized over
its observed training range ``[lo, hi]`` (``prepare_config.json``'s ``"ranges"``)::

    v_norm = 2 * (v - lo) / (hi - lo) - 1          v = lo + (v_norm + 1) * (hi - lo) / 2

:class:`NormalizeParents` does this for arrays/tensors whose last axis holds the ``V`` variables in
``names`` order; :class:`NormalizeParentsd` is its dictionary version (e.g. ``"variables"`` ->
``"parents"`` for training the regressor, or ``inverse=True`` to turn predicted normalized means
back into mm^2). Values outside the observed range map outside [-1, 1]; nothing is clipped.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import ensure_tuple_rep

__all__ = ["NormalizeParents", "NormalizeParentsd", "range_bounds"]


def range_bounds(ranges: Mapping[str, Sequence[float]], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` float64 arrays (V,) of the ranges of ``names``, validated.

    Raises:
        ValueError: a name without a range, or a range that is not two finite numbers with ``hi > lo``.
    """
    names = list(names)
    if not names:
        raise ValueError("names must list at least one variable.")
    missing = [n for n in names if n not in ranges]
    if missing:
        raise ValueError(f"no range for variable(s) {missing}; ranges are given for {sorted(ranges)}.")
    lo, hi = [], []
    for n in names:
        r = list(ranges[n])
        if len(r) != 2 or not all(math.isfinite(float(b)) for b in r) or not float(r[1]) > float(r[0]):
            raise ValueError(f"range of {n!r} must be [min, max] with finite min < max, got {r}.")
        lo.append(float(r[0]))
        hi.append(float(r[1]))
    return np.asarray(lo), np.asarray(hi)


class NormalizeParents(Transform):
    """Min-max normalize the last axis (V variables) to [-1, 1] over the observed ranges, or invert it.

    Args:
        ranges: ``{name: [min, max]}`` in physical units (mm^2 / mm^3).
        names: the variables in the order of the last axis.
        inverse: map normalized values back to physical units.

    Input: (..., V) numpy array, list or tensor (a 1D (V,) vector for one case). Output: the same
    type (lists become float32 tensors), float32 unless the input is float64.
    """

    backend = ["torch", "numpy"]

    def __init__(self, ranges: Mapping[str, Sequence[float]], names: Sequence[str], inverse: bool = False) -> None:
        self.names = list(names)
        self.lo, self.hi = range_bounds(ranges, self.names)
        self.inverse = bool(inverse)

    def __call__(self, values: Any) -> Any:
        if isinstance(values, (list, tuple)):
            values = torch.as_tensor(values, dtype=torch.float32)
        if values.shape[-1] != len(self.names):
            raise ValueError(
                f"expected the last axis to hold the {len(self.names)} variables {self.names}, got shape {tuple(values.shape)}."
            )
        if isinstance(values, torch.Tensor):
            dtype = values.dtype if values.dtype == torch.float64 else torch.float32
            lo = torch.as_tensor(self.lo, dtype=dtype, device=values.device)
            hi = torch.as_tensor(self.hi, dtype=dtype, device=values.device)
            values = values.to(dtype)
        else:
            values = np.asarray(values)
            dtype = np.float64 if values.dtype == np.float64 else np.float32
            lo, hi = self.lo.astype(dtype), self.hi.astype(dtype)
            values = values.astype(dtype)
        if self.inverse:
            return lo + (values + 1.0) * (hi - lo) / 2.0
        return 2.0 * (values - lo) / (hi - lo) - 1.0


class NormalizeParentsd(MapTransform):
    """Dictionary version of :class:`NormalizeParents`.

    Args:
        keys: keys of the (V,) variable vectors to transform.
        ranges, names, inverse: see :class:`NormalizeParents`.
        output_keys: where to store each result (default: in place); e.g. ``keys="variables",
            output_keys="parents"`` keeps the physical values next to the normalized ones.
        allow_missing_keys: skip absent keys instead of raising.
    """

    backend = NormalizeParents.backend

    def __init__(
        self,
        keys: KeysCollection,
        ranges: Mapping[str, Sequence[float]],
        names: Sequence[str],
        inverse: bool = False,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = NormalizeParents(ranges, names, inverse)
        self.output_keys = ensure_tuple_rep(output_keys, len(self.keys)) if output_keys is not None else self.keys
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"output_keys {self.output_keys} must pair up with keys {self.keys}.")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.converter(d[key])
        return d
