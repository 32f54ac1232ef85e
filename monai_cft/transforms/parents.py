"""Map physical parent variables to [-1, 1] and back with their observed ranges.

The networks of monai-cft (flows, HVAE, regressor) see every variable ``v`` min-max normalized over
its observed training range ``[lo, hi]`` (``prepare_config.json``'s ``"ranges"``)::

    v_norm = 2 * (v - lo) / (hi - lo) - 1          v = (v_norm + 1) * (hi - lo) / 2 + lo

:class:`ParentNormalizer` is the one implementation: an ``nn.Module`` whose ranges are float32
buffers (they travel with a DSCM's ``state_dict`` and device), which also checks values against the
ranges. :class:`NormalizeParents` is the same mapping as a MONAI transform for arrays/tensors whose
last axis holds the ``V`` variables in ``names`` order (no range check: values outside the observed
range map outside [-1, 1]; nothing is clipped), and :class:`NormalizeParentsd` its dictionary version
(e.g. ``"variables"`` -> ``"parents"`` for training the regressor, or ``inverse=True`` to turn
predicted normalized means back into mm^2).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import ensure_tuple_rep

__all__ = ["ParentNormalizer", "NormalizeParents", "NormalizeParentsd", "range_bounds"]


def range_bounds(
    ranges: Mapping[str, Sequence[float]], names: Sequence[str], allow_constant: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` float64 arrays (V,) of the ranges of ``names``, validated.

    The one check of observed ranges: the normalisers, the guidance losses' scales, the
    intervention sampling and the prepared dataset's config all call it.

    Args:
        ranges: ``{name: [min, max]}`` in physical units.
        names: the variables to look up, in order.
        allow_constant: accept ``min == max`` (a variable that never varied in the training cases:
            valid data, but it cannot be normalised; the prepared dataset's config allows it).

    Raises:
        ValueError: no names, repeated names, a name without a range, or a range that is not two
            finite numbers (booleans and text are not numbers) with ``max > min`` (``>=`` with
            ``allow_constant``).
    """
    names = list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"names must be a non-empty list of unique variable names, got {names}.")
    missing = [n for n in names if n not in ranges]
    if missing:
        raise ValueError(f"no range given for variable(s) {missing}; ranges are given for {sorted(ranges)}.")
    lo, hi = [], []
    for n in names:
        r = ranges[n]
        numbers = isinstance(r, (list, tuple, np.ndarray)) and len(r) == 2 and all(
            isinstance(b, (int, float, np.number)) and not isinstance(b, (bool, np.bool_)) and math.isfinite(b)
            for b in r)
        if not numbers:
            raise ValueError(f"range of {n!r} must be [min, max], two finite numbers, got {r!r}.")
        if not (float(r[1]) >= float(r[0]) if allow_constant else float(r[1]) > float(r[0])):
            raise ValueError(
                f"range of {n!r} must be [min, max] with finite min {'<=' if allow_constant else '<'} max, got "
                f"{list(r)}" + ("." if allow_constant else "; a variable that never varies cannot be normalised or "
                                "intervened on: widen its range or leave it out.")
            )
        lo.append(float(r[0]))
        hi.append(float(r[1]))
    return np.asarray(lo), np.asarray(hi)


