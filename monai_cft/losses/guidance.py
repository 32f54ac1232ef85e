"""Guidance losses of counterfactual fine-tuning (Reg-CFT, Seg-CFT, Pos-Seg-CFT).

A guidance loss scores a counterfactual image ``x_cf`` against the counterfactual parents it was
generated for, through a *frozen*, pretrained network:

- :class:`RegressorGuidanceLoss` (Reg-CFT): a parent regressor predicts the normalized parents of
  ``x_cf`` (mean and log-variance); the loss is their Gaussian negative log-likelihood, L1 or L2
  distance to the targets.
- :class:`SegmentorGuidanceLoss` (Seg-CFT and Pos-Seg-CFT, Eq. 1-3 of the positional paper): a
  segmentor's softmax on ``x_cf`` is summed per structure inside each region mask and multiplied
  by the pixel area, giving measured areas (mm^2; mm^3 in 3D) that are compared with the targets
  by an L1 or L2 term per variable. Without region masks (Seg-CFT) there is one global area per
  structure; with ``K`` masks (Pos-Seg-CFT) one per structure and region.

Frozen means frozen: the guidance network's parameters get ``requires_grad=False``, the network is
kept in eval mode (BatchNorm statistics and Dropout fixed) even when the loss module is switched to
train mode, so no gradient ever reaches its weights; gradients do flow through it into ``x_cf``.

Reduction: ``"mean"`` (default) returns the mean over the batch of the *sum* over variables (each
variable is one term of Eq. 3, so adding variables adds terms instead of diluting them);
``"sum"`` sums over batch and variables; ``"none"`` returns the (B, V) per-variable terms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.loss import _Loss

from monai_cft.transforms.measures import measure_structures
from monai_cft.transforms.parents import range_bounds

__all__ = [
    "freeze_module",
    "RegressorGuidanceLoss",
    "SegmentorGuidanceLoss",
    "ranges_to_scales",
    "structure_total_scales",
]

_REDUCTIONS = ("mean", "sum", "none")


def freeze_module(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``module`` and put it in eval mode (in place)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module to freeze, got {type(module).__name__}.")
    module.requires_grad_(False)
    return module.eval()


def ranges_to_scales(ranges: Mapping[str, Sequence[float]], names: Sequence[str]) -> torch.Tensor:
    """Per-variable normalization scales ``max - min`` of the observed ranges, in ``names`` order.

    Args:
        ranges: ``{name: [min, max]}`` in physical units (``prepare_config.json``'s ``"ranges"``).
        names: the variables in the order of the loss's targets.

    Returns:
        (V,) float32 tensor of positive scales.

    Raises:
        ValueError: a name missing from ``ranges``, or a range that is not finite or has ``max <= min``
            (:func:`monai_cft.transforms.parents.range_bounds`).
    """
    lo, hi = range_bounds(ranges, names)
    return torch.tensor((hi - lo).tolist(), dtype=torch.float32)


def structure_total_scales(values: Any, num_structures: int) -> torch.Tensor:
    """Normalization scales of Seg-CFT's global areas: the observed range of each structure's total.

    Args:
        values: (N, S * R) regional variables of the training cases (structure-major, physical units),
            e.g. ``[item["variables"] for item in datalist]``.
        num_structures: S.

    Returns:
        (S,) float32 tensor ``max_n sum_r v[n, s, r] - min_n sum_r v[n, s, r]``.

    Raises:
        ValueError: a shape that does not split into S structures, non-finite values or a
            structure whose total never varies.
    """
    v = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] % int(num_structures):
        raise ValueError(
            f"values must be (N, S * R) with S = {num_structures} structures, got shape {tuple(v.shape)}."
        )
    if not torch.isfinite(v).all():
        raise ValueError("values contain NaN or infinite entries.")
    totals = v.view(v.shape[0], int(num_structures), -1).sum(-1)
    scales = (totals.max(0).values - totals.min(0).values).float()
    if not (scales > 0).all():
        raise ValueError(f"every structure's total must vary over the cases, got ranges {scales.tolist()}.")
    return scales


def _reduce(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce (B, V) per-variable terms: mean over batch of the sum over variables, sum, or none."""
    if reduction == "mean":
        return terms.sum(1).mean()
    if reduction == "sum":
        return terms.sum()
    return terms


def _distance(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    diff = pred - target
    return diff.abs() if loss == "l1" else diff.square()


class _FrozenGuidanceLoss(_Loss):
    """Common part of the guidance losses: holds one frozen network, keeps it in eval mode."""

    def __init__(self, network: nn.Module, network_name: str, loss: str, losses: Sequence[str], reduction: str):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
        super().__init__(reduction=reduction)
        if loss not in losses:
            raise ValueError(f"loss must be one of {tuple(losses)}, got {loss!r}.")
        self.loss = loss
        self._network_name = network_name
        self.add_module(network_name, freeze_module(network))

    @property
    def network(self) -> nn.Module:
        """The frozen guidance network."""
        return getattr(self, self._network_name)

    def train(self, mode: bool = True) -> _FrozenGuidanceLoss:
        """Switch the loss module's mode; the guidance network always stays in eval mode."""
        super().train(mode)
        self.network.eval()
        return self

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the guidance network (all have ``requires_grad=False``)."""
        return list(self.network.parameters())

    @staticmethod
    def _check_pair(x: torch.Tensor, target: torch.Tensor, num_vars: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 3:
            raise ValueError(f"x_cf must be a (B, C, *spatial) tensor, got {getattr(x, 'shape', type(x))}.")
        target = torch.as_tensor(target, device=x.device)
        if target.ndim == 3:
            target = target.flatten(1)
        if target.shape != (x.shape[0], num_vars):
            raise ValueError(
                f"targets must have shape (B, V) = ({x.shape[0]}, {num_vars}), got {tuple(target.shape)}."
            )
        return target.float()


class RegressorGuidanceLoss(_FrozenGuidanceLoss):
    """Reg-CFT guidance: a frozen parent regressor's prediction on ``x_cf`` vs the counterfactual parents.

    The regressor maps (B, C, *spatial) images to (B, 2V): the mean then the log-variance of the
    *normalized* parents (``monai_cft.networks.predictors.ParentRegressor``), so targets are given
    in normalized units ([-1, 1] over each variable's observed range), which already puts all
    variables on a comparable scale.

    Args:
        regressor: the pretrained regressor; frozen in place (``requires_grad=False``, eval mode).
        num_outputs: V, the number of parents it predicts; checked against its output width 2V.
        loss: ``"gaussian_nll"`` (``-log q(pa_cf | x_cf)`` under the predicted Gaussian, the
            Reg-CFT objective), ``"l1"`` or ``"l2"`` (distance of the predicted mean).
        reduction: ``"mean"`` (mean over batch of the sum over variables), ``"sum"`` or ``"none"`` (B, V).
        log_var_clamp: the predicted log-variance is clamped to this range for the NLL.

    Example::

        loss_fn = RegressorGuidanceLoss(regressor, num_outputs=9)
        loss = loss_fn(x_cf, parents_cf_norm)  # x_cf (B, 1, H, W), parents_cf_norm (B, 9)
    """

    def __init__(
        self,
        regressor: nn.Module,
        num_outputs: int,
        loss: str = "gaussian_nll",
        reduction: str = "mean",
        log_var_clamp: tuple[float, float] = (-9.0, 9.0),
    ) -> None:
        super().__init__(regressor, "regressor", loss, ("gaussian_nll", "l1", "l2"), reduction)
        if int(num_outputs) < 1:
            raise ValueError(f"num_outputs must be a positive number of parents, got {num_outputs}.")
        self.num_outputs = int(num_outputs)
        self.log_var_clamp = (float(log_var_clamp[0]), float(log_var_clamp[1]))
        if loss == "gaussian_nll":
            from monai_cft.losses.nll import GaussianNLLLoss

            self._nll = GaussianNLLLoss(reduction="none", log_var_clamp=self.log_var_clamp)

    def check_parents(self, num_variables: int) -> None:
        """Raise unless this loss can score counterfactuals of a model with ``num_variables`` parents."""
        if self.num_outputs != int(num_variables):
            raise ValueError(f"the regressor predicts {self.num_outputs} parents but the DSCM has {num_variables}.")

    def from_parents(self, x_cf: torch.Tensor, parents_norm: torch.Tensor, low: torch.Tensor,
                     high: torch.Tensor) -> torch.Tensor:
        """The CFT term of ``x_cf`` given the normalized counterfactual parents (B, V) ([-1, 1] over
        ``[low, high]``, which the regressor's targets already are): :meth:`forward`."""
        return self(x_cf, parents_norm)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Regressor prediction on ``x`` (B, C, *spatial): (mean, log-variance), each (B, V), normalized units."""
        out = self.network(x).float()
        if out.ndim != 2 or out.shape[1] != 2 * self.num_outputs:
            raise ValueError(
                f"the regressor must output (B, 2V) = (B, {2 * self.num_outputs}), got {tuple(out.shape)}."
            )
        return out[:, : self.num_outputs], out[:, self.num_outputs :]

    def forward(self, x_cf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Score ``x_cf`` (B, C, *spatial) against the normalized counterfactual parents ``target`` (B, V).

        Returns:
            a scalar (``"mean"`` / ``"sum"``) or the (B, V) per-variable terms (``"none"``).
        """
        target = self._check_pair(x_cf, target, self.num_outputs)
        mean, log_var = self.predict(x_cf)
        if self.loss == "gaussian_nll":
            terms = self._nll(mean, target, log_var)
        else:
            terms = _distance(mean, target, self.loss)
        return _reduce(terms, self.reduction)


class SegmentorGuidanceLoss(_FrozenGuidanceLoss):
    """Seg-CFT / Pos-Seg-CFT guidance: structure areas measured on ``x_cf`` by a frozen segmentor.

    Measured area of structure ``s`` in region ``k`` (Eq. 2): ``a[s, k] = element_size *
    sum_p softmax(segmentor(x_cf))[c_s, p] * R_k[p]``. The loss (Eq. 3) sums over the V = S * K
    variables (structure-major, as :func:`monai_cft.variables.variable_names`)::

        term[b, v] = |a[b, v] - t[b, v]| / scale[v]        (loss="l1")
        term[b, v] = ((a[b, v] - t[b, v]) / scale[v])^2    (loss="l2")

    ``scale[v]`` is the observed range (max - min) of variable ``v`` (:func:`ranges_to_scales`):
    dividing by it makes a lumen error and a calcified-plaque error of the same fraction of their
    ranges weigh the same, although lumen areas are several times larger.

    Args:
        segmentor: pretrained segmentor giving (B, C, *spatial) logits (or probabilities with
            ``softmax=False``); frozen in place.
        structures: structure name -> channel of ``segmentor``'s output (e.g.
            ``{"lumen": 1, "calcified": 2, "noncalcified": 3}``), in variable order.
        region_masks: (K, *spatial) region masks R_k (Pos-Seg-CFT), or ``None`` for one global
            region (Seg-CFT). Kept as a buffer.
        loss: ``"l1"`` or ``"l2"``.
        element_size: pixel area in mm^2 (voxel volume in mm^3 in 3D).
        scales: (V,) per-variable normalization (``max - min``), ``None`` for none (physical units).
        softmax: apply a softmax over channels to the segmentor's output.
        reduction: ``"mean"`` (mean over batch of the sum over variables), ``"sum"`` or ``"none"`` (B, V).

    Example::

        masks = RegionMasks()(torch.zeros(1, 32, 192))  # (3, 32, 192) proximal / mid / distal
        loss_fn = SegmentorGuidanceLoss(unet, {"lumen": 1, "calcified": 2, "noncalcified": 3}, masks,
                                        element_size=0.25, scales=ranges_to_scales(ranges, names))
        loss = loss_fn(x_cf, parents_cf_mm2)  # (B, 9) in mm^2
    """

    def __init__(
        self,
        segmentor: nn.Module,
        structures: Mapping[str, int],
        region_masks: torch.Tensor | None = None,
        loss: str = "l1",
        element_size: float = 1.0,
        scales: torch.Tensor | Sequence[float] | None = None,
        softmax: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__(segmentor, "segmentor", loss, ("l1", "l2"), reduction)
        if not isinstance(structures, Mapping) or not structures:
            raise TypeError(f"structures must be a non-empty mapping name -> channel, got {structures!r}.")
        self.structures = {str(k): int(v) for k, v in structures.items()}
        if not float(element_size) > 0:
            raise ValueError(f"element_size must be a positive pixel area / voxel volume, got {element_size}.")
        self.element_size = float(element_size)
        self.softmax = bool(softmax)
        if region_masks is not None:
            region_masks = torch.as_tensor(region_masks, dtype=torch.float32)
            if region_masks.ndim < 2:
                raise ValueError(f"region_masks must be (K, *spatial), got shape {tuple(region_masks.shape)}.")
        self.register_buffer("region_masks", region_masks)
        num_vars = len(self.structures) * self.num_regions
        if scales is not None:
            scales = torch.as_tensor(scales, dtype=torch.float32).flatten()
            if scales.numel() != num_vars:
                raise ValueError(
                    f"scales must have one entry per variable (S * K = {num_vars}), got {scales.numel()}."
                )
            if not (torch.isfinite(scales).all() and (scales > 0).all()):
                raise ValueError(f"scales must be finite and positive, got {scales.tolist()}.")
        self.register_buffer("scales", scales)

    @property
    def num_regions(self) -> int:
        """K: the number of region masks (1 without masks)."""
        return 1 if self.region_masks is None else int(self.region_masks.shape[0])

    @property
    def num_variables(self) -> int:
        """V = S * K, the number of measured variables."""
        return len(self.structures) * self.num_regions

    def check_parents(self, num_variables: int) -> None:
        """Raise unless the loss can score a model with ``num_variables`` structure-major regional parents:
        S structures times either K regions (Pos-Seg-CFT) or one global region (Seg-CFT)."""
        num_s = len(self.structures)
        if int(num_variables) % num_s:
            raise ValueError(f"{num_variables} DSCM variables are not a multiple of {num_s} structures.")
        regions = int(num_variables) // num_s
        if self.num_regions not in (1, regions):
            raise ValueError(f"the segmentor loss measures {self.num_regions} regions but the DSCM's variables have "
                             f"{regions} per structure (the loss needs one mask per region, or none).")

    def from_parents(self, x_cf: torch.Tensor, parents_norm: torch.Tensor, low: torch.Tensor,
                     high: torch.Tensor) -> torch.Tensor:
        """The CFT term of ``x_cf`` given the normalized counterfactual parents (B, V) in [-1, 1] over
        ``[low, high]`` (physical units): mapped back to physical units (no range check: descendants
        recomputed by the flows may leave the observed range), then :meth:`targets_from_parents`
        and :meth:`forward`."""
        phys = (parents_norm + 1.0) * 0.5 * (high - low) + low
        return self(x_cf, self.targets_from_parents(phys))

    def targets_from_parents(self, parents: torch.Tensor) -> torch.Tensor:
        """Map regional parents (B, S * R), structure-major, physical units, to this loss's (B, S * K) targets.

        With as many regions as the parents (K = R) this is the identity; for Seg-CFT (no masks,
        K = 1) the regional values of each structure are summed into its global area.
        """
        parents = torch.as_tensor(parents)
        num_s = len(self.structures)
        if parents.ndim != 2 or parents.shape[1] % num_s:
            raise ValueError(
                f"parents must be (B, S * R) with S = {num_s} structures, got shape {tuple(parents.shape)}."
            )
        num_r = parents.shape[1] // num_s
        if num_r == self.num_regions:
            return parents
        if self.num_regions == 1:
            return parents.view(parents.shape[0], num_s, num_r).sum(-1)
        raise ValueError(
            f"parents have {num_r} regions per structure but the loss measures {self.num_regions} regions."
        )

    def measure(self, x: torch.Tensor, region_masks: torch.Tensor | None = None) -> torch.Tensor:
        """Areas measured on ``x`` (B, C, *spatial): (B, S * K) in physical units, structure-major.

        Args:
            x: the image batch the segmentor takes.
            region_masks: optional per-call masks (K, *spatial) or (B, K, *spatial) overriding the
                stored ones (same K).
        """
        masks = self.region_masks if region_masks is None else torch.as_tensor(region_masks, device=x.device)
        out = self.network(x).float()
        probs = torch.softmax(out, dim=1) if self.softmax else out
        areas = measure_structures(probs, masks, list(self.structures.values()), self.element_size)
        if areas.shape[-1] != self.num_regions:
            raise ValueError(
                f"expected {self.num_regions} region masks, got masks of shape {tuple(masks.shape)}."
            )
        return areas.flatten(1)

    def forward(
        self, x_cf: torch.Tensor, target: torch.Tensor, region_masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Score ``x_cf`` (B, C, *spatial) against the target areas ``target`` (B, S * K) or (B, S, K).

        Args:
            x_cf: counterfactual images (intensities as the segmentor was trained on).
            target: counterfactual parents in physical units (mm^2 / mm^3), structure-major; use
                :meth:`targets_from_parents` to build them from regional parents.
            region_masks: optional per-call region masks, see :meth:`measure`.

        Returns:
            a scalar (``"mean"`` / ``"sum"``) or the (B, V) per-variable terms (``"none"``).
        """
        target = self._check_pair(x_cf, target, self.num_variables)
        terms = _distance(self.measure(x_cf, region_masks), target, self.loss)
        if self.scales is not None:
            scales = self.scales if self.loss == "l1" else self.scales.square()
            terms = terms / scales
        return _reduce(terms, self.reduction)
