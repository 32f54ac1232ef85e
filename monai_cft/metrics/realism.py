"""Realism of counterfactual images: distances between feature distributions of real and generated images.

No network is downloaded: features come from any ``feature_fn(images) -> (N, F)``, typically a
:class:`FeatureExtractor` hooked on the project's own, locally trained evaluation segmentor (its
deepest encoder block, globally average-pooled) or on the parent regressor's penultimate layer.

Two distances are provided:

* :func:`frechet_distance` (the FID formula on these features): the Fréchet (2-Wasserstein)
  distance between Gaussians fitted to both feature sets,
  ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``. The matrix square root is
  computed in float64 with symmetric eigendecompositions (torch only, no scipy; exact for
  singular covariances, which occur whenever N <= F). It is biased for finite N (its expectation is
  > 0 even for two samples of one distribution, decreasing roughly like 1/N), so only compare
  values computed with the same N.
* :func:`kernel_distance` (KID): the unbiased estimate of the squared maximum mean discrepancy with
  the polynomial kernel ``k(a, b) = (a.b / F + 1)^3``. Its expectation is exactly 0 for two samples
  of one distribution and it makes no Gaussian assumption, so it is the better-behaved choice for the
  few hundred images of a quick evaluation; it can be slightly negative.
"""

from __future__ import annotations

import math
from collections.abc import Callable


import torch
from monai.networks.utils import eval_mode

from monai_cft.metrics._utils import check_positive_int, module_device, plain

__all__ = [
    "FeatureExtractor",
    "gaussian_frechet_distance",
    "frechet_distance",
    "kernel_distance",
]


class FeatureExtractor(torch.nn.Module):
    """Global-average-pooled activations of one layer of a (locally trained) network.

    Args:
        model: the network, e.g. the evaluation segmentor or the parent regressor.
        layer: dotted name of the sub-module whose output is taken (one of
            ``dict(model.named_modules())``); ``None`` takes the model's own output.

    ``forward(images (N, C, *spatial)) -> (N, F)``: activations (N, F, *spatial') are averaged over
    their spatial dimensions; (N, F) activations are returned as they are. The model runs on its own
    device in eval mode without gradients (its mode is restored afterwards).
    """

    def __init__(self, model: torch.nn.Module, layer: str | None = None) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        modules = dict(model.named_modules())
        if layer is not None and layer not in modules:
            names = [n for n in modules if n][:20]
            raise ValueError(
                f"model has no sub-module {layer!r}; its first sub-modules are {names} (see model.named_modules())."
            )
        self.model = model
        self.layer = layer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) images -> (N, F) pooled features (float32, on the model's device)."""
        captured: list[torch.Tensor] = []
        handle = None
        if self.layer is not None:
            module = dict(self.model.named_modules())[self.layer]
            handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            with eval_mode(self.model):
                out = self.model(images.to(module_device(self.model, images.device)))
        finally:
            if handle is not None:
                handle.remove()
        if self.layer is not None and not captured:
            raise ValueError(f"sub-module {self.layer!r} was not called in the model's forward pass.")
        feats = captured[-1] if captured else out
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        if not isinstance(feats, torch.Tensor) or feats.ndim < 2:
            got = type(feats).__name__
            raise ValueError(f"layer {self.layer!r} gave {got} output; expected a (N, F, *spatial) tensor.")
        feats = feats.float()
        return feats.flatten(2).mean(2) if feats.ndim > 2 else feats


def _check_features(a: torch.Tensor, b: torch.Tensor, min_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    for t, n in ((a, "first"), (b, "second")):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            got = getattr(t, "shape", type(t).__name__)
            raise ValueError(f"the {n} feature set must be an (N, F) tensor, got {got}.")
        if t.shape[0] < min_n:
            raise ValueError(f"the {n} feature set needs at least {min_n} samples, got {t.shape[0]}.")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"the {n} feature set contains non-finite values.")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}.")
    return plain(a).detach().to(torch.float64), plain(b).detach().to(torch.float64).to(a.device)


