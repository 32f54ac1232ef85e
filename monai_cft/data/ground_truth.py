"""Ground-truth counterfactuals of the synthetic phantoms (evaluation only, never a training signal).

The phantom is a true structural causal model: a case's saved parameters (``raw/params/<id>.json``)
are its exogenous noise, and :func:`~monai_cft.data.phantom.render_phantom` its mechanism. So the
*true* counterfactual of ``do(STRUCT-REGION := target)`` can be rendered: edit the parameters so
that the re-rendered, re-straightened and re-measured case has the target value, leave every other
parameter (geometry, tissue, noise seed) unchanged, and render again.

The edit, one scalar solved by bracketing and bisection on the label-only render:

* **plaque** (``calcified_*``, ``noncalcified_*``): every plaque of that type in that third is
  scaled by ``s``: thickness ``x s`` (at most ``_MAX_THICKNESS_MM``) and length ``x sqrt(s)`` (centre
  fixed, capped so the plaque stays 3 mm inside its third, beyond the blur and the segmentors'
  context), so a large target first thickens the
  plaque, then lengthens it. Its remodelling fraction is kept, so ``1 - remodelling`` of the added
  (removed) thickness narrows (widens) the lumen *of that third*, as plaque growth does; the
  lumen elsewhere is untouched. A third without such a plaque gets one of the sampler's typical
  shape (the middle of each :class:`~monai_cft.data.phantom.PhantomConfig` range, centred in the
  third), turned about the vessel to face the sCPR plane, before scaling; a target of 0 removes the
  plaques. (A new plaque placed at an arbitrary angle is usually cut by the plane only at its
  tapering edge: a faint sliver carries the labelled area while most of its calcium lies beside the
  plane and blooms into it, a rendering no sampled plaque of that area has.) When the target cannot be reached
  because the sCPR plane shows too little of the plaque (its angular extent lies off the plane), the
  plaque is turned about the vessel to the orientation the plane shows best, and if that is not
  enough, also widened to the sampler's largest half-width (180 degrees).
* **lumen** (``lumen_*``): the lumen calibre of that third is multiplied by ``f``
  (``lumen.calibre_scale``, with smooth transitions that end 1 mm inside the third).

A counterfactual is not unique: this is one physically valid answer among many (another could
lengthen instead of thicken a plaque). The image changes only where the anatomy changes, plus the
reach of the scanner's blur and blooming; label pixels outside the intervened third do not change.
Targets are reached within ``max(tolerance * target, one pixel area)`` when the edit can reach
them (``hit``); a plaque is never thicker than ``_MAX_THICKNESS_MM`` (about the largest plaque the
16 mm-wide sCPR can show next to a proximal lumen) nor longer than its third allows.

``python -m monai_cft.data.ground_truth --raw RAW --scpr SCPR [--split test] [--seed 0]`` renders the
ground truth of the evaluation protocol (targets of :func:`monai_cft.metrics.uniform_targets`) for
every case of a split and writes ``SCPR/ground_truth/<split>_seed<seed>.npz``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_cft.utils.io import atomic_path
from monai_cft.data.phantom import (
    PhantomConfig,
    label_voxels,
    lumen_diameter_mm,
    phantom_geometry,
    render_phantom,
    vessel_geometry,
)
from monai_cft.data.presets import get_scpr_preset
from monai_cft.variables import DEFAULT_REGIONS, DEFAULT_STRUCTURES, split_variable_name, variable_names
from monai_cft.utils.cli import count_arg, run_cli

__all__ = ["ground_truth_counterfactual", "render_scpr", "ground_truth_dataset", "main"]

_MAX_SCALE = 64.0
_MAX_THICKNESS_MM = 4.0
_MIN_CALIBRE, _MAX_CALIBRE = 0.15, 6.0
_EDGE_MARGIN_MM = 3.0
_MAX_ITER = 40
#: plaque orientations tried (degrees, relative to its own) when the sCPR plane does not cut it.
_TURNS = (0.0, 45.0, -45.0, 90.0, -90.0, 135.0, -135.0, 180.0)


def _roundtrip(affine: np.ndarray, centerline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Affine and centreline exactly as the prepared case reads them back from NIfTI and CSV."""
    affine = affine.astype(np.float32).astype(np.float64)  # NIfTI stores the sform as float32
    centerline = np.array([[float(f"{v:.4f}") for v in p] for p in centerline])  # save_centerline's CSV
    return affine, centerline


