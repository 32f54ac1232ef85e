"""Deep structural causal model: attribute flows plus a parent-conditioned hierarchical VAE.

A counterfactual takes three steps (Pearl's abduction, action, prediction):

1. **Abduction**: latents ``z ~ q(z | x, pa)`` of every stochastic layer of the HVAE, the noise
   ``u_k`` of every scalar variable (:meth:`AttributeMechanisms.abduct`) and the pixel noise
   ``u_x = (x - loc(z, pa)) / scale(z, pa)``.
2. **Action**: ``do(v_i := c)``; descendants of ``v_i`` are recomputed from their noise.
3. **Prediction**: ``x_cf = loc(z, pa_cf) + scale(z, pa_cf) * T * u_x``.

``T`` (``noise_temperature``) scales the abducted pixel noise. ``T = 1`` (default) is exact
abduction: under the factual parents ``x_cf == x`` up to float error, so every pixel that the
decoder does not explain (noise, fine texture) is carried over. ``T < 1`` shrinks that residual
towards the decoder mean (causal-gen's demonstration notebook uses 0.1), ``T = 0`` returns the mean
image ``loc(z, pa_cf)``.

Parents are passed to the networks in normalised units: each variable mapped linearly from its
observed [min, max] to [-1, 1] by :class:`~monai_cft.transforms.parents.ParentNormalizer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from monai_cft.networks.flows import AttributeMechanisms
from monai_cft.networks.hvae import HierarchicalVAE
from monai_cft.networks.presets import build_hvae
from monai_cft.transforms.parents import ParentNormalizer
from monai_cft.utils.state_dict import state_dict_problems

__all__ = ["DeepSCM", "build_dscm", "parent_regions"]


class DeepSCM(nn.Module):
    """Deep structural causal model of an image and its scalar parent variables.

    Args:
        hvae: image mechanism, conditioned on all V variables (``hvae.num_parents == V``).
        mechanisms: flows of the V variables (same names, same order).
        normalizer: physical <-> normalised mapping of the V variables (same names, same order).

    The state dict holds all three (``hvae.*``, ``mechanisms.*``, ``normalizer.low/high``).
    """

    def __init__(self, hvae: HierarchicalVAE, mechanisms: AttributeMechanisms, normalizer: ParentNormalizer) -> None:
        super().__init__()
        if list(mechanisms.variables) != list(normalizer.names):
            raise ValueError(
                f"mechanisms variables {mechanisms.variables} and normalizer names {normalizer.names} differ."
            )
        if hvae.num_parents != len(normalizer.names):
            raise ValueError(
                f"the HVAE takes {hvae.num_parents} parents but there are {len(normalizer.names)} variables "
                f"{normalizer.names}."
            )
        self.hvae = hvae
        self.mechanisms = mechanisms
        self.normalizer = normalizer

    @property
    def variables(self) -> list[str]:
        """Variable names, the column order of every (B, V) tensor."""
        return list(self.normalizer.names)

    def forward(self, x: torch.Tensor, parents_norm: torch.Tensor, beta: float = 1.0) -> dict[str, Any]:
        """Training losses: the HVAE's dict (``elbo``, ``nll``, ``kl``) plus ``flow_nll``.

        Args:
            x: images in [-1, 1], (B, C, *spatial).
            parents_norm: normalised parents (B, V).
            beta: KL weight of the HVAE.

        Returns:
            dict with the HVAE's scalars and ``flow_nll``, the mean negative log-likelihood per
            sample of the variables (nats, summed over variables).
        """
        out = self.hvae(x, parents_norm, beta=beta)
        out["flow_nll"] = -self.mechanisms.log_prob(parents_norm).mean()
        return out

    # ------------------------------------------------------------------ CFT building blocks
    def counterfactual_parents(
        self, parents_norm: torch.Tensor, mask: torch.Tensor, values_norm: torch.Tensor
    ) -> torch.Tensor:
        """Counterfactual normalised parents (B, V); see :meth:`AttributeMechanisms.counterfactual`.

        Args:
            parents_norm: factual normalised parents (B, V).
            mask: (B, V) bool, intervened variables.
            values_norm: (B, V) normalised intervention targets (read where ``mask``).
        """
        return self.mechanisms.counterfactual(parents_norm, mask, values_norm)

    def predict_counterfactual(
        self,
        x: torch.Tensor,
        latents: Sequence[torch.Tensor],
        loc: torch.Tensor,
        scale: torch.Tensor,
        parents_cf_norm: torch.Tensor,
        noise_temperature: float = 1.0,
        clamp: bool = True,
    ) -> torch.Tensor:
        """Prediction step with abducted latents and pixel noise (differentiable).

        Args:
            x: factual images (B, C, *spatial) in [-1, 1].
            latents: abducted latents (from ``hvae.abduct`` or ``hvae(..., return_latents=True)``).
            loc, scale: factual likelihood parameters for these latents, (B, C, *spatial).
            parents_cf_norm: counterfactual normalised parents (B, V).
            noise_temperature: T, the factor on the abducted pixel noise (see module doc).
            clamp: clamp the result to the image range [-1, 1].

        Returns:
            x_cf (B, C, *spatial) = ``loc_cf + scale_cf * T * (x - loc) / scale``.
        """
        try:
            temperature = float(noise_temperature)
        except (TypeError, ValueError) as err:
            raise TypeError(f"noise_temperature must be a number, got {noise_temperature!r}.") from err
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"noise_temperature must be a finite number >= 0, got {noise_temperature!r}.")
        loc_cf, scale_cf = self.hvae.decode(latents, parents_cf_norm)
        x_cf = loc_cf + scale_cf * (noise_temperature * (x - loc) / scale)
        return x_cf.clamp(-1.0, 1.0) if clamp else x_cf

    # ------------------------------------------------------------------ user-facing counterfactuals
    def intervention_tensors(
        self, intervention: Mapping[str, float | torch.Tensor], batch: int, allow_extrapolation: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn ``{name: value}`` (physical units) into ``(mask (B, V) bool, values_norm (B, V))``.

        A value is a float (all samples) or a (B,) tensor. Values are range-checked by the
        normalizer (``allow_extrapolation`` as in :class:`ParentNormalizer`).
        """
        if not isinstance(intervention, Mapping) or not intervention:
            raise ValueError(f"intervention must be a non-empty dict of variable -> value, got {intervention!r}.")
        unknown = [k for k in intervention if k not in self.variables]
        if unknown:
            raise ValueError(f"unknown variables {unknown} in the intervention; valid variables are {self.variables}.")
        device = self.normalizer.low.device
        mask = torch.zeros(batch, len(self.variables), dtype=torch.bool, device=device)
        values = self.normalizer.low.expand(batch, -1).clone()
        for name, value in intervention.items():
            k = self.variables.index(name)
            value = torch.as_tensor(value, dtype=torch.float32, device=device)
            if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != batch):
                raise ValueError(
                    f"intervention on {name!r} must be a float or a ({batch},) tensor, got {tuple(value.shape)}."
                )
            values[:, k] = value
            mask[:, k] = True
        values_norm = self.normalizer.normalize(values, allow_extrapolation=allow_extrapolation)
        return mask, values_norm

    @torch.no_grad()
    def counterfactual(
        self,
        x: torch.Tensor,
        parents: torch.Tensor,
        intervention: Mapping[str, float | torch.Tensor],
        num_particles: int = 1,
        noise_temperature: float = 1.0,
        allow_extrapolation: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Counterfactual images for an intervention in physical units (no gradients).

        Runs the networks in whatever mode they are in (call ``eval()`` first for inference).

        Args:
            x: images (B, C, *spatial) in [-1, 1].
            parents: factual parents (B, V) in physical units.
            intervention: ``{variable: value}``, value a float or a (B,) tensor, physical units.
            num_particles: number of posterior latent samples; the result is their mean.
            noise_temperature: T on the abducted pixel noise (1 = exact abduction).
            allow_extrapolation: accept parents/targets outside the normalizer's range (warn).

        Returns:
            dict with ``x_cf`` (B, C, *spatial), ``parents_cf`` (B, V) physical,
            ``parents_cf_norm`` (B, V), and, when ``num_particles > 1``, ``uncertainty``: the
            per-pixel standard deviation of x_cf over the particles (B, C, *spatial).
        """
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}.")
        self.hvae._check_x(x)
        pa_norm = self.normalizer.normalize(parents, allow_extrapolation=allow_extrapolation)
        if pa_norm.ndim != 2 or pa_norm.shape[0] != x.shape[0]:
            raise ValueError(f"parents must be (B, V) with B = {x.shape[0]}, got {tuple(pa_norm.shape)}.")
        mask, values_norm = self.intervention_tensors(intervention, x.shape[0], allow_extrapolation)
        pa_cf_norm = self.counterfactual_parents(pa_norm, mask, values_norm)
        particles = []
        for _ in range(num_particles):
            out = self.hvae(x, pa_norm, return_latents=True)
            particles.append(
                self.predict_counterfactual(x, out["latents"], out["loc"], out["scale"], pa_cf_norm, noise_temperature)
            )
        stack = torch.stack(particles)
        result = {
            "x_cf": stack.mean(0),
            "parents_cf": self.normalizer.denormalize(pa_cf_norm, validate=False),  # targets were checked
            "parents_cf_norm": pa_cf_norm,
        }
        if num_particles > 1:
            result["uncertainty"] = stack.std(0)
        return result

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        """Everything :meth:`from_checkpoint` needs to rebuild this model (plain JSON-able values).

        Store it as the checkpoint's ``"meta"`` (add your own keys such as ``cft_mode``).
        """
        return {
            "preset": self.hvae.config.get("preset"),
            "spatial_dims": self.hvae.spatial_dims,
            "img_size": list(self.hvae.img_size),
            "variables": self.variables,
            "ranges": self.normalizer.ranges,
            "graph": self.mechanisms.graph,
            "hvae_config": dict(self.hvae.config),
            "hvae_overrides": list(getattr(self.hvae, "preset_overrides", [])),
            "flow_config": dict(self.mechanisms.config),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` raising a ``ValueError`` that names the HVAE presets on a mismatch."""
        self.hvae.check_state_dict(state_dict, strict=strict, prefix="hvae.")
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("hvae.")}
        other = {k: v for k, v in state_dict.items() if not k.startswith("hvae.")}
        problems = state_dict_problems(own, other, strict, "")
        if problems:
            raise ValueError(
                f"state dict does not fit this DeepSCM (variables {self.variables}): first differences {problems[:5]}."
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | Mapping[str, Any],
        expected_preset: str | None = None,
        map_location: str | torch.device = "cpu",
    ) -> DeepSCM:
        """Rebuild a DeepSCM from ``{"model": state_dict, "meta": checkpoint_meta()}`` or its path.

        Args:
            checkpoint: the dict, or a path loaded with ``torch.load(weights_only=True)``.
            expected_preset: if given, a checkpoint of another HVAE preset raises ``ValueError``.
            map_location: device for ``torch.load``.
        """
        from monai_cft.utils.checkpoint import load_torch_file

        source = "checkpoint (dict)"
        if not isinstance(checkpoint, Mapping):
            source = f"checkpoint {str(checkpoint)!r}"
            checkpoint = load_torch_file(checkpoint, map_location)
        if not isinstance(checkpoint, Mapping) or "model" not in checkpoint or "meta" not in checkpoint:
            keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise ValueError(f"{source} must hold 'model' and 'meta', got {keys}.")
        from monai_cft.utils.checkpoint import check_finite

        check_finite(checkpoint["model"], source)
        meta = checkpoint["meta"]
        missing = [k for k in ("hvae_config", "variables", "ranges") if k not in meta]
        if missing:
            raise ValueError(f"checkpoint meta lacks {missing} (write it with DeepSCM.checkpoint_meta()).")
        preset = meta["hvae_config"].get("preset")
        if expected_preset is not None and preset != expected_preset:
            raise ValueError(f"checkpoint is from HVAE preset {preset!r}, expected preset {expected_preset!r}.")
        flow_cfg = dict(meta.get("flow_config", {"variables": meta["variables"], "graph": meta.get("graph")}))
        model = cls(
            HierarchicalVAE.from_config(meta["hvae_config"]),
            AttributeMechanisms(**flow_cfg),
            ParentNormalizer(meta["ranges"], meta["variables"]),
        )
        model.hvae.config = dict(meta["hvae_config"])
        model.load_state_dict(checkpoint["model"])
        return model


