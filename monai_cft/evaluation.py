"""Counterfactual evaluation of one (fine-tuned) deep SCM: Table 1, Fig. 1 and the other metrics.

Protocol (the positional paper's, Sec. 4): for every test case and every variable v (structure x
region) one intervention do(v := t) with t drawn uniformly from v's observed [min, max] on the
training split (seeded). The counterfactual x_cf is measured by the **evaluation segmentor**
(trained independently of the guidance segmentor: other seed and architecture) in every region;
the absolute error to the counterfactual parents is reported per region: in the intervened region
it shows whether the change happened, in the others whether the image stayed put.

:func:`evaluate_counterfactuals` works on loaded models and tensors; :class:`CounterfactualEvaluation`
is the bundle entry point (``evaluate.json``) that loads checkpoints and data and writes
``effectiveness.csv``, ``metrics.json``, ``table1.md`` and ``fig1_<mode>.png``.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from monai_cft.metrics.effectiveness import measure_with_segmentor
from monai_cft.metrics.summary import summarize
from monai_cft.report import EFFECTIVENESS_COLUMNS, write_table1

__all__ = ["evaluate_counterfactuals", "load_split_tensors", "segmentor_features", "CounterfactualEvaluation"]


def load_split_tensors(dataset_dir: str | os.PathLike, split: str, max_cases: int | None = None,
                       device: str | torch.device = "cpu") -> dict:
    """Load one split of a prepared sCPR dataset into memory for evaluation.

    Returns:
        dict with ``images`` (N, 1, H, W) scaled from the config's HU window to [-1, 1],
        ``variables`` (N, V) mm^2, ``region_masks`` (K, H, W) from the config's boundaries,
        ``element_size`` (pixel area, mm^2), ``ids`` and the prepared dataset's ``config``.
    """
    from monai.transforms import LoadImage

    from monai_cft.data.dataset import load_prepare_config, load_scpr_datalist
    from monai_cft.data.presets import HU_WINDOW
    from monai_cft.transforms.regions import RegionMasks

    config = load_prepare_config(dataset_dir)
    items = load_scpr_datalist(dataset_dir, split)
    if max_cases is not None:
        items = items[: int(max_cases)]
    if not items:
        raise ValueError(f"split {split!r} of {str(dataset_dir)!r} has no cases to evaluate.")
    lo, hi = config.get("hu_window", HU_WINDOW)
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    images = torch.stack([torch.as_tensor(loader(it["image"])).float() for it in items])
    images = ((images.clamp(lo, hi) - lo) / (hi - lo) * 2.0 - 1.0).to(device)
    variables = torch.tensor([it["variables"] for it in items], dtype=torch.float32, device=device)
    masks = RegionMasks(boundaries=config["boundaries"], names=config["regions"])(images[0].cpu())
    return {
        "images": images,
        "variables": variables,
        "region_masks": torch.as_tensor(masks).float().to(device),
        "element_size": float(config["spacing"]) ** (images.ndim - 2),
        "ids": [it["id"] for it in items],
        "config": config,
    }


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
             channels: Sequence[int], element_size: float) -> torch.Tensor:
    """(B, S*K) areas measured by ``segmentor`` on ``images`` (structure-major), on the CPU."""
    return measure_with_segmentor(segmentor, images, region_masks, channels, element_size).flatten(1).float().cpu()


def _stats(values) -> dict:
    """mean, std, 95 % CI half-width and n of a list of per-case values (NaNs ignored) as floats."""
    st = summarize(torch.as_tensor(values, dtype=torch.float64).reshape(-1))
    mean, low, high = float(st["mean"]), float(st["ci_low"]), float(st["ci_high"])
    return {"mean": mean, "std": float(st["std"]), "ci95": (high - low) / 2.0, "n": int(st["n"])}


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
        seed: seeds the intervention targets and the model's sampling.
        feature_fn: maps images to (B, F) features for the realism distances (None: skipped).
        allow_extrapolation: accept test cases whose factual values lie outside the training
            range (warned about) instead of raising.

    Returns:
        ``(rows, metrics)``: one dict per case x intervention x measured variable (the columns of
        :data:`monai_cft.report.EFFECTIVENESS_COLUMNS`) and the aggregated metrics.
    """
    from monai_cft.metrics import composition, frechet_distance, kernel_distance, locality, reversibility

    n, v_count = variables.shape
    if len(names) != v_count:
        raise ValueError(f"got {v_count} variables per case but {len(names)} names {list(names)}.")
    device = images.device
    segmentor.eval()
    channels = list(structures.values())
    k = len(regions)
    case_ids = list(case_ids) if case_ids is not None else [f"case_{i:04d}" for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lo = torch.tensor([ranges[nm][0] for nm in names], dtype=torch.float32)
    hi = torch.tensor([ranges[nm][1] for nm in names], dtype=torch.float32)
    targets = lo + (hi - lo) * torch.rand(n, v_count, generator=gen)  # (N, V): target of do(v) for case i
    cf_kwargs = {} if noise_temperature is None else {"noise_temperature": noise_temperature}
    if allow_extrapolation:
        cf_kwargs["allow_extrapolation"] = True

    rows: list[dict] = []
    local: list[float] = []
    factual_err = []
    real_feats, cf_feats = [], []
    comp: dict[int, list[float]] = {c: [] for c in composition_cycles}
    rev: list[float] = []
    iterator = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"evaluate {mode}".strip(), unit="batch", total=(n + batch_size - 1) // batch_size)
    for start in iterator:
        sl = slice(start, min(start + batch_size, n))
        x, pa = images[sl], variables[sl].to(device)
        measured_f = _measure(segmentor, x, region_masks, channels, element_size)
        factual_err.append((measured_f - pa.cpu()).abs())
        if feature_fn is not None:
            real_feats.append(feature_fn(x).float().cpu())
        for vi, vname in enumerate(names):
            t = targets[sl, vi].to(device)
            with torch.no_grad():
                out = scm.counterfactual(x, pa, {vname: t}, **cf_kwargs)
            x_cf, pa_cf = out["x_cf"], out["parents_cf"].float()
            meas = _measure(segmentor, x_cf, region_masks, channels, element_size)
            err = (meas - pa_cf.cpu()).abs()
            for b in range(x.shape[0]):
                i = start + b
                for mi, mname in enumerate(names):
                    rows.append({
                        "case_id": case_ids[i], "mode": mode, "intervened": vname, "target": float(targets[i, vi]),
                        "measured_variable": mname, "measured_structure": list(structures)[mi // k],
                        "measured_region": regions[mi % k], "is_intervened": int(mi == vi),
                        "cf_value": float(pa_cf[b, mi]), "measured_value": float(meas[b, mi]),
                        "abs_error": float(err[b, mi]),
                    })
            region = region_masks[vi % k]
            local.extend(locality(x, x_cf, region).cpu().tolist())
            if feature_fn is not None and vi == 0:
                cf_feats.append(feature_fn(x_cf).float().cpu())
        with torch.no_grad():
            c = composition(scm, x, pa, cycles=tuple(composition_cycles), variables=names, **cf_kwargs)
            for cyc in composition_cycles:
                comp[cyc].extend(c[cyc].cpu().tolist())
            vi = int(torch.randint(v_count, (1,), generator=gen))
            rev.extend(reversibility(scm, x, pa, {names[vi]: targets[sl, vi].to(device)}, variables=names,
                                     **cf_kwargs).cpu().tolist())

    fe = torch.cat(factual_err)
    metrics = {
        "mode": mode,
        "n_cases": n,
        "seed": seed,
        "variables": list(names),
        "structures": list(structures),
        "regions": list(regions),
        "factual_segmentor_error": {nm: _stats(fe[:, j].tolist()) for j, nm in enumerate(names)},
        "composition": {str(cyc): _stats(vals) for cyc, vals in comp.items()},
        "reversibility": _stats(rev),
        "locality": _stats(local),
    }
    if feature_fn is not None:
        # Counterfactuals are paired with their factual images (x_cf = x when nothing changes), and
        # paired samples bias both distances (KID's cross term gains the near-identical pairs and
        # goes negative). Compare real images of the even-indexed cases with counterfactuals of
        # the odd-indexed ones: two independent samples, as the estimators assume.
        real_all = torch.cat(real_feats)
        rf, cf, rf_other = real_all[0::2], torch.cat(cf_feats)[1::2], real_all[1::2]
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
    return rows, metrics


def _write_csv_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=EFFECTIVENESS_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class CounterfactualEvaluation:
    """Bundle entry point: evaluate one CFT mode on a split and write the results.

    Args:
        dscm_checkpoint: the (fine-tuned) DSCM checkpoint, e.g. ``models/dscm_cft_pos_seg.pt``.
        segmentor_checkpoint: the evaluation segmentor (``models/segmentor_eval.pt``).
        dataset_dir: a prepared sCPR folder (``python -m monai_cft.data.prepare``).
        out_dir: where ``effectiveness.csv``, ``metrics.json``, ``table1.md`` and the figure go.
        cft_mode: the mode being evaluated (checked against the checkpoint's meta).
        split: datalist split to evaluate (default ``"test"``).
        seed: fixes the intervention targets and sampling.
        max_cases: evaluate only the first cases of the split (None: all).
        figure_delta: the Fig. 1 intervention, mm^2 added to calcified plaque in each region.
        allow_extrapolation: evaluate cases whose factual values lie outside the training range
            (default: such a case is an error naming the variable and the range).
        device: torch device.
    """

    def __init__(
        self,
        dscm_checkpoint: str,
        segmentor_checkpoint: str,
        dataset_dir: str,
        out_dir: str,
        cft_mode: str,
        split: str = "test",
        seed: int = 0,
        max_cases: int | None = None,
        batch_size: int = 32,
        figure_delta: float = 20.0,
        noise_temperature: float | None = None,
        allow_extrapolation: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        self.dscm_checkpoint = Path(dscm_checkpoint)
        self.segmentor_checkpoint = Path(segmentor_checkpoint)
        self.dataset_dir = Path(dataset_dir)
        self.out_dir = Path(out_dir)
        self.cft_mode = cft_mode
        self.split = split
        self.seed = int(seed)
        self.max_cases = max_cases
        self.batch_size = int(batch_size)
        self.figure_delta = float(figure_delta)
        self.noise_temperature = noise_temperature
        self.allow_extrapolation = bool(allow_extrapolation)
        self.device = torch.device(device)

    def run(self) -> dict:
        """Evaluate and write the outputs; return the metrics dict."""
        from monai_cft.inference import load_segmentor
        from monai_cft.networks.dscm import DeepSCM
        from monai_cft.utils.checkpoint import load_checkpoint

        t0 = time.time()
        ckpt = load_checkpoint(self.dscm_checkpoint, expect={"kind": "dscm", "cft_mode": self.cft_mode})
        meta = ckpt["meta"]
        scm = DeepSCM.from_checkpoint(ckpt).to(self.device).eval()
        seg, seg_meta = load_segmentor(self.segmentor_checkpoint, expect={"role": "eval"}, return_meta=True)
        seg = seg.to(self.device)
        data = load_split_tensors(self.dataset_dir, self.split, max_cases=self.max_cases, device=self.device)
        cfg = data["config"]
        structures = dict(cfg["structures"])
        rows, metrics = evaluate_counterfactuals(
            scm, seg, data["images"], data["variables"], data["region_masks"],
            names=cfg["variables"], structures=structures, regions=cfg["regions"], ranges=cfg["ranges"],
            element_size=data["element_size"], case_ids=data["ids"], seed=self.seed, batch_size=self.batch_size,
            feature_fn=segmentor_features(seg), noise_temperature=self.noise_temperature,
            allow_extrapolation=self.allow_extrapolation, mode=self.cft_mode,
        )
        metrics.update({"preset": meta.get("preset"), "segmentor": seg_meta.get("arch", "?"),
                        "dscm_checkpoint": str(self.dscm_checkpoint), "split": self.split,
                        "seconds": time.time() - t0})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_csv_atomic(self.out_dir / "effectiveness.csv", rows)
        _write_json_atomic(self.out_dir / "metrics.json", metrics)
        self._figure(scm, seg, data, cfg)
        write_table1(self.out_dir.parent, ("none", "reg", "seg", "pos_seg"), list(structures), cfg["regions"],
                     self.out_dir / "table1.md")
        print(f"evaluation of mode {self.cft_mode} on {len(data['ids'])} {self.split} cases written to {self.out_dir} "
              f"in {time.time() - t0:.1f} s")
        return metrics

    def _figure(self, scm, seg, data, cfg) -> None:
        from monai_cft.visualize import save_fig1

        save_fig1(scm, seg, data, cfg, delta=self.figure_delta, mode=self.cft_mode,
                  path=self.out_dir / f"fig1_{self.cft_mode}.png", noise_temperature=self.noise_temperature)
