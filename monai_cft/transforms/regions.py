"""Disjoint region masks: positional splits along an image axis, or one mask per value of a region map.

Positional regions partition a spatial axis at fractions of its length (or at millimetre positions);
pixel centres decide membership, so every pixel belongs to exactly one region. With the defaults
the last axis (the sCPR's W, ostium at column 0) is cut into proximal / mid / distal thirds, the
regions of the positional paper. Map mode turns any integer partition (lung zones, AHA segments,
3D sub-volumes) into the same one-hot form.
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
from monai.data.utils import affine_to_spacing
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, ensure_tuple_rep

from monai_cft.variables import DEFAULT_BOUNDARIES, DEFAULT_REGIONS

__all__ = ["REGION_NAMES_KEY", "RegionMasks", "RegionMasksd", "region_windows", "region_window_shape", "context_pixels"]

#: meta key under which the region names are recorded on the output masks.
REGION_NAMES_KEY = "region_names"
_UNITS = ("fraction", "mm")
_UNLISTED = ("error", "ignore")


def _check_boundaries(boundaries: Sequence[float], units: str) -> tuple[float, ...]:
    if isinstance(boundaries, (str, bytes)):
        raise TypeError(f"boundaries must be a sequence of numbers such as (0.3, 0.6), got the text {boundaries!r}.")
    try:
        b = tuple(float(v) for v in boundaries)
    except (TypeError, ValueError) as e:
        raise TypeError(f"boundaries must be a sequence of numbers, got {boundaries!r}.") from e
    if any(isinstance(v, (str, bytes, bool)) for v in boundaries):
        raise TypeError(f"boundaries must be a sequence of numbers, got {boundaries!r}.")
    if not all(math.isfinite(v) for v in b):
        raise ValueError(f"boundaries must be finite, got {boundaries!r}.")
    if any(b2 <= b1 for b1, b2 in zip(b, b[1:])):
        raise ValueError(f"boundaries must be strictly increasing, got {boundaries!r}.")
    if units == "fraction" and b and (b[0] <= 0.0 or b[-1] >= 1.0):
        raise ValueError(f"fraction boundaries must lie strictly inside (0, 1), got {boundaries!r}.")
    if units == "mm" and b and b[0] <= 0.0:
        raise ValueError(f"mm boundaries must be > 0, got {boundaries!r}.")
    return b


class RegionMasks(Transform):
    """Build K disjoint region masks for a 2D or 3D image.

    Positional mode (``region_values=None``): the spatial axis ``axis`` of length ``n`` is split at
    ``boundaries``. With ``units="fraction"`` pixel ``j`` belongs to region ``k`` when its centre
    ``(j + 0.5) / n`` lies in ``[b_{k-1}, b_k)`` (``b_{-1} = 0``, ``b_{K-1} = 1``); with
    ``units="mm"`` the centre ``(j + 0.5) * pixdim[axis]`` (mm from the outer edge of the first pixel,
    pixdim from the ``MetaTensor`` affine) is compared with boundaries in mm, which must lie in
    ``(0, n * pixdim)``. The input (C, *spatial) only provides the spatial shape (and geometry).

    Map mode (``region_values=(v_1, ..., v_K)``): the input is an integer region map (1, *spatial)
    and region ``k`` is ``map == v_k``. Pixels whose value is not listed raise ``ValueError``
    (``unlisted="error"``) or belong to no region (``unlisted="ignore"``).

    Args:
        boundaries: K - 1 strictly increasing split positions (positional mode); default
            ``(1/3, 2/3)``. Not allowed together with ``region_values``.
        axis: spatial axis to split (negative counts from the last; -1 = W of an sCPR).
        names: the K region names; ``None`` gives ``("proximal", "mid", "distal")`` for the split
            into thirds (fractions ``(1/3, 2/3)``, the default) and ``region_<k>`` (positional) /
            ``region_<value>`` (map) otherwise.
        units: ``"fraction"`` or ``"mm"``.
        region_values: the region map values, one per region (map mode).
        unlisted: ``"error"`` or ``"ignore"`` for map values not in ``region_values``.
        dtype: dtype of the masks.

    Returns:
        (K, *spatial) one-hot masks (a ``MetaTensor`` keeping the input's geometry when meta
        tracking is on, with ``meta["region_names"]``).
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        boundaries: Sequence[float] | None = None,
        axis: int = -1,
        names: Sequence[str] | None = None,
        units: str = "fraction",
        region_values: Sequence[int] | None = None,
        unlisted: str = "error",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if units not in _UNITS:
            raise ValueError(f"units must be one of {_UNITS}, got {units!r}.")
        if unlisted not in _UNLISTED:
            raise ValueError(f"unlisted must be one of {_UNLISTED}, got {unlisted!r}.")
        if region_values is not None and boundaries is not None:
            raise ValueError("give either boundaries (positional regions) or region_values (a region map), not both.")
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis must be an int, got {axis!r}.")
        self.axis, self.units, self.unlisted, self.dtype = int(axis), units, unlisted, dtype
        if region_values is not None:
            vals = tuple(region_values)
            if not vals or any(isinstance(v, bool) or float(v) != int(v) for v in vals):
                raise ValueError(f"region_values must be a non-empty sequence of ints, got {region_values!r}.")
            self.region_values: tuple[int, ...] | None = tuple(int(v) for v in vals)
            if len(set(self.region_values)) != len(self.region_values):
                raise ValueError(f"region_values must be distinct, got {region_values!r}.")
            self.boundaries: tuple[float, ...] = ()
            count = len(self.region_values)
            default_names = [f"region_{v}" for v in self.region_values]
        else:
            self.region_values = None
            self.boundaries = _check_boundaries(DEFAULT_BOUNDARIES if boundaries is None else boundaries, units)
            count = len(self.boundaries) + 1
            thirds = units == "fraction" and count == 3 and bool(np.allclose(self.boundaries, DEFAULT_BOUNDARIES))
            default_names = list(DEFAULT_REGIONS) if thirds else [f"region_{k}" for k in range(count)]
        self.names = tuple(default_names if names is None else (str(n) for n in names))
        if len(self.names) != count:
            raise ValueError(f"{count} regions need {count} names, got {len(self.names)}: {list(self.names)}.")
        if len(set(self.names)) != count:
            raise ValueError(f"region names must be distinct, got {list(self.names)}.")

    @property
    def num_regions(self) -> int:
        """K, the number of masks produced."""
        return len(self.names)

    def _positional(self, spatial: tuple[int, ...], pixdim: float | None, device: torch.device) -> torch.Tensor:
        nd = len(spatial)
        ax = self.axis % nd
        n = spatial[ax]
        centres = torch.arange(n, dtype=torch.float64, device=device) + 0.5
        if self.units == "mm":
            length = n * pixdim
            if self.boundaries and self.boundaries[-1] >= length:
                raise ValueError(
                    f"mm boundaries {list(self.boundaries)} must lie inside (0, {length:g}) mm, the length of "
                    f"spatial axis {ax} ({n} pixels of {pixdim:g} mm)."
                )
            centres = centres * pixdim
        else:
            centres = centres / n
        bounds = torch.tensor(self.boundaries, dtype=torch.float64, device=device)
        region = torch.searchsorted(bounds, centres, right=True)  # (n,) in [0, K - 1]
        onehot = region.unsqueeze(0) == torch.arange(self.num_regions, device=device).unsqueeze(1)  # (K, n)
        empty = [self.names[k] for k in range(self.num_regions) if not bool(onehot[k].any())]
        if empty:
            raise ValueError(
                f"regions {empty} get no pixel of spatial axis {ax} ({n} pixels) with boundaries "
                f"{list(self.boundaries)} ({self.units}): use a longer axis or fewer regions."
            )
        view = [self.num_regions] + [1] * nd
        view[ax + 1] = n
        return onehot.view(view).expand(self.num_regions, *spatial).to(self.dtype).contiguous()

    def _from_map(self, data: torch.Tensor) -> torch.Tensor:
        if data.shape[0] != 1:
            raise ValueError(f"a region map must have one channel (1, *spatial), got shape {tuple(data.shape)}.")
        rmap = data[0]
        if rmap.is_floating_point():
            if not torch.isfinite(rmap).all() or not torch.equal(rmap, torch.round(rmap)):
                raise ValueError("the region map must hold integer values (got non-integer or non-finite ones).")
        else:
            rmap = rmap.long()  # compare without overflowing small integer dtypes
        vals = torch.tensor(self.region_values, device=rmap.device, dtype=rmap.dtype)
        onehot = rmap.unsqueeze(0) == vals.view(-1, *([1] * rmap.ndim))
        if self.unlisted == "error":
            covered = onehot.any(0)
            if not bool(covered.all()):
                found = torch.unique(rmap[~covered]).tolist()
                raise ValueError(
                    f"region map values {found[:10]} are not in region_values {list(self.region_values)}; "
                    "list them or use unlisted='ignore'."
                )
        return onehot.to(self.dtype)

    def __call__(self, img: Any) -> torch.Tensor:
        """Masks for ``img``: (C, *spatial) image (positional) or (1, *spatial) region map (map mode)."""
        if not isinstance(img, (torch.Tensor, np.ndarray)):
            raise TypeError(f"img must be a tensor or ndarray (C, *spatial), got {type(img).__name__}.")
        data = img if isinstance(img, torch.Tensor) else torch.as_tensor(img)
        if data.ndim < 2:
            raise ValueError(f"img must be channel-first (C, *spatial), got shape {tuple(data.shape)}.")
        raw = data.as_tensor() if isinstance(data, MetaTensor) else data
        if self.region_values is not None:
            out = self._from_map(raw)
        else:
            nd = data.ndim - 1
            if not -nd <= self.axis < nd:
                raise ValueError(f"axis {self.axis} is out of range for an image with {nd} spatial dimensions.")
            pixdim = None
            if self.units == "mm":
                if not isinstance(img, MetaTensor):
                    raise TypeError(
                        "units='mm' needs the pixel spacing: pass a MetaTensor with an affine, "
                        f"got {type(img).__name__}."
                    )
                if img.affine.ndim != 2 or img.affine.shape[-1] < nd + 1:
                    raise ValueError(f"the affine of shape {tuple(img.affine.shape)} does not cover {nd} spatial dims.")
                pixdim = float(affine_to_spacing(img.affine, r=nd)[self.axis % nd])
            out = self._positional(tuple(raw.shape[1:]), pixdim, raw.device)
        if not get_track_meta():
            return out
        meta = dict(img.meta) if isinstance(img, MetaTensor) else {}
        meta[REGION_NAMES_KEY] = list(self.names)
        affine = meta.pop("affine", None)
        return MetaTensor(out, affine=affine, meta=meta)


