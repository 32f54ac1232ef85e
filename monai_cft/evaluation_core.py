"""The computation of the counterfactual evaluation on loaded models and tensors (:func:`evaluate_counterfactuals`).

See :mod:`monai_cft.evaluation` for the protocol and the bundle entry point that loads checkpoints
and writes the results. Data-parallel under ``torchrun``: every process evaluates the cases
``rank::world`` of each batch (random draws follow the whole batch's stream, see
:mod:`monai_cft.utils.distributed`) and the per-case results are summed over the processes, so
every process ends with the metrics of all cases, as one process computes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from monai_cft.constants import HU_WINDOW, area_unit
from monai_cft.transforms.intensity import HUWindow
from monai_cft.metrics.effectiveness import measure_with_segmentor
from monai_cft.metrics.summary import case_statistics
from monai_cft.utils.distributed import all_reduce_sum_, global_batch, is_main_process, shard_rows, world_size

__all__ = ["evaluate_counterfactuals", "segmentor_features"]


def segmentor_features(segmentor: torch.nn.Module):
    """Realism features: the pooled bottleneck of a locally trained segmentor (no hub weights).

    For a MONAI ``SegResNet`` (the evaluation segmentor) this is the output of its deepest encoder
    stage; for other networks the pooled logits are used. The returned callable has a
    ``description`` attribute recorded in ``metrics.json``.
    """
    from monai_cft.metrics.realism import FeatureExtractor

    layer = None
    down = getattr(segmentor, "down_layers", None)
    if isinstance(down, torch.nn.ModuleList) and len(down) > 0:
        layer = f"down_layers.{len(down) - 1}"
    fx = FeatureExtractor(segmentor, layer)
    fx.description = f"{type(segmentor).__name__} {layer or 'logits'}, global average pooled"
    return fx


def _measure(segmentor: torch.nn.Module, images: torch.Tensor, region_masks: torch.Tensor,
             channels: Sequence[int], element_size: float, context: int | None = None) -> torch.Tensor:
    """(B, S*K) areas measured by ``segmentor`` on ``images`` (structure-major), on the CPU."""
    return measure_with_segmentor(segmentor, images, region_masks, channels, element_size,
                                  context=context).flatten(1).float().cpu()


def _mean(values: torch.Tensor) -> float:
    """Mean of the non-NaN entries of ``values`` as a float (NaN if there are none)."""
    v = values.double().reshape(-1)
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else math.nan


def _masked_l1(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean |a - b| over the pixels where ``mask`` (spatial) is True; NaN for an empty mask."""
    d = (a.float() - b.float()).abs().flatten(1)  # (B, C*P)
    m = mask.to(d.device).flatten().repeat(a.shape[1])
    if not bool(m.any()):
        return torch.full((a.shape[0],), math.nan)
    return d[:, m].mean(1).cpu()


