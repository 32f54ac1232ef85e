"""Gap closure and response slope against CFT updates, from the fine-tuning's weight snapshots.

The CFT trainer keeps the HVAE's EMA weights at iteration 0 (the pretrained model, i.e. No-CFT)
and every ``snapshot_interval`` iterations (:meth:`monai_cft.engines.cft_trainer.CFTTrainer.save_snapshot`).
:func:`snapshot_curves` evaluates each snapshot on the first ``n_cases`` test cases with the
evaluation protocol (same targets, same evaluation segmentor, same ground truth) and returns, per
intervened variable and snapshot, the intervened-region error, the gap closure against the
iteration-0 snapshot ((err_0 - err_t) / (err_0 - err_GT)) and the response slope. The report plots
the median over the variables for every mode (:func:`save_curves_figure`): whether a mode was
still improving when fine-tuning stopped, or had converged or diverged.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_cft.metrics.response import gap_closure
from monai_cft.metrics.summary import finite_median
from monai_cft.utils.checkpoint import load_model_weights

__all__ = ["list_snapshots", "snapshot_curves", "save_curves_figure", "curves_section"]

_NAME = re.compile(r"iter_(\d+)\.pt$")


def list_snapshots(snapshot_dir: str | os.PathLike | None) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the snapshots in ``snapshot_dir``, by iteration (empty if none)."""
    if snapshot_dir is None or not Path(snapshot_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(snapshot_dir).iterdir() if (m := _NAME.search(p.name))]
    return sorted(found)


def snapshot_curves(scm: Any, snapshots: Sequence[tuple[int, Path]], evaluate: Callable[..., tuple[list, dict]],
                    images: torch.Tensor, variables: torch.Tensor, ground_truth: Mapping[str, Any] | None,
                    n_cases: int, mode: str, **evaluate_kwargs: Any) -> dict[str, Any]:
    """Evaluate every snapshot on the first ``n_cases`` cases (see the module docstring).

    Args:
        scm: the fine-tuned DSCM (its HVAE weights are replaced by each snapshot's, on a copy).
        snapshots: from :func:`list_snapshots`; the first must be iteration 0 (the No-CFT reference).
        evaluate: :func:`monai_cft.evaluation_core.evaluate_counterfactuals`.
        images, variables: the evaluated split (N, 1, *spatial) / (N, V).
        ground_truth: the split's ground truth (``load_ground_truth``) or ``None`` (no gap closure).
        n_cases: cases used (the first ones, so the targets are the protocol's).
        mode: the CFT mode (for messages).
        evaluate_kwargs: the other arguments of ``evaluate`` (names, structures, ranges, ...).

    Returns:
        ``{"iterations", "n_cases", "err": {var: [...]}, "err_ground_truth": {var: float},
        "gap_closure": {var: [...]}, "slope": {var: [...]}, "median_gap_closure": [...],
        "median_slope": [...]}``.
    """
    if not snapshots or snapshots[0][0] != 0:
        raise ValueError(f"the {mode} snapshots must start at iteration 0 (the pretrained model), got "
                         f"{[it for it, _ in snapshots]}.")
    n = min(int(n_cases), images.shape[0])
    gt = None if ground_truth is None else {k: v[:n] for k, v in ground_truth.items()}
    model = copy.deepcopy(scm).eval()
    iters, errs, slopes, gts = [], {}, {}, {}
    for it, path in snapshots:
        load_model_weights(model.hvae, path, expect={"kind": "cft_snapshot", "cft_mode": mode})
        _, m = evaluate(model, images=images[:n], variables=variables[:n], ground_truth=gt, feature_fn=None,
                        composition_cycles=(1,), include_identity_rows=False, include_ground_truth_rows=False,
                        progress=False, mode=mode, **evaluate_kwargs)
        iters.append(it)
        for var, e in m["intervened_error"].items():
            errs.setdefault(var, []).append(e["err_mode"])
            gts[var] = e.get("err_ground_truth", math.nan)
            slopes.setdefault(var, []).append(m["response_slope"][var][var])
    gc = {var: [gap_closure(e[0], x, gts[var]) for x in e] for var, e in errs.items()}
    return {
        "iterations": iters,
        "n_cases": n,
        "err": errs,
        "err_ground_truth": gts,
        "gap_closure": gc,
        "slope": slopes,
        "median_gap_closure": [finite_median([gc[v][i] for v in gc]) for i in range(len(iters))],
        "median_slope": [finite_median([slopes[v][i] for v in slopes]) for i in range(len(iters))],
    }


def save_curves_figure(curves: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                       labels: Mapping[str, str] | None = None) -> Path:
    """Median gap closure and median slope against CFT iterations, one line per mode (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from monai_cft.utils.io import atomic_path

    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    for mode, c in curves.items():
        name = (labels or {}).get(mode, mode)
        axes[0].plot(c["iterations"], c["median_gap_closure"], marker="o", label=name)
        axes[1].plot(c["iterations"], c["median_slope"], marker="o", label=name)
    for ax, title, ylabel in ((axes[0], "gap closure vs No-CFT", "median over the 9 rows"),
                              (axes[1], "response slope (intervened region)", "median over the 9 rows")):
        ax.set_title(title)
        ax.set_xlabel("CFT updates")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    n = next(iter(curves.values()))["n_cases"] if curves else 0
    fig.suptitle(f"Counterfactual fine-tuning progress ({n} test cases per point)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


def curves_section(metrics: Mapping[str, Mapping[str, Any]], modes: Sequence[str], eval_root: Path, out: Path,
                   labels: Mapping[str, str] | None = None) -> tuple[list[str], dict | None]:
    """Report lines (and the PNG ``<eval_root>/cft_curves.png``) of the modes whose metrics have curves."""
    curves = {m: metrics[m]["curves"] for m in modes if m in metrics and metrics[m].get("curves")}
    parts = ["## Fine-tuning curves: gap closure and slope against CFT updates\n"]
    if not curves:
        parts.append("_Omitted: no CFT snapshots were evaluated (finetune.json `snapshot_interval`)._\n")
        return parts, None
    png = save_curves_figure(curves, eval_root / "cft_curves.png", labels)
    rows = []
    for m, c in curves.items():
        pts = ", ".join(f"{it}: {g:.2f} / {s:.2f}" for it, g, s in
                        zip(c["iterations"], c["median_gap_closure"], c["median_slope"]))
        rows.append(f"- {(labels or {}).get(m, m)} (updates: median gap closure / median slope): {pts}")
    parts.extend(rows)
    parts.append(f"\nEach point: the EMA weights after that many updates, evaluated on the first "
                 f"{next(iter(curves.values()))['n_cases']} test cases with the protocol's targets; gap closure "
                 "against the same mode's weights at update 0 (the pretrained DSCM).\n")
    parts.append(f"![CFT curves]({os.path.relpath(png, out)})\n")
    return parts, {m: {k: c[k] for k in ("iterations", "median_gap_closure", "median_slope")} for m, c in curves.items()}
