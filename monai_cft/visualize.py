"""PNG panels of counterfactuals: factual, counterfactual and difference images with region boundaries.

Used by :mod:`monai_cft.inference`; the figure layout follows Fig. 1 of the positional paper
(counterfactual plus difference map, proximal / mid / distal segments as dashed vertical lines).
Rendering uses matplotlib's non-interactive ``Agg`` canvas, so no display is needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["region_boundaries", "format_values", "plot_counterfactual_panel"]


def _to_2d(img: Any, name: str) -> np.ndarray:
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    arr = np.asarray(arr, dtype=np.float32)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:  # (H, H, W) straightened volume: show the central slice across the vessel
        arr = arr[arr.shape[0] // 2]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2D image (optionally with a leading channel), got shape {arr.shape}.")
    return arr


def region_boundaries(region_masks: Any, axis: int = -1) -> list[float]:
    """Positions (in pixels, between columns) where the region label changes along ``axis``.

    Args:
        region_masks: (K, *spatial) one-hot region masks (e.g. from ``RegionMasks``).
        axis: spatial axis along which boundaries are reported (default: the last, the vessel axis).

    Returns:
        sorted list of boundary positions ``j - 0.5`` for every index ``j`` at which the region of
        the first row / slice changes (empty for one region).
    """
    masks = torch.as_tensor(np.asarray(region_masks) if not isinstance(region_masks, torch.Tensor) else region_masks)
    if masks.ndim < 2:
        raise ValueError(f"region_masks must be (K, *spatial), got shape {tuple(masks.shape)}.")
    labels = masks.float().argmax(0)  # (*spatial)
    labels = labels.movedim(axis, -1).reshape(-1, labels.shape[axis])[0]
    change = torch.nonzero(labels[1:] != labels[:-1]).flatten()
    return [float(j) + 0.5 for j in change.tolist()]


def format_values(values: Mapping[str, float], unit: str = "mm²", digits: int = 1) -> str:
    """``"name=1.2 mm², other=3.4 mm²"`` for a mapping of variable values."""
    return ", ".join(f"{k}={float(v):.{digits}f} {unit}" for k, v in values.items())


def plot_counterfactual_panel(
    factual: Any,
    counterfactual: Any,
    path: str | os.PathLike,
    difference: Any | None = None,
    boundaries: Sequence[float] = (),
    title: str = "",
    window: tuple[float, float] = (-300.0, 1100.0),
    spacing: float | None = None,
    unit: str = "HU",
    dpi: int = 150,
) -> Path:
    """Write a three-row panel: factual, counterfactual, difference (counterfactual - factual).

    Args:
        factual, counterfactual: (H, W) or (1, H, W) images (HU); straightened volumes show their
            central slice.
        path: PNG file to write (atomically).
        difference: optional precomputed difference map; default ``counterfactual - factual``.
        boundaries: region boundary positions along W in pixels (:func:`region_boundaries`),
            drawn as dashed vertical lines on every row.
        title: figure title (e.g. the intervention and the intended / measured values).
        window: display window of the images (default: the networks' HU window).
        spacing: pixel size in mm; when given, the x axis is labelled in mm along the vessel.
        unit: intensity unit in the colour-bar labels.
        dpi: resolution of the PNG.

    Returns:
        the written path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from monai_cft.data.io import atomic_path

    x = _to_2d(factual, "factual")
    x_cf = _to_2d(counterfactual, "counterfactual")
    if x.shape != x_cf.shape:
        raise ValueError(f"factual {x.shape} and counterfactual {x_cf.shape} images differ in shape.")
    diff = x_cf - x if difference is None else _to_2d(difference, "difference")
    lim = float(np.nanmax(np.abs(diff))) if diff.size else 0.0
    lim = lim if lim > 0 else 1.0
    h, w = x.shape
    extent = None if spacing is None else (0.0, w * spacing, h * spacing, 0.0)
    scale = 1.0 if spacing is None else float(spacing)
    fig = Figure(figsize=(min(18.0, max(6.0, w / 24)), 3 * max(1.4, h / 24) + 1.0), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    rows = [
        ("factual", x, "gray", window[0], window[1]),
        ("counterfactual", x_cf, "gray", window[0], window[1]),
        ("difference (cf - factual)", diff, "RdBu_r", -lim, lim),
    ]
    for ax, (name, img, cmap, vmin, vmax) in zip(axes, rows):
        im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, aspect="equal", interpolation="nearest")
        for b in boundaries:
            ax.axvline((b + 0.5) * scale if spacing is not None else b, color="gold", linestyle="--", linewidth=1.0)
        ax.set_ylabel(name, fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01).set_label(unit, fontsize=7)
    axes[-1].set_xlabel("along the vessel (mm)" if spacing is not None else "column (pixels)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path
