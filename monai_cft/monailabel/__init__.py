"""MONAI Label integration of monai-cft (the optional extra ``monai-cft[monailabel]``).

``python -m monai_cft.monailabel serve --studies DIR [--models DIR] [--host 127.0.0.1] [--port 8000]``
starts a MONAI Label server (``monailabel start_server``) whose app serves the main job's models:

* infer ``straighten`` (3D CCTA volume + centreline -> sCPR image + nine measurements, REST);
* infer ``segmentation`` (sCPR -> lumen / calcified / non-calcified label map; 3D Slicer lists it);
* infer ``counterfactual`` (sCPR + intervention -> counterfactual, difference, uncertainty, REST);
* scoring ``measure`` (the nine variables of every datastore image, stored in its info);
* train ``segmentation`` (fine-tunes the segmentor on the datastore's final labels).

See ``docs/monailabel.md``. Importing this package needs no MONAI Label; the app
(:mod:`monai_cft.monailabel.main`) and its tasks (:mod:`monai_cft.monailabel.tasks`) do.
"""