class RegionMasksd(MapTransform):
    """Dictionary version of :class:`RegionMasks`: ``d[output_key] = RegionMasks(...)(d[key])``.

    Args:
        keys: the key whose image (positional) or region map (map mode) is used.
        output_key: where to store the (K, *spatial) masks; one per key when several keys are given.
        boundaries, axis, names, units, region_values, unlisted, dtype: as in :class:`RegionMasks`.
        allow_missing_keys: skip absent keys.
    """

    backend = RegionMasks.backend

    def __init__(
        self,
        keys: KeysCollection,
        output_key: Hashable | Sequence[Hashable] = "regions",
        boundaries: Sequence[float] | None = None,
        axis: int = -1,
        names: Sequence[str] | None = None,
        units: str = "fraction",
        region_values: Sequence[int] | None = None,
        unlisted: str = "error",
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = ensure_tuple_rep(output_key, len(self.keys))
        if len(set(self.output_keys)) != len(self.output_keys):
            raise ValueError(f"each key needs its own output key, got keys {self.keys} -> {self.output_keys}.")
        self.masks = RegionMasks(boundaries, axis, names, units, region_values, unlisted, dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.masks(d[key])
        return d


def region_windows(region_masks: torch.Tensor | np.ndarray, context: int, multiple: int = 8) -> list[tuple[slice, ...]]:
    """One crop window per region: its bounding box plus ``context`` pixels, all of the same shape.

    A regional measurement made on a window sees the region and ``context`` pixels around it and
    nothing else, so a change elsewhere in the image cannot move it (a segmentor run on the whole
    image reads context from everywhere: through its receptive field and its normalisation).

    The window of region k is its mask's bounding box grown by ``context`` pixels on each side of
    every spatial axis; every window then takes the largest such extent per axis, rounded up to a
    multiple of ``multiple`` (the networks' down-sampling factor) and capped at the image size, and
    is shifted to lie inside the image (a region at the image border gets its extra context on the
    inner side).

    Args:
        region_masks: (K, *spatial) masks; pixels > 0.5 belong to a region. Each must be non-empty.
        context: pixels of context on each side, >= 0.
        multiple: window extents are multiples of it (unless capped at the image size), >= 1.

    Returns:
        K tuples of slices, one per spatial axis, to index ``image[..., *window]``.
    """
    masks = torch.as_tensor(region_masks)
    if masks.ndim < 2:
        raise ValueError(f"region_masks must be (K, *spatial), got shape {tuple(masks.shape)}.")
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 0:
        raise ValueError(f"context must be an integer number of pixels >= 0, got {context!r}.")
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple must be an integer >= 1, got {multiple!r}.")
    spatial = tuple(masks.shape[1:])
    boxes = []
    for k in range(masks.shape[0]):
        idx = torch.nonzero(masks[k] > 0.5)
        if idx.numel() == 0:
            raise ValueError(f"region {k} of the region masks is empty: it has no window.")
        boxes.append((idx.min(0).values.tolist(), (idx.max(0).values + 1).tolist()))
    shape = []
    for ax, n in enumerate(spatial):
        extent = max(hi[ax] - lo[ax] for lo, hi in boxes) + 2 * int(context)
        shape.append(min(n, -(-extent // multiple) * multiple))
    windows = []
    for lo, hi in boxes:
        win = []
        for ax, (n, size) in enumerate(zip(spatial, shape)):
            start = lo[ax] - (size - (hi[ax] - lo[ax])) // 2
            start = max(0, min(start, n - size))
            win.append(slice(start, start + size))
        windows.append(tuple(win))
    return windows


def region_window_shape(region_masks: torch.Tensor | np.ndarray, context: int | None, multiple: int = 8) -> list[int]:
    """The common spatial shape of :func:`region_windows` (the image's shape for ``context=None``).

    Used as the training crop of a segmentor that will measure region by region, so that it is
    trained on inputs of the shape it will see.
    """
    masks = torch.as_tensor(region_masks)
    if context is None:
        return list(masks.shape[1:])
    return [w.stop - w.start for w in region_windows(masks, context, multiple)[0]]


def context_pixels(context_mm: float | None, spacing: float) -> int | None:
    """``context_mm`` millimetres as a whole number of pixels of ``spacing`` mm (``None`` stays ``None``)."""
    if context_mm is None:
        return None
    mm, sp = float(context_mm), float(spacing)
    if not (math.isfinite(mm) and mm >= 0.0):
        raise ValueError(f"context_mm must be a finite number >= 0 (mm), got {context_mm!r}.")
    if not (math.isfinite(sp) and sp > 0.0):
        raise ValueError(f"spacing must be a finite number > 0 (mm), got {spacing!r}.")
    return int(round(mm / sp))
