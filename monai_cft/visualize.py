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

from monai_cft.constants import HU_WINDOW
from monai_cft.transforms.intensity import HUWindow

__all__ = ["region_boundaries", "wrap_title", "plot_counterfactual_panel", "save_fig1"]


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


def wrap_title(title: str, width_inches: float, fontsize: float) -> str:
    """Break each line of ``title`` at spaces so that it fits a figure ``width_inches`` wide.

    Uses a conservative average glyph width of 0.6 em (DejaVu Sans averages about 0.55 em), so a
    wrapped line does not run off the figure.
    """
    import textwrap

    chars = max(20, int(width_inches * 72.0 / (0.6 * fontsize)) - 2)
    return "\n".join(textwrap.fill(line, chars) if line else line for line in str(title).split("\n"))


def plot_counterfactual_panel(
    factual: Any,
    counterfactual: Any,
    path: str | os.PathLike,
    difference: Any | None = None,
    boundaries: Sequence[float] = (),
    title: str = "",
    window: Sequence[float] = HU_WINDOW,
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

    from monai_cft.utils.io import atomic_path

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
        fig.suptitle(wrap_title(title, fig.get_figwidth(), 8), fontsize=8)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def _fig1_case(
    variables: torch.Tensor, columns: Sequence[int], ranges: Sequence[tuple[float, float]], delta: float
) -> int:
    """Index of the first case whose target ``v + delta`` lies inside the observed range in every region (else 0)."""
    v = variables[:, list(columns)]
    lo = torch.tensor([r[0] for r in ranges], dtype=v.dtype, device=v.device)
    hi = torch.tensor([r[1] for r in ranges], dtype=v.dtype, device=v.device)
    ok = ((v + delta >= lo) & (v + delta <= hi)).all(1)
    return int(ok.nonzero()[0]) if bool(ok.any()) else 0


@torch.no_grad()
def save_fig1(
    scm: Any,
    segmentor: Any,
    data: Mapping[str, Any],
    config: Mapping[str, Any],
    delta: float = 20.0,
    mode: str | None = None,
    path: str | os.PathLike = "fig1.png",
    noise_temperature: float | None = None,
    structure: str = "calcified",
    case_index: int | None = None,
    dpi: int = 150,
    segmentor_context: int | None = None,
) -> Path:
    """Fig. 1 of the positional paper: ``do(<structure>_<region> += delta)`` for every region of one case.

    Rows: the factual image, then one row per region with the counterfactual (left) and its
    difference map (right); region boundaries are dashed vertical lines and each row's title gives
    the intended and the segmentor-measured value of the intervened variable.

    Args:
        scm: a :class:`~monai_cft.networks.dscm.DeepSCM` (put in eval mode here).
        segmentor: measures the intervened variable on the counterfactuals (logits (B, C, *spatial)).
        data: ``images`` (N, 1, H, W) in [-1, 1], ``variables`` (N, V) physical units,
            ``region_masks`` (K, H, W) or (N, K, H, W), ``element_size`` (pixel area, mm^2) and
            optionally ``ids``.
        config: the prepared dataset's config (``variables``, ``regions``, ``structures``,
            ``ranges``, optional ``hu_window``).
        delta: change of the intervened variable (mm^2); targets beyond the observed range are
            extrapolated (the case is chosen so that they are not, when one exists).
        mode: CFT mode, shown in the title.
        path: PNG file (written atomically).
        noise_temperature: factor on the abducted pixel noise (``None``: 1, exact abduction).
        structure: the intervened structure.
        case_index: which case to show (default: the first whose targets are all in range).
        dpi: resolution.
        segmentor_context: the segmentor measures each region on its own window with this many pixels
            of context (``None``: on the whole image), as in the evaluation.

    Returns:
        the written path.
    """
    import warnings

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from monai_cft.utils.io import atomic_path
    from monai_cft.metrics.effectiveness import measure_with_segmentor

    names, regions = list(config["variables"]), list(config["regions"])
    intensity = HUWindow(config.get("hu_window", HU_WINDOW))
    window, hu = intensity.window, intensity.inverse
    columns = [names.index(f"{structure}_{r}") for r in regions]
    images, variables = data["images"], data["variables"]
    i = case_index if case_index is not None else _fig1_case(
        variables, columns, [config["ranges"][names[c]] for c in columns], delta
    )
    x, pa = images[i : i + 1], variables[i : i + 1]
    masks = data["region_masks"]
    masks = masks[i] if masks.ndim == x.ndim else masks
    channel = int(dict(config["structures"])[structure])
    scm.eval()
    rows = []
    for region, col in zip(regions, columns):
        target = float(pa[0, col]) + float(delta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # out-of-range targets are reported in the titles
            out = scm.counterfactual(
                x, pa, {names[col]: target}, noise_temperature=1.0 if noise_temperature is None else noise_temperature,
                allow_extrapolation=True,
            )
        measured = measure_with_segmentor(segmentor, out["x_cf"], masks, [channel], data.get("element_size", 1.0),
                                          context=segmentor_context)
        k = regions.index(region)
        rows.append((region, target, float(measured[0, 0, k]), hu(out["x_cf"][0, 0]).cpu().numpy()))
    factual = hu(x[0, 0]).cpu().numpy()
    diffs = [r[3] - factual for r in rows]
    lim = max(float(np.abs(d).max()) for d in diffs) or 1.0
    bounds = region_boundaries(masks)
    h, w = factual.shape
    fig = Figure(figsize=(12.0, 1.0 + 1.3 * (len(rows) + 1) * max(1.0, 6.0 * h / w)), layout="constrained")
    axes = fig.subplots(len(rows) + 1, 2, squeeze=False)
    axes[0, 0].imshow(factual, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
    axes[0, 0].set_title(f"factual (case {data.get('ids', [str(i)] * (i + 1))[i]})", fontsize=8)
    axes[0, 1].axis("off")
    for row, ((region, target, measured, cf), diff) in enumerate(zip(rows, diffs), start=1):
        axes[row, 0].imshow(cf, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
        im = axes[row, 1].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        axes[row, 0].set_title(
            f"do({structure}_{region} += {delta:g} mm²): intended {target:.1f}, measured {measured:.1f}", fontsize=8
        )
        axes[row, 1].set_title("difference (HU)", fontsize=8)
    fig.colorbar(im, ax=axes[1:, 1], fraction=0.03, pad=0.01).set_label("HU", fontsize=7)
    for ax in axes.flat:
        if ax.has_data():
            for b in bounds:
                ax.axvline(b, color="gold", linestyle="--", linewidth=0.8)
            ax.tick_params(labelsize=6)
    fig.suptitle(f"{structure} +{delta:g} mm² per region" + (f" [{mode}]" if mode else ""), fontsize=9)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path
