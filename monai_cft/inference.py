"""Counterfactual inference: one call from an sCPR image and an intervention to a counterfactual image.

:class:`CounterfactualPipeline` takes a model-sized sCPR image in HU (a tensor or a ``MetaTensor``
with its affine, e.g. from :func:`monai_cft.inference_cases.load_case`, which also straightens a 3D
CCTA volume along its centreline) and an intervention such as ``{"calcified_mid": "+20"}``
(relative: a string starting with ``+`` or ``-``, in mm^2) or ``{"lumen_distal": 3.5}`` (absolute,
mm^2). Factual variables not given are measured on the image by the guidance segmentor. It returns
a :class:`CounterfactualResult`: the counterfactual in HU (the network's [-1, 1] scaling undone) with
the input's geometry, the difference map, the intended counterfactual variables and the ones the
segmentor measures on the counterfactual. It reads and writes no files and prints nothing:
:func:`monai_cft.inference_output.save_result` writes a result as NIfTI, JSON and a PNG panel.

Python::

    from monai_cft.inference import CounterfactualPipeline
    from monai_cft.inference_cases import load_case
    from monai_cft.inference_output import save_result

    pipe = CounterfactualPipeline.from_bundle("bundle", mode="pos_seg")
    case = load_case("case_0001.nii.gz", **pipe.geometry)
    result = pipe(case.image, variables=None, intervention={"calcified_mid": "+20"})
    save_result(result, "out", name="case_0001")

Bundle::

    python -m monai.bundle run inference --config_file "['bundle/configs/common.json','bundle/configs/inference.json']" \\
        --cft_mode pos_seg --image case.nii.gz --intervention "{'calcified_mid': '+20'}"
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_cft.constants import HU_WINDOW, check_cft_mode
from monai_cft.utils.tensors import to_plain_tensor
from monai_cft.metrics.effectiveness import measure_with_segmentor
from monai_cft.transforms.intensity import HUWindow
from monai_cft.utils.checks import check_count

__all__ = ["parse_intervention", "CounterfactualResult", "CounterfactualPipeline"]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def parse_intervention(
    intervention: Mapping[str, Any] | str,
    factual: Mapping[str, float],
    ranges: Mapping[str, Sequence[float]],
    allow_extrapolation: bool = False,
) -> dict[str, float]:
    """Turn a user intervention into absolute targets in physical units.

    Args:
        intervention: ``{variable: value}`` (or its JSON text). A number, or a string holding a
            plain number, is an absolute target; a string starting with ``+`` or ``-`` is a change
            relative to the factual value (``"+20"``: 20 mm^2 more).
        factual: the factual value of every variable (physical units).
        ranges: ``{variable: [min, max]}``, the observed ranges the model was trained on.
        allow_extrapolation: warn instead of raising for targets outside the observed range.

    Returns:
        ``{variable: absolute target}``.

    Raises:
        ValueError: an empty intervention, an unknown variable (the message lists the valid ones),
            a value that is not a number, a non-finite target, or (without
            ``allow_extrapolation``) a target outside the observed range.
    """
    if isinstance(intervention, str):
        try:
            intervention = json.loads(intervention)
        except json.JSONDecodeError as err:
            raise ValueError(f"intervention {intervention!r} is not valid JSON: {err}.") from None
    if not isinstance(intervention, Mapping) or not intervention:
        raise ValueError(
            f"intervention must be a non-empty dict variable -> value (e.g. {{'calcified_mid': '+20'}}), "
            f"got {intervention!r}."
        )
    valid = list(ranges)
    unknown = [k for k in intervention if k not in ranges]
    if unknown:
        raise ValueError(f"unknown variable(s) {unknown} in the intervention; valid variables are {valid}.")
    targets: dict[str, float] = {}
    for name, value in intervention.items():
        relative = isinstance(value, str) and value.strip()[:1] in ("+", "-")
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ValueError(
                f"intervention value of {name!r} must be a number (absolute) or a string like '+20' / '-5' "
                f"(relative), got {value!r}."
            ) from None
        target = float(factual[name]) + number if relative else number
        if not math.isfinite(target):
            raise ValueError(f"intervention target of {name!r} is {target}, not a finite number.")
        lo, hi = (float(v) for v in ranges[name])
        if not lo <= target <= hi:
            msg = (
                f"intervention target {name!r} = {target:.6g} is outside its observed range [{lo:.6g}, {hi:.6g}]"
                + (f" (factual {float(factual[name]):.6g} {value})" if relative else "")
            )
            if not allow_extrapolation:
                raise ValueError(msg + "; pass allow_extrapolation=True to extrapolate.")
            warnings.warn(msg + "; extrapolating.", stacklevel=2)
        targets[name] = target
    return targets


@dataclass
class CounterfactualResult:
    """The counterfactual of one case (:meth:`CounterfactualPipeline.__call__`).

    Images are (1, *spatial) CPU ``MetaTensor`` in HU with the input's affine and meta (an identity
    affine for a plain tensor input); variables are dicts by name in the model's order, physical units (mm^2 for
    2D models, mm^3 for 3D ones).

    Attributes:
        image: the factual sCPR, clipped to the HU window (what the networks saw).
        counterfactual: the counterfactual, HU.
        difference: ``counterfactual - image``, HU.
        region_masks: (K, *spatial) region masks.
        variables: the factual variables (given, or measured by the guidance segmentor).
        measured_factual: the guidance segmentor's measurement of the factual image.
        intervention: the absolute target of every intervened variable.
        intended: the counterfactual parents (targets, and the other variables as the SCM keeps them).
        measured: the guidance segmentor's measurement of the counterfactual.
        mode: the CFT mode of the DSCM (``None`` if not given).
        spacing: pixel size of the images (mm).
        hu_window: the HU window mapped to the networks' [-1, 1].
        uncertainty: with ``num_particles > 1``, the per-pixel standard deviation over the particles (HU).
    """

    image: torch.Tensor
    counterfactual: torch.Tensor
    difference: torch.Tensor
    region_masks: torch.Tensor
    variables: dict[str, float]
    measured_factual: dict[str, float]
    intervention: dict[str, float]
    intended: dict[str, float]
    measured: dict[str, float]
    mode: str | None
    spacing: float
    hu_window: tuple[float, float]
    uncertainty: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------


class CounterfactualPipeline:
    """Counterfactual images of single cases from a (fine-tuned) deep SCM.

    Args:
        dscm: a :class:`~monai_cft.networks.dscm.DeepSCM` (e.g. ``DeepSCM.from_checkpoint(...)``).
        segmentor: the guidance segmentor (logits (B, C, *spatial)); measures the factual variables
            when they are not given and the variables of every counterfactual.
        structures: structure name -> segmentor channel, in the DSCM's variable order
            (``{"lumen": 1, "calcified": 2, "noncalcified": 3}``).
        spacing: pixel size of the model's images (mm); the pixel area ``spacing ** spatial_dims``
            converts pixel counts to mm^2 (mm^3).
        region_transform: callable mapping a (C, *spatial) image to (K, *spatial) region masks,
            e.g. :class:`~monai_cft.transforms.regions.RegionMasks` (default: proximal / mid / distal thirds).
        hu_window: HU window mapped to [-1, 1] for the networks.
        mode: the CFT mode the DSCM was fine-tuned with (recorded in the outputs).
        device: torch device of the networks.
        noise_temperature: factor on the abducted pixel noise (1 = exact abduction).
        num_particles: posterior samples averaged for each counterfactual (> 1 also gives an
            ``uncertainty`` map).
        allow_extrapolation: default for :meth:`__call__`.
    """

    def __init__(
        self,
        dscm: nn.Module,
        segmentor: nn.Module,
        structures: Mapping[str, int],
        spacing: float,
        region_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        hu_window: Sequence[float] = HU_WINDOW,
        mode: str | None = None,
        device: str | torch.device = "cpu",
        noise_temperature: float = 1.0,
        num_particles: int = 1,
        allow_extrapolation: bool = False,
    ) -> None:
        from monai_cft.transforms.regions import RegionMasks
        from monai_cft.variables import variable_names

        self.device = torch.device(device)
        self.dscm = dscm.to(self.device).eval()
        self.segmentor = segmentor.to(self.device).eval()
        self.structures = {str(k): int(v) for k, v in structures.items()}
        if not float(spacing) > 0:
            raise ValueError(f"spacing must be a positive pixel size in mm, got {spacing}.")
        self.spacing = float(spacing)
        self.region_transform = region_transform if region_transform is not None else RegionMasks()
        self.intensity = HUWindow(hu_window)
        self.mode = mode
        if isinstance(noise_temperature, bool) or not isinstance(noise_temperature, (int, float)) or not (
                math.isfinite(noise_temperature) and noise_temperature >= 0):
            raise ValueError(f"noise_temperature must be a finite number >= 0, got {noise_temperature!r}.")
        self.noise_temperature = float(noise_temperature)
        self.num_particles = check_count(num_particles, "num_particles")
        self.allow_extrapolation = bool(allow_extrapolation)
        self.variables = list(dscm.variables)
        self.spatial_dims = int(dscm.hvae.spatial_dims)
        self.img_size = tuple(int(s) for s in dscm.hvae.img_size)
        names = getattr(self.region_transform, "names", None)
        if names is not None and variable_names(self.structures, names) != self.variables:
            raise ValueError(
                f"structures {list(self.structures)} x regions {list(names)} give variables "
                f"{variable_names(self.structures, names)}, but the model has {self.variables}."
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | os.PathLike | None = None,
        mode: str = "pos_seg",
        config_files: Sequence[str] = ("common.json", "inference.json"),
        **overrides: Any,
    ) -> CounterfactualPipeline:
        """Build the pipeline of a bundle's ``inference.json`` (models from ``<ckpt_dir>/dscm_cft_<mode>.pt``).

        Args:
            bundle_dir: the bundle folder (default: ``monai_cft.utils.bundle.find_bundle_root()``).
            mode: CFT mode of the DSCM to load (``none``, ``reg``, ``seg``, ``pos_seg``).
            config_files: config files under ``<bundle_dir>/configs``, later ones override.
            overrides: config values to override, e.g. ``ckpt_dir="outputs/models"``,
                ``preset="quick"``, ``device="cpu"``.
        """
        from monai_cft.utils.bundle import load_bundle_component

        return load_bundle_component("pipeline", config_files, bundle_dir, expected_type=cls,
                                     cft_mode=check_cft_mode(mode), **overrides)

    @property
    def hu_window(self) -> tuple[float, float]:
        """The HU window mapped to the networks' [-1, 1] (``self.intensity.window``)."""
        return self.intensity.window

    @property
    def geometry(self) -> dict[str, Any]:
        """``{"img_size", "spacing"}`` of the model's images: the keywords of
        :func:`monai_cft.inference_cases.load_case`."""
        return {"img_size": self.img_size, "spacing": self.spacing}

    # ------------------------------------------------------------------ inputs
    def _check_image(self, image: Any) -> torch.Tensor:
        from monai.data import MetaTensor

        if not isinstance(image, (torch.Tensor, np.ndarray)):
            raise TypeError(f"image must be a tensor or an array of the sCPR in HU (load files with "
                            f"monai_cft.inference_cases.load_case), got {type(image).__name__}.")
        img = image if isinstance(image, MetaTensor) else MetaTensor(torch.as_tensor(image))
        if img.ndim == self.spatial_dims:
            img = img.unsqueeze(0)
        if tuple(img.shape) != (1, *self.img_size):
            hint = " (a 3D volume needs a centreline: load_case(volume, centerline))" if img.ndim == 4 else ""
            raise ValueError(
                f"the image must be a (1, {', '.join(map(str, self.img_size))}) sCPR of the model's size{hint}, "
                f"got shape {tuple(img.shape)}."
            )
        img = img.float()
        finite = torch.isfinite(to_plain_tensor(img))
        if not finite.all():
            bad = int((~finite).sum())
            raise ValueError(f"the image contains {bad} NaN or infinite value(s) of {finite.numel()}.")
        return img

    @torch.no_grad()
    def measure(self, x_unit: torch.Tensor, region_masks: torch.Tensor) -> torch.Tensor:
        """Variables measured by the segmentor on (B, 1, *spatial) images in [-1, 1]: (B, V) physical units."""
        areas = measure_with_segmentor(
            self.segmentor, x_unit.to(self.device), region_masks.to(self.device), list(self.structures.values()),
            self.spacing**self.spatial_dims,
        )
        return areas.flatten(1)

    def _factual_values(self, variables: Any, measured: torch.Tensor) -> torch.Tensor:
        if isinstance(variables, str):
            try:
                variables = json.loads(variables)
            except json.JSONDecodeError as err:
                raise ValueError(f"variables {variables!r} are not valid JSON: {err}.") from None
        if variables is None:
            return measured
        if isinstance(variables, Mapping):
            unknown = [k for k in variables if k not in self.variables]
            missing = [k for k in self.variables if k not in variables]
            if unknown or missing:
                raise ValueError(
                    f"variables must give every one of {self.variables}; unknown {unknown}, missing {missing}."
                )
            values = [variables[k] for k in self.variables]
        else:
            values = variables
        try:
            out = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32).flatten()
        except (TypeError, ValueError):
            raise ValueError(f"variables must be numbers, got {variables!r}.") from None
        if out.numel() != len(self.variables):
            raise ValueError(f"expected {len(self.variables)} variables {self.variables}, got {out.numel()} values.")
        if not torch.isfinite(out).all():
            bad = [n for n, v in zip(self.variables, out.tolist()) if not math.isfinite(v)]
            raise ValueError(f"factual variables {bad} are not finite.")
        return out.to(self.device)

    # ------------------------------------------------------------------ counterfactuals
    @torch.no_grad()
    def __call__(
        self,
        image: torch.Tensor,
        variables: Mapping[str, float] | Sequence[float] | None,
        intervention: Mapping[str, Any] | str,
        allow_extrapolation: bool | None = None,
    ) -> CounterfactualResult:
        """Generate the counterfactual of one case.

        Args:
            image: (1, *img_size) or (*img_size) sCPR in HU: a tensor, an array, or a ``MetaTensor``
                whose affine and meta the outputs keep (:func:`monai_cft.inference_cases.load_case`).
            variables: factual variables (dict by name or a sequence in the model's order, physical
                units), or ``None`` to measure them with the segmentor.
            intervention: see :func:`parse_intervention`.
            allow_extrapolation: accept targets (and factual values) outside the observed ranges
                with a warning (default: the pipeline's setting).
        """
        allow = self.allow_extrapolation if allow_extrapolation is None else bool(allow_extrapolation)
        img = self._check_image(image)
        raw = to_plain_tensor(img).to(self.device)
        x = self.intensity(raw)[None]  # (1, 1, *spatial)
        masks = to_plain_tensor(self.region_transform(img)).float().to(self.device)
        measured_factual = self.measure(x, masks)[0]
        factual = self._factual_values(variables, measured_factual)
        as_dict = lambda t: dict(zip(self.variables, (float(v) for v in t.flatten().tolist())))  # noqa: E731
        targets = parse_intervention(intervention, as_dict(factual), self.dscm.normalizer.ranges, allow)
        if variables is None:  # say where out-of-range factual values came from; other errors pass unchanged
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the counterfactual below warns once
                    self.dscm.normalizer.normalize(factual[None], allow_extrapolation=allow)
            except ValueError as err:
                raise ValueError(f"factual variables as measured by the guidance segmentor: {err}") from err
        out = self.dscm.counterfactual(
            x, factual[None], targets, num_particles=self.num_particles,
            noise_temperature=self.noise_temperature, allow_extrapolation=allow,
        )
        x_cf = out["x_cf"]
        factual_hu = self.intensity.inverse(x[0])
        cf_hu = self.intensity.inverse(x_cf[0])
        uncertainty = out.get("uncertainty")
        return CounterfactualResult(
            image=self._like(img, factual_hu),
            counterfactual=self._like(img, cf_hu),
            difference=self._like(img, cf_hu - factual_hu),
            region_masks=masks.cpu(),
            variables=as_dict(factual),
            measured_factual=as_dict(measured_factual),
            intervention=targets,
            intended=as_dict(out["parents_cf"][0]),
            measured=as_dict(self.measure(x_cf, masks)[0]),
            mode=self.mode,
            spacing=self.spacing,
            hu_window=self.hu_window,
            uncertainty=None if uncertainty is None else self._like(img, uncertainty[0] * self.intensity.hu_per_unit),
        )

    @staticmethod
    def _like(ref: Any, data: torch.Tensor) -> torch.Tensor:
        """``data`` on the CPU as a ``MetaTensor`` with the affine and meta of ``ref`` (the checked input)."""
        from monai.data import MetaTensor

        meta = {k: v for k, v in ref.meta.items() if k != "affine"}
        return MetaTensor(data.detach().cpu(), affine=ref.affine, meta=meta)
