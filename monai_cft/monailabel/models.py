"""The trained models the MONAI Label app serves, found in the main job's model folder.

``python -m monai_cft.pipeline`` writes them to ``outputs/models`` (``--output-dir``/models):

* ``segmentor_guidance.pt``: the guidance segmentor (UNet, (B, 1, H, W) in [-1, 1] -> (B, 4, H, W)
  logits); used by straighten, segmentation, scoring and counterfactual;
* ``dscm_cft_<mode>.pt``: the deep SCM fine-tuned in ``<mode>`` (``none``, ``reg``, ``seg``,
  ``pos_seg``); used by counterfactual.

The train task writes ``segmentor_finetuned.pt`` (the guidance segmentor fine-tuned on the
datastore's labels) into the workspace folder; the segmentation task uses it once it exists. The
counterfactual and scoring tasks keep the guidance segmentor: it is the one the DSCM was fine-tuned
with and the one the pipeline's measurements are defined by.

This module does not import MONAI Label: it only finds, checks and loads checkpoints.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai_cft.constants import CFT_MODES

__all__ = [
    "GUIDANCE_SEGMENTOR",
    "FINETUNED_SEGMENTOR",
    "MissingModelError",
    "default_models_dir",
    "dscm_file",
    "ModelStore",
]

GUIDANCE_SEGMENTOR = "segmentor_guidance.pt"
FINETUNED_SEGMENTOR = "segmentor_finetuned.pt"
#: the command that writes every file of the model folder (the main job).
MAKE_MODELS = "python -m monai_cft.pipeline"


class MissingModelError(FileNotFoundError):
    """A model file the app needs does not exist; the message names it and the command that makes it."""


def default_models_dir() -> Path:
    """``outputs/models`` next to the ``monai_cft`` package (the checkout's): where
    ``python -m monai_cft.pipeline`` writes its models when ``--output-dir`` is not given."""
    import monai_cft

    return Path(monai_cft.__file__).resolve().parent.parent / "outputs" / "models"


def dscm_file(mode: str) -> str:
    """File name of the DSCM fine-tuned in ``mode``."""
    return f"dscm_cft_{mode}.pt"


def _stage_for(name: str) -> str:
    if name == GUIDANCE_SEGMENTOR:
        return "segmentor_guidance"
    return "finetune_" + name[len("dscm_cft_") : -len(".pt")]


class ModelStore:
    """Finds the app's checkpoints and keeps the loaded networks, reloading a file that changed.

    Args:
        models_dir: the main job's model folder (``outputs/models``).
        workspace: where the train task writes ``segmentor_finetuned.pt`` (default
            ``<models_dir>/monailabel``).
        device: torch device of the networks (``"cpu"``, ``"cuda"``).

    Example::

        store = ModelStore("outputs/models")
        store.require([GUIDANCE_SEGMENTOR])     # MissingModelError naming the command otherwise
        segmentor, meta = store.segmentor()     # eval mode, logits (B, 4, H, W)
    """

    def __init__(self, models_dir: str | os.PathLike, workspace: str | os.PathLike | None = None,
                 device: str = "cpu") -> None:
        self.models_dir = Path(models_dir).expanduser().resolve()
        self.workspace = Path(workspace).expanduser().resolve() if workspace else self.models_dir / "monailabel"
        self.device = str(device)
        self._cache: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ files
    def path(self, name: str) -> Path:
        return self.models_dir / name

    def missing(self, names: Sequence[str]) -> list[Path]:
        return [self.path(n) for n in names if not self.path(n).is_file()]

    def require(self, names: Sequence[str]) -> None:
        """Raise :class:`MissingModelError` for the first missing file of ``names``."""
        for path in self.missing(names):
            out = f"--output-dir {path.parent.parent}" if path.parent.name == "models" else "--output-dir OUT"
            where = "" if path.parent.name == "models" else " (it writes OUT/models; pass --models OUT/models)"
            raise MissingModelError(
                f"model file {str(path)!r} does not exist; it is written by the main job "
                f"`{MAKE_MODELS} {out}`{where}, stage {_stage_for(path.name)}."
            )

    def available_modes(self) -> list[str]:
        """The CFT modes whose fine-tuned DSCM is in the model folder."""
        return [m for m in CFT_MODES if self.path(dscm_file(m)).is_file()]

    @property
    def finetuned_segmentor_path(self) -> Path:
        return self.workspace / FINETUNED_SEGMENTOR

    # ------------------------------------------------------------------ loading
    def _cached(self, key: Any, paths: Sequence[Path], load: Callable[[], Any]) -> Any:
        """``load()`` once per modification time of ``paths`` (the train task may rewrite a file)."""
        stamp = tuple(p.stat().st_mtime_ns for p in paths)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
            value = load()
            self._cache[key] = (stamp, value)
            return value

    def segmentor(self, finetuned: bool = False) -> tuple[Any, dict]:
        """The guidance segmentor (or, with ``finetuned`` and once it exists, the train task's) and its meta."""
        from monai_cft.networks.loading import load_segmentor

        path = self.finetuned_segmentor_path if finetuned and self.finetuned_segmentor_path.is_file() else None
        if path is None:
            self.require([GUIDANCE_SEGMENTOR])
            path = self.path(GUIDANCE_SEGMENTOR)

        def load():
            net, meta = load_segmentor(path, {"kind": "segmentor"}, return_meta=True)
            return net.to(self.device).eval(), dict(meta, path=str(path))

        return self._cached(("segmentor", str(path)), [path], load)

    def pipeline(self, mode: str) -> Any:
        """The :class:`~monai_cft.inference.CounterfactualPipeline` of the DSCM fine-tuned in ``mode``
        (one per mode; callers set its ``num_particles`` per request)."""
        from monai_cft.inference import CounterfactualPipeline
        from monai_cft.utils.checkpoint import load_checkpoint

        if mode not in CFT_MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes are {list(CFT_MODES)}.")
        names = [dscm_file(mode), GUIDANCE_SEGMENTOR]
        self.require(names)
        paths = [self.path(n) for n in names]

        def load():
            preset = load_checkpoint(paths[0])["meta"].get("preset", "quick")
            return CounterfactualPipeline.from_bundle(
                mode=mode, ckpt_dir=str(self.models_dir), preset=preset, device=self.device,
            )

        return self._cached(("pipeline", mode), paths, load)
