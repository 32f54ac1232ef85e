"""Sampling interventions and running them through a deep SCM, one variable per sample.

The evaluation protocol of the positional paper (and of Monteiro et al. 2023) intervenes on one
variable per image, with a target drawn uniformly from the variable's observed range ``[min, max]``
(training split). This module draws those targets reproducibly (:func:`uniform_targets`) and runs a
batch whose samples have different intervened variables (:class:`Interventions`) through any model
exposing the ``DeepSCM.counterfactual`` API (:func:`counterfactual_per_sample`).

The SCM API relied upon (``docs/design.md``)::

    scm.counterfactual(x, parents, intervention: dict[name -> float | Tensor], **kwargs)
        -> dict(x_cf=..., parents_cf=..., [uncertainty=...])

with ``parents`` (B, V) in physical units and a tensor intervention value of shape (B,) giving one
target per sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from monai.networks.utils import eval_mode

from monai_cft.transforms.parents import range_bounds

__all__ = [
    "Interventions",
    "run_counterfactual",
    "counterfactual_per_sample",
    "uniform_targets",
]


class Interventions(NamedTuple):
    """One single-variable intervention ``do(variables[index[i]] := values[i])`` per sample.

    Attributes:
        index: (N,) int64 column of the intervened variable in the structure-major parents.
        values: (N,) target values in physical units (mm^2 in 2D, mm^3 in 3D).
        variables: the V variable names, in the column order of the parents.
    """

    index: torch.Tensor
    values: torch.Tensor
    variables: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        """The intervened variable's name for every sample (length N)."""
        return [self.variables[i] for i in self.index.tolist()]

    def to_dicts(self) -> list[dict[str, float]]:
        """One ``{name: value}`` intervention dictionary per sample, as ``DeepSCM.counterfactual`` takes."""
        return [{n: float(v)} for n, v in zip(self.names, self.values.tolist())]

    def select(self, samples: torch.Tensor | slice) -> Interventions:
        """The interventions of some samples (a slice, boolean mask or index tensor)."""
        return Interventions(self.index[samples], self.values[samples], self.variables)


def run_counterfactual(
    scm: Any, x: torch.Tensor, parents: torch.Tensor, intervention: Mapping[str, Any], **kwargs: Any
) -> dict[str, torch.Tensor]:
    """Call ``scm.counterfactual`` without gradients, in eval mode, and check its output.

    Args:
        scm: any object with ``counterfactual(x, parents, intervention, **kwargs) -> dict`` (an
            ``nn.Module`` is put in eval mode for the call and restored afterwards).
        x: (B, C, *spatial) images, the network's intensity range.
        parents: (B, V) factual parents, physical units.
        intervention: ``{name: float | (B,) Tensor}`` in physical units.
        kwargs: passed on (e.g. ``num_particles``, ``noise_temperature``).

    Returns:
        the SCM's output dict; ``x_cf`` has the shape of ``x`` and ``parents_cf`` that of ``parents``.
    """
    if not callable(getattr(scm, "counterfactual", None)):
        raise TypeError(f"scm must expose counterfactual(x, parents, intervention, ...), got {type(scm).__name__}.")
    with eval_mode(scm):
        out = scm.counterfactual(x, parents, dict(intervention), **kwargs)
    if not isinstance(out, Mapping) or "x_cf" not in out or "parents_cf" not in out:
        keys = sorted(out) if isinstance(out, Mapping) else type(out).__name__
        raise TypeError(f"scm.counterfactual must return a dict with 'x_cf' and 'parents_cf', got {keys}.")
    if tuple(out["x_cf"].shape) != tuple(x.shape):
        raise ValueError(f"scm returned x_cf of shape {tuple(out['x_cf'].shape)} for x of shape {tuple(x.shape)}.")
    if tuple(out["parents_cf"].shape) != tuple(parents.shape):
        raise ValueError(
            f"scm returned parents_cf of shape {tuple(out['parents_cf'].shape)} for parents of shape "
            f"{tuple(parents.shape)}."
        )
    return dict(out)


def counterfactual_per_sample(
    scm: Any, x: torch.Tensor, parents: torch.Tensor, interventions: Interventions, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """Counterfactuals of a batch in which every sample has its own intervened variable.

    Samples are grouped by intervened variable and each group goes through one
    ``scm.counterfactual`` call with a (b,) tensor of targets; the outputs are put back in batch
    order. Every tensor output whose first dimension is the group size (``x_cf``, ``parents_cf``,
    ``uncertainty``, ...) is reassembled.

    Args:
        scm: see :func:`run_counterfactual`.
        x: (B, C, *spatial) images.
        parents: (B, V) factual parents, physical units, columns in ``interventions.variables`` order.
        interventions: (B,) interventions, e.g. from :func:`sample_interventions`.
        kwargs: passed to ``scm.counterfactual``.

    Returns:
        dict with at least ``x_cf`` (B, C, *spatial) and ``parents_cf`` (B, V).
    """
    b = x.shape[0]
    if parents.ndim != 2 or parents.shape[0] != b:
        raise ValueError(f"parents must be (B, V) with B = {b}, got shape {tuple(parents.shape)}.")
    if parents.shape[1] != len(interventions.variables):
        raise ValueError(
            f"parents have {parents.shape[1]} columns but the interventions name {len(interventions.variables)} "
            f"variables {list(interventions.variables)}."
        )
    if interventions.index.shape != (b,) or interventions.values.shape != (b,):
        raise ValueError(
            f"need one intervention per sample (B = {b}), got index {tuple(interventions.index.shape)} and "
            f"values {tuple(interventions.values.shape)}."
        )
    if b == 0:
        raise ValueError("counterfactual_per_sample needs a non-empty batch, got B = 0.")
    index = interventions.index.to(x.device)
    values = interventions.values.to(device=parents.device, dtype=parents.dtype)
    merged: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    groups = torch.unique(index).tolist()
    for j in groups:
        sel = (index == j).nonzero(as_tuple=True)[0]
        name = interventions.variables[j]
        out = run_counterfactual(scm, x[sel], parents[sel], {name: values[sel.to(values.device)]}, **kwargs)
        for key, val in out.items():
            if not (isinstance(val, torch.Tensor) and val.ndim > 0 and val.shape[0] == sel.numel()):
                continue
            if key not in merged:
                merged[key] = val.new_empty((b, *val.shape[1:]))
            merged[key][sel.to(val.device)] = val
            counts[key] = counts.get(key, 0) + 1
    # keep only outputs that every group returned (a partially filled tensor would hold garbage)
    return {k: v for k, v in merged.items() if counts[k] == len(groups)}


def uniform_targets(names: Sequence[str], ranges: Mapping[str, Sequence[float]], n: int, seed: int) -> torch.Tensor:
    """The evaluation protocol's intervention targets: (n, V) float32, ``[i, v]`` the target of do(names[v]) on case i.

    Each target is drawn uniformly from the variable's observed ``[min, max]`` (training split) with a
    ``torch.Generator`` seeded by ``seed``, so the evaluation and the ground-truth counterfactuals
    (:mod:`monai_cft.data.ground_truth`) use the same targets for the same cases.
    """
    low, high = range_bounds(ranges, names, allow_constant=True)  # validated; a constant variable gets its value
    gen = torch.Generator().manual_seed(int(seed))
    lo = torch.tensor(low.tolist(), dtype=torch.float32)
    hi = torch.tensor(high.tolist(), dtype=torch.float32)
    return lo + (hi - lo) * torch.rand(int(n), len(names), generator=gen)