def _ground_truth_tensors(ground_truth: dict, targets: torch.Tensor, spatial: tuple[int, ...],
                          names: Sequence[str]) -> dict:
    """Validate the ``ground_truth`` argument of :func:`evaluate_counterfactuals`; CPU tensors."""
    missing = [key for key in ("images", "targets", "hit") if key not in ground_truth]
    if missing:
        raise ValueError(f"ground_truth lacks the keys {missing}; it needs 'images', 'targets' and 'hit'.")
    n, v_count = targets.shape

    def cpu(value, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.detach().to(device="cpu", dtype=dtype)
        return torch.as_tensor(np.asarray(value)).to(dtype)

    gt_images, gt_targets, hit = (cpu(ground_truth["images"], torch.float32),
                                  cpu(ground_truth["targets"], torch.float32), cpu(ground_truth["hit"], torch.bool))
    if tuple(gt_images.shape) != (n, v_count, *spatial):
        raise ValueError(f"ground_truth['images'] must be (N, V, *spatial) = {(n, v_count, *spatial)} HU, "
                         f"got {tuple(gt_images.shape)}.")
    for key, arr in (("targets", gt_targets), ("hit", hit)):
        if tuple(arr.shape) != (n, v_count):
            raise ValueError(f"ground_truth[{key!r}] must be (N, V) = {(n, v_count)}, got {tuple(arr.shape)}.")
    diff = (gt_targets - targets).abs()
    if bool(torch.isnan(diff).any()) or float(diff.max()) > 1e-4:
        worst = divmod(int(torch.nan_to_num(diff, nan=math.inf).argmax()), v_count)
        raise ValueError(
            f"the ground truth's targets differ from the evaluation's by up to {float(diff.max()):.6g} mm^2 "
            f"(case {worst[0]}, {names[worst[1]]}; tolerance 1e-4): it was made with another seed, split or "
            "case order than this evaluation."
        )
    return {"images": gt_images, "hit": hit}


def _store(store: dict[str, torch.Tensor], key: str, rows: Any, values: torch.Tensor, n: int) -> None:
    """``store[key][rows] = values`` in an (n, F) tensor allocated at the first call."""
    if key not in store:
        store[key] = torch.zeros(n, *values.shape[1:], dtype=values.dtype)
    store[key][rows] = values


def _effectiveness_rows(mode: str, case_ids: Sequence[str], names: Sequence[str], structures: Sequence[str],
                        regions: Sequence[str], targets: torch.Tensor, parents_cf: torch.Tensor,
                        measured: torch.Tensor) -> list[dict]:
    """Rows of ``effectiveness.csv`` from (N, V, V) ``[case, intervened, measured]`` parents and measurements."""
    k = len(regions)
    err = (measured - parents_cf).abs()
    rows = []
    for i, cid in enumerate(case_ids):
        for vi, vname in enumerate(names):
            for mi, mname in enumerate(names):
                rows.append({
                    "case_id": cid, "mode": mode, "intervened": vname, "target": float(targets[i, vi]),
                    "measured_variable": mname, "measured_structure": structures[mi // k],
                    "measured_region": regions[mi % k], "is_intervened": int(mi == vi),
                    "cf_value": float(parents_cf[i, vi, mi]), "measured_value": float(measured[i, vi, mi]),
                    "abs_error": float(err[i, vi, mi]),
                })
    return rows


def evaluate_counterfactuals(
    scm,
    segmentor: torch.nn.Module,
    images: torch.Tensor,
    variables: torch.Tensor,
    region_masks: torch.Tensor,
    *,
    names: Sequence[str],
    structures: dict[str, int],
    regions: Sequence[str],
    ranges: dict[str, Sequence[float]],
    element_size: float,
    case_ids: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    composition_cycles: Sequence[int] = (1, 10),
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    noise_temperature: float | None = None,
    allow_extrapolation: bool = False,
    mode: str = "",
    progress: bool = True,
    ground_truth: dict | None = None,
    hu_window: Sequence[float] = HU_WINDOW,
    calcium_threshold_hu: float | None = None,
    include_identity_rows: bool = False,
    include_ground_truth_rows: bool = False,
    segmentor_context: int | None = None,
) -> tuple[list[dict], dict]:
    """Run every metric of the evaluation on one model.

    Args:
        scm: a :class:`monai_cft.networks.dscm.DeepSCM` (or any object with its ``counterfactual``).
        segmentor: the evaluation segmentor (logits (B, C, *spatial)); put in eval mode here.
        images: (N, 1, *spatial) test images scaled to [-1, 1].
        variables: (N, V) factual variables in physical units (mm^2), structure-major.
        region_masks: (K, *spatial) region masks.
        names, structures, regions, ranges: the variable names, structure label values, region names
            and the observed [min, max] of each variable (training split).
        element_size: pixel area in mm^2 (voxel volume in mm^3 for 3D).
        seed: seeds the intervention targets (:func:`monai_cft.metrics.uniform_targets`, the same as
            the ground truth's) and the model's sampling.
        feature_fn: maps images to (B, F) features for the realism distances (None: skipped).
        allow_extrapolation: accept test cases whose factual values lie outside the training
            range (warned about) instead of raising.
        ground_truth: optional ground-truth counterfactuals aligned with the cases (arrays or
            tensors): ``images`` (N, V, *spatial) float32 HU, ``[i, v]`` the true counterfactual of
            do(names[v] := targets[i, v]) on case i; ``targets`` (N, V) mm^2, which must equal this
            evaluation's targets to 1e-4; ``hit`` (N, V) bool, whether the ground truth reached its
            target (comparisons with the ground truth use the hit cases only).
        hu_window: the HU window that maps to the networks' [-1, 1].
        calcium_threshold_hu: when given, calcified areas are also measured as the area of the pixels
            brighter than this HU (:func:`monai_cft.metrics.calcium_areas`); must lie inside ``hu_window``.
        include_identity_rows: also return the rows of the unchanged-image baseline (``mode="identity"``:
            the factual image taken as the counterfactual).
        include_ground_truth_rows: also return the rows of the ground truth (``mode="ground_truth"``),
            when ``ground_truth`` is given.
        segmentor_context: ``None``: the segmentor sees whole images; an integer: every region is
            measured on its own window with this many pixels of context
            (:func:`monai_cft.metrics.effectiveness.segmentor_probabilities`), so that a change in one
            region cannot move another region's measurement (the evaluation segmentor is trained on
            such windows; its checkpoint meta records ``region_context_mm``).

    Returns:
        ``(rows, metrics)``: one dict per case x intervention x measured variable (the columns of
        :data:`monai_cft.report.EFFECTIVENESS_COLUMNS`; the model's rows first, then the requested
        baseline rows) and the aggregated metrics (``docs/metrics.md``): besides the protocol's
        metrics ``intervened_error`` and ``response_slope`` always; ``pixel_l1_to_ground_truth``,
        ``response_slope_ground_truth`` and ``ground_truth`` with ``ground_truth``;
        ``calcium_threshold`` with ``calcium_threshold_hu``.
    """
    from monai_cft.metrics import composition, frechet_distance, kernel_distance, locality, reversibility
    from monai_cft.metrics.calcium import calcium_areas
    from monai_cft.metrics.interventions import uniform_targets
    from monai_cft.metrics.response import gap_closure, response_slope

    n, v_count = variables.shape
    if len(names) != v_count:
        raise ValueError(f"got {v_count} variables per case but {len(names)} names {list(names)}.")
    device = images.device
    segmentor.eval()
    channels = list(structures.values())
    struct_names = list(structures)
    k = len(regions)
    case_ids = list(case_ids) if case_ids is not None else [f"case_{i:04d}" for i in range(n)]
    targets = uniform_targets(names, ranges, n, seed)  # (N, V): target of do(v) for case i
    gen = torch.Generator().manual_seed(seed)  # the reversibility draws
    torch.manual_seed(seed)
    gt = None if ground_truth is None else _ground_truth_tensors(ground_truth, targets, tuple(images.shape[2:]), names)
    window = HUWindow(hu_window)
    lo_hu, hi_hu = window.window
    if calcium_threshold_hu is not None:
        calcium_threshold_hu = float(calcium_threshold_hu)
        if not lo_hu <= calcium_threshold_hu < hi_hu:
            raise ValueError(f"calcium_threshold_hu {calcium_threshold_hu} HU lies outside the HU window "
                             f"[{lo_hu}, {hi_hu}) that the images can represent.")
        if "calcified" not in structures:
            raise ValueError(f"calcium_threshold_hu needs a 'calcified' structure, got structures {struct_names}.")
    thr = calcium_threshold_hu
    cf_kwargs = {} if noise_temperature is None else {"noise_temperature": noise_temperature}
    if allow_extrapolation:
        cf_kwargs["allow_extrapolation"] = True

    # per case x intervention x measured variable, on the CPU: [i, v, m]
    parents_cf = torch.zeros(n, v_count, v_count)
    meas_cf = torch.zeros(n, v_count, v_count)
    meas_f = torch.zeros(n, v_count)  # the factual image, measured by the same segmentor
    meas_gt = torch.zeros(n, v_count, v_count) if gt is not None else None
    l1 = torch.zeros(n, v_count, 4) if gt is not None else None  # model in/out, identity in/out (HU)
    thr_f = torch.zeros(n, k) if thr is not None else None
    thr_cf = torch.zeros(n, v_count, k) if thr is not None else None
    thr_gt = torch.zeros(n, v_count, k) if thr is not None and gt is not None else None
    inside = region_masks > 0.5

    # per case, filled by the process that holds the case (data-parallel: rows rank::world of every batch)
    local_t = torch.zeros(n, v_count)
    comp_t = {c: torch.zeros(n) for c in composition_cycles}
    rev_t = torch.zeros(n)
    feats: dict[str, torch.Tensor] = {}
    world = world_size()
    if world > batch_size:
        raise ValueError(f"batch_size {batch_size} must be >= the number of processes {world}.")
    iterator = range(0, n, batch_size)
    if progress and is_main_process():
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"evaluate {mode}".strip(), unit="batch", total=(n + batch_size - 1) // batch_size)
    for start in iterator:
        stop = min(start + batch_size, n)
        sl = shard_rows(start, stop) if world > 1 else slice(start, stop)
        vi_rev = int(torch.randint(v_count, (1,), generator=gen))  # every process draws it for every batch
        if world > 1 and sl.numel() == 0:  # a last batch with fewer cases than processes
            continue
        x, pa = images[sl], variables[sl].to(device)
        with global_batch(stop - start):
            meas_f[sl] = _measure(segmentor, x, region_masks, channels, element_size, segmentor_context)
            x_hu = window.inverse(x.clamp(-1.0, 1.0))
            if thr is not None:
                thr_f[sl] = calcium_areas(x_hu, region_masks, thr, element_size).cpu()
            if feature_fn is not None:
                _store(feats, "real", sl, feature_fn(x).float().cpu(), n)
            for vi, vname in enumerate(names):
                t = targets[sl, vi].to(device)
                with torch.no_grad():
                    out = scm.counterfactual(x, pa, {vname: t}, **cf_kwargs)
                x_cf, pa_cf = out["x_cf"], out["parents_cf"].float()
                parents_cf[sl, vi] = pa_cf.cpu()
                meas_cf[sl, vi] = _measure(segmentor, x_cf, region_masks, channels, element_size, segmentor_context)
                cf_hu = window.inverse(x_cf.clamp(-1.0, 1.0))
                if thr is not None:
                    thr_cf[sl, vi] = calcium_areas(cf_hu, region_masks, thr, element_size).cpu()
                if gt is not None:
                    g = window(gt["images"][sl, vi].unsqueeze(1).to(device))
                    meas_gt[sl, vi] = _measure(segmentor, g, region_masks, channels, element_size, segmentor_context)
                    g_hu = window.inverse(g)  # the ground truth clipped to the window, as a model can produce it
                    r_in = inside[vi % k]
                    l1[sl, vi, 0] = _masked_l1(cf_hu, g_hu, r_in)
                    l1[sl, vi, 1] = _masked_l1(cf_hu, g_hu, ~r_in)
                    l1[sl, vi, 2] = _masked_l1(x_hu, g_hu, r_in)
                    l1[sl, vi, 3] = _masked_l1(x_hu, g_hu, ~r_in)
                    if thr is not None:
                        thr_gt[sl, vi] = calcium_areas(g_hu, region_masks, thr, element_size).cpu()
                region = region_masks[vi % k]
                local_t[sl, vi] = locality(x, x_cf, region).cpu()
                if feature_fn is not None and vi == 0:
                    _store(feats, "cf", sl, feature_fn(x_cf).float().cpu(), n)
            with torch.no_grad():
                c = composition(scm, x, pa, cycles=tuple(composition_cycles), variables=names, **cf_kwargs)
                for cyc in composition_cycles:
                    comp_t[cyc][sl] = c[cyc].cpu()
                rev_t[sl] = reversibility(scm, x, pa, {names[vi_rev]: targets[sl, vi_rev].to(device)}, variables=names,
                                          **cf_kwargs).cpu()

    # data-parallel: every process gets every case (each row was filled by one process, zeros elsewhere)
    all_reduce_sum_(*[t for t in (meas_f, meas_cf, parents_cf, local_t, rev_t, *comp_t.values(), meas_gt, l1, thr_f,
                                  thr_cf, thr_gt, *feats.values()) if t is not None])
    batches = [range(b, min(b + batch_size, n)) for b in range(0, n, batch_size)]
    local = [v for r in batches for vi in range(v_count) for v in local_t[r.start:r.stop, vi].tolist()]
    comp = {c: t.tolist() for c, t in comp_t.items()}
    rev = rev_t.tolist()
    fe = (meas_f - variables.float().cpu()).abs()
    meas_id = meas_f[:, None, :].expand(n, v_count, v_count)  # the unchanged image as the counterfactual
    err_model = (meas_cf - parents_cf).abs()
    err_id = (meas_id - parents_cf).abs()
    err_gt = (meas_gt - parents_cf).abs() if gt is not None else None
    # comparisons that involve the ground truth use the cases whose ground truth reached its target
    cases = gt["hit"] if gt is not None else torch.ones(n, v_count, dtype=torch.bool)
    metrics = {
        "mode": mode,
        "n_cases": n,
        "seed": seed,
        "segmentor_context_px": segmentor_context,
        "variables": list(names),
        "structures": struct_names,
        "regions": list(regions),
        "area_unit": area_unit(images.ndim - 2),
        "factual_segmentor_error": {nm: case_statistics(fe[:, j].tolist()) for j, nm in enumerate(names)},
        "composition": {str(cyc): case_statistics(vals) for cyc, vals in comp.items()},
        "reversibility": case_statistics(rev),
        "locality": case_statistics(local),
    }
    interv = {}
    for vi, nm in enumerate(names):
        sel = cases[:, vi]
        entry = {"err_mode": _mean(err_model[sel, vi, vi]), "err_identity": _mean(err_id[sel, vi, vi]),
                 "n": int(sel.sum())}
        if gt is not None:
            entry["err_ground_truth"] = _mean(err_gt[sel, vi, vi])
            entry["gap_closure_identity"] = gap_closure(entry["err_identity"], entry["err_mode"],
                                                        entry["err_ground_truth"])
        interv[nm] = entry
    metrics["intervened_error"] = interv

    intended = targets - variables.float().cpu()  # (N, V) intended change of the intervened variable

    def slopes(measured: torch.Tensor, sel: torch.Tensor) -> dict:
        change = measured - meas_id  # (N, V, V) measured change, x_cf vs x, same segmentor
        out = {}
        for vi, nm in enumerate(names):
            s = vi // k
            rows_sel = sel[:, vi]
            out[nm] = {names[s * k + r]: response_slope(intended[rows_sel, vi], change[rows_sel, vi, s * k + r])
                       for r in range(k)}
        return out

    metrics["response_slope"] = slopes(meas_cf, torch.ones(n, v_count, dtype=torch.bool))
    if gt is not None:
        metrics["response_slope_ground_truth"] = slopes(meas_gt, cases)
        metrics["pixel_l1_to_ground_truth"] = {
            nm: {
                "inside": {"model": _mean(l1[cases[:, vi], vi, 0]), "identity": _mean(l1[cases[:, vi], vi, 2])},
                "outside": {"model": _mean(l1[cases[:, vi], vi, 1]), "identity": _mean(l1[cases[:, vi], vi, 3])},
                "n": int(cases[:, vi].sum()),
            }
            for vi, nm in enumerate(names)
        }
        metrics["ground_truth"] = {
            "hit_fraction": {nm: float(gt["hit"][:, vi].float().mean()) for vi, nm in enumerate(names)},
            "hu_window": [lo_hu, hi_hu],
        }
    if thr is not None:
        cols = [struct_names.index("calcified") * k + r for r in range(k)]
        pa_calc = parents_cf[:, :, cols]  # (N, V, K) counterfactual calcified parents
        thr_err = {"model": (thr_cf - pa_calc).abs(), "identity": (thr_f[:, None, :] - pa_calc).abs()}
        seg_err = {"model": err_model[:, :, cols], "identity": err_id[:, :, cols]}
        if gt is not None:
            thr_err["ground_truth"] = (thr_gt - pa_calc).abs()
            seg_err["ground_truth"] = err_gt[:, :, cols]

        def per_region(errors: dict) -> dict:
            return {nm: {regions[r]: {src: case_statistics(e[cases[:, vi], vi, r]) for src, e in errors.items()}
                         for r in range(k)} for vi, nm in enumerate(names)}

        metrics["calcium_threshold"] = {
            "threshold_hu": thr,
            "cases": "hit" if gt is not None else "all",
            "factual_error": {regions[r]: case_statistics((thr_f[:, r] - variables.float().cpu()[:, cols[r]]).abs())
                              for r in range(k)},
            "errors": per_region(thr_err),
            "segmentor_errors": per_region(seg_err),
        }
    if feature_fn is not None:
        # Counterfactuals are paired with their factual images (x_cf = x when nothing changes), and
        # paired samples bias both distances (KID's cross term gains the near-identical pairs and
        # goes negative). Compare real images of the even-indexed cases with counterfactuals of
        # the odd-indexed ones: two independent samples, as the estimators assume.
        real_all = feats["real"]
        rf, cf, rf_other = real_all[0::2], feats["cf"][1::2], real_all[1::2]
    if feature_fn is not None and min(rf.shape[0], cf.shape[0]) < 2:
        metrics["realism"] = {"skipped": f"needs at least 4 cases (two independent halves of >= 2), got {n}"}
    elif feature_fn is not None:
        kid, kid_std = kernel_distance(rf, cf)
        metrics["realism"] = {
            "fid": float(frechet_distance(rf, cf)),
            "kid": float(kid),
            "kid_std": float(kid_std),
            # the same distances between the two halves of the *real* images: the value a perfect
            # generator would get with this many cases (estimator noise and case-to-case variation)
            "fid_real_halves": float(frechet_distance(rf, rf_other)),
            "kid_real_halves": float(kernel_distance(rf, rf_other)[0]),
            "n_real": int(rf.shape[0]),
            "n_cf": int(cf.shape[0]),
            "features": getattr(feature_fn, "description", "custom"),
        }
    rows = _effectiveness_rows(mode, case_ids, names, struct_names, regions, targets, parents_cf, meas_cf)
    if include_identity_rows:
        rows += _effectiveness_rows("identity", case_ids, names, struct_names, regions, targets, parents_cf, meas_id)
    if include_ground_truth_rows and gt is not None:
        rows += _effectiveness_rows("ground_truth", case_ids, names, struct_names, regions, targets, parents_cf,
                                    meas_gt)
    return rows, metrics
