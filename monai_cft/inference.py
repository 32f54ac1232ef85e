"""Counterfactual inference: one call from an image and an intervention to a counterfactual image.

:class:`CounterfactualPipeline` takes a case, either

* a prepared sCPR image (HU, (H, W) or (1, H, W), a NIfTI path or a tensor) with its variables, or
* a 3D CCTA volume (HU, a NIfTI path or a ``MetaTensor`` with its affine) plus the vessel centreline
  (world mm, RAS, ostium first), straightened on the fly with
  :class:`~monai_cft.transforms.cpr.StraightenCPR` at the model's spacing and size,

and an intervention such as ``{"calcified_mid": "+20"}`` (relative: a string starting with ``+`` or
``-``, in mm^2) or ``{"lumen_distal": 3.5}`` (absolute, mm^2). Factual variables not given are
measured on the image by the guidance segmentor. It returns the counterfactual in HU (the network's
[-1, 1] scaling undone) with the input's geometry, the difference map, the intended counterfactual
variables and the ones the segmentor measures on the counterfactual; :meth:`CounterfactualPipeline.save`
writes them as NIfTI, JSON and a PNG panel.

Python::

    from monai_cft.inference import CounterfactualPipeline

    pipe = CounterfactualPipeline.from_bundle("bundle", mode="pos_seg")
    result = pipe("case_0001.nii.gz", variables=None, intervention={"calcified_mid": "+20"})
    pipe.save(result, "out", name="case_0001")

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_cft.constants import HU_WINDOW, check_cft_mode
from monai_cft.engines.common import as_plain_tensor
from monai_cft.metrics.effectiveness import measure_with_segmentor
from monai_cft.networks.loading import load_regressor, load_segmentor
from monai_cft.transforms.intensity import HUWindow
from monai_cft.utils.checks import check_count

__all__ = [
    "parse_intervention",
    "load_segmentor",
    "load_regressor",
    "CounterfactualPipeline",
]


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


def _as_plain(x: Any) -> torch.Tensor:
    """A plain tensor (``MetaTensor`` metadata dropped; arrays converted)."""
    return torch.as_tensor(as_plain_tensor(x))


def _affine4(affine: Any, spatial_dims: int) -> torch.Tensor:
    """A (4, 4) float64 affine; (d+1, d+1) affines of 2D images are embedded with unit z spacing."""
    aff = torch.as_tensor(np.asarray(affine.detach().cpu() if torch.is_tensor(affine) else affine), dtype=torch.float64)
    if aff.shape == (4, 4):
        return aff
    d = aff.shape[0] - 1
    if aff.shape != (d + 1, d + 1) or d < 1:
        raise ValueError(f"affine must be square (d + 1, d + 1), got shape {tuple(aff.shape)}.")
    out = torch.eye(4, dtype=torch.float64)
    out[:d, :d] = aff[:d, :d]
    out[:d, 3] = aff[:d, d]
    return out


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
        self.hu_window = self.intensity.window
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
        from monai.bundle import ConfigParser

        from monai_cft.utils.bundle import find_bundle_root

        check_cft_mode(mode)
        root = Path(bundle_dir if bundle_dir is not None else find_bundle_root()).resolve()
        files = [str(root / "configs" / f) for f in config_files]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"bundle config file(s) {missing} do not exist.")
        parser = ConfigParser()
        parser.read_config(files)
        parser["bundle_root"] = str(root)
        parser["cft_mode"] = mode
        for key, value in overrides.items():
            if key == "device" and isinstance(value, (str, torch.device)):
                value = f"$torch.device('{value}')"
            parser[key] = value
        pipe = parser.get_parsed_content("pipeline")
        if not isinstance(pipe, cls):
            raise TypeError(f"the bundle's 'pipeline' is a {type(pipe).__name__}, expected {cls.__name__}.")
        return pipe

    # ------------------------------------------------------------------ inputs
    def load_case(self, image: Any, centerline: Any | None = None) -> torch.Tensor:
        """The model-sized sCPR image (1, *img_size) in HU, as a ``MetaTensor`` with its affine.

        See :meth:`_load` (which also returns the 3D volume a centreline was given for).
        """
        return self._load(image, centerline)[0]

    def _load(self, image: Any, centerline: Any | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(sCPR, volume)``: the model-sized sCPR image (1, *img_size) in HU as a ``MetaTensor``, and the
        (1, X, Y, Z) volume it was straightened from (``None`` for an sCPR input).

        Args:
            image: a NIfTI path, or an array / tensor / ``MetaTensor``: a (1, *img_size) or
                (*img_size) sCPR image, or (with ``centerline``) a (1, X, Y, Z) / (X, Y, Z) volume.
            centerline: (N, 3) world-mm points or a centreline file (``.csv``, ``.npy``, ``.json``,
                ``.fcsv``); when given the volume is straightened at the model's spacing and size.
        """
        from monai.data import MetaTensor
        from monai.transforms import LoadImage

        volume = None
        if isinstance(image, (str, os.PathLike)):
            if not Path(image).is_file():
                raise FileNotFoundError(f"image file {str(image)!r} does not exist.")
            img = LoadImage(image_only=True, ensure_channel_first=True)(str(image))
        elif isinstance(image, (torch.Tensor, np.ndarray)):
            img = image if isinstance(image, MetaTensor) else MetaTensor(torch.as_tensor(image))
        else:
            raise TypeError(f"image must be a file path, a numpy array or a tensor, got {type(image).__name__}.")
        if centerline is not None:
            from monai_cft.transforms.cpr import StraightenCPR

            if img.ndim == 3:
                img = img.unsqueeze(0)
            if img.ndim != 4:
                raise ValueError(
                    f"with a centreline the image must be a 3D volume (X, Y, Z), got shape {tuple(img.shape)}."
                )
            if isinstance(centerline, (str, os.PathLike)):
                from monai_cft.utils.io import load_centerline

                centerline = load_centerline(centerline)
            cpr = StraightenCPR(
                output_size=(self.img_size[0], self.img_size[-1]),
                spacing=self.spacing,
                out_dims=self.spatial_dims,
                record_grid=True,  # the grid writes a counterfactual back into the volume (save(write_volume=True))
            )
            volume = img
            img = cpr(img.float(), centerline)
        if img.ndim == self.spatial_dims:
            img = img.unsqueeze(0)
        if tuple(img.shape) != (1, *self.img_size):
            hint = " (a 3D volume needs a centreline)" if img.ndim == self.spatial_dims + 2 or img.ndim == 4 else ""
            raise ValueError(
                f"the image must be a (1, {', '.join(map(str, self.img_size))}) sCPR of the model's size{hint}, "
                f"got shape {tuple(img.shape)}."
            )
        img = img.float()
        finite = torch.isfinite(_as_plain(img))
        if not finite.all():
            bad = int((~finite).sum())
            raise ValueError(f"the image contains {bad} NaN or infinite value(s) of {finite.numel()}.")
        return img, (volume if centerline is not None else None)

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
        image: Any,
        variables: Mapping[str, float] | Sequence[float] | None,
        intervention: Mapping[str, Any] | str,
        centerline: Any | None = None,
        allow_extrapolation: bool | None = None,
    ) -> dict[str, Any]:
        """Generate the counterfactual of one case.

        Args:
            image: the case (see :meth:`load_case`), HU.
            variables: factual variables (dict by name or a sequence in the model's order, physical
                units), or ``None`` to measure them with the segmentor.
            intervention: see :func:`parse_intervention`.
            centerline: optional centreline of a 3D volume.
            allow_extrapolation: accept targets (and factual values) outside the observed ranges
                with a warning (default: the pipeline's setting).

        Returns:
            dict with ``image`` (factual sCPR, HU, clipped to the window, ``MetaTensor`` with the
            sCPR affine), ``counterfactual`` (HU, same geometry), ``difference`` (counterfactual -
            factual, HU), ``region_masks`` (K, *spatial), and dicts by variable name (physical
            units): ``variables`` (factual), ``measured_factual`` (segmentor on the factual image),
            ``intervention`` (absolute targets), ``intended`` (counterfactual parents), ``measured``
            (segmentor on the counterfactual); plus ``mode`` and, with ``num_particles > 1``,
            ``uncertainty`` (HU).
        """
        allow = self.allow_extrapolation if allow_extrapolation is None else bool(allow_extrapolation)
        img, volume = self._load(image, centerline)
        raw = _as_plain(img).to(self.device)
        x = self.intensity(raw)[None]  # (1, 1, *spatial)
        masks = _as_plain(self.region_transform(img)).float().to(self.device)
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
        result = {
            "image": self._like(img, factual_hu),
            "counterfactual": self._like(img, cf_hu),
            "difference": self._like(img, cf_hu - factual_hu),
            "region_masks": masks.cpu(),
            "variables": as_dict(factual),
            "measured_factual": as_dict(measured_factual),
            "intervention": targets,
            "intended": as_dict(out["parents_cf"][0]),
            "measured": as_dict(self.measure(x_cf, masks)[0]),
            "mode": self.mode,
        }
        if volume is not None:  # a 3D CCTA with its centreline: kept to write the counterfactual back into it
            result["volume"] = volume
        if "uncertainty" in out:
            result["uncertainty"] = self._like(img, out["uncertainty"][0] * self.intensity.hu_per_unit)
        return result

    @staticmethod
    def _like(ref: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        from monai.data import MetaTensor

        data = data.detach().cpu()
        if isinstance(ref, MetaTensor):
            meta = {k: v for k, v in ref.meta.items() if k != "affine"}
            return MetaTensor(data, affine=ref.affine, meta=meta)
        return data

    # ------------------------------------------------------------------ outputs
    def save(self, result: Mapping[str, Any], output_dir: str | os.PathLike, name: str = "case",
             write_volume: bool = False) -> dict[str, str]:
        """Write a result of :meth:`__call__` to ``output_dir`` (atomically).

        Files: ``<name>_cf.nii.gz`` (counterfactual, HU, float32, the sCPR affine),
        ``<name>_diff.nii.gz`` (counterfactual - factual, HU), ``<name>_panel.png`` (factual,
        counterfactual, difference, region boundaries dashed, intended and measured values in the
        title) and ``<name>_values.json`` (every variable: factual, intended, measured). With
        ``write_volume`` (the input was a 3D CCTA with a centreline) also
        ``<name>_cf_volume.nii.gz``: the volume with the counterfactual's change written back along
        the sampling grid (:class:`~monai_cft.transforms.UnstraightenCPR`, trilinear splatting),
        float32 HU with the volume's own affine, so it opens over the original scan in 3D Slicer.

        Returns:
            ``{"counterfactual", "difference", "panel", "values"[, "volume"]}`` -> written path.

        Raises:
            ValueError: ``write_volume`` for a result whose input was an sCPR (no volume to write into).
        """
        if write_volume and result.get("volume") is None:
            raise ValueError("write_volume needs a result of a 3D CCTA volume given with its centreline; this one "
                             "came from an sCPR image.")
        from monai_cft.utils.io import check_file_name, save_json, save_nifti
        from monai_cft.visualize import plot_counterfactual_panel, region_boundaries

        check_file_name(name, "save name", f"{type(self).__name__}.save")
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        cf, diff = result["counterfactual"], result["difference"]
        affine = _affine4(cf.affine if hasattr(cf, "affine") else torch.eye(self.spatial_dims + 1), self.spatial_dims)
        paths = {
            "counterfactual": save_nifti(_as_plain(cf)[0].numpy(), affine, out / f"{name}_cf.nii.gz", np.float32),
            "difference": save_nifti(_as_plain(diff)[0].numpy(), affine, out / f"{name}_diff.nii.gz", np.float32),
        }
        paths["panel"] = plot_counterfactual_panel(
            _as_plain(result["image"]),
            _as_plain(cf),
            out / f"{name}_panel.png",
            difference=_as_plain(diff),
            boundaries=region_boundaries(result["region_masks"]),
            title=self.describe(result),
            window=self.hu_window,
            spacing=self.spacing,
        )
        values = {
            "mode": result.get("mode"),
            "intervention": result["intervention"],
            "variables": {
                k: {
                    "factual": result["variables"][k],
                    "measured_factual": result["measured_factual"][k],
                    "intended": result["intended"][k],
                    "measured": result["measured"][k],
                }
                for k in self.variables
            },
        }
        paths["values"] = save_json(values, out / f"{name}_values.json")
        if write_volume:
            from monai_cft.transforms.unstraighten import UnstraightenCPR

            vol = result["volume"]
            cf_vol = UnstraightenCPR(mode="bilinear")(vol.float(), result["counterfactual"], result["image"])
            paths["volume"] = save_nifti(_as_plain(cf_vol)[0].numpy(), _affine4(vol.affine, 3),
                                         out / f"{name}_cf_volume.nii.gz", np.float32)
        return {k: str(v) for k, v in paths.items()}

    @staticmethod
    def describe(result: Mapping[str, Any]) -> str:
        """Two-line title: the intervention with its intended and measured values, then the other regions."""
        parts, others = [], []
        for k, target in result["intervention"].items():
            parts.append(
                f"do({k} = {target:.1f} mm², factual {result['variables'][k]:.1f}): "
                f"measured on counterfactual {result['measured'][k]:.1f}"
            )
        for k in result["intended"]:
            if k not in result["intervention"]:
                others.append(f"{k} {result['intended'][k]:.1f}/{result['measured'][k]:.1f}")
        mode = f"[{result.get('mode')}] " if result.get("mode") else ""
        return mode + "; ".join(parts) + "\nintended/measured: " + ", ".join(others)