def render_scpr(params: Mapping[str, Any], preset: str = "quick", with_image: bool = True,
                vessel: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Render a phantom and straighten / measure it exactly as ``synthetic`` + ``prepare`` do on disk.

    ``vessel``: :func:`~monai_cft.data.phantom.vessel_geometry` of the case (reused across edits).

    Returns:
        ``{"image": MetaTensor (1, H, W) float32 HU (None without image), "label": MetaTensor (1, H, W)
        uint8, "variables": (9,) float64 mm^2, structure-major}``.
    """
    import torch
    from monai.data import MetaTensor

    from monai_cft.data.prepare import build_prepare_transform

    geometry = get_scpr_preset(preset)
    case = render_phantom(params, with_image=with_image, vessel=vessel)
    affine, centerline = _roundtrip(case.affine, case.centerline)
    keys = ("image", "label") if with_image else ("label",)
    data: dict[str, Any] = {"centerline": centerline}
    aff = torch.as_tensor(affine)
    if with_image:
        data["image"] = MetaTensor(torch.from_numpy(case.image.astype(np.float32))[None], affine=aff)
    data["label"] = MetaTensor(torch.from_numpy(case.label.astype(np.float32))[None], affine=aff)
    transform = build_prepare_transform(geometry["spacing"], geometry["output_size"], keys=keys, load=False)
    out = transform(data)
    return {
        "image": out["image"] if with_image else None,
        "label": out["label"].to(torch.uint8),
        "variables": np.asarray(out["variables"], dtype=np.float64),
    }


class _RegionMeter:
    """Measure one variable of edited phantoms fast: the vessel model is evaluated only at the voxels
    that the sCPR pixels of its region sample (nearest neighbour, as ``grid_sample`` rounds), on the
    case's sampling plan, which no plaque or calibre edit changes."""

    def __init__(self, params: Mapping[str, Any], preset: str, name: str,
                 vessel: Mapping[str, Any] | None = None) -> None:
        import torch

        from monai_cft.transforms.cpr import StraightenCPR
        from monai_cft.transforms.regions import RegionMasks

        geometry = get_scpr_preset(preset)
        affine, shape, centerline = phantom_geometry(params)
        affine, centerline = _roundtrip(affine, centerline)
        plan = StraightenCPR(geometry["output_size"], geometry["spacing"], mode="nearest", padding_value=0.0,
                             record_grid=False).plan(centerline, torch.as_tensor(affine), shape)
        struct, region = split_variable_name(name, list(DEFAULT_STRUCTURES), list(DEFAULT_REGIONS))
        masks = torch.as_tensor(RegionMasks()(torch.zeros(1, *geometry["output_size"]))).bool()
        mask = masks[list(DEFAULT_REGIONS).index(region)][:, : plan.n_valid]
        grid = plan.sample_grid.float()  # (H, Wv, 3), (z, y, x) order, as grid_sample gets it
        size = torch.tensor(shape[::-1], dtype=grid.dtype)
        idx = torch.round((grid + 1.0) / 2.0 * (size - 1.0))
        inside = ((idx >= 0) & (idx <= size - 1)).all(-1) & mask
        self.vox = idx[inside].flip(-1).long().numpy()  # (M, 3) voxel (x, y, z) of each region pixel
        self.value = DEFAULT_STRUCTURES[struct]
        self.area = geometry["spacing"] ** 2
        self.vessel = vessel if vessel is not None else vessel_geometry(params)  # no edit changes it

    def __call__(self, params: Mapping[str, Any]) -> float:
        return float(np.count_nonzero(label_voxels(params, self.vox, self.vessel) == self.value)) * self.area


def _third(params: Mapping[str, Any], region: str) -> tuple[float, float]:
    length = float(params["scpr_length_mm"]) / len(DEFAULT_REGIONS)
    k = list(DEFAULT_REGIONS).index(region)
    return k * length, (k + 1) * length


def _typical_plaque(params: Mapping[str, Any], kind: str, region: str) -> dict[str, Any]:
    """A plaque of the sampler's typical shape centred in the third (the middle of each range)."""
    cfg = PhantomConfig()
    lo, hi = _third(params, region)
    mid = lambda r: 0.5 * (float(r[0]) + float(r[1]))  # noqa: E731
    center = 0.5 * (lo + hi)
    radius = 0.5 * float(lumen_diameter_mm(params, center))
    hu = mid(cfg.calcified_hu) if kind == "calcified" else float(cfg.noncalcified_hu[0])
    return {
        "type": kind, "region": region, "center_mm": center,
        "length_mm": min(mid(getattr(cfg, f"{kind}_length_mm")), hi - lo - 2.0 * _EDGE_MARGIN_MM),
        "angle_deg": 0.0, "half_width_deg": mid(getattr(cfg, f"{kind}_half_width_deg")),
        "thickness_mm": mid(getattr(cfg, f"{kind}_thickness")) * radius,
        "remodelling": mid(cfg.remodelling), "hu": hu,
    }


def _turned(plaques: Sequence[dict], degrees: float) -> list[dict]:
    """The plaques turned about the vessel by ``degrees`` (angles kept in [-180, 180))."""
    return [dict(p, angle_deg=(p["angle_deg"] + degrees + 180.0) % 360.0 - 180.0) for p in plaques]


def _best_turn(meter, base: Mapping[str, Any], kind: str, region: str, plaques: Sequence[dict]) -> list[dict]:
    """``plaques`` turned (by one of ``_TURNS``) to the orientation whose sCPR shows most of them."""
    shown = [(meter(_scaled(base, kind, region, 1.0, _turned(plaques, t))), -i, t) for i, t in enumerate(_TURNS)]
    return _turned(plaques, max(shown)[2])


def _scaled(params: Mapping[str, Any], kind: str, region: str, s: float, base: Sequence[dict]) -> dict[str, Any]:
    """Params with the plaques ``base`` (of ``kind`` in ``region``) scaled by ``s`` (0 removes them)."""
    out = copy.deepcopy(dict(params))
    lo, hi = _third(params, region)
    keep = [p for p in out.get("plaques", []) if not (p["type"] == kind and p["region"] == region)]
    if s > 0:
        for p in base:
            q = dict(p)
            room = 2.0 * (min(q["center_mm"] - lo, hi - q["center_mm"]) - _EDGE_MARGIN_MM)
            q["length_mm"] = min(q["length_mm"] * math.sqrt(s), max(q["length_mm"], room))
            q["thickness_mm"] = min(q["thickness_mm"] * s, max(q["thickness_mm"], _MAX_THICKNESS_MM))
            keep.append(q)
    out["plaques"] = keep
    return out


def _calibre(params: Mapping[str, Any], region: str, f: float) -> dict[str, Any]:
    out = copy.deepcopy(dict(params))
    scale = list(out["lumen"].get("calibre_scale") or [1.0] * len(DEFAULT_REGIONS))
    scale[list(DEFAULT_REGIONS).index(region)] *= f
    out["lumen"]["calibre_scale"] = scale
    return out


def _solve(measure, target: float, tol: float, x0: float, x_min: float, x_max: float,
           power: float = 1.0) -> tuple[float, float]:
    """Find ``x`` in ``[x_min, x_max]`` with ``|measure(x) - target| <= tol`` (measure increasing in x).

    The first step assumes ``measure ~ x ** power`` from ``x0``; then the root is bracketed (doubling /
    halving) and refined by false position with the Illinois modification, which falls back to
    bisection when it stalls. Returns ``(x, measure(x))`` of the best point found.
    """
    seen: list[tuple[float, float]] = []

    def f(x: float) -> float:
        m = measure(x)
        seen.append((x, m))
        return m

    def best() -> tuple[float, float]:
        return min(seen, key=lambda t: abs(t[1] - target))

    m0 = f(x0)
    if abs(m0 - target) <= tol:
        return x0, m0
    x = min(max(x0 * (target / m0) ** (1.0 / power), x_min), x_max) if m0 > 0 else min(2.0 * x0, x_max)
    lo, hi = (x0, None) if m0 < target else (None, x0)
    m = f(x)
    for _ in range(_MAX_ITER):  # bracket
        if abs(m - target) <= tol:
            return x, m
        if m < target:
            lo = x if lo is None or x > lo else lo
        else:
            hi = x if hi is None or x < hi else hi
        if lo is not None and hi is not None:
            break
        if hi is None:
            if x >= x_max:
                return best()
            x = min(2.0 * x, x_max)
        else:
            if x <= x_min:
                return best()
            x = max(0.5 * x, x_min) if x_min > 0 else (0.5 * x if x > 1e-3 else x_min)
        m = f(x)
    m_lo, m_hi = dict(seen)[lo], dict(seen)[hi]
    side = 0
    for _ in range(_MAX_ITER):  # Illinois false position inside [lo, hi]
        if hi - lo < 1e-4 * max(hi, 1e-6):
            break
        x = lo + (target - m_lo) * (hi - lo) / (m_hi - m_lo) if m_hi > m_lo else 0.5 * (lo + hi)
        if not lo < x < hi:
            x = 0.5 * (lo + hi)
        m = f(x)
        if abs(m - target) <= tol:
            return x, m
        if m < target:
            lo, m_lo = x, m
            if side == -1:
                m_hi = target + 0.5 * (m_hi - target)
            side = -1
        else:
            hi, m_hi = x, m
            if side == 1:
                m_lo = target - 0.5 * (target - m_lo)
            side = 1
    return best()


def ground_truth_counterfactual(params: Mapping[str, Any], intervention: Mapping[str, float], preset: str = "quick",
                                tolerance: float = 0.05) -> dict[str, Any]:
    """The true counterfactual of a phantom under ``do(variable := target)`` (see the module docstring).

    Args:
        params: a case's saved phantom parameters (``raw/params/<id>.json``; a ``derived`` entry is ignored).
        intervention: one or more of the nine variable names (e.g. ``"calcified_mid"``) -> target (mm^2).
        preset: the sCPR preset the case was prepared with.
        tolerance: relative tolerance on each target (at least one pixel area).

    Returns:
        ``{"image": MetaTensor (1, H, W) float32 HU, "label": MetaTensor (1, H, W) uint8, "variables":
        {name: mm^2} (the nine measured on the label), "params": the edited parameters, "hit":
        {name: bool} (target reached within the tolerance)}``, in the geometry of the prepared case.

    Raises:
        ValueError: an unknown variable name or a negative / non-finite target.
    """
    names = variable_names(DEFAULT_STRUCTURES, DEFAULT_REGIONS)
    bad = [k for k in intervention if k not in names]
    if bad:
        raise ValueError(f"unknown variables {bad} in the intervention; valid names are {names}.")
    for k, v in intervention.items():
        if not math.isfinite(float(v)) or float(v) < 0:
            raise ValueError(f"the target of {k!r} must be a finite area >= 0 mm^2, got {v!r}.")
    spacing = get_scpr_preset(preset)["spacing"]
    pixel_area = spacing**2
    current = {k: v for k, v in dict(params).items() if k != "derived"}
    vessel = vessel_geometry(current)  # plaque and calibre edits leave it as it is

    for name, target in intervention.items():
        target = float(target)
        meter = _RegionMeter(current, preset, name, vessel)

        struct, region = split_variable_name(name, list(DEFAULT_STRUCTURES), list(DEFAULT_REGIONS))
        tol = max(tolerance * target, pixel_area)
        if struct == "lumen":
            base = current
            f, _ = _solve(lambda f: meter(_calibre(base, region, f)), target, tol, 1.0, _MIN_CALIBRE,
                          _MAX_CALIBRE, power=1.0)
            current = _calibre(base, region, f)
            continue
        plaques = [p for p in current.get("plaques", []) if p["type"] == struct and p["region"] == region]
        if target <= 0:
            current = _scaled(current, struct, region, 0.0, plaques)
            continue
        base = current
        if not plaques:  # a new plaque of the sampler's typical shape, facing the sCPR plane
            plaques = _best_turn(meter, base, struct, region, [_typical_plaque(current, struct, region)])
        # the plaques as they are; if the sCPR plane misses them or cannot show enough of them even at
        # the largest size, turned to the orientation the plane shows best; then also as wide as the
        # sampler allows (half-width 180 degrees)
        attempts = [plaques]
        best: tuple[float, dict] | None = None
        for k in range(3):
            cand = attempts[-1]
            s, m = _solve(lambda s: meter(_scaled(base, struct, region, s, cand)), target, tol, 1.0, 0.0,
                          _MAX_SCALE, power=1.5)
            edited = _scaled(base, struct, region, s, cand)
            if best is None or abs(m - target) < best[0]:
                best = (abs(m - target), edited)
            if abs(m - target) <= tol or k == 2:
                break
            if k == 0:
                attempts.append(_best_turn(meter, base, struct, region, cand))
            else:
                attempts.append([dict(p, half_width_deg=180.0) for p in cand])
        current = best[1]

    out = render_scpr(current, preset, with_image=True, vessel=vessel)
    measured = {n: float(v) for n, v in zip(names, out["variables"])}
    hit = {k: abs(measured[k] - float(t)) <= max(tolerance * float(t), pixel_area) for k, t in intervention.items()}
    return {"image": out["image"], "label": out["label"], "variables": measured, "params": current, "hit": hit}


def _case_job(job: Mapping[str, Any]) -> dict[str, Any]:
    params = json.loads(Path(job["params_path"]).read_text())
    images, labels, variables, hits = [], [], [], []
    for name, target in zip(job["names"], job["targets"]):
        gt = ground_truth_counterfactual(params, {name: float(target)}, preset=job["preset"])
        images.append(gt["image"][0].numpy().astype(np.float32))
        labels.append(gt["label"][0].numpy().astype(np.uint8))
        variables.append([gt["variables"][n] for n in job["names"]])
        hits.append(gt["hit"][name])
    return {"id": job["id"], "images": np.stack(images), "labels": np.stack(labels),
            "variables": np.asarray(variables, np.float32), "hit": np.asarray(hits, bool)}


def ground_truth_dataset(raw_dir: str | Path, scpr_dir: str | Path, split: str = "test", seed: int = 0,
                         workers: int | None = None, progress: bool = True) -> Path:
    """Ground truth of the evaluation protocol for every case of ``split``; returns the ``.npz`` path.

    The targets are those of the evaluation (:func:`monai_cft.metrics.uniform_targets` with the same
    seed over the split's cases in datalist order), so ``evaluate.json`` can compare each model's
    counterfactual with the truth. The file holds ``ids`` (N,), ``names`` (V,), ``targets`` (N, V),
    ``images`` (N, V, H, W) float32 HU, ``labels`` (N, V, H, W) uint8, ``variables`` (N, V, V) mm^2
    measured on the labels and ``hit`` (N, V).
    """
    from monai_cft.data._parallel import parallel_map
    from monai_cft.data.dataset import load_prepare_config, load_scpr_datalist
    from monai_cft.metrics.interventions import uniform_targets

    raw, scpr = Path(raw_dir), Path(scpr_dir)
    config = load_prepare_config(scpr)
    items = load_scpr_datalist(scpr, split)
    names = list(config["variables"])
    targets = uniform_targets(names, config["ranges"], len(items), seed).numpy()
    missing = [it["id"] for it in items if not (raw / "params" / f"{it['id']}.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} cases of {str(scpr)!r} have no phantom parameters in {str(raw / 'params')!r} "
            f"(e.g. {missing[0]!r}): ground truth exists only for synthetic cases."
        )
    jobs = [{"id": it["id"], "params_path": str(raw / "params" / f"{it['id']}.json"), "names": names,
             "targets": targets[i].tolist(), "preset": config["preset"]} for i, it in enumerate(items)]
    results = {r["id"]: r for r in parallel_map(_case_job, jobs, workers, desc=f"ground truth {split}",
                                                   progress=progress, preload=("monai.transforms",))}
    ordered = [results[it["id"]] for it in items]
    path = scpr / "ground_truth" / f"{split}_seed{int(seed)}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, ids=np.array([it["id"] for it in items]), names=np.array(names), targets=targets,
                 images=np.stack([r["images"] for r in ordered]), labels=np.stack([r["labels"] for r in ordered]),
                 variables=np.stack([r["variables"] for r in ordered]), hit=np.stack([r["hit"] for r in ordered]))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: render the ground-truth counterfactuals of a split of a synthetic dataset."""
    parser = argparse.ArgumentParser(prog="python -m monai_cft.data.ground_truth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", required=True, help="raw synthetic dataset folder (with params/)")
    parser.add_argument("--scpr", required=True, help="its prepared sCPR folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--seed", type=count_arg(0), default=0, help="evaluation seed (the targets' seed)")
    parser.add_argument("--workers", type=count_arg(0), default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = ground_truth_dataset(args.raw, args.scpr, args.split, args.seed, args.workers, not args.no_progress)
    with np.load(path) as f:
        hit, n = f["hit"], len(f["ids"])
    print(f"{path}: ground truth of {n} cases x {hit.shape[1]} interventions, {hit.mean() * 100:.1f} % within "
          f"tolerance ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
