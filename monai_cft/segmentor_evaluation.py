"""Measurement quality on the test split: the segmentors' Dice and the HU-threshold calcium measure.

``python -m monai_cft.segmentor_evaluation --dataset-dir SCPR --ckpt-dir MODELS --out FILE.json``

* **Segmentors**: Dice per structure (per image and pooled, :func:`monai_cft.metrics.dice_per_structure`)
  of the guidance and the evaluation segmentor on the test split, and their area error per
  variable (mm^2) against the ground-truth labels.
* **Physics measure of calcium** (:class:`monai_cft.metrics.calcium.CalciumThreshold`): the HU
  threshold is fitted on the *training* cases against their labels, then its area error per region
  is measured on the test cases (real images). It is the calcium measure that brightening the
  lumen cannot fool.

The JSON is read by the report (``outputs/report.md``) and by the evaluation (which measures
counterfactuals with the fitted threshold).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from monai_cft.utils.io import save_json
from monai_cft.metrics.calcium import CalciumThreshold, calcium_areas
from monai_cft.metrics.effectiveness import measure_with_segmentor, segmentor_probabilities
from monai_cft.metrics.segmentation import dice_per_structure
from monai_cft.transforms.intensity import HUWindow
from monai_cft.transforms.regions import context_pixels
from monai_cft.utils.cli import run_cli

__all__ = ["load_split_arrays", "evaluate_segmentor", "evaluate_measurements", "main"]

#: file name of the measurement report inside the evaluation folder.
MEASUREMENTS_JSON = "measurements.json"


def load_split_arrays(dataset_dir: str | Path, split: str, max_cases: int | None = None) -> dict[str, Any]:
    """HU images (N, 1, H, W) float32, labels (N, 1, H, W) uint8, variables (N, V), region masks (K, H, W)."""
    from monai.transforms import LoadImage

    from monai_cft.data.dataset import load_prepare_config, load_scpr_datalist
    from monai_cft.transforms.regions import RegionMasks

    config = load_prepare_config(dataset_dir)
    items = load_scpr_datalist(dataset_dir, split)[: max_cases if max_cases else None]
    if not items:
        raise ValueError(f"split {split!r} of {str(dataset_dir)!r} has no labelled cases.")
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    images = torch.stack([torch.as_tensor(loader(it["image"])).float() for it in items])
    labels = torch.stack([torch.as_tensor(loader(it["label"])).round().to(torch.uint8) for it in items])
    masks = torch.as_tensor(RegionMasks(boundaries=config["boundaries"], names=config["regions"])(images[0])).float()
    return {
        "images": images,
        "labels": labels,
        "variables": torch.tensor([it["variables"] for it in items], dtype=torch.float64),
        "region_masks": masks,
        "ids": [it["id"] for it in items],
        "config": config,
    }


def evaluate_segmentor(segmentor: torch.nn.Module, data: dict[str, Any], batch_size: int = 32,
                       context: int | None = None) -> dict[str, Any]:
    """Dice per structure and area error per variable of one segmentor on loaded split arrays.

    ``context``: as the segmentor measures (None: whole images; an integer: each region on its own
    window with that many pixels of context, see :func:`~monai_cft.metrics.effectiveness.segmentor_probabilities`).
    """
    from monai_cft.transforms.measures import measure_structures

    config = data["config"]
    structures = dict(config["structures"])
    window = HUWindow(config["hu_window"])
    segmentor.eval()
    preds, areas = [], []
    element = float(config["spacing"]) ** (data["images"].ndim - 2)
    with torch.no_grad():
        for start in range(0, len(data["images"]), batch_size):
            x = window(data["images"][start : start + batch_size])
            probs = segmentor_probabilities(segmentor, x, data["region_masks"], context).cpu()
            preds.append(probs.argmax(1, keepdim=True).to(torch.uint8))
            areas.append(measure_structures(probs, data["region_masks"], list(structures.values()), element).flatten(1))
    pred = torch.cat(preds)
    err = (torch.cat(areas).double() - data["variables"]).abs()
    return {
        "dice": dice_per_structure(pred, data["labels"], structures),
        "area_mae_mm2": {nm: float(err[:, j].mean()) for j, nm in enumerate(config["variables"])},
    }


def _parent_sensitivity(dscm_path: Path, segmentor_path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Parent sensitivity of the pretrained DSCM (before any CFT) under the evaluation segmentor."""
    from monai_cft.networks.loading import load_segmentor
    from monai_cft.metrics.response import parent_sensitivity
    from monai_cft.networks.dscm import DeepSCM

    config = data["config"]
    scm = DeepSCM.from_checkpoint(dscm_path).eval()
    seg, meta = load_segmentor(segmentor_path, expect={"role": "eval"}, return_meta=True)
    context = context_pixels(meta.get("region_context_mm"), config["spacing"])
    channels = list(dict(config["structures"]).values())
    element = float(config["spacing"]) ** 2

    def measure(x: torch.Tensor) -> torch.Tensor:
        return measure_with_segmentor(seg, x, data["region_masks"], channels, element, context=context).flatten(1)

    images = HUWindow(config["hu_window"])(data["images"])
    torch.manual_seed(0)
    slopes = parent_sensitivity(scm, measure, images, data["variables"].float(), list(config["variables"]))
    # null where no slope is defined (fewer than 2 cases, or a variable without variation)
    slopes = {name: (v if math.isfinite(v) else None) for name, v in slopes.items()}
    return {"model": str(dscm_path), "slopes": slopes,
            "description": "response slope of the evaluation segmentor's change on the parent change when each test "
                           "case's latents are decoded with another case's parents (1: follows its parents, 0: "
                           "ignores them)"}


