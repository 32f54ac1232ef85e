"""Per-structure, per-region physical measurements of (soft) segmentations.

The core is :func:`measure_structures`, a differentiable sum of structure probabilities inside
region masks times the pixel (voxel) size. It is the measurement of Seg-CFT (one global region)
and Pos-Seg-CFT (K regions, Eq. 2 of the positional paper), shared by the
``StructureMeasures`` transforms, the guidance losses and the metrics.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

from monai_cft.variables import DEFAULT_REGIONS, DEFAULT_STRUCTURES, variable_names

__all__ = ["measure_structures", "StructureMeasures", "StructureMeasuresd"]


def measure_structures(
    probs: torch.Tensor,
    region_masks: torch.Tensor | None,
    channels: list[int] | tuple[int, ...],
    element_size: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Sum structure probabilities inside regions: ``area[b, s, k] = size * sum_p probs[b, c_s, p] * R[k, p]``.

    Args:
        probs: (B, C, *spatial) channel-wise probabilities or one-hot maps (any float dtype);
            gradients flow through it.
        region_masks: (K, *spatial) or (B, K, *spatial) region masks (binary or soft), or ``None``
            for one region covering the whole image.
        channels: the channel index of each of the S structures in ``probs``.
        element_size: area (2D, mm^2) or volume (3D, mm^3) of one pixel / voxel; a scalar or a (B,)
            tensor when cases have different spacings.

    Returns:
        (B, S, K) tensor of measurements in physical units (K = 1 without region masks).
    """
    if probs.ndim < 3:
        raise ValueError(f"probs must be (B, C, *spatial), got shape {tuple(probs.shape)}.")
    spatial = probs.shape[2:]
    n_ch = probs.shape[1]
    bad = [c for c in channels if not 0 <= int(c) < n_ch]
    if bad:
        raise ValueError(f"structure channels {bad} out of range for probs with {n_ch} channels.")
    sel = probs[:, list(channels)].flatten(2)  # (B, S, P)
    if region_masks is None:
        out = sel.sum(-1, keepdim=True)
    else:
        if region_masks.ndim == len(spatial) + 1:
            if tuple(region_masks.shape[1:]) != tuple(spatial):
                raise ValueError(
                    f"region masks of spatial shape {tuple(region_masks.shape[1:])} do not match "
                    f"the segmentation's {tuple(spatial)}."
                )
            out = torch.einsum("bsp,kp->bsk", sel, region_masks.flatten(1).to(sel.dtype))
        elif region_masks.ndim == len(spatial) + 2:
            if tuple(region_masks.shape[2:]) != tuple(spatial) or region_masks.shape[0] != probs.shape[0]:
                raise ValueError(
                    f"region masks of shape {tuple(region_masks.shape)} do not match the "
                    f"segmentation's batch {probs.shape[0]} and spatial shape {tuple(spatial)}."
                )
            out = torch.einsum("bsp,bkp->bsk", sel, region_masks.flatten(2).to(sel.dtype))
        else:
            raise ValueError(
                f"region masks must be (K, *spatial) or (B, K, *spatial), got shape {tuple(region_masks.shape)}."
            )
    size = torch.as_tensor(element_size, dtype=out.dtype, device=out.device)
    if size.ndim == 1:
        size = size.view(-1, 1, 1)
    return out * size


def _resolve_structures(structures: Mapping[str, int] | Sequence[str]) -> dict[str, int]:
    """Structure name -> label value (channel index); bare names are looked up in the defaults."""
    if isinstance(structures, str):
        structures = [structures]
    if isinstance(structures, Mapping):
        out = {}
        for name, value in structures.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"structure {name!r} needs a label value / channel index >= 0, got {value!r}.")
            out[str(name)] = int(value)
    else:
        unknown = [n for n in structures if n not in DEFAULT_STRUCTURES]
        if unknown:
            raise ValueError(
                f"unknown structure names {unknown}; known: {list(DEFAULT_STRUCTURES)} "
                "(or pass a mapping name -> label value)."
            )
        out = {str(n): DEFAULT_STRUCTURES[n] for n in structures}
    if not out:
        raise ValueError("at least one structure is needed.")
    return out


#: tolerance of the soft-input checks (probabilities in [0, 1] summing to 1 over the channels; region
#: masks in [0, 1] summing to at most 1), widened for half-precision inputs.
_SOFT_TOL = 1e-3
_UNLISTED = ("warn", "error", "ignore")


