"""A counterfactual of a 3D CCTA given with its centreline, written back into the volume (issue 11)."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_cft.inference_cases import load_case
from monai_cft.inference_output import save_result
from monai_cft.variables import DEFAULT_REGIONS, DEFAULT_STRUCTURES, variable_names

pytestmark = pytest.mark.usefixtures("single_thread")
NAMES = variable_names(DEFAULT_STRUCTURES, DEFAULT_REGIONS)


@pytest.fixture(scope="module")
def pipe():
    from monai_cft.inference import CounterfactualPipeline
    from monai_cft.networks.dscm import build_dscm
    from monai_cft.networks.predictors import build_segmentor

    torch.manual_seed(0)
    dscm = build_dscm("quick", 2, (32, 192), NAMES, {v: (0.0, 60.0) for v in NAMES}, widths=(4, 8, 8, 8),
                      blocks_per_level=1, z_max_res=24, flow_kwargs={"hidden": (8,), "transforms": 1, "bins": 4})
    return CounterfactualPipeline(dscm.eval(), build_segmentor(2, "unet", 1, 4).eval(), dict(DEFAULT_STRUCTURES), 0.5)


def _case():
    vol = torch.full((1, 48, 48, 120), -80.0)
    vol[:, 22:26, 22:26, :] = 350.0  # a straight lumen along z
    affine = torch.tensor([[-0.5, 0, 0, 20.0], [0, -0.5, 0, 30.0], [0, 0, 1.0, -5.0], [0, 0, 0, 1]], dtype=torch.float64)
    centre = affine[:3, :3] @ torch.tensor([23.5, 23.5, 0.0], dtype=torch.float64) + affine[:3, 3]
    line = np.stack([np.full(60, float(centre[0])), np.full(60, float(centre[1])), np.linspace(-3.0, 110.0, 60)], 1)
    return MetaTensor(vol, affine=affine), line


def test_counterfactual_volume_has_the_input_geometry_and_only_the_sampled_voxels_change(pipe, tmp_path):
    vol, line = _case()
    variables = {v: 10.0 for v in NAMES}
    case = load_case(vol, line, **pipe.geometry)
    res = pipe(case.image, variables, {"calcified_mid": 50.0}, allow_extrapolation=True)
    # the tiny untrained DSCM barely changes the image: its own write-back stays as small as its change
    plain = nib.load(save_result(res, tmp_path, "plain", volume=case.volume)["volume"])
    assert plain.shape == (48, 48, 120) and np.allclose(plain.affine, vol.affine.numpy())
    assert np.abs(plain.get_fdata() - vol[0].numpy()).max() <= np.abs(res.difference.numpy()).max() + 1e-3
    # an edited counterfactual (+200 HU on the rows 14-17, i.e. within 1 mm of the line) lands around the line
    cf = res.counterfactual.clone()
    cf[:, 14:18, :] += 200.0
    edited = dataclasses.replace(res, counterfactual=cf)
    nii = nib.load(save_result(edited, tmp_path, "ct", volume=case.volume)["volume"])
    change = nii.get_fdata() - vol[0].numpy()
    x, y = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    dist_mm = np.hypot(x - 23.5, y - 23.5) * 0.5
    near = dist_mm[..., None].repeat(120, -1) <= 0.5
    assert change[near].mean() > 100.0  # the band arrived where the sCPR sampled it
    assert np.abs(change[dist_mm > 2.0 + 0.75]).max() <= np.abs(res.difference.numpy()).max() + 1e-3


def test_write_volume_needs_a_volume(pipe, tmp_path):
    scpr = MetaTensor(torch.full((1, 32, 192), 100.0), affine=torch.diag(torch.tensor([0.5, 0.5, 1, 1],
                                                                                    dtype=torch.float64)))
    res = pipe(scpr, {v: 10.0 for v in NAMES}, {"calcified_mid": 12.0})
    vol, _ = _case()
    with pytest.raises(ValueError, match="a volume can only be written for a result of a 3D CCTA volume"):
        save_result(res, tmp_path, "s", volume=vol)
    assert "volume" not in save_result(res, tmp_path, "s")