def _psd_eigh(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD matrix, eigenvalues within rounding of 0 set to exactly 0.

    Rounding leaves |lambda| ~ F * eps * max(lambda) in the null space of a singular covariance;
    their square roots (~1e-8 relative) would otherwise bias the trace term.
    """
    evals, evecs = torch.linalg.eigh((mat + mat.T) / 2)
    tol = evals.abs().max() * mat.shape[0] * torch.finfo(evals.dtype).eps
    return torch.where(evals > tol, evals, torch.zeros_like(evals)), evecs


def _psd_sqrt(mat: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix."""
    evals, evecs = _psd_eigh(mat)
    return (evecs * evals.sqrt()) @ evecs.T


def gaussian_frechet_distance(
    mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor
) -> torch.Tensor:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    ``|mu_a - mu_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a^1/2 cov_b cov_a^1/2)^1/2)``, the trace term
    computed with symmetric eigendecompositions in float64 (valid for singular covariances).

    Args:
        mu_a, mu_b: (F,) means. cov_a, cov_b: (F, F) symmetric PSD covariances.

    Returns:
        0-d float64 tensor (squared feature units), >= 0 up to rounding.
    """
    f = mu_a.shape[-1]
    for t, shape, n in ((mu_a, (f,), "mu_a"), (mu_b, (f,), "mu_b"), (cov_a, (f, f), "cov_a"), (cov_b, (f, f), "cov_b")):
        if tuple(t.shape) != shape:
            raise ValueError(f"{n} must have shape {shape}, got {tuple(t.shape)}.")
    mu_a, mu_b, cov_a, cov_b = (t.to(torch.float64) for t in (mu_a, mu_b, cov_a, cov_b))
    sa = _psd_sqrt(cov_a)
    cross = _psd_eigh(sa @ cov_b @ sa)[0].sqrt().sum()
    diff = mu_a - mu_b
    return diff @ diff + torch.trace(cov_a) + torch.trace(cov_b) - 2.0 * cross


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> torch.Tensor:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    Args:
        feats_a: (N, F) features of one image set (e.g. counterfactuals).
        feats_b: (M, F) features of the other (e.g. real test images); N, M >= 2.

    Returns:
        0-d float64 tensor; sample covariances use ddof = 1 (as ``monai.metrics.FIDMetric``).
    """
    a, b = _check_features(feats_a, feats_b, min_n=2)
    f = a.shape[1]
    return gaussian_frechet_distance(a.mean(0), torch.cov(a.T).reshape(f, f), b.mean(0), torch.cov(b.T).reshape(f, f))


def _unbiased_mmd2(
    a: torch.Tensor, b: torch.Tensor, kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    m, n = a.shape[0], b.shape[0]
    kaa, kbb, kab = kernel(a, a), kernel(b, b), kernel(a, b)
    term_a = (kaa.sum() - kaa.diagonal().sum()) / (m * (m - 1))
    term_b = (kbb.sum() - kbb.diagonal().sum()) / (n * (n - 1))
    return term_a + term_b - 2.0 * kab.mean()


def kernel_distance(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    subset_size: int | None = None,
    num_subsets: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel (inception-style) distance: unbiased MMD^2 with a polynomial kernel.

    ``k(a, b) = (gamma * a.b + coef0) ** degree`` with ``gamma = 1 / F`` by default (KID). With
    ``subset_size`` the estimate is averaged over ``num_subsets`` random subsets of that size drawn
    without replacement from each set (as in the KID paper, bounding memory at subset_size^2).

    Args:
        feats_a: (N, F) features; feats_b: (M, F) features; N, M >= 2.
        degree, gamma, coef0: polynomial kernel parameters.
        subset_size: samples per subset (<= min(N, M)); ``None`` uses all samples once.
        num_subsets: number of subsets (ignored without ``subset_size``).
        generator: RNG of the subset draws.

    Returns:
        ``(mean, std)`` 0-d float64 tensors: the average MMD^2 estimate and its standard deviation
        over subsets (NaN for a single estimate). Expectation 0 when both sets share a distribution.
    """
    a, b = _check_features(feats_a, feats_b, min_n=2)
    check_positive_int(degree, "degree")
    g = 1.0 / a.shape[1] if gamma is None else float(gamma)
    if not g > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}.")

    def kernel(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (g * (u @ v.T) + coef0) ** degree

    if subset_size is None:
        return _unbiased_mmd2(a, b, kernel), torch.tensor(math.nan, dtype=torch.float64)
    limit = min(a.shape[0], b.shape[0])
    check_positive_int(subset_size, "subset_size", minimum=2)
    if subset_size > limit:
        raise ValueError(f"subset_size must not exceed the smaller feature set's size {limit}, got {subset_size}.")
    check_positive_int(num_subsets, "num_subsets")
    estimates = []
    for _ in range(num_subsets):
        ia = torch.randperm(a.shape[0], generator=generator)[:subset_size].to(a.device)
        ib = torch.randperm(b.shape[0], generator=generator)[:subset_size].to(a.device)
        estimates.append(_unbiased_mmd2(a[ia], b[ib], kernel))
    est = torch.stack(estimates)
    std = est.std() if num_subsets > 1 else torch.tensor(math.nan, dtype=torch.float64)
    return est.mean(), std