class ParentNormalizer(nn.Module):
    """Map physical variable values to [-1, 1] and back, per variable, over an observed range.

    ``v_norm = 2 * (v - min) / (max - min) - 1``. The ranges are buffers, so they travel with the
    module's ``state_dict`` and device.

    Args:
        ranges: ``{name: (min, max)}`` in physical units (mm^2 or mm^3), e.g. the training split's
            range from ``prepare_config.json``; ``max > min`` is required.
        names: variable order of the (B, V) tensors; every name needs a range.
        tolerance: how far (as a fraction of the range) a value may lie outside [min, max] before
            :meth:`normalize` complains.
        allow_extrapolation: warn instead of raising on out-of-range values.
    """

    def __init__(
        self,
        ranges: Mapping[str, Sequence[float]],
        names: Sequence[str],
        tolerance: float = 0.05,
        allow_extrapolation: bool = False,
    ) -> None:
        super().__init__()
        lows, highs = range_bounds(ranges, names)
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
        self.names = list(names)
        self.tolerance = float(tolerance)
        self.allow_extrapolation = bool(allow_extrapolation)
        self.register_buffer("low", torch.tensor(lows.tolist(), dtype=torch.float32))
        self.register_buffer("high", torch.tensor(highs.tolist(), dtype=torch.float32))

    @property
    def ranges(self) -> dict[str, list[float]]:
        """``{name: [min, max]}`` (physical units)."""
        return {n: [float(lo), float(hi)] for n, lo, hi in zip(self.names, self.low.tolist(), self.high.tolist())}

    def _bounds(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 range buffers on ``values``' device (float64 values promote them)."""
        return self.low.to(values.device), self.high.to(values.device)

    def _check(self, values: torch.Tensor, normalized: bool, allow_extrapolation: bool | None) -> torch.Tensor:
        if not isinstance(values, torch.Tensor):
            values = torch.as_tensor(values, dtype=torch.float32)
        if values.shape[-1:] != (len(self.names),) or values.ndim not in (1, 2):
            raise ValueError(
                f"expected (V,) or (B, V) values with V={len(self.names)} variables {self.names}, "
                f"got shape {tuple(values.shape)}."
            )
        if not values.is_floating_point():
            values = values.float()
        flat = values.reshape(-1, len(self.names))
        if not torch.isfinite(flat).all():
            b, k = (~torch.isfinite(flat)).nonzero()[0].tolist()
            raise ValueError(f"value of {self.names[k]!r} (sample {b}) is {flat[b, k].item()}, not finite.")
        allow = self.allow_extrapolation if allow_extrapolation is None else allow_extrapolation
        low, high = (-torch.ones_like(self.low), torch.ones_like(self.high)) if normalized else (self.low, self.high)
        margin = self.tolerance * (high - low)
        outside = (flat < low - margin) | (flat > high + margin)
        if bool(outside.any()):
            b, k = outside.nonzero()[0].tolist()
            unit = "normalised" if normalized else "physical"
            msg = (
                f"{self.names[k]!r} = {flat[b, k].item():.6g} (sample {b}) is outside its {unit} range "
                f"[{low[k].item():.6g}, {high[k].item():.6g}] by more than {self.tolerance:.0%} of the range "
                f"({int(outside.sum())} value(s) out of range in total)"
            )
            if not allow:
                raise ValueError(msg + "; pass allow_extrapolation=True to accept it.")
            warnings.warn(msg + "; extrapolating.", stacklevel=3)
        return values

    def normalize(
        self, values: torch.Tensor, allow_extrapolation: bool | None = None, validate: bool = True
    ) -> torch.Tensor:
        """Physical (V,) or (B, V) values -> [-1, 1] (same shape), validated (see class doc).

        ``validate=False`` skips the range / NaN checks and accepts any (..., V) shape.
        """
        if validate:
            values = self._check(values, False, allow_extrapolation)
        low, high = self._bounds(values)
        return 2.0 * (values - low) / (high - low) - 1.0

    def denormalize(
        self, values: torch.Tensor, allow_extrapolation: bool | None = None, validate: bool = True
    ) -> torch.Tensor:
        """Normalised (V,) or (B, V) values -> physical units (same shape).

        ``validate=False`` skips the range / NaN checks (for values this module produced itself).
        """
        if validate:
            values = self._check(values, True, allow_extrapolation)
        low, high = self._bounds(values)
        return (values + 1.0) * 0.5 * (high - low) + low

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`normalize`."""
        return self.normalize(values)


class NormalizeParents(Transform):
    """Min-max normalize the last axis (V variables) to [-1, 1] over the observed ranges, or invert it.

    Args:
        ranges: ``{name: [min, max]}`` in physical units (mm^2 / mm^3).
        names: the variables in the order of the last axis.
        inverse: map normalized values back to physical units.

    Input: (..., V) numpy array, list or tensor (a 1D (V,) vector for one case). Output: the same
    type (lists become float32 tensors), float32 unless the input is float64. The mapping is
    :class:`ParentNormalizer`'s (its float32 ranges), without its range check.
    """

    backend = ["torch", "numpy"]

    def __init__(self, ranges: Mapping[str, Sequence[float]], names: Sequence[str], inverse: bool = False) -> None:
        self.normalizer = ParentNormalizer(ranges, names)
        self.names = self.normalizer.names
        self.inverse = bool(inverse)

    def __call__(self, values: Any) -> Any:
        if isinstance(values, (list, tuple)):
            values = torch.as_tensor(values, dtype=torch.float32)
        if values.shape[-1] != len(self.names):
            raise ValueError(
                f"expected the last axis to hold the {len(self.names)} variables {self.names}, got shape {tuple(values.shape)}."
            )
        as_numpy = not isinstance(values, torch.Tensor)
        x = torch.as_tensor(np.asarray(values)) if as_numpy else values
        x = x.to(x.dtype if x.dtype == torch.float64 else torch.float32)
        if self.inverse:
            out = self.normalizer.denormalize(x, validate=False)
        else:
            out = self.normalizer.normalize(x, validate=False)
        return out.numpy() if as_numpy else out


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
