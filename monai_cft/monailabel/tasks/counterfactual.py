"""``counterfactual``: an sCPR image and an intervention -> the counterfactual image, its difference
map, its uncertainty map, and the intended and measured values of every region."""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferType

from monai_cft.monailabel.inputs import RequestError, file_shape, get_int, load_scpr, parse_params
from monai_cft.monailabel.models import ModelStore
from monai_cft.monailabel.tasks.base import CFTInferTask, check_spacing

__all__ = ["CounterfactualTask", "OUTPUT_MAPS", "MAX_PARTICLES"]

#: the images one request can return (``params["output_map"]``).
OUTPUT_MAPS: tuple[str, ...] = ("counterfactual", "difference", "uncertainty")
#: most posterior samples per counterfactual one request may ask for (CPU time).
MAX_PARTICLES = 64
_CACHE_SIZE = 4


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RequestError(f"parameter {key!r} must be true or false, got {value!r}.")


class CounterfactualTask(CFTInferTask):
    """Counterfactual of an sCPR image under an intervention on its regional plaque / lumen areas.

    Params (the ``/infer`` form field ``params``, JSON):

    * ``intervention`` (required): ``{variable: value}``; a number is an absolute target in mm^2, a
      string ``"+20"`` / ``"-5"`` a change from the factual value. Targets outside the range the
      model was trained on are refused unless ``allow_extrapolation`` is true.
    * ``mode``: the CFT mode of the DSCM (``none``, ``reg``, ``seg``, ``pos_seg``; default
      ``pos_seg`` when its model exists).
    * ``particles``: posterior samples averaged (1 to 64, default 1); > 1 also gives the uncertainty map.
    * ``output_map``: which image the answer carries: ``counterfactual`` (default), ``difference``
      or ``uncertainty``. A result is cached, so asking for the other maps of the same request
      (same image and params) returns the maps of the same counterfactual.
    * ``seed`` (default 0): seeds the posterior sampling, so that a request is reproducible.

    Output: an (H, W) float32 NIfTI with the input's affine: the counterfactual in HU (the network's
    [-1, 1] scaling undone), the difference (counterfactual - factual, HU) or the standard deviation
    over particles (HU). JSON: ``mode``, ``particles``, ``intervention`` (absolute targets), and per
    variable ``factual`` (measured on the input by the guidance segmentor), ``intended`` (the
    counterfactual parents of the DSCM) and ``measured`` (the guidance segmentor on the
    counterfactual), all mm^2; ``change`` (measured - factual) for the intervened variables.
    Nothing is written to the datastore: a generated image is never a label.

    Example (server running, ``docs/monailabel.md``)::

        curl -X POST "$S/infer/counterfactual?image=scpr_0007&output=json" \\
            -F 'params={"intervention": {"calcified_mid": "+10"}, "mode": "pos_seg"}'
    """

    def __init__(self, store: ModelStore, default_mode: str) -> None:
        super().__init__(store, InferType.OTHERS, None,
                         "Counterfactual sCPR image under an intervention on regional plaque / lumen areas",
                         dimension=2, config={"mode": default_mode, "particles": 1, "output_map": "counterfactual",
                                              "seed": 0, "allow_extrapolation": False})
        self.default_mode = default_mode
        self._results: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, data: dict) -> dict:
        modes = self.store.available_modes()
        mode = data.get("mode", self.default_mode)
        if mode not in modes:
            raise RequestError(f"unknown or unavailable mode {mode!r}; the model folder has the modes {modes}.")
        intervention = data.get("intervention")
        if intervention is None or intervention == "" or intervention == {}:
            raise RequestError('params must give an "intervention", e.g. {"intervention": {"calcified_mid": "+10"}}.')
        data["intervention"] = parse_params(intervention, "intervention")
        data["particles"] = get_int(data, "particles", 1, 1, MAX_PARTICLES)
        data["seed"] = get_int(data, "seed", 0, 0, 2**31 - 1)
        data["allow_extrapolation"] = _flag(data.get("allow_extrapolation", False), "allow_extrapolation")
        if data.get("output_map", "counterfactual") not in OUTPUT_MAPS:
            raise RequestError(f"unknown output_map {data.get('output_map')!r}; valid maps are {list(OUTPUT_MAPS)}.")
        if data.get("output_map") == "uncertainty" and data["particles"] < 2:
            raise RequestError("output_map 'uncertainty' needs particles > 1 (the spread over posterior samples).")
        pipe = self.store.pipeline(mode)
        data["mode"] = mode
        data["scpr"], data["scpr_affine"] = load_scpr(data.get("image"), pipe.img_size)
        check_spacing(data["scpr_affine"], pipe.spacing, str(data.get("image")))
        return data

    def _key(self, data: dict) -> str:
        path = str(data.get("image"))
        stamp = os.stat(path).st_mtime_ns if os.path.isfile(path) else 0
        fields = {k: data[k] for k in ("mode", "particles", "seed", "allow_extrapolation", "intervention")}
        return json.dumps([path, stamp, fields], sort_keys=True, default=str)

    def _compute(self, data: dict) -> dict:
        pipe = self.store.pipeline(data["mode"])
        pipe.num_particles = data["particles"]
        torch.manual_seed(data["seed"])
        try:
            out = pipe(torch.as_tensor(data["scpr"])[None], None, data["intervention"],
                       allow_extrapolation=data["allow_extrapolation"])
        except ValueError as err:  # unknown variable, target out of range, factual values out of range
            raise RequestError(str(err)) from None
        maps = {k: getattr(out, k)[0].detach().cpu().numpy().astype(np.float32)
                for k in OUTPUT_MAPS if getattr(out, k) is not None}
        intervened = list(out.intervention)
        result = {
            "mode": data["mode"],
            "particles": data["particles"],
            "seed": data["seed"],
            "intervention": out.intervention,
            "variables": {
                k: {"factual": out.measured_factual[k], "intended": out.intended[k], "measured": out.measured[k]}
                for k in pipe.variables
            },
            "change": {k: out.measured[k] - out.measured_factual[k] for k in intervened},
            "maps": [k for k in OUTPUT_MAPS if k in maps],
            "difference_max_abs_hu": float(np.abs(maps["difference"]).max()),
            "units": {"variables": "mm^2", "image": "HU"},
        }
        return {"maps": maps, "result": result}

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict:
        key = self._key(data)
        with self._lock:
            hit = self._results.get(key)
            if hit is None:
                hit = self._compute(data)
                self._results[key] = hit
                while len(self._results) > _CACHE_SIZE:
                    self._results.popitem(last=False)
            self._results.move_to_end(key)
        which = data.get("output_map", "counterfactual")
        data["pred"], data["pred_affine"], data["pred_dtype"] = hit["maps"][which], data["scpr_affine"], np.float32
        data["pred_shape"] = file_shape(data["image"])
        data["result"] = dict(hit["result"], output_map=which)
        return data
