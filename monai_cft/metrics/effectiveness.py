"""Effectiveness of counterfactual interventions, measured region by region.

Effectiveness (Monteiro et al. 2023) is the distance between the intended counterfactual parents
and the parents measured on the counterfactual image by a predictor trained independently from the
one that guided fine-tuning. For structure areas the predictor is the *evaluation* segmentor: its
softmax probabilities are summed inside each region mask and multiplied by the pixel area
(:func:`monai_cft.transforms.measures.measure_structures`), exactly as Seg-CFT / Pos-Seg-CFT
measure areas, but with different weights.

For ``do(structure_region := c)`` the absolute error is reported in *every* variable: in the
intervened one it shows whether the change happened, in the others (target: the counterfactual
parents, i.e. the factual values in an independent graph) whether the image stayed put.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.utils import eval_mode

from monai_cft.metrics._utils import check_positive_int, module_device, plain
from monai_cft.transforms.measures import measure_structures
from monai_cft.transforms.regions import region_windows

__all__ = ["segmentor_probabilities", "measure_with_segmentor", "effectiveness_errors"]


def segmentor_probabilities(
    segmentor: Any,
    images: torch.Tensor,
    region_masks: torch.Tensor | None = None,
    context: int | None = None,
) -> torch.Tensor:
    """Softmax probabilities of a segmentor, on the whole image or region by region.

    With ``context=None`` the segmentor sees the whole image. With an integer ``context`` every region
    is segmented on its own window (:func:`monai_cft.transforms.regions.region_windows`: the region
    plus ``context`` pixels on each side) and each pixel of a region takes its probabilities from its
    region's window, so a region's measurement depends only on the pixels of its window: a change in
    another region (further than ``context`` away) cannot move it. Pixels in no region fall back to
    the whole-image prediction. All windows share one shape and go through the network as one batch.

    Args:
        segmentor: callable ``(B, C_in, *spatial) -> (B, C, *spatial)`` logits, in eval mode.
        images: (B, C_in, *spatial) images in the segmentor's intensity range.
        region_masks: (K, *spatial) shared masks; required with ``context``.
        context: pixels of context around each region, or ``None`` for the whole image.

    Returns:
        (B, C, *spatial) float32 probabilities on the segmentor's device.
    """
    device = module_device(segmentor, images.device)
    x = images.to(device)

    def run(inp: torch.Tensor) -> torch.Tensor:
        logits = segmentor(inp)
        ok = isinstance(logits, torch.Tensor) and logits.shape[0] == inp.shape[0]
        if not ok or logits.shape[2:] != inp.shape[2:]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(
                f"segmentor must return (B, C, *spatial) logits matching its input's spatial shape "
                f"{tuple(inp.shape[2:])}, got {got}."
            )
        return torch.softmax(logits.float(), dim=1)

    if context is None:
        return run(x)
    if region_masks is None or region_masks.ndim != images.ndim - 1:
        got = None if region_masks is None else tuple(region_masks.shape)
        raise ValueError(f"region-by-region segmentation needs shared (K, *spatial) region masks, got {got}.")
    masks = region_masks.to(device).float()
    windows = region_windows(masks, context)
    b = x.shape[0]
    crops = torch.cat([x[(slice(None), slice(None), *w)] for w in windows])  # (K*B, C_in, *window)
    probs = run(crops)
    out = torch.zeros((b, probs.shape[1], *x.shape[2:]), device=device)
    for i, w in enumerate(windows):
        out[(slice(None), slice(None), *w)] += probs[i * b : (i + 1) * b] * masks[i][w]
    covered = masks.sum(0) > 0.5
    if not bool(covered.all()):
        out = torch.where(covered, out, run(x))
    return out


def measure_with_segmentor(
    segmentor: Any,
    images: torch.Tensor,
    region_masks: torch.Tensor | None,
    channels: Sequence[int],
    element_size: float | torch.Tensor = 1.0,
    batch_size: int = 32,
    context: int | None = None,
) -> torch.Tensor:
    """Structure areas (volumes) per region measured by a segmentor on a set of images.

    The segmentor runs in eval mode without gradients (its mode is restored afterwards), in
    mini-batches on the device of its parameters; its probabilities
    (:func:`segmentor_probabilities`) go through
    :func:`~monai_cft.transforms.measures.measure_structures`.

    Args:
        segmentor: callable ``(B, C_in, *spatial) -> (B, C, *spatial)`` logits (e.g.
            ``predictors.build_segmentor``), usually the evaluation segmentor.
        images: (B, C_in, *spatial) images in the segmentor's intensity range.
        region_masks: (K, *spatial) masks shared by all images, (B, K, *spatial) per image, or ``None``
            for one region covering the image.
        channels: output channel of each of the S structures (e.g. ``[1, 2, 3]`` for lumen,
            calcified, non-calcified).
        element_size: pixel area (mm^2) / voxel volume (mm^3): a scalar or a (B,) tensor.
        batch_size: images per segmentor call.
        context: ``None``: the segmentor sees whole images; an integer: each region is measured on its
            own window with this many pixels of context (shared masks only; see
            :func:`segmentor_probabilities`).

    Returns:
        (B, S, K) float tensor on ``images.device`` in physical units; ``.flatten(1)`` gives the
        (B, S*K) structure-major variables of ``monai_cft.variables.variable_names``.
    """
    if not isinstance(images, torch.Tensor) or images.ndim < 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, *spatial) tensor, got {shape}.")
    check_positive_int(batch_size, "batch_size")
    images, region_masks = plain(images), plain(region_masks)
    b = images.shape[0]
    per_case_masks = region_masks is not None and region_masks.ndim == images.ndim
    if per_case_masks and region_masks.shape[0] != b:
        raise ValueError(f"per-image region masks have batch {region_masks.shape[0]}, images have {b}.")
    if per_case_masks and context is not None:
        raise ValueError("region-by-region measurement (context) needs shared (K, *spatial) region masks.")
    size = torch.as_tensor(element_size, dtype=torch.float32)
    if size.ndim > 1 or (size.ndim == 1 and size.shape[0] != b):
        raise ValueError(f"element_size must be a scalar or a (B,) = ({b},) tensor, got shape {tuple(size.shape)}.")
    device = module_device(segmentor, images.device)
    masks = None if region_masks is None else region_masks.to(device)
    outs = []
    with eval_mode(segmentor):
        for start in range(0, b, batch_size):
            stop = min(start + batch_size, b)
            probs = segmentor_probabilities(segmentor, images[start:stop], masks, context)
            m = masks[start:stop] if per_case_masks else masks
            s = size[start:stop] if size.ndim == 1 else size
            outs.append(measure_structures(probs, m, list(channels), s.to(device)))
    return torch.cat(outs).to(images.device)


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    for t, n in zip((a, b), names):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}.")
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def effectiveness_errors(measured: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Absolute error between measured and target counterfactual parents.

    Args:
        measured: (B, V) (or any shape) values measured on the counterfactual images, physical units.
        target: same shape, the counterfactual parents (intervened variable: its target value;
            others: their counterfactual values, the factual ones in an independent graph).

    Returns:
        ``|measured - target|``, same shape and units (mm^2 / mm^3).
    """
    _check_pair(measured, target, ("measured", "target"))
    measured, target = plain(measured), plain(target)
    return (measured - target.to(measured.dtype)).abs()


