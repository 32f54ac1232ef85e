"""Counterfactual inference over a list of cases as a MONAI evaluator (``inference.json``'s ``evaluator``).

- :func:`inference_items`: the cases of a run, from the command line's single case (``--image``,
  ``--intervention``, ...) or from a JSON list of cases (``--datalist cases.json``).
- :class:`CounterfactualInferer`: how the network is applied to one case (MONAI's ``Inferer``
  interface): ``inferer(case, pipeline)`` runs :class:`~monai_cft.inference.CounterfactualPipeline`
  on the case's image, variables, intervention and centreline.
- :class:`CounterfactualInferenceEngine`: a ``monai.engines.Evaluator`` that iterates the cases,
  applies the inferer and saves each result (``<name>_cf.nii.gz``, ``_diff``, ``_panel.png``,
  ``_values.json``), so the bundle has the dataset / evaluator / inferer / network_def of MONAI's
  inference properties and runs one or many cases the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines import Evaluator
from monai.inferers import Inferer

from monai_cft.inference_cases import load_case
from monai_cft.inference_output import save_result
from monai_cft.utils.io import check_file_name, read_json

__all__ = ["inference_items", "CounterfactualInferer", "CounterfactualInferenceEngine"]

_CASE_KEYS = ("image", "intervention", "variables", "centerline", "name")


def inference_items(image: Any = "", intervention: Any = None, variables: Any = None, centerline: Any = None,
                    name: str = "case", datalist: str | os.PathLike | Sequence[Mapping] | None = None) -> list[dict]:
    """The cases of an inference run: ``datalist`` if given, else the single case of the other arguments.

    Args:
        image, intervention, variables, centerline, name: one case (``--image`` etc. of ``inference.json``).
        datalist: a JSON file (or a list) of cases, each ``{"image": path, "intervention": {...}}`` with
            optional ``"variables"``, ``"centerline"`` and ``"name"`` (default: the image file's stem);
            relative paths are taken from the JSON file's folder.

    Raises:
        ValueError: no image, an unknown key, a case without an intervention, or two cases with one name.
    """
    if datalist is None or datalist == "":
        if image is None or (isinstance(image, str) and not image):
            raise ValueError("no input image given: pass --image <path to an sCPR or a 3D NIfTI volume> "
                             "(or --datalist <JSON list of cases>).")
        return [{"image": image, "intervention": intervention, "variables": variables, "centerline": centerline,
                 "name": name}]
    root = Path(".")
    if isinstance(datalist, (str, os.PathLike)):
        path = Path(datalist)
        cases = read_json(path, "inference datalist")
        root = path.parent
    else:
        cases = datalist
    if not isinstance(cases, list) or not cases:
        raise ValueError(f"the inference datalist must be a non-empty JSON list of cases, got {type(cases).__name__}.")
    items, names = [], set()
    for i, case in enumerate(cases):
        if not isinstance(case, Mapping) or "image" not in case or "intervention" not in case:
            raise ValueError(f"inference case [{i}] must be an object with 'image' and 'intervention', got {case!r}.")
        unknown = sorted(set(case) - set(_CASE_KEYS))
        if unknown:
            raise ValueError(f"inference case [{i}] has unknown key(s) {unknown}; valid keys are {list(_CASE_KEYS)}.")

        def local(p: Any) -> Any:
            return str(root / p) if isinstance(p, str) and p and not os.path.isabs(p) else p

        name_i = check_file_name(case.get("name") or Path(str(case["image"])).name.split(".")[0], f"case [{i}] name")
        if name_i in names:
            raise ValueError(f"inference case [{i}]: the name {name_i!r} is used twice (outputs would overwrite).")
        names.add(name_i)
        items.append({"image": local(case["image"]), "intervention": case["intervention"],
                      "variables": case.get("variables"), "centerline": local(case.get("centerline")),
                      "name": name_i})
    return items


class CounterfactualInferer(Inferer):
    """Apply a :class:`~monai_cft.inference.CounterfactualPipeline` to one case.

    ``inferer(case, pipeline)`` with ``case`` a dict of :func:`inference_items` loads the case at the
    pipeline's geometry (:func:`~monai_cft.inference_cases.load_case`: an sCPR, or a 3D volume
    straightened along its centreline) and returns ``(result, volume)``: the pipeline's
    :class:`~monai_cft.inference.CounterfactualResult` and the volume the sCPR came from (``None`` for
    an sCPR case).
    """

    def __call__(self, inputs: Mapping[str, Any], network: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        case = load_case(inputs["image"], inputs.get("centerline"), **network.geometry)
        return network(case.image, inputs.get("variables"), inputs["intervention"], **kwargs), case.volume


class CounterfactualInferenceEngine(Evaluator):
    """Iterate the cases of a loader (one case per batch), apply ``inferer`` with ``network`` and save each result.

    Args:
        device: the device of the run (the pipeline holds its own).
        val_data_loader: yields one case dict per iteration (``DataLoader(..., batch_size=1,
            collate_fn=lambda b: b[0])`` over :func:`inference_items`).
        network: a :class:`~monai_cft.inference.CounterfactualPipeline`.
        inferer: a :class:`CounterfactualInferer`.
        output_dir: where each case's files go (``<name>_cf.nii.gz``, ...).
        write_volume: also write ``<name>_cf_volume.nii.gz``, the counterfactual written back into the
            3D CCTA of a case given as a volume with its centreline (an error for an sCPR case).
        verbose: print one line per case (intended and measured value).
    """

    def __init__(self, device: str | torch.device, val_data_loader: Any, network: Any, inferer: Inferer,
                 output_dir: str | os.PathLike, write_volume: bool = False, verbose: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(device=torch.device(device) if isinstance(device, str) else device,
                         val_data_loader=val_data_loader, decollate=False, **kwargs)
        self.network = network
        self.inferer = inferer
        self.output_dir = Path(output_dir)
        self.write_volume = bool(write_volume)
        self.verbose = bool(verbose)
        self.saved: list[dict[str, str]] = []

    def _iteration(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        result, volume = self.inferer(batchdata, self.network)
        if self.write_volume and volume is None:
            raise ValueError(f"write_volume needs a 3D CCTA volume given with its centreline; case "
                             f"{batchdata['name']!r} is an sCPR image.")
        paths = save_result(result, self.output_dir, batchdata["name"], volume=volume if self.write_volume else None)
        self.saved.append(paths)
        if self.verbose:
            for k in result.intervention:
                print(f"{batchdata['name']}: do({k} = {result.intervention[k]:.2f}) -> measured "
                      f"{result.measured[k]:.2f} (factual {result.variables[k]:.2f}); files: "
                      f"{', '.join(paths.values())}", flush=True)
        return {"name": batchdata["name"], "paths": paths}
