"""Composition and reversibility of a deep SCM's counterfactuals (Monteiro et al. 2023).

* **Composition**: the null intervention ``do(pa := pa)`` must leave an image unchanged. It is
  applied ``k`` times in a row (each cycle abducts from the previous cycle's output) and the mean
  absolute difference to the original image is reported after, by default, 1 and 10 cycles.
* **Reversibility**: ``do(v := c)`` followed by ``do(v := v_original)`` on the result must give
  back the original image.

Both are L1 distances on images mapped to [0, 255] (from the networks' [-1, 1]: ``(x + 1) * 127.5``),
one value per sample. They work with any object exposing ``counterfactual(x, parents,
intervention, **kwargs) -> dict(x_cf, parents_cf, ...)`` (``monai_cft.networks.dscm.DeepSCM``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from monai_cft.metrics._utils import plain
from monai_cft.metrics.interventions import Interventions, counterfactual_per_sample, run_counterfactual

__all__ = ["to_pixel_range", "image_l1", "composition", "reversibility"]


def to_pixel_range(x: torch.Tensor, value_range: Sequence[float] = (-1.0, 1.0), clip: bool = True) -> torch.Tensor:
    """Map intensities linearly from ``value_range`` to [0, 255] (float, not rounded).

    Args:
        x: any tensor of intensities.
        value_range: ``(low, high)`` of the input, mapped to 0 and 255; ``(-1, 1)`` gives ``(x + 1) * 127.5``.
        clip: clamp the result to [0, 255], as when images are saved as 8-bit.
    """
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {tuple(value_range)}.")
    out = (x.to(torch.float32) - lo) * (255.0 / (hi - lo))
    return out.clamp(0.0, 255.0) if clip else out


def image_l1(
    a: torch.Tensor, b: torch.Tensor, value_range: Sequence[float] = (-1.0, 1.0), clip: bool = True
) -> torch.Tensor:
    """Per-sample mean absolute difference of two image batches on the [0, 255] scale.

    Args:
        a, b: (B, C, *spatial) images in ``value_range``.
        value_range, clip: see :func:`to_pixel_range`.

    Returns:
        (B,) float32, in 0-255 intensity units.
    """
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            f"images must be two (B, C, *spatial) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    a, b = plain(a), plain(b)
    diff = to_pixel_range(a, value_range, clip) - to_pixel_range(b, value_range, clip)
    return diff.abs().flatten(1).mean(1)


def _resolve_variables(scm: Any, x: torch.Tensor, parents: torch.Tensor, variables: Sequence[str] | None) -> list[str]:
    """The variable names of the parents' columns: ``variables``, else ``scm.variables``; checked against the shapes."""
    if variables is None:
        variables = getattr(scm, "variables", None)
        if variables is None:
            raise ValueError(
                f"{type(scm).__name__} has no 'variables' attribute: pass variables=[names of the parents' columns]."
            )
    variables = [str(v) for v in variables]
    if parents.ndim != 2 or parents.shape[0] != x.shape[0]:
        raise ValueError(f"parents must be (B, V) with B = {x.shape[0]}, got shape {tuple(parents.shape)}.")
    if parents.shape[1] != len(variables):
        raise ValueError(
            f"parents have {parents.shape[1]} columns but {len(variables)} variables were named: {variables}."
        )
    return variables