def _tolerance(t: torch.Tensor) -> float:
    return max(_SOFT_TOL, 10.0 * float(torch.finfo(t.dtype).eps)) if t.is_floating_point() else _SOFT_TOL


def _finite_bounds(x: torch.Tensor, what: str) -> tuple[float, float, float]:
    """``(min, max, tolerance)`` of ``x`` after checking it holds no NaN / inf (``what`` names it in the error)."""
    if x.is_floating_point():
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            raise ValueError(f"{what} {int((~finite).sum())} non-finite (NaN / inf) value(s).")
    return float(x.min()), float(x.max()), _tolerance(x)


def _check_soft(probs: torch.Tensor) -> None:
    """(B, C, *sp) probabilities: finite, in [0, 1], summing to 1 over the channels (within tolerance)."""
    x = probs.detach()
    lo, hi, tol = _finite_bounds(x, "soft label has")
    if lo < -tol or hi > 1.0 + tol:
        raise ValueError(
            f"soft label values must be probabilities in [0, 1], got min {lo:.6g} and max {hi:.6g}"
            + (" (logits? apply softmax over the channels first)" if lo < -tol else "") + "."
        )
    sums = x.double().sum(1)
    worst = float((sums - 1.0).abs().max())
    if worst > tol * x.shape[1]:
        raise ValueError(
            f"the {x.shape[1]} channels of a soft label must sum to 1 at every pixel (channel 0 is the background), "
            f"got sums from {float(sums.min()):.6g} to {float(sums.max()):.6g}."
        )


def _check_masks(masks: torch.Tensor, k_dim: int) -> None:
    """Region masks: finite, in [0, 1], not overlapping (their sum over the regions is at most 1)."""
    x = masks.detach()
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    lo, hi, tol = _finite_bounds(x, "region masks have")
    if lo < -tol or hi > 1.0 + tol:
        raise ValueError(f"region mask values must lie in [0, 1], got min {lo:.6g} and max {hi:.6g}.")
    total = float(x.double().sum(k_dim).max())
    if total > 1.0 + tol * x.shape[k_dim]:
        raise ValueError(
            f"region masks overlap: their sum over the {x.shape[k_dim]} regions reaches {total:.6g} at some pixel "
            "(at most 1: each pixel belongs to one region, or is shared with weights summing to 1)."
        )


def _element_size(img: Any, spatial_dims: int) -> float | None:
    """Pixel area / voxel volume (mm^2 / mm^3) from a MetaTensor's affine, or None."""
    if not isinstance(img, MetaTensor) or img.affine.ndim != 2 or img.affine.shape[-1] < spatial_dims + 1:
        return None
    return float(np.prod(np.asarray(affine_to_spacing(img.affine, r=spatial_dims), dtype=np.float64)))


