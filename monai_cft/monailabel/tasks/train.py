"""``segmentation`` train task: fine-tune the guidance segmentor on the datastore's final labels."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.tasks.train import TrainTask

from monai_cft.monailabel.inputs import RequestError, get_int, load_nifti, load_scpr
from monai_cft.monailabel.models import ModelStore
from monai_cft.monailabel.tasks.base import check_spacing, scpr_spacing

__all__ = ["FinetuneSegmentor"]


def _dice(logits: torch.Tensor, labels: torch.Tensor, values: list[int]) -> float:
    """Mean hard Dice over the structures (each structure absent from both counts as 1)."""
    pred = logits.argmax(1)
    scores = []
    for v in values:
        p, t = pred == v, labels == v
        denom = float(p.sum() + t.sum())
        scores.append(1.0 if denom == 0 else 2.0 * float((p & t).sum()) / denom)
    return float(np.mean(scores))


class FinetuneSegmentor(TrainTask):
    """Fine-tune the segmentor on the images of the datastore that have a ``final`` label.

    Starts from the previous fine-tuned segmentor (``<workspace>/segmentor_finetuned.pt``) or the
    guidance segmentor, trains with Dice + cross-entropy (``monai.losses.DiceCELoss``) and AdamW on
    the images in HU scaled like the pipeline's (HU window -> [-1, 1]), and writes the result
    atomically to ``<workspace>/segmentor_finetuned.pt`` with the original meta (plus
    ``role: "monailabel"``); the segmentation task picks it up at its next request. The guidance
    segmentor used by counterfactuals and scoring is never changed.

    Params: ``max_epochs`` (1-1000, default 10), ``lr`` (default 1e-4), ``batch_size`` (1-256, default 8).
    The result has the loss of each epoch and the mean structure Dice on the labelled images before
    and after. Progress goes to ``<workspace>/train_stats.json`` (``epoch``, ``total_epochs``,
    ``best_metric`` = that Dice, ``total_time`` once finished), which :meth:`stats` returns in the
    server's ``/info/`` (``train_stats``): 3D Slicer's progress and accuracy bars read it while a
    background training runs in its own process.

    Example (server running, ``docs/monailabel.md``)::

        curl -X POST "$S/train/segmentation?run_sync=true" -H "Content-Type: application/json" -d '{"max_epochs": 2}'
    """

    def __init__(self, store: ModelStore) -> None:
        super().__init__("Fine-tune the lumen / plaque segmentor on the datastore's final labels")
        self.store = store

    def config(self) -> dict[str, Any]:
        return {"max_epochs": 10, "lr": 1e-4, "batch_size": 8}

    @property
    def stats_path(self):
        return self.store.workspace / "train_stats.json"

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.stats_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _lr(self, request: dict) -> float:
        value = request.get("lr", 1e-4)
        try:
            lr = float(value)
        except (TypeError, ValueError):
            raise RequestError(f"parameter 'lr' must be a number, got {value!r}.") from None
        if not 0.0 < lr <= 1.0:
            raise RequestError(f"parameter 'lr' = {lr} is outside (0, 1].")
        return lr

    def _data(self, datastore: Any, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
        from monai_cft.constants import HU_WINDOW
        from monai_cft.transforms.intensity import HUWindow

        items = datastore.datalist()
        if not items:
            raise RequestError("no image in the datastore has a final label; save labels with "
                               "PUT /datastore/label?image=<id>&tag=final first.")
        allowed = [0, *(int(v) for v in meta["structures"].values())]
        images, labels = [], []
        for item in items:
            hu, affine = load_scpr(item["image"], meta["img_size"])
            check_spacing(affine, scpr_spacing(meta), str(item["image"]))
            label, _ = load_nifti(item["label"], "label")
            label = label[:, :, 0] if label.ndim == 3 and label.shape[2] == 1 else label
            if label.shape != hu.shape:
                raise RequestError(f"label {item['label']!r} has shape {label.shape}, its image {hu.shape}.")
            bad = sorted(set(np.unique(label).astype(int).tolist()) - set(allowed))
            if bad:
                raise RequestError(f"label {item['label']!r} holds values {bad}; expected {allowed}.")
            images.append(hu)
            labels.append(label)
        x = HUWindow(meta.get("hu_window") or HU_WINDOW)(torch.as_tensor(np.stack(images))[:, None])
        return x, torch.as_tensor(np.stack(labels)).long()[:, None]

    def __call__(self, request: dict[str, Any], datastore: Any) -> dict[str, Any]:
        from monai.losses import DiceCELoss

        from monai_cft.utils.io import save_json
        from monai_cft.utils.checkpoint import save_checkpoint

        epochs = get_int(request, "max_epochs", 10, 1, 1000)
        batch = get_int(request, "batch_size", 8, 1, 256)
        lr = self._lr(request)
        start_net, meta = self.store.segmentor(finetuned=True)
        x, y = self._data(datastore, meta)
        values = [int(v) for v in meta["structures"].values()]
        net = copy.deepcopy(start_net).train()
        device = next(net.parameters()).device
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            dice_before = _dice(net.eval()(x), y[:, 0], values)
        net.train()
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(0)
        losses, begin = [], time.time()
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            total = 0.0
            for i in range(0, len(x), batch):
                idx = order[i : i + batch]
                optimizer.zero_grad()
                loss = loss_fn(net(x[idx]), y[idx])
                loss.backward()
                optimizer.step()
                total += float(loss) * len(idx)
            losses.append(total / len(x))
            save_json({"epoch": epoch + 1, "total_epochs": epochs, "best_metric": dice_before, "loss": losses},
                      self.stats_path)
        net.eval()
        with torch.no_grad():
            dice_after = _dice(net(x), y[:, 0], values)
        if not all(np.isfinite(losses)):
            raise RuntimeError(f"fine-tuning diverged (losses {losses}); nothing was saved.")
        out_meta = {k: v for k, v in meta.items() if k != "path"}
        out_meta.update(role="monailabel", finetuned_from=str(meta["path"]), finetune_epochs=epochs,
                        finetune_images=len(x))
        path = save_checkpoint(self.store.finetuned_segmentor_path, net, out_meta)
        seconds = round(time.time() - begin, 2)
        save_json({"epoch": epochs, "total_epochs": epochs, "best_metric": dice_after, "loss": losses,
                   "total_time": seconds, "model": str(path)}, self.stats_path)
        return {
            "model": str(path),
            "images": len(x),
            "epochs": epochs,
            "loss": losses,
            "dice_before": dice_before,
            "dice_after": dice_after,
            "seconds": seconds,
        }