def composition(
    scm: Any,
    x: torch.Tensor,
    parents: torch.Tensor,
    cycles: Sequence[int] = (1, 10),
    variables: Sequence[str] | None = None,
    value_range: Sequence[float] = (-1.0, 1.0),
    clip: bool = True,
    **counterfactual_kwargs: Any,
) -> dict[int, torch.Tensor]:
    """L1 distance between images and their null-intervention counterfactuals after ``k`` cycles.

    Cycle ``i`` computes ``x_i = scm.counterfactual(x_{i-1}, parents, {v: parents[:, v] for v in
    variables})["x_cf"]`` with ``x_0 = x``: every variable is set to its own factual value.

    Args:
        scm: object with the ``DeepSCM.counterfactual`` API.
        x: (B, C, *spatial) images in ``value_range``.
        parents: (B, V) factual parents, physical units.
        cycles: the cycle counts to report (positive ints); ``max(cycles)`` cycles are run once.
        variables: the V variable names, in the column order of ``parents``; ``None`` takes
            ``scm.variables``.
        value_range, clip: intensity mapping to [0, 255], see :func:`to_pixel_range`.
        counterfactual_kwargs: passed to ``scm.counterfactual`` (e.g. ``noise_temperature``).

    Returns:
        ``{k: (B,) L1 in 0-255 units}`` for every ``k`` in ``cycles``.
    """
    variables = _resolve_variables(scm, x, parents, variables)
    cycles = tuple(cycles)
    if not cycles or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in cycles):
        raise ValueError(f"cycles must be a non-empty sequence of positive ints, got {cycles}.")
    ks = sorted(set(cycles))
    null = {name: parents[:, j] for j, name in enumerate(variables)}
    out: dict[int, torch.Tensor] = {}
    current = x
    for k in range(1, ks[-1] + 1):
        current = run_counterfactual(scm, current, parents, null, **counterfactual_kwargs)["x_cf"]
        if k in ks:
            out[k] = image_l1(x, current, value_range, clip)
    return out


def reversibility(
    scm: Any,
    x: torch.Tensor,
    parents: torch.Tensor,
    intervention: Mapping[str, float | torch.Tensor] | Interventions,
    variables: Sequence[str] | None = None,
    value_range: Sequence[float] = (-1.0, 1.0),
    clip: bool = True,
    **counterfactual_kwargs: Any,
) -> torch.Tensor:
    """L1 distance between images and the result of an intervention followed by its reversal.

    Step 1: ``x', pa' = scm.counterfactual(x, parents, {v: c})``; step 2: ``x'' =
    scm.counterfactual(x', pa', {v: parents[:, v]})`` (abduction from the counterfactual, so children
    of ``v`` in a non-independent graph return to their values too). Reported: L1(x, x'').

    Args:
        scm: object with the ``DeepSCM.counterfactual`` API.
        x: (B, C, *spatial) images in ``value_range``.
        parents: (B, V) factual parents, physical units.
        intervention: ``{name: float | (B,) Tensor}`` applied to all samples, or per-sample
            :class:`~monai_cft.metrics.interventions.Interventions` (one variable per sample).
        variables: the V variable names, in the column order of ``parents``; ``None`` takes
            ``intervention.variables`` (for :class:`Interventions`) or ``scm.variables``.
        value_range, clip: intensity mapping to [0, 255], see :func:`to_pixel_range`.
        counterfactual_kwargs: passed to ``scm.counterfactual``.

    Returns:
        (B,) L1 in 0-255 units.
    """
    if variables is None and isinstance(intervention, Interventions):
        variables = intervention.variables
    variables = _resolve_variables(scm, x, parents, variables)
    if isinstance(intervention, Interventions):
        if list(intervention.variables) != variables:
            raise ValueError(f"interventions name variables {list(intervention.variables)}, expected {variables}.")
        fwd = counterfactual_per_sample(scm, x, parents, intervention, **counterfactual_kwargs)
        idx = intervention.index.to(parents.device)
        original = parents[torch.arange(parents.shape[0], device=parents.device), idx]
        back = Interventions(intervention.index, original, intervention.variables)
        x_rev = counterfactual_per_sample(scm, fwd["x_cf"], fwd["parents_cf"], back, **counterfactual_kwargs)["x_cf"]
    elif isinstance(intervention, Mapping):
        unknown = [k for k in intervention if k not in variables]
        if unknown or not intervention:
            raise ValueError(f"intervention must set some of {variables}, got {list(intervention)}.")
        fwd = run_counterfactual(scm, x, parents, intervention, **counterfactual_kwargs)
        back_map = {k: parents[:, variables.index(k)] for k in intervention}
        x_rev = run_counterfactual(scm, fwd["x_cf"], fwd["parents_cf"], back_map, **counterfactual_kwargs)["x_cf"]
    else:
        raise TypeError(f"intervention must be a mapping or Interventions, got {type(intervention).__name__}.")
    return image_l1(x, x_rev, value_range, clip)
