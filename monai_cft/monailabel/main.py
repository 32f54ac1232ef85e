"""The monai-cft MONAI Label app: straightening, segmentation, counterfactuals, measurements, training.

Started by ``python -m monai_cft.monailabel serve --studies DIR [--models DIR]`` (see
``docs/monailabel.md``), which runs ``monailabel start_server`` on an app folder whose ``main.py``
imports :class:`MONAICFTApp`. Configuration (``--conf KEY VALUE`` of ``monailabel start_server``):

* ``models``: the main job's model folder (default ``outputs/models`` of the checkout);
* ``workspace``: where the train task writes ``segmentor_finetuned.pt`` (default ``<studies>/.monai_cft``);
* ``device``: torch device of the networks (default ``cpu``).

Infer tasks: ``straighten`` and ``counterfactual`` (type ``others``, REST only), ``segmentation``
(type ``segmentation``, listed by 3D Slicer); train task ``segmentation``; scoring method
``measure``. Request problems (unknown task, variable or image, target out of range, missing
centreline, wrong image dimensionality, malformed JSON) are answered with HTTP 400 / 404 and a
``detail`` message, and leave the datastore unchanged.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

import monai_cft
from monai_cft.monailabel.inputs import RequestError
from monai_cft.monailabel.models import GUIDANCE_SEGMENTOR, MissingModelError, ModelStore, default_models_dir, dscm_file
from monai_cft.monailabel.tasks.counterfactual import CounterfactualTask
from monai_cft.monailabel.tasks.scoring import MeasureVariables
from monai_cft.monailabel.tasks.segmentation import SegmentationTask
from monai_cft.monailabel.tasks.straighten import StraightenTask
from monai_cft.monailabel.tasks.train import FinetuneSegmentor

__all__ = ["MONAICFTApp"]

#: infer tasks whose result may be stored as a label (the others produce images, never labels).
LABEL_TASKS = ("segmentation",)


def _json_error(request: Any, exc: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": f"a JSON form field of the request is malformed: {exc}."})


def _monailabel_error(request: Any, exc: MONAILabelException) -> JSONResponse:
    code = 400 if exc.error in (MONAILabelError.INVALID_INPUT, MONAILabelError.APP_ERROR) else 500
    return JSONResponse(status_code=code, content={"detail": f"{exc.error.value}: {exc.msg}"})


def _install_error_handlers() -> None:
    """Give clear HTTP answers for errors MONAI Label's endpoints raise before any task runs
    (malformed ``params`` JSON, unknown image); without them FastAPI answers a bare 500."""
    server = sys.modules.get("monailabel.app")
    fastapi_app = getattr(server, "app", None)
    if fastapi_app is None:  # not in the server (e.g. a background train / scoring process)
        return
    fastapi_app.add_exception_handler(json.JSONDecodeError, _json_error)
    fastapi_app.add_exception_handler(MONAILabelException, _monailabel_error)
    fastapi_app.middleware_stack = None  # rebuilt with the handlers at the next request


class MONAICFTApp(MONAILabelApp):
    """MONAI Label app serving the models of the monai-cft main job (see the module docstring).

    Example (what ``python -m monai_cft.monailabel serve --studies outputs/studies`` runs)::

        monailabel start_server --app outputs/studies/.monai_cft/app --studies outputs/studies \\
            --conf models outputs/models --conf zoo_source github -i 127.0.0.1 -p 8000
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        models = conf.get("models") or str(default_models_dir())
        workspace = conf.get("workspace") or os.path.join(studies, ".monai_cft")
        self.store = ModelStore(models, workspace, device=conf.get("device", "cpu"))
        self.store.require([GUIDANCE_SEGMENTOR])
        self.modes = self.store.available_modes()
        if not self.modes:
            self.store.require([dscm_file("pos_seg")])
        self.default_mode = "pos_seg" if "pos_seg" in self.modes else self.modes[-1]
        _, meta = self.store.segmentor()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monai-cft",
            description="Straightened coronary CCTA: sCPR, plaque segmentation, segmentor-guided counterfactuals",
            version=monai_cft.__version__,
            labels={str(k): int(v) for k, v in meta["structures"].items()},
        )
        _install_error_handlers()

    # ------------------------------------------------------------------ tasks
    def init_infers(self) -> dict[str, Any]:
        return {
            "straighten": StraightenTask(self.store),
            "segmentation": SegmentationTask(self.store),
            "counterfactual": CounterfactualTask(self.store, self.default_mode),
        }

    def init_trainers(self) -> dict[str, Any]:
        return {"segmentation": FinetuneSegmentor(self.store)}

    def init_scoring_methods(self) -> dict[str, Any]:
        return {"measure": MeasureVariables(self.store)}

    # ------------------------------------------------------------------ requests
    @staticmethod
    def _unknown(kind: str, name: Any, valid: Any) -> HTTPException:
        return HTTPException(status_code=404, detail=f"unknown {kind} {name!r}; valid {kind}s are {sorted(valid)}.")

    @staticmethod
    def _answer(call, *args):
        """Run a task; request problems become HTTP 400 with their message, a missing model 503."""
        try:
            return call(*args)
        except HTTPException:
            raise
        except MissingModelError as err:
            raise HTTPException(status_code=503, detail=str(err)) from None
        except (RequestError, ValueError, FileNotFoundError) as err:
            raise HTTPException(status_code=400, detail=str(err)) from None

    def infer(self, request, datastore=None):
        model = request.get("model")
        if model not in self._infers:
            raise self._unknown("infer task", model, self._infers)
        image = request.get("image")
        store = datastore if datastore else self.datastore()
        if isinstance(image, str) and not os.path.exists(image):
            if image not in store.list_images():
                raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore and is not a file.")
            request = dict(request, image_info=store.get_image_info(image))
        if model not in LABEL_TASKS:
            request = dict(request, save_label=False)  # generated images are never stored as labels
        return self._answer(super().infer, request, datastore)

    def batch_infer(self, request, datastore=None):
        if request.get("model") not in LABEL_TASKS:
            raise HTTPException(
                status_code=400,
                detail=f"batch inference stores its results as labels; only {list(LABEL_TASKS)} may run in batch, "
                f"not {request.get('model')!r}.",
            )
        return self._answer(super().batch_infer, request, datastore)

    def scoring(self, request, datastore=None):
        method = request.get("method")
        if method not in self._scoring_methods:
            raise self._unknown("scoring method", method, self._scoring_methods)
        return self._answer(super().scoring, request, datastore)

    def train(self, request):
        model = request.get("model")
        if model not in self._trainers:
            raise self._unknown("train task", model, self._trainers)
        return self._answer(super().train, request)
