"""``measure`` scoring method: the nine regional variables of every datastore image, stored in its info."""

from __future__ import annotations

import time
from typing import Any

from monailabel.interfaces.tasks.scoring import ScoringMethod

from monai_cft.monailabel.inputs import RequestError, load_scpr
from monai_cft.monailabel.models import ModelStore
from monai_cft.monailabel.tasks.base import check_spacing, measure_variables, scpr_spacing

__all__ = ["MeasureVariables", "INFO_KEY"]

#: key of the measurements in an image's datastore info.
INFO_KEY = "monai_cft_variables"


class MeasureVariables(ScoringMethod):
    """Measure lumen / calcified / non-calcified areas (mm^2) per third with the guidance segmentor.

    For every datastore image that is an sCPR of the models' geometry, the image's info gets
    ``monai_cft_variables`` (``{variable: mm^2}``), ``monai_cft_segmentor`` (the checkpoint used)
    and ``monai_cft_ts`` (seconds since the epoch). Other images (e.g. 3D volumes not yet
    straightened) are listed under ``skipped`` with the reason. Param ``images``: a list of image
    ids to measure (default all); an unknown id is refused before anything is stored.

    Example (server running, ``docs/monailabel.md``)::

        curl -X POST "$S/scoring/measure?run_sync=true"
    """

    def __init__(self, store: ModelStore) -> None:
        super().__init__("The nine regional plaque / lumen areas (mm^2) of each sCPR image, stored in its info")
        self.store = store

    def __call__(self, request: dict[str, Any], datastore: Any) -> dict[str, Any]:
        known = list(datastore.list_images())
        wanted = request.get("images", known)
        if not isinstance(wanted, list) or not all(isinstance(i, str) for i in wanted):
            raise RequestError(f"parameter 'images' must be a list of image ids, got {wanted!r}.")
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise RequestError(f"image id(s) {unknown} are not in the datastore (it has {len(known)} images).")
        segmentor, meta = self.store.segmentor()
        measured, skipped = {}, {}
        for image_id in wanted:
            path = datastore.get_image_uri(image_id)
            try:
                hu, affine = load_scpr(path, meta["img_size"])
                check_spacing(affine, scpr_spacing(meta), image_id)
            except RequestError as err:
                skipped[image_id] = str(err)
                continue
            measured[image_id] = measure_variables(segmentor, meta, hu)
        stamp = int(time.time())
        for image_id, values in measured.items():
            datastore.update_image_info(
                image_id, {INFO_KEY: values, "monai_cft_segmentor": str(meta["path"]), "monai_cft_ts": stamp}
            )
        return {"measured": measured, "skipped": skipped, "units": "mm^2"}
