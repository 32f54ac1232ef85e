"""Segmentation quality of the guidance and evaluation segmentors: Dice per structure.

Two Dice summaries of one structure over a set of images are reported, because plaques are absent
from many images:

* ``per_image``: the mean of the per-image Dice over the images whose ground truth contains the
  structure (MONAI's ``DiceMetric`` with ``ignore_empty=True``); images where the structure is
  absent are left out (they are counted in ``false_positive_images`` when the prediction has it).
* ``pooled``: ``2 |P and G| / (|P| + |G|)`` with the pixels of all images pooled (the Dice of the
  whole split as one image), insensitive to tiny structures in single images.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["dice_per_structure"]


def dice_per_structure(pred: torch.Tensor, label: torch.Tensor, structures: Mapping[str, int]) -> dict[str, dict]:
    """Dice of each structure between predicted and ground-truth label maps.

    Args:
        pred: (N, *spatial) or (N, 1, *spatial) integer label maps (argmax of the segmentor).
        label: ground truth of the same shape.
        structures: name -> label value (e.g. ``{"lumen": 1, "calcified": 2, "noncalcified": 3}``).

    Returns:
        ``{name: {"per_image": float, "pooled": float, "n_images": int, "false_positive_images": int}}``;
        ``per_image`` is NaN when no image contains the structure.
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but label has {tuple(label.shape)}.")
    if pred.ndim < 2:
        raise ValueError(f"pred and label must be (N, *spatial), got shape {tuple(pred.shape)}.")
    n = pred.shape[0]
    p_all, g_all = pred.reshape(n, -1), label.reshape(n, -1)
    out: dict[str, dict] = {}
    for name, value in structures.items():
        p, g = p_all == int(value), g_all == int(value)
        inter = (p & g).sum(1).double()
        size_p, size_g = p.sum(1).double(), g.sum(1).double()
        present = size_g > 0
        per_image = 2.0 * inter[present] / (size_p[present] + size_g[present])
        denom = float(size_p.sum() + size_g.sum())
        out[name] = {
            "per_image": float(per_image.mean()) if present.any() else float("nan"),
            "pooled": 2.0 * float(inter.sum()) / denom if denom > 0 else float("nan"),
            "n_images": int(present.sum()),
            "false_positive_images": int(((~present) & (size_p > 0)).sum()),
        }
    return out
