"""The HVAE's likelihood terms: the discretised Gaussian image likelihood, the Gaussian KL and the KL warm-up."""

from __future__ import annotations

import math

import torch

__all__ = ["beta_schedule", "gaussian_kl", "discretized_gaussian_nll"]


def beta_schedule(step: int, warmup_steps: int, beta_max: float = 1.0) -> float:
    """KL weight for a linear warm-up: ``beta_max * min(1, step / warmup_steps)``.

    Args:
        step: current optimisation step (>= 0).
        warmup_steps: number of steps of the warm-up; 0 switches the warm-up off.
        beta_max: final KL weight.
    """
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got step={step}, warmup_steps={warmup_steps}.")
    if warmup_steps == 0:
        return float(beta_max)
    return float(beta_max) * min(1.0, step / warmup_steps)


def gaussian_kl(q_loc: torch.Tensor, q_std: torch.Tensor, p_loc: torch.Tensor, p_std: torch.Tensor) -> torch.Tensor:
    """Element-wise analytic ``KL(N(q_loc, q_std^2) || N(p_loc, p_std^2))`` in nats (same shape as inputs)."""
    var_ratio = (q_std / p_std) ** 2
    diff = ((q_loc - p_loc) / p_std) ** 2
    return 0.5 * (var_ratio + diff - 1.0) - torch.log(q_std / p_std)


def discretized_gaussian_nll(
    x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, num_bins: int = 256, edge: float = 1e-3
) -> torch.Tensor:
    """Negative log-likelihood (nats) of ``x`` under a Gaussian discretised into ``num_bins`` bins on [-1, 1].

    Every value ``x`` is given the probability mass of the bin ``[x - h, x + h]`` with half width
    ``h = 1 / (num_bins - 1)``; values within ``edge`` of -1 (of 1) take the whole lower (upper) tail,
    as the clipped image intensities pile up at the ends of the window. The mass is evaluated with
    ``log_ndtr`` on the tail that keeps it accurate, and by the midpoint rule (``pdf * width``) when
    the bin is narrower than 1e-3 standard deviations, so the result and its gradient stay finite.

    Args:
        x: data in [-1, 1], any shape.
        loc: Gaussian mean, broadcastable to ``x``.
        scale: Gaussian standard deviation (> 0), broadcastable to ``x``.
        num_bins: number of intensity bins (256 for 8-bit images).
        edge: distance from +-1 below which a value is treated as the extreme bin.

    Returns:
        Tensor of the shape of ``x``: per-element negative log-probability in nats.
    """
    half = 1.0 / (num_bins - 1)
    upper = (x - loc + half) / scale
    lower = (x - loc - half) / scale
    # Phi(u) - Phi(l) == Phi(-l) - Phi(-u): evaluate on the side where both arguments are <= their mean.
    flip = (upper + lower) > 0
    a = torch.where(flip, -upper, lower)
    b = torch.where(flip, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    diff = (torch.special.log_ndtr(a) - log_b).clamp(max=-1e-12)
    log_exact = log_b + torch.log(-torch.expm1(diff))
    mid = 0.5 * (a + b)
    log_midpoint = -0.5 * mid * mid - 0.5 * math.log(2.0 * math.pi) + torch.log(b - a)
    log_mass = torch.where((b - a) < 1e-3, log_midpoint, log_exact)
    # extreme bins: log Phi(upper) at the lower end, log Phi(-lower) = log(1 - Phi(lower)) at the upper end
    log_tail = torch.special.log_ndtr(torch.where(x < 0, upper, -lower))
    log_mass = torch.where((x < -1.0 + edge) | (x > 1.0 - edge), log_tail, log_mass)
    return -log_mass
