"""The constrained ELBO of counterfactual fine-tuning: ``min aux  s.t.  nelbo <= eps`` as a damped Lagrangian.

:class:`ConstrainedELBO` holds the Lagrange multiplier ``lambda`` (a parameter, updated by gradient
ascent in :class:`~monai_cft.engines.cft_trainer.CFTTrainer`) and the ELBO target ``eps`` (a
buffer, measured on the pretrained model when the fine-tuning starts).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from monai_cft.utils.distributed import all_reduce_mean

__all__ = ["ConstrainedELBO"]


class ConstrainedELBO(nn.Module):
    """Lagrangian of ``min aux  s.t.  nelbo <= eps`` with a damping term.

    ``forward(aux, nelbo) = aux - (lambda - damping * sg(eps - nelbo)) * (eps - nelbo)``: the
    gradient in the model's weights is ``d aux + (lambda + damping * (nelbo - eps)) d nelbo``, so
    the ELBO is pulled back towards ``eps`` from both sides; the gradient in ``lambda`` is
    ``nelbo - eps``, ascended by the multiplier's optimizer (``maximize=True``) and ``lambda`` is
    clamped at 0 after each step (:meth:`clamp_`).

    With ``one_sided=True`` the damping acts only on a violation: the term is
    ``damping * sg(min(eps - nelbo, 0))``, so an ELBO better than ``eps`` is left alone (an inequality
    constraint) instead of being pushed back up to ``eps``; with a slack in ``eps`` this leaves the
    guidance the whole slack to spend.

    Args:
        damping: weight of the damping term (100 in causal-gen).
        lagrange_init: initial ``lambda`` (>= 0).
        one_sided: damp violations only (see above); False is causal-gen's two-sided form.
        elbo_target: ``eps`` in nats per image element, or ``None`` to set it later
            (:meth:`set_target`); kept as a buffer so that it is saved and restored.

    Shapes: ``aux`` and ``nelbo`` are scalars; so is the result.
    """

    def __init__(self, damping: float = 100.0, lagrange_init: float = 0.0, elbo_target: float | None = None,
                 one_sided: bool = False) -> None:
        super().__init__()
        self.one_sided = bool(one_sided)
        if not (math.isfinite(damping) and damping >= 0):
            raise ValueError(f"damping must be finite and >= 0, got {damping}.")
        if not (math.isfinite(lagrange_init) and lagrange_init >= 0):
            raise ValueError(f"lagrange_init must be finite and >= 0, got {lagrange_init}.")
        self.damping = float(damping)
        self.lmbda = nn.Parameter(torch.tensor(float(lagrange_init)))
        self.register_buffer("eps", torch.tensor(float("nan")))
        if elbo_target is not None:
            self.set_target(elbo_target)

    @property
    def has_target(self) -> bool:
        """Whether the ELBO target ``eps`` has been set."""
        return bool(torch.isfinite(self.eps))

    def set_target(self, value: float) -> None:
        """Set the ELBO target ``eps`` (nats per image element)."""
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"the ELBO target must be finite, got {value}.")
        self.eps.fill_(value)

    def forward(self, aux: torch.Tensor, nelbo: torch.Tensor) -> torch.Tensor:
        """Constrained objective for the guidance loss ``aux`` and the factual negative ELBO ``nelbo``."""
        if not self.has_target:
            raise RuntimeError("the ELBO target eps is not set: call set_target() or measure it first.")
        gap = self.eps.to(nelbo.dtype) - nelbo
        # the damping factor from the ELBO of the whole (global) batch, so that data-parallel processes agree
        damp = self.eps.to(nelbo.dtype) - all_reduce_mean(nelbo.detach())
        damp = damp.clamp(max=0.0) if self.one_sided else damp
        return aux - (self.lmbda - self.damping * damp) * gap

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project ``lambda`` back onto ``lambda >= 0``."""
        self.lmbda.clamp_(min=0.0)