def build_dscm(
    preset: str,
    spatial_dims: int,
    img_size: Sequence[int],
    variables: Sequence[str],
    ranges: Mapping[str, Sequence[float]],
    graph: Mapping[str, Sequence[str]] | None = None,
    in_channels: int = 1,
    flow_kwargs: Mapping[str, Any] | None = None,
    region_masks: Any | None = None,
    region_names: Sequence[str] | None = None,
    **hvae_overrides: Any,
) -> DeepSCM:
    """Build a :class:`DeepSCM` from an HVAE preset (see :mod:`monai_cft.networks.presets`).

    Args:
        preset: ``"quick"`` or ``"paper"``.
        spatial_dims: 2 or 3.
        img_size: image size, e.g. ``(32, 192)``.
        variables: variable names (structure-major, :func:`monai_cft.variables.variable_names`).
        ranges: ``{name: (min, max)}`` physical ranges (e.g. ``prepare_config.json["ranges"]``).
        graph: causal graph ``{child: [parents]}``; ``None`` = all independent roots.
        in_channels: image channels.
        flow_kwargs: extra :class:`AttributeMechanisms` arguments (hidden, transforms, bins, dequantize).
        region_masks: (K, *img_size) region masks and ``region_names`` their names: for an HVAE with
            ``spatial_parents`` (preset or override) each variable named ``<structure>_<region>`` is
            painted into its region's mask, other variables everywhere.
        hvae_overrides: :func:`build_hvae` overrides.
    """
    variables = list(variables)
    from monai_cft.networks.presets import HVAE_PRESETS

    spatial = hvae_overrides.get("spatial_parents", HVAE_PRESETS.get(preset, {}).get("spatial_parents", False))
    if spatial and "parent_regions" not in hvae_overrides:
        hvae_overrides["parent_regions"] = parent_regions(variables, img_size, region_masks, region_names)
    hvae = build_hvae(preset, spatial_dims, img_size, len(variables), in_channels, **hvae_overrides)
    mechanisms = AttributeMechanisms(variables, graph, **dict(flow_kwargs or {}))
    return DeepSCM(hvae, mechanisms, ParentNormalizer(ranges, variables))


def parent_regions(variables: Sequence[str], img_size: Sequence[int], region_masks: Any | None,
                   region_names: Sequence[str] | None) -> torch.Tensor:
    """(P, *img_size) float masks: variable ``<structure>_<region>`` -> that region's mask, others all ones.

    Args:
        variables: the parent names.
        img_size: image size.
        region_masks: (K, *img_size) masks (``None``: every parent is global).
        region_names: the K region names, in the order of ``region_masks``.
    """
    out = torch.ones(len(variables), *[int(s) for s in img_size])
    if region_masks is None:
        return out
    masks = torch.as_tensor(region_masks).float().as_subclass(torch.Tensor)
    names = list(region_names or [])
    if masks.shape[0] != len(names) or tuple(masks.shape[1:]) != tuple(out.shape[1:]):
        raise ValueError(
            f"region_masks must be (K, *img_size) = ({len(names)}, {tuple(out.shape[1:])}) for the regions {names}, "
            f"got {tuple(masks.shape)}."
        )
    for i, name in enumerate(variables):
        for k, region in enumerate(names):
            if name.endswith("_" + region):
                out[i] = masks[k]
    return out
