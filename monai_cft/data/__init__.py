"""monai-cft data: synthetic coronary CCTA phantoms, file IO and the sCPR preparation pipeline.

Command-line entry points (``python -m monai_cft.data <command> ...`` or the modules directly)::

    python -m monai_cft.data.synthetic --out RAW --num-cases 1000 --seed 0
    python -m monai_cft.data.datalist  --data-dir RAW          # datalist for a user's own data
    python -m monai_cft.data.prepare   --data-dir RAW --out SCPR --preset quick
    python -m monai_cft.data.ground_truth --raw RAW --scpr SCPR --split test   # evaluation only

Public names are imported lazily (``from monai_cft.data import render_phantom``) so that importing
one module does not pull in the others' dependencies.
"""

from __future__ import annotations

from monai_cft.utils.lazy import lazy_exports

_EXPORTS = {
    "atomic_path": "io",
    "save_nifti": "io",
    "save_json": "io",
    "save_csv": "io",
    "load_centerline": "io",
    "save_centerline": "io",
    "load_datalist": "io",
    "PhantomConfig": "phantom",
    "PhantomCase": "phantom",
    "sample_phantom_params": "phantom",
    "render_phantom": "phantom",
    "ground_truth_counterfactual": "ground_truth",
    "render_scpr": "ground_truth",
    "rendered_hu": "fidelity",
    "generate_dataset": "synthetic",
    "make_datalist": "datalist",
    "split_ids": "datalist",
    "SCPR_PRESETS": "presets",
    "HU_WINDOW": "presets",
    "get_scpr_preset": "presets",
    "build_prepare_transform": "prepare",
    "prepare_dataset": "prepare",
    "load_scpr_datalist": "dataset",
    "load_prepare_config": "dataset",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