def evaluate_measurements(dataset_dir: str | Path, ckpt_dir: str | Path, out: str | Path,
                          roles: Sequence[str] = ("guidance", "eval"), split: str = "test",
                          raw_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate both segmentors and fit + test the calcium threshold; write and return the JSON.

    With ``raw_dir`` (a synthetic raw folder with ``params/``) the phantoms' rendered HU per class
    (:func:`monai_cft.data.fidelity.rendered_hu`) is measured too.
    """
    from monai_cft.networks.loading import load_segmentor

    t0 = time.time()
    test = load_split_arrays(dataset_dir, split)
    train = load_split_arrays(dataset_dir, "training")
    config = test["config"]
    result: dict[str, Any] = {"split": split, "n_cases": len(test["ids"]), "segmentors": {}}
    for role in roles:
        path = Path(ckpt_dir) / f"segmentor_{role}.pt"
        seg, meta = load_segmentor(path, expect={"role": role}, return_meta=True)
        context = context_pixels(meta.get("region_context_mm"), config["spacing"])
        result["segmentors"][role] = {"arch": meta.get("arch"), "region_context_mm": meta.get("region_context_mm"),
                                      **evaluate_segmentor(seg, test, context=context)}
    calcium_channel = list(config["structures"]).index("calcified")
    k = len(config["regions"])
    element = float(config["spacing"]) ** 2
    measure = CalciumThreshold.fit(train["images"], train["variables"][:, calcium_channel * k:(calcium_channel + 1) * k],
                                   train["region_masks"], element)
    test_areas = calcium_areas(test["images"], test["region_masks"], measure.threshold_hu, element)
    truth = test["variables"][:, calcium_channel * k:(calcium_channel + 1) * k]
    err = (test_areas.double() - truth).abs()
    result["calcium_threshold"] = {
        "threshold_hu": measure.threshold_hu,
        "fitted_on": f"training split ({len(train['ids'])} cases)",
        "train_mae_mm2": measure.train_mae,
        "test_mae_mm2": {config["regions"][r]: float(err[:, r].mean()) for r in range(k)},
        "test_bias_mm2": {config["regions"][r]: float((test_areas.double() - truth)[:, r].mean()) for r in range(k)},
    }
    dscm_path = Path(ckpt_dir) / "dscm.pt"
    if dscm_path.is_file():
        result["parent_sensitivity"] = _parent_sensitivity(dscm_path, Path(ckpt_dir) / "segmentor_eval.pt", test)
    if raw_dir is not None and (Path(raw_dir) / "params").is_dir():
        from monai_cft.data.fidelity import rendered_hu

        result["rendered_hu"] = rendered_hu(raw_dir, dataset_dir, split=split)
    result["seconds"] = time.time() - t0
    save_json(result, Path(out))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the measurement report of a trained pipeline."""
    parser = argparse.ArgumentParser(prog="python -m monai_cft.segmentor_evaluation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", required=True, help="prepared sCPR folder")
    parser.add_argument("--ckpt-dir", required=True, help="folder with segmentor_guidance.pt and segmentor_eval.pt")
    parser.add_argument("--out", required=True, help="output JSON")
    parser.add_argument("--split", default="test")
    parser.add_argument("--raw-dir", default=None, help="synthetic raw folder: also measure the rendered HU per class")
    args = parser.parse_args(argv)
    res = evaluate_measurements(args.dataset_dir, args.ckpt_dir, args.out, split=args.split, raw_dir=args.raw_dir)
    for role, r in res["segmentors"].items():
        d = r["dice"]
        print(f"segmentor {role} ({r['arch']}): Dice per image / pooled " + ", ".join(
            f"{nm} {v['per_image']:.3f} / {v['pooled']:.3f}" for nm, v in d.items()))
    c = res["calcium_threshold"]
    print(f"calcium threshold {c['threshold_hu']:.0f} HU: test MAE " + ", ".join(
        f"{r} {v:.2f}" for r, v in c["test_mae_mm2"].items()) + " mm^2")
    if "parent_sensitivity" in res:
        print("pretrained DSCM parent sensitivity (slope under shuffled parents): " + ", ".join(
            f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in res["parent_sensitivity"]["slopes"].items()))
    if "rendered_hu" in res:
        from monai_cft.data.fidelity import hu_table_markdown

        print(hu_table_markdown(res["rendered_hu"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
