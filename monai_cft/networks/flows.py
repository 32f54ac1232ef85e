"""Invertible mechanisms of the scalar variables: one conditional normalising flow per variable.

Every variable ``v_k`` (in normalised units, [-1, 1] over its observed range, see
:class:`monai_cft.transforms.parents.ParentNormalizer`) has a mechanism ``v_k = f_k(u_k; pa_k)`` with
standard-normal exogenous noise ``u_k``. ``f_k`` is a zuko neural spline flow on one feature
(``zuko.flows.NSF(features=1, context=len(pa_k))``): for a single feature zuko's autoregressive
conditioner sees only the context, so each of its transforms is a monotonic rational-quadratic
spline whose knots are an MLP of the parents (a constant for a root). The splines act on
[-5, 5] and are the identity outside, which comfortably contains normalised values.

The causal graph is a dict ``{variable: [parent variables]}``; variables that do not appear as a
key are roots. The default (no graph) makes every variable a root, as in the coronary paper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import zuko

from monai_cft.utils.distributed import batch_rand_like

__all__ = ["AttributeMechanisms", "topological_order"]


def topological_order(variables: Sequence[str], graph: Mapping[str, Sequence[str]] | None) -> list[int]:
    """Indices of ``variables`` in a causal order (parents first, ties kept in the given order).

    Raises:
        ValueError: unknown variable names, duplicate or self parents, or a cycle (named).
    """
    variables = list(variables)
    index = {v: i for i, v in enumerate(variables)}
    graph = dict(graph or {})
    for child, parents in graph.items():
        if child not in index:
            raise ValueError(f"graph names unknown variable {child!r}; variables are {variables}.")
        if isinstance(parents, str):
            raise TypeError(f"parents of {child!r} must be a list of names, got the string {parents!r}.")
        for p in parents:
            if p not in index:
                raise ValueError(f"graph gives {child!r} the unknown parent {p!r}; variables are {variables}.")
        if child in parents:
            raise ValueError(f"variable {child!r} cannot be its own parent.")
        if len(set(parents)) != len(parents):
            raise ValueError(f"parents of {child!r} are repeated: {list(parents)}.")
    remaining = {v: set(graph.get(v, ())) for v in variables}
    order: list[int] = []
    while remaining:
        ready = [v for v in variables if v in remaining and not remaining[v]]
        if not ready:
            raise ValueError(f"the causal graph has a cycle among {sorted(remaining)}.")
        for v in ready:
            order.append(index[v])
            del remaining[v]
        for deps in remaining.values():
            deps.difference_update(ready)
    return order


def _identity_init(flow: nn.Module) -> None:
    """Start a zuko spline flow as the identity (a standard-normal density in normalised units).

    zuko draws the parameters of an unconditional spline from a standard normal, which makes the
    initial density of a root arbitrary (log-densities of -10 nats inside [-1, 1] are common).
    Zero spline parameters give the identity spline; for a conditional flow the last layer of each
    conditioner MLP is zeroed, so that it starts as the identity for every context and still
    receives gradients.
    """
    for transform in flow.transform.transforms:
        # zuko has its own Linear (not an nn.Linear subclass): find layers by their 2D weight
        layers = [m for m in transform.modules() if getattr(getattr(m, "weight", None), "ndim", 0) == 2]
        params = list(layers[-1].parameters()) if layers else list(transform.parameters())
        with torch.no_grad():
            for p in params:
                p.zero_()


class AttributeMechanisms(nn.Module):
    """Conditional normalising flows for the scalar variables of a causal graph.

    Args:
        variables: variable names; the column order of every (B, V) tensor.
        graph: ``{variable: [parent variables]}``; ``None`` or missing keys mean roots.
        hidden: hidden layer widths of every flow's conditioner MLP.
        transforms: spline transforms stacked per flow.
        bins: spline bins per transform.
        dequantize: width (normalised units) of the uniform noise added to the values by
            :meth:`log_prob` in training mode. Zero-inflated variables (no plaque: exactly the range
            minimum) are point masses whose density is unbounded; spreading them over a small
            interval keeps the likelihood finite. 0 disables it.

    Every flow starts as the identity map (standard-normal densities), see :func:`_identity_init`.

    Attributes:
        order: variable indices in causal order. ``parent_index``: per variable, the column indices
        of its parents. ``config``: constructor arguments (JSON-serialisable).
    """

    def __init__(
        self,
        variables: Sequence[str],
        graph: Mapping[str, Sequence[str]] | None = None,
        hidden: Sequence[int] = (64, 64),
        transforms: int = 3,
        bins: int = 8,
        dequantize: float = 0.02,
    ) -> None:
        super().__init__()
        variables = list(variables)
        if not variables or not all(isinstance(v, str) and v for v in variables):
            raise ValueError(f"variables must be a non-empty list of names, got {variables!r}.")
        if len(set(variables)) != len(variables):
            raise ValueError(f"variable names must be unique, got {variables}.")
        if dequantize < 0:
            raise ValueError(f"dequantize must be >= 0, got {dequantize}.")
        self.variables = variables
        self.order = topological_order(variables, graph)
        graph = {k: list(v) for k, v in (graph or {}).items() if v}
        self.parent_index = [[variables.index(p) for p in graph.get(v, [])] for v in variables]
        self.dequantize = float(dequantize)
        self.flows = nn.ModuleList(
            zuko.flows.NSF(
                features=1,
                context=len(pa),
                bins=bins,
                transforms=transforms,
                hidden_features=tuple(int(h) for h in hidden),
            )
            for pa in self.parent_index
        )
        for flow in self.flows:
            _identity_init(flow)
        self.config: dict[str, Any] = {
            "variables": variables,
            "graph": graph,
            "hidden": [int(h) for h in hidden],
            "transforms": int(transforms),
            "bins": int(bins),
            "dequantize": self.dequantize,
        }

    @property
    def num_variables(self) -> int:
        """Number of variables V."""
        return len(self.variables)

    @property
    def graph(self) -> dict[str, list[str]]:
        """The causal graph as ``{child: [parents]}`` (roots omitted)."""
        return {k: list(v) for k, v in self.config["graph"].items()}

    def _check(self, values: torch.Tensor, name: str = "values") -> None:
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}.")
        if values.ndim != 2 or values.shape[1] != self.num_variables:
            raise ValueError(
                f"{name} must be (B, {self.num_variables}) for variables {self.variables}, got {tuple(values.shape)}."
            )
        if not torch.isfinite(values).all():
            b, k = (~torch.isfinite(values)).nonzero()[0].tolist()
            raise ValueError(f"{name} contain NaN/inf: sample {b}, variable {self.variables[k]!r}.")

    def _dist(self, k: int, columns: Sequence[torch.Tensor | None] | torch.Tensor):
        """zuko distribution of variable ``k`` given its parents' columns."""
        pa = self.parent_index[k]
        if not pa:
            return self.flows[k]()
        if isinstance(columns, torch.Tensor):
            ctx = columns[:, pa]
        else:
            ctx = torch.stack([columns[p] for p in pa], dim=1)
        return self.flows[k](ctx)

    def log_prob_per_variable(self, values: torch.Tensor, dequantize: float | None = None) -> torch.Tensor:
        """Log-density (nats) of every variable given its parents.

        Args:
            values: normalised values (B, V).
            dequantize: uniform noise width; ``None`` uses :attr:`dequantize` in training mode and
                0 in eval mode.

        Returns:
            (B, V) log-densities in normalised units.
        """
        self._check(values)
        width = (self.dequantize if self.training else 0.0) if dequantize is None else float(dequantize)
        if width > 0:
            values = values + (batch_rand_like(values) - 0.5) * width
        cols = [self._dist(k, values).log_prob(values[:, k : k + 1]) for k in range(self.num_variables)]
        return torch.stack(cols, dim=1)

    def log_prob(self, values: torch.Tensor, dequantize: float | None = None) -> torch.Tensor:
        """Joint log-density (B,) of normalised values (B, V): the sum of :meth:`log_prob_per_variable`."""
        return self.log_prob_per_variable(values, dequantize).sum(dim=1)

    def abduct(self, values: torch.Tensor) -> torch.Tensor:
        """Exogenous noise ``u_k = f_k^{-1}(v_k; pa_k)`` (B, V) of normalised values (B, V)."""
        self._check(values)
        cols = [self._dist(k, values).transform(values[:, k : k + 1]).squeeze(1) for k in range(self.num_variables)]
        return torch.stack(cols, dim=1)

    def generate(self, noise: torch.Tensor) -> torch.Tensor:
        """Values (B, V) from exogenous noise (B, V), evaluated in causal order (inverse of :meth:`abduct`)."""
        self._check(noise, "noise")
        cols: list[torch.Tensor | None] = [None] * self.num_variables
        for k in self.order:
            cols[k] = self._dist(k, cols).transform.inv(noise[:, k : k + 1]).squeeze(1)
        return torch.stack(cols, dim=1)  # type: ignore[arg-type]

    def sample(self, num_samples: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Draw ``num_samples`` joint samples (num_samples, V) in normalised units."""
        if device is None:
            device = next(self.parameters()).device
        return self.generate(torch.randn(num_samples, self.num_variables, device=device))

    def counterfactual(
        self, values: torch.Tensor, intervene_mask: torch.Tensor, intervene_values: torch.Tensor
    ) -> torch.Tensor:
        """Counterfactual values under per-sample interventions.

        Variables with ``intervene_mask`` set take ``intervene_values``; every descendant of an
        intervened variable is recomputed in causal order from its abducted noise under its new
        parents; all other variables (untouched roots included) are returned unchanged, bit for bit.

        Args:
            values: factual normalised values (B, V).
            intervene_mask: (B, V) bool, which variables are intervened on in each sample.
            intervene_values: (B, V) normalised targets (read only where the mask is set; other
                entries may hold anything, NaN included).

        Returns:
            (B, V) counterfactual normalised values.
        """
        self._check(values)
        if not isinstance(intervene_mask, torch.Tensor) or intervene_mask.dtype != torch.bool:
            got = getattr(intervene_mask, "dtype", type(intervene_mask).__name__)
            raise TypeError(f"intervene_mask must be a bool tensor, got {got}.")
        if intervene_mask.shape != values.shape or not isinstance(intervene_values, torch.Tensor) or (
            intervene_values.shape != values.shape
        ):
            raise ValueError(
                f"intervene_mask and intervene_values must have the shape of values {tuple(values.shape)}, got "
                f"{tuple(intervene_mask.shape)} and {tuple(getattr(intervene_values, 'shape', ()))}."
            )
        targets = torch.where(intervene_mask, intervene_values, torch.zeros_like(intervene_values))
        if not torch.isfinite(targets).all():
            b, k = (~torch.isfinite(targets)).nonzero()[0].tolist()
            raise ValueError(f"intervention value of sample {b}, variable {self.variables[k]!r} is not finite.")
        noise = None
        cols: list[torch.Tensor | None] = [None] * self.num_variables
        changed: list[torch.Tensor | None] = [None] * self.num_variables
        for k in self.order:
            new, moved = values[:, k], intervene_mask[:, k]
            pa = self.parent_index[k]
            if pa:
                parent_moved = torch.stack([changed[p] for p in pa], dim=1).any(dim=1)
                if bool(parent_moved.any()):
                    if noise is None:
                        noise = self.abduct(values)
                    recomputed = self._dist(k, cols).transform.inv(noise[:, k : k + 1]).squeeze(1)
                    new = torch.where(parent_moved, recomputed, new)
                    moved = moved | parent_moved
            cols[k] = torch.where(intervene_mask[:, k], targets[:, k], new)
            changed[k] = moved
        return torch.stack(cols, dim=1)  # type: ignore[arg-type]
