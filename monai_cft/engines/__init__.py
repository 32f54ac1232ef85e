"""monai-cft engines: Ignite/MONAI trainers, evaluators and handlers.

- :mod:`monai_cft.engines.common`: EMA, gradient clipping / skipping, LR warm-up, bf16 autocast,
  ``PrepareBatchKeys``.
- :mod:`monai_cft.engines.dscm_trainer`: ``DSCMTrainer`` and ``DSCMEvaluator`` (likelihood training
  of the deep structural causal model).
- :mod:`monai_cft.engines.handlers`: ``CheckpointWriter`` and ``DSCMImageLogger``.
- :mod:`monai_cft.engines.cft_trainer`: counterfactual fine-tuning.

Names are imported lazily (``from monai_cft.engines import DSCMTrainer`` loads only what it needs).
"""

from __future__ import annotations

from monai_cft.utils.lazy import lazy_exports

_EXPORTS = {
    "ModelEMA": "common",
    "clip_and_check": "common",
    "step_or_skip": "common",
    "linear_warmup": "common",
    "autocast": "common",
    "PrepareBatchKeys": "common",
    "lower_is_better": "common",
    "DSCMTrainer": "dscm_trainer",
    "DSCMEvaluator": "dscm_trainer",
    "SampleMean": "dscm_trainer",
    "CheckpointWriter": "handlers",
    "DSCMImageLogger": "handlers",
    "CFTTrainer": "cft_trainer",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