class StructureMeasures(Transform):
    """Measure each structure inside each region: areas (mm^2, 2D) or volumes (mm^3, 3D).

    The label is either an integer label map (1, *spatial) (float dtype with integer values is fine,
    as ``LoadImage`` returns it) or channel-wise probabilities / one-hot maps (C, *spatial) with
    ``C > 1``, where a structure's label value is its channel index. Measurements are
    ``size * sum_p P[s, p] * R[k, p]`` (:func:`measure_structures`), differentiable in soft inputs.

    Args:
        structures: mapping structure name -> label value / channel, or a sequence of names among
            ``{"lumen": 1, "calcified": 2, "noncalcified": 3}``.
        region_names: names of the K region masks (their order along the masks' first axis);
            ``None`` measures each structure over the whole image (variables named after the
            structures alone).
        element_size: pixel area / voxel volume in mm^2 / mm^3; ``None`` takes it from the label's
            (else the regions') ``MetaTensor`` affine.
        unlisted: what a label map value that is neither 0 (background) nor in ``structures`` does:
            ``"warn"`` (default; it is not measured), ``"error"`` (``ValueError``) or ``"ignore"``
            (e.g. when measuring only some structures on purpose).

    Inputs are checked: a soft label (C > 1) must be finite probabilities in [0, 1] summing to 1
    over its channels (logits, negative values, NaN raise ``ValueError``), region masks finite, in
    [0, 1] and not overlapping (their sum over the regions at most 1), all within 1e-3.

    Call ``(label, regions=None) -> dict[name -> float]`` with names ``f"{structure}_{region}"``;
    :meth:`measure` returns the same (V,) tensor in the structure-major order of
    :func:`monai_cft.variables.variable_names`, :meth:`measure_batch` a (B, V) tensor for losses.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        structures: Mapping[str, int] | Sequence[str] = DEFAULT_STRUCTURES,
        region_names: Sequence[str] | None = DEFAULT_REGIONS,
        element_size: float | None = None,
        unlisted: str = "warn",
    ) -> None:
        if unlisted not in _UNLISTED:
            raise ValueError(f"unlisted must be one of {_UNLISTED}, got {unlisted!r}.")
        self.unlisted = unlisted
        self.structures = _resolve_structures(structures)
        self.region_names = tuple(region_names) if region_names else None
        self.names = variable_names(self.structures, self.region_names)
        if element_size is not None and not float(element_size) > 0:
            raise ValueError(f"element_size must be > 0 (mm^2 or mm^3), got {element_size!r}.")
        self.element_size = None if element_size is None else float(element_size)

    def _probs(self, label: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(B, C, *sp) label -> structure maps and their channel indices."""
        values = list(self.structures.values())
        if label.shape[1] == 1:
            lab = label[:, 0]
            if lab.is_floating_point() and (not torch.isfinite(lab).all() or not torch.equal(lab, torch.round(lab))):
                raise ValueError(
                    "a one-channel label must be an integer label map; for soft probabilities give one channel "
                    "per label value (C > 1)."
                )
            if self.unlisted != "ignore":
                found = torch.unique(lab).tolist()
                other = sorted({int(v) for v in found} - {0, *values})
                if other:
                    msg = (f"label values {other} are neither background (0) nor one of the structures "
                           f"{self.structures}; they are not measured")
                    if self.unlisted == "error":
                        raise ValueError(msg + ".")
                    warnings.warn(msg + " (unlisted='ignore' silences this).", stacklevel=4)
            vals = torch.tensor(values, device=lab.device).view(1, -1, *([1] * (lab.ndim - 1)))
            return (lab.unsqueeze(1) == vals).to(torch.float64), list(range(len(values)))
        bad = {n: v for n, v in self.structures.items() if v >= label.shape[1]}
        if bad:
            raise ValueError(f"structures {bad} need channels beyond the {label.shape[1]} channels of the label.")
        probs = label if label.is_floating_point() else label.to(torch.float64)
        _check_soft(probs)
        return probs, values

    def _regions(self, regions: Any, spatial: tuple[int, ...]) -> torch.Tensor | None:
        if self.region_names is None:
            if regions is not None:
                raise ValueError("regions were given but region_names is None; set region_names to measure per region.")
            return None
        if regions is None:
            raise ValueError(f"region masks are needed for the regions {list(self.region_names)}.")
        if not isinstance(regions, torch.Tensor):
            regions = torch.as_tensor(np.asarray(regions))
        if isinstance(regions, MetaTensor):
            recorded = regions.meta.get("region_names")
            if isinstance(recorded, (list, tuple)) and all(isinstance(n, str) for n in recorded):
                if tuple(recorded) != self.region_names:
                    raise ValueError(f"the masks are of regions {list(recorded)}, expected {list(self.region_names)}.")
            regions = regions.as_tensor()
        if regions.shape[-len(spatial) - 1] != len(self.region_names):
            raise ValueError(
                f"{len(self.region_names)} region names {list(self.region_names)} but the masks have shape "
                f"{tuple(regions.shape)}."
            )
        _check_masks(regions, regions.ndim - len(spatial) - 1)
        return regions

    def measure_batch(
        self, label: torch.Tensor, regions: Any = None, element_size: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Batched, differentiable measurement for losses.

        Args:
            label: (B, C, *spatial) probabilities / one-hot (C > 1) or integer label maps (B, 1, *spatial).
            regions: (K, *spatial) or (B, K, *spatial) masks, or ``None`` without regions.
            element_size: scalar or (B,) pixel size in mm^2 / mm^3; default: the constructor's, else 1.

        Returns:
            (B, V) measurements, structure-major (``self.names``); dtype of soft inputs kept
            (float64 for label maps).
        """
        if not isinstance(label, torch.Tensor) or label.ndim < 3:
            raise ValueError(f"label must be a (B, C, *spatial) tensor, got {getattr(label, 'shape', type(label))}.")
        raw = label.as_tensor() if isinstance(label, MetaTensor) else label
        probs, channels = self._probs(raw)
        masks = self._regions(regions, tuple(raw.shape[2:]))
        size = self.element_size if element_size is None else element_size
        out = measure_structures(probs, masks, channels, 1.0 if size is None else size)
        return out.flatten(1)

    def measure(self, label: Any, regions: Any = None) -> torch.Tensor:
        """(V,) measurements of one (C, *spatial) label (see class docstring), structure-major."""
        if not isinstance(label, (torch.Tensor, np.ndarray)):
            raise TypeError(f"label must be a tensor (C, *spatial), got {type(label).__name__}.")
        lab = label if isinstance(label, torch.Tensor) else torch.as_tensor(label)
        if lab.ndim < 2:
            raise ValueError(f"label must be channel-first (C, *spatial), got shape {tuple(lab.shape)}.")
        nd = lab.ndim - 1
        size = self.element_size
        if size is None:
            size = _element_size(label, nd) or _element_size(regions, nd)
        if size is None:
            raise TypeError(
                "the pixel size is unknown: pass a MetaTensor label (or regions) with an affine, or element_size=."
            )
        if isinstance(regions, torch.Tensor) and regions.ndim != nd + 1:
            raise ValueError(
                f"regions must be (K, *spatial) for a label of shape {tuple(lab.shape)}, got {tuple(regions.shape)}."
            )
        raw = lab.as_tensor() if isinstance(lab, MetaTensor) else lab
        return self.measure_batch(raw.unsqueeze(0), regions, size)[0]

    def __call__(self, label: Any, regions: Any = None) -> dict[str, float]:
        values = self.measure(label, regions).detach().to(torch.float64).cpu().tolist()
        return dict(zip(self.names, values))


class StructureMeasuresd(MapTransform):
    """Dictionary version of :class:`StructureMeasures`.

    Stores the (V,) float32 tensor (structure-major) in ``d[output_key]`` and each variable as a
    float in ``d[name]`` (for example ``d["calcified_mid"]``).

    Args:
        keys: the one label key.
        region_key: key of the (K, *spatial) region masks (ignored when ``region_names`` is None).
        output_key: key of the variables tensor.
        structures, region_names, element_size, unlisted: as in :class:`StructureMeasures`.
        allow_missing_keys: skip the transform when the label is absent.
        overwrite: replace ``output_key`` and variable keys already in the dictionary (default: a
            ``KeyError`` naming them, so that a measurement never silently replaces other data).
    """

    backend = StructureMeasures.backend

    def __init__(
        self,
        keys: KeysCollection = "label",
        region_key: Hashable = "regions",
        output_key: Hashable = "variables",
        structures: Mapping[str, int] | Sequence[str] = DEFAULT_STRUCTURES,
        region_names: Sequence[str] | None = DEFAULT_REGIONS,
        element_size: float | None = None,
        allow_missing_keys: bool = False,
        unlisted: str = "warn",
        overwrite: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"StructureMeasuresd measures one label key, got {list(self.keys)}.")
        self.region_key, self.output_key = region_key, output_key
        self.overwrite = bool(overwrite)
        self.measures = StructureMeasures(structures, region_names, element_size, unlisted)
        clash = set(self.measures.names) & {*self.keys, region_key, output_key}
        if clash:
            raise ValueError(f"variable names {sorted(map(str, clash))} clash with the transform's keys.")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            regions = None
            if self.measures.region_names is not None:
                if self.region_key not in d:
                    raise KeyError(f"region key {self.region_key!r} not found; available keys: {list(d)}.")
                regions = d[self.region_key]
            if not self.overwrite:
                taken = [k for k in (self.output_key, *self.measures.names) if k in d]
                if taken:
                    raise KeyError(
                        f"StructureMeasuresd would overwrite the existing key(s) {taken}; rename output_key, "
                        "remove them first or pass overwrite=True."
                    )
            values = self.measures.measure(d[key], regions).detach().to(torch.float32)
            d[self.output_key] = values
            d.update(zip(self.measures.names, (float(v) for v in values.tolist())))
        return d
