"""Counterfactual evaluation of one (fine-tuned) deep SCM: Table 1, Fig. 1 and the other metrics.

Protocol (the positional paper's, Sec. 4): for every test case and every variable v (structure x
region) one intervention do(v := t) with t drawn uniformly from v's observed [min, max] on the
training split (seeded). The counterfactual x_cf is measured by the **evaluation segmentor**
(trained independently of the guidance segmentor: other seed and architecture) in every region;
the absolute error to the counterfactual parents is reported per region: in the intervened region
it shows whether the change happened, in the others whether the image stayed put.

Two baselines are measured the same way: the **identity** (the factual image taken as the
counterfactual: what doing nothing scores) and, when the ground-truth counterfactuals of the
synthetic phantoms are given (:mod:`monai_cft.data.ground_truth`, the same targets), the
**ground truth** (what a perfect counterfactual scores under this segmentor). Against them come the
response slopes, the gap closure, the pixel L1 to the ground truth and the HU-threshold measure of
calcium (``docs/metrics.md``).

:func:`evaluate_counterfactuals` works on loaded models and tensors; :class:`CounterfactualEvaluation`
is the bundle entry point (``evaluate.json``) that loads checkpoints and data and writes
``effectiveness.csv``, ``metrics.json``, ``table1.md`` and ``fig1_<mode>.png`` (and the baselines'
``../identity/effectiveness.csv`` and ``../ground_truth/effectiveness.csv``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from monai_cft.cft_curves import list_snapshots, snapshot_curves
from monai_cft.data.evaluation_data import load_ground_truth, load_split_tensors
from monai_cft.utils.io import save_csv, save_text
from monai_cft.constants import CFT_MODES, HU_WINDOW
from monai_cft.evaluation_core import evaluate_counterfactuals, segmentor_features
from monai_cft.report import EFFECTIVENESS_COLUMNS, write_table1
from monai_cft.transforms.regions import context_pixels
from monai_cft.utils.distributed import is_main_process

__all__ = [
    "evaluate_counterfactuals",
    "load_split_tensors",
    "load_ground_truth",
    "segmentor_features",
    "CounterfactualEvaluation",
]


def _write_effectiveness(path: Path, rows: list[dict]) -> None:
    # atomic, with a temporary name unique per call: the evaluations of several modes may write the
    # shared baseline files at once
    save_csv(EFFECTIVENESS_COLUMNS, [[r.get(c) for c in EFFECTIVENESS_COLUMNS] for r in rows], path)


class CounterfactualEvaluation:
    """Bundle entry point: evaluate one CFT mode on a split and write the results.

    Args:
        dscm_checkpoint: the (fine-tuned) DSCM checkpoint, e.g. ``models/dscm_cft_pos_seg.pt``.
        segmentor_checkpoint: the evaluation segmentor (``models/segmentor_eval.pt``).
        dataset_dir: a prepared sCPR folder (``python -m monai_cft.data.prepare``).
        out_dir: where ``effectiveness.csv``, ``metrics.json``, ``table1.md`` and the figure go; the
            baselines shared by all modes go to ``<out_dir>/../identity/`` and ``<out_dir>/../ground_truth/``.
        cft_mode: the mode being evaluated (checked against the checkpoint's meta).
        split: datalist split to evaluate (default ``"test"``).
        seed: fixes the intervention targets and sampling.
        max_cases: evaluate only the first cases of the split (None: all).
        figure_delta: the Fig. 1 intervention, mm^2 added to calcified plaque in each region.
        allow_extrapolation: evaluate cases whose factual values lie outside the training range
            (default: such a case is an error naming the variable and the range).
        ground_truth_path: ground-truth counterfactuals of the split (``.npz`` of
            ``python -m monai_cft.data.ground_truth``, same seed); a missing file is skipped with a warning.
        measurements_path: the measurement report of ``python -m monai_cft.segmentor_evaluation``; its
            fitted ``calcium_threshold.threshold_hu`` adds the physics measure of calcium. A missing
            file is skipped with a warning.
        snapshot_dir: the fine-tuning's weight snapshots (``<output_dir>/cft_state/cft_<mode>_snapshots``);
            when present, gap closure and slope against CFT updates are evaluated on the first
            ``curve_cases`` cases (:mod:`monai_cft.cft_curves`) into ``metrics["curves"]``.
        curve_cases: cases per curve point (0: no curves).
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
        ground_truth_path: str | None = None,
        measurements_path: str | None = None,
        snapshot_dir: str | None = None,
        curve_cases: int = 8,
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
        self.ground_truth_path = Path(ground_truth_path) if ground_truth_path else None
        self.measurements_path = Path(measurements_path) if measurements_path else None
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self.curve_cases = int(curve_cases)
        self.device = torch.device(device)

    @staticmethod
    def _optional_input(path: Path | None, what: str, make: str) -> bool:
        """Whether the optional input ``path`` is there; say once how to make it when it was asked for but is not."""
        if path is None:
            return False
        if not path.is_file():
            print(f"warning: no {what} {path}, evaluating without it (make it with `{make}`)")
            return False
        return True

    def _ground_truth(self, case_ids: Sequence[str], names: Sequence[str]) -> dict | None:
        make = (f"python -m monai_cft.data.ground_truth --raw RAW --scpr {self.dataset_dir} --split {self.split} "
                f"--seed {self.seed}")
        if not self._optional_input(self.ground_truth_path, "ground truth", make):
            return None
        return load_ground_truth(self.ground_truth_path, case_ids, names)

    def _calcium_threshold(self) -> float | None:
        make = (f"python -m monai_cft.segmentor_evaluation --dataset-dir {self.dataset_dir} "
                f"--ckpt-dir {self.segmentor_checkpoint.parent} --out {self.measurements_path}")
        if not self._optional_input(self.measurements_path, "measurement report (the calcium threshold)", make):
            return None
        report = json.loads(self.measurements_path.read_text())
        try:
            return float(report["calcium_threshold"]["threshold_hu"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.measurements_path} has no numeric calcium_threshold.threshold_hu "
                             f"(keys: {sorted(report) if isinstance(report, dict) else type(report).__name__}).") from e

    def run(self) -> dict:
        """Evaluate and write the outputs; return the metrics dict."""
        from monai_cft.networks.loading import load_segmentor
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
        ground_truth = self._ground_truth(data["ids"], cfg["variables"])
        threshold = self._calcium_threshold()
        spacing = float(data["element_size"]) ** (1.0 / (data["images"].ndim - 2))
        context = context_pixels(seg_meta.get("region_context_mm"), spacing)
        rows, metrics = evaluate_counterfactuals(
            scm, seg, data["images"], data["variables"], data["region_masks"],
            names=cfg["variables"], structures=structures, regions=cfg["regions"], ranges=cfg["ranges"],
            element_size=data["element_size"], case_ids=data["ids"], seed=self.seed, batch_size=self.batch_size,
            feature_fn=segmentor_features(seg), noise_temperature=self.noise_temperature,
            allow_extrapolation=self.allow_extrapolation, mode=self.cft_mode,
            ground_truth=ground_truth, hu_window=cfg.get("hu_window", HU_WINDOW), calcium_threshold_hu=threshold,
            include_identity_rows=True, include_ground_truth_rows=True, segmentor_context=context,
        )
        snapshots = list_snapshots(self.snapshot_dir)
        if snapshots and self.curve_cases > 0:
            metrics["curves"] = snapshot_curves(
                scm, snapshots, evaluate_counterfactuals, data["images"], data["variables"], ground_truth,
                self.curve_cases, self.cft_mode, segmentor=seg, region_masks=data["region_masks"],
                names=cfg["variables"], structures=structures, regions=cfg["regions"], ranges=cfg["ranges"],
                element_size=data["element_size"], seed=self.seed, batch_size=self.batch_size,
                noise_temperature=self.noise_temperature, allow_extrapolation=self.allow_extrapolation,
                hu_window=cfg.get("hu_window", HU_WINDOW), segmentor_context=context,
            )
        if not is_main_process():  # data-parallel: every process has the metrics, rank 0 writes them
            return metrics
        metrics.update({"preset": meta.get("preset"), "segmentor": seg_meta.get("arch", "?"),
                        "dscm_checkpoint": str(self.dscm_checkpoint), "split": self.split,
                        "ground_truth_path": str(self.ground_truth_path) if ground_truth is not None else None,
                        "measurements_path": str(self.measurements_path) if threshold is not None else None,
                        "figure": {"delta": self.figure_delta, "structure": "calcified"},
                        "seconds": time.time() - t0})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        by_mode: dict[str, list[dict]] = {}
        for r in rows:
            by_mode.setdefault(r["mode"], []).append(r)
        _write_effectiveness(self.out_dir / "effectiveness.csv", by_mode.get(self.cft_mode, []))
        # the baselines do not depend on the model (same targets, same segmentor): shared by all modes
        for ref in ("identity", "ground_truth"):
            if ref in by_mode:
                _write_effectiveness(self.out_dir.parent / ref / "effectiveness.csv", by_mode[ref])
        save_text(json.dumps(metrics, indent=2), self.out_dir / "metrics.json")  # NaN kept: "not defined"
        self._figure(scm, seg, data, cfg, context)
        write_table1(self.out_dir.parent, CFT_MODES, list(structures), cfg["regions"],
                     self.out_dir / "table1.md")
        print(f"evaluation of mode {self.cft_mode} on {len(data['ids'])} {self.split} cases written to {self.out_dir} "
              f"in {time.time() - t0:.1f} s")
        return metrics

    def _figure(self, scm, seg, data, cfg, context: int | None) -> None:
        from monai_cft.visualize import save_fig1

        save_fig1(scm, seg, data, cfg, delta=self.figure_delta, mode=self.cft_mode,
                  path=self.out_dir / f"fig1_{self.cft_mode}.png", noise_temperature=self.noise_temperature,
                  segmentor_context=context)
