"""Parent-conditioned hierarchical VAE (a VDVAE-style ladder network) for 2D and 3D images.

The network is the image mechanism of the deep structural causal model: ``x = g(z, pa, u_x)``.
It follows the very deep VAE (VDVAE) layout:

* a bottom-up **encoder**: a stem convolution, then for every *level* a stack of residual blocks,
  then a down-sampling step (average pooling by the level's per-axis factor and a 1x1 convolution
  to the next width);
* a top-down **decoder** that starts from a learned constant at the coarsest level and walks back
  up, level by level, through decoder blocks. At a *stochastic* level every decoder block holds one
  latent layer ``z_i`` of ``z_dim`` channels at that level's resolution, with a learned prior
  ``p(z_i | z_<i, pa)`` computed from the decoder state and a posterior ``q(z_i | z_<i, x, pa)``
  computed from the decoder state and the encoder activation of the same level;
* the normalised parents ``pa`` (B, P) are embedded once by a small MLP and injected into **every**
  decoder block by FiLM (per-channel scale and shift, zero-initialised so that the untrained
  network starts as an unconditional VAE);
* a discretised Gaussian likelihood over 256 bins of the [-1, 1] intensity range.

Resolutions are keyed by level, never by width, so non-square images (32 x 192, 64 x 384) and
volumes (32 x 32 x 192) work: level 0 is the input resolution and every level divides each axis by
its factor (default 2 for every axis whose size is even, 1 once an axis is odd, e.g. already 1).
Latents only exist at levels whose every axis is ``<= z_max_res`` (``HierarchicalVAE.stochastic``).

All losses are reported per image element (pixel or voxel, times channels) in nats and averaged
over the batch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool

from monai_cft.networks.likelihoods import beta_schedule, discretized_gaussian_nll, gaussian_kl
from monai_cft.networks.strides import expand_per_axis, level_sizes, resolve_strides
from monai_cft.utils.distributed import batch_randn_like
from monai_cft.utils.state_dict import state_dict_problems

__all__ = ["HierarchicalVAE", "beta_schedule", "discretized_gaussian_nll", "gaussian_kl", "resolve_strides",
           "level_sizes"]

#: softplus(_SOFTPLUS_ONE) == 1, so a zero-initialised raw scale gives a unit standard deviation.
_SOFTPLUS_ONE = math.log(math.e - 1.0)
#: lower bound added to every latent standard deviation.
_MIN_STD = 1e-5
#: keys of :attr:`HierarchicalVAE.config` that define the parameter shapes (checkpoint compatibility).
ARCH_KEYS = ("spatial_dims", "in_channels", "img_size", "num_parents", "widths", "blocks_per_level", "z_dim",
             "z_max_res", "strides", "bottleneck", "embed_dim", "cond_prior", "spatial_parents")
#: keys of :attr:`HierarchicalVAE.config` that record provenance, not constructor arguments.
_PROVENANCE_KEYS = ("overrides",)
#: value of an architecture key that checkpoints written before the key existed imply.
_ARCH_DEFAULTS = {"spatial_parents": False}


class _ConvBlock(nn.Module):
    """Pre-activation block ``GELU -> conv(k1) -> GELU -> conv(k2)``, optionally residual.

    Shapes: (B, in_ch, *sp) -> (B, out_ch, *sp). ``last_scale`` multiplies the initial weights of
    the last convolution (0 gives a block that starts as the identity / as zeros).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_ch: int,
        mid_ch: int,
        out_ch: int,
        residual: bool,
        kernels: tuple[int, int] = (3, 3),
        last_scale: float = 1.0,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        if residual and in_ch != out_ch:
            raise ValueError(f"a residual block needs in_ch == out_ch, got {in_ch} and {out_ch}.")
        self.residual = residual
        self.conv1 = conv(in_ch, mid_ch, kernels[0], padding=kernels[0] // 2)
        self.conv2 = conv(mid_ch, out_ch, kernels[1], padding=kernels[1] // 2)
        with torch.no_grad():
            self.conv2.weight.mul_(last_scale)
            self.conv2.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.gelu(self.conv1(F.gelu(h))))
        return h + out if self.residual else out


class _DecoderBlock(nn.Module):
    """One top-down block: FiLM parent injection, an optional stochastic layer, a residual block."""

    def __init__(
        self, spatial_dims: int, width: int, mid: int, embed_dim: int, z_dim: int, cond_prior: bool, res_scale: float,
        num_maps: int = 0,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.width = width
        self.z_dim = z_dim
        self.cond_prior = cond_prior
        self.film = nn.Linear(embed_dim, 2 * width)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        # spatial FiLM from parent maps (each parent's value painted into its region), zero-initialised
        self.map_film = conv(num_maps, 2 * width, 1) if num_maps else None
        if self.map_film is not None:
            nn.init.zeros_(self.map_film.weight)
            nn.init.zeros_(self.map_film.bias)
        if z_dim:
            # prior: (loc, raw std, features added to the state); zero init -> N(0, 1) and no features.
            self.prior = _ConvBlock(spatial_dims, width, mid, 2 * z_dim + width, False, (3, 1), last_scale=0.0)
            self.posterior = _ConvBlock(spatial_dims, 2 * width, mid, 2 * z_dim, False, (3, 1))
            self.z_proj = conv(z_dim, width, 1)
            with torch.no_grad():
                self.z_proj.weight.mul_(res_scale)
        self.res = _ConvBlock(spatial_dims, width, mid, width, True, (3, 3), last_scale=res_scale)

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        enc: torch.Tensor | None,
        z: torch.Tensor | None,
        mean: bool,
        temperature: float,
        maps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Return the new state, the latent used (None if deterministic) and the KL map (posterior only)."""
        mod = self.film(emb).view(emb.shape[0], 2 * self.width, *([1] * (h.ndim - 2)))
        if self.map_film is not None and maps is not None:
            mod = mod + self.map_film(maps)
        gamma, shift = mod.chunk(2, dim=1)
        h_pa = h * (1.0 + gamma) + shift
        kl = None
        if self.z_dim:
            p_loc, p_raw, feat = self.prior(h_pa if self.cond_prior else h).split(
                [self.z_dim, self.z_dim, self.width], dim=1
            )
            # distribution parameters in float32 even under autocast (KL and sampling are precision sensitive)
            p_loc, p_std = p_loc.float(), F.softplus(p_raw.float() + _SOFTPLUS_ONE) + _MIN_STD
            if z is None and enc is not None:
                q_loc, q_raw = self.posterior(torch.cat([h_pa, enc], dim=1)).chunk(2, dim=1)
                q_loc, q_std = q_loc.float(), F.softplus(q_raw.float() + _SOFTPLUS_ONE) + _MIN_STD
                z = q_loc if mean else q_loc + q_std * batch_randn_like(q_loc)
                kl = gaussian_kl(q_loc, q_std, p_loc, p_std)
            elif z is None:
                z = p_loc if mean else p_loc + temperature * p_std * batch_randn_like(p_loc)
            h_pa = h_pa + feat + self.z_proj(z)
        return self.res(h_pa), z, kl


class HierarchicalVAE(nn.Module):
    """Parent-conditioned VDVAE-style hierarchical VAE for images in [-1, 1].

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels C.
        img_size: spatial size of the input, e.g. ``(32, 192)`` or ``(32, 32, 192)``.
        num_parents: number P of (normalised) parent variables conditioning the decoder.
        widths: channel width of every level (level 0 = full resolution); its length is the number
            of levels.
        blocks_per_level: residual blocks per level (int or one per level), used by the encoder and
            the decoder alike; at a stochastic level every decoder block is one latent layer. 0 is
            allowed (the level only changes resolution).
        z_dim: latent channels of every stochastic layer (int or one per level).
        z_max_res: a level is stochastic when every axis of its size is ``<= z_max_res`` (an int, or
            one limit per axis). At least one level must be stochastic.
        strides: per-transition down-sampling factors, see :func:`resolve_strides` (``None``: halve
            every even axis).
        bottleneck: width of the inner convolution of every block as a fraction of the level's width
            (at least 4 channels).
        embed_dim: width of the parent embedding fed to every decoder block's FiLM layer.
        cond_prior: if True the prior of a layer also sees the parents injected in its own block;
            if False it only sees the decoder state below it (parents of earlier blocks), so the
            top layer's prior is parent-free.
        spatial_parents: also inject each parent as a *map*: its value painted into its region
            (``parent_regions``), resized to every level, through a zero-initialised 1x1 convolution
            giving a per-pixel FiLM scale and shift. A regional variable (e.g. calcified plaque in
            the mid third) then modulates the decoder only where it applies.
        parent_regions: (P, *img_size) masks in [0, 1], one per parent (all ones for a global
            parent); required with ``spatial_parents`` unless the masks are loaded afterwards from a
            state dict (buffer ``parent_regions``).
        free_bits: KL floor in nats per latent channel of every layer and image (0 disables);
            applied to the batch-mean KL of each (layer, channel) pair inside ``elbo`` only.
        log_scale_min: lower clamp of the likelihood's log standard deviation.
        num_bins: bins of the discretised likelihood.
        preset: name of the preset the hyper-parameters come from (stored in :attr:`config`).

    Attributes:
        config: dict of every constructor argument (JSON-serialisable); checkpoints store it.
        sizes: spatial size of every level. ``stochastic``: per-level flag.
        latent_shapes: ``(z_dim, *size)`` of every stochastic layer, top (coarsest) first, the order
            of the lists returned by :meth:`abduct`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        img_size: Sequence[int],
        num_parents: int,
        widths: Sequence[int] = (16, 32, 64, 64),
        blocks_per_level: int | Sequence[int] = 1,
        z_dim: int | Sequence[int] = 8,
        z_max_res: int | Sequence[int] = 48,
        strides: Sequence[int | Sequence[int]] | None = None,
        bottleneck: float = 0.5,
        embed_dim: int = 32,
        cond_prior: bool = True,
        spatial_parents: bool = False,
        parent_regions: torch.Tensor | None = None,
        free_bits: float = 0.0,
        log_scale_min: float = -9.0,
        num_bins: int = 256,
        preset: str | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        img_size = tuple(int(s) for s in img_size)
        if len(img_size) != spatial_dims or min(img_size) < 1:
            raise ValueError(f"img_size must hold {spatial_dims} positive sizes, got {img_size}.")
        for name, val in (("in_channels", in_channels), ("num_parents", num_parents), ("embed_dim", embed_dim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}.")
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths}.")
        n_levels = len(widths)
        blocks = expand_per_axis(blocks_per_level, n_levels, "blocks_per_level", "level of widths")
        z_dims = expand_per_axis(z_dim, n_levels, "z_dim", "level of widths")
        if min(blocks) < 0 or min(z_dims) < 1:
            raise ValueError(f"blocks_per_level must be >= 0 and z_dim >= 1, got {blocks} and {z_dims}.")
        if not 0.0 < bottleneck <= 4.0:
            raise ValueError(f"bottleneck must be in (0, 4], got {bottleneck}.")
        if free_bits < 0:
            raise ValueError(f"free_bits must be >= 0, got {free_bits}.")
        z_limit = expand_per_axis(z_max_res, spatial_dims, "z_max_res")
        resolved = resolve_strides(img_size, n_levels, strides)
        self.sizes = level_sizes(img_size, resolved)
        self.stochastic = [all(s <= m for s, m in zip(size, z_limit)) and b > 0 for size, b in zip(self.sizes, blocks)]
        if not any(self.stochastic):
            raise ValueError(
                f"no stochastic level: level sizes {self.sizes} with blocks {blocks} and z_max_res={z_max_res}; "
                "raise z_max_res or add levels."
            )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.img_size = img_size
        self.num_parents = num_parents
        self.free_bits = float(free_bits)
        self.log_scale_min = float(log_scale_min)
        self.num_bins = int(num_bins)
        self.config: dict[str, Any] = {
            "preset": preset,
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "img_size": list(img_size),
            "num_parents": num_parents,
            "widths": list(widths),
            "blocks_per_level": list(blocks),
            "z_dim": list(z_dims),
            "z_max_res": list(z_limit),
            "strides": [list(f) for f in resolved],
            "bottleneck": float(bottleneck),
            "embed_dim": embed_dim,
            "cond_prior": bool(cond_prior),
            "spatial_parents": bool(spatial_parents),
            "free_bits": self.free_bits,
            "log_scale_min": self.log_scale_min,
            "num_bins": self.num_bins,
        }

        conv = Conv[Conv.CONV, spatial_dims]
        pool = Pool[Pool.AVG, spatial_dims]
        mids = [max(4, int(round(w * bottleneck))) for w in widths]
        n_dec_blocks = max(1, sum(blocks))
        res_scale = 1.0 / math.sqrt(n_dec_blocks)

        # encoder
        self.stem = conv(in_channels, widths[0], 3, padding=1)
        self.enc_blocks = nn.ModuleList(
            nn.ModuleList(
                _ConvBlock(spatial_dims, widths[lv], mids[lv], widths[lv], True, last_scale=res_scale)
                for _ in range(blocks[lv])
            )
            for lv in range(n_levels)
        )
        self.enc_down = nn.ModuleList()
        for lv in range(n_levels - 1):
            factor = resolved[lv]
            steps: list[nn.Module] = []
            if any(f > 1 for f in factor):
                steps.append(pool(kernel_size=factor, stride=factor))
            if widths[lv] != widths[lv + 1]:
                steps.append(conv(widths[lv], widths[lv + 1], 1))
            self.enc_down.append(nn.Sequential(*steps))

        # decoder
        self.spatial_parents = bool(spatial_parents)
        if self.spatial_parents:
            shape = (num_parents, *img_size)
            regions = torch.ones(shape) if parent_regions is None else torch.as_tensor(parent_regions).float().as_subclass(torch.Tensor)
            if tuple(regions.shape) != shape:
                raise ValueError(f"parent_regions must have shape {shape}, got {tuple(regions.shape)}.")
            if regions.device.type != "meta" and (
                not torch.isfinite(regions).all() or regions.min() < 0 or regions.max() > 1
            ):
                raise ValueError("parent_regions must be finite masks with values in [0, 1].")
            self.register_buffer("parent_regions", regions)
        elif parent_regions is not None:
            raise ValueError("parent_regions given but spatial_parents is False.")
        self.parent_embed = nn.Sequential(
            nn.Linear(num_parents, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim), nn.GELU()
        )
        self.dec_start = nn.Parameter(torch.zeros(1, widths[-1], *self.sizes[-1]))
        self.dec_blocks = nn.ModuleList(
            nn.ModuleList(
                _DecoderBlock(
                    spatial_dims,
                    widths[lv],
                    mids[lv],
                    embed_dim,
                    z_dims[lv] if self.stochastic[lv] else 0,
                    cond_prior,
                    res_scale,
                    num_parents if self.spatial_parents else 0,
                )
                for _ in range(blocks[lv])
            )
            for lv in range(n_levels)
        )
        self.dec_up = nn.ModuleList(
            conv(widths[lv + 1], widths[lv], 1) if widths[lv] != widths[lv + 1] else nn.Identity()
            for lv in range(n_levels - 1)
        )
        self.out = conv(widths[0], 2 * in_channels, 3, padding=1)
        self._factors = resolved
        self.latent_shapes = [
            (z_dims[lv], *self.sizes[lv])
            for lv in reversed(range(n_levels))
            if self.stochastic[lv]
            for _ in range(blocks[lv])
        ]

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HierarchicalVAE:
        """Build a network from :attr:`config` (e.g. a checkpoint's ``meta["hvae_config"]``); the
        ``"overrides"`` key that checkpoints of earlier versions carried there (provenance, now
        ``meta["hvae_overrides"]``) is skipped, other unknown keys raise."""
        params = inspect.signature(cls).parameters
        args = {k: v for k, v in dict(config).items() if k not in _PROVENANCE_KEYS}
        if sorted(set(args) - set(params)):
            raise ValueError(f"HierarchicalVAE config has unknown key(s) {sorted(set(args) - set(params))}; "
                             f"constructor arguments are {sorted(params)}.")
        return cls(**args)

    @property
    def num_latent_layers(self) -> int:
        """Number of stochastic layers (length of the latent lists)."""
        return len(self.latent_shapes)

    def check_compatible(self, meta: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` when a checkpoint's meta describes a different architecture.

        Args:
            meta: a checkpoint's ``"meta"`` dict holding ``"hvae_config"`` (or ``"preset"`` only),
                or an HVAE config dict itself.
        """
        other = meta.get("hvae_config", meta)
        if "widths" not in other:
            theirs, ours = other.get("preset"), self.config["preset"]
            if theirs is not None and ours is not None and theirs != ours:
                raise ValueError(f"checkpoint is from HVAE preset {theirs!r} but this model is preset {ours!r}.")
            return
        diffs = {
            k: (other.get(k, _ARCH_DEFAULTS.get(k)), self.config[k])
            for k in ARCH_KEYS
            if _normalise(other.get(k, _ARCH_DEFAULTS.get(k))) != _normalise(self.config[k])
        }
        if diffs:
            detail = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in diffs.items())
            raise ValueError(
                f"checkpoint HVAE (preset {other.get('preset')!r}) does not match this model "
                f"(preset {self.config['preset']!r}): {detail}."
            )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that raises a ``ValueError`` naming the presets on a mismatch."""
        self.check_state_dict(state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def check_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, prefix: str = "") -> None:
        """Raise ``ValueError`` when ``state_dict`` (keys under ``prefix``) is not of this architecture.

        The message names this model's preset and, when one of the known presets built for the same
        image size matches the state dict, that preset.
        """
        own = {prefix + k: v for k, v in self.state_dict().items()}
        problems = state_dict_problems(own, state_dict, strict, prefix)
        if not problems:
            return
        origin = ""
        matcher = getattr(self, "preset_matcher", None)  # set by networks.presets.build_hvae
        if matcher is not None:
            sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            guess = matcher(sub, self.spatial_dims, self.img_size, self.num_parents, self.in_channels)
            origin = f"; it matches preset {guess!r}" if guess else "; it matches no known preset at this image size"
        raise ValueError(
            f"state dict does not fit this HierarchicalVAE (preset {self.config['preset']!r}, "
            f"img_size {self.img_size}){origin}. First differences: {problems[:5]}."
        )

    # ------------------------------------------------------------------ input validation
    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"image must be a torch.Tensor, got {type(x).__name__}.")
        expected = f"(B, {', '.join(str(s) for s in (self.in_channels, *self.img_size))})"
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"image must be (B, C, *spatial) with spatial_dims={self.spatial_dims}, i.e. {expected}; "
                f"got shape {tuple(x.shape)} ({x.ndim - 2} spatial dims)."
            )
        if x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"image shape must be {expected}, got {tuple(x.shape)}.")
        if not x.is_floating_point():
            raise TypeError(f"image must be a floating point tensor, got {x.dtype}.")

    def _check_parents(self, parents: torch.Tensor, batch: int | None) -> None:
        if not isinstance(parents, torch.Tensor):
            raise TypeError(f"parents must be a torch.Tensor, got {type(parents).__name__}.")
        if parents.ndim != 2 or parents.shape[1] != self.num_parents:
            raise ValueError(f"parents must be (B, {self.num_parents}) normalised values, got {tuple(parents.shape)}.")
        if batch is not None and parents.shape[0] != batch:
            raise ValueError(f"parents batch size {parents.shape[0]} does not match the image batch size {batch}.")
        if not torch.isfinite(parents).all():
            bad = (~torch.isfinite(parents)).nonzero()[0].tolist()
            raise ValueError(f"parents contain NaN/inf, first at (sample, variable) {tuple(bad)}.")

    def _check_latents(self, latents: Sequence[torch.Tensor], batch: int) -> None:
        if len(latents) != self.num_latent_layers:
            raise ValueError(f"expected {self.num_latent_layers} latent tensors, got {len(latents)}.")
        for i, (z, shape) in enumerate(zip(latents, self.latent_shapes)):
            if tuple(z.shape) != (batch, *shape):
                raise ValueError(f"latent {i} must have shape {(batch, *shape)}, got {tuple(z.shape)}.")

    # ------------------------------------------------------------------ passes
    def _encode(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """Bottom-up pass; returns the activation of every stochastic level (None elsewhere)."""
        h = self.stem(x)
        acts: list[torch.Tensor | None] = []
        for lv, blocks in enumerate(self.enc_blocks):
            for block in blocks:
                h = block(h)
            acts.append(h if self.stochastic[lv] else None)
            if lv < len(self.enc_down):
                h = self.enc_down[lv](h)
        return acts

    def _decode(
        self,
        parents: torch.Tensor,
        acts: list[torch.Tensor | None] | None = None,
        latents: Sequence[torch.Tensor] | None = None,
        mean: bool = False,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Top-down pass. Returns (loc, scale, latents, kl maps (posterior mode only))."""
        emb = self.parent_embed(parents)
        h = self.dec_start.expand(parents.shape[0], *self.dec_start.shape[1:])
        painted = self._parent_maps(parents)
        zs: list[torch.Tensor] = []
        kls: list[torch.Tensor] = []
        for lv in reversed(range(len(self.dec_blocks))):
            if lv < len(self.dec_up):
                # a 1x1 convolution commutes with nearest up-sampling: change width at the coarse size
                h = F.interpolate(self.dec_up[lv](h), scale_factor=self._factors[lv], mode="nearest")
            for block in self.dec_blocks[lv]:
                z_in = latents[len(zs)] if (latents is not None and block.z_dim) else None
                enc = acts[lv] if acts is not None else None
                h, z, kl = block(h, emb, enc, z_in, mean, temperature, painted[lv] if painted else None)
                if z is not None:
                    zs.append(z)
                if kl is not None:
                    kls.append(kl)
        loc, log_scale = self.out(F.gelu(h)).float().chunk(2, dim=1)  # likelihood in float32
        scale = torch.exp(log_scale.clamp(min=self.log_scale_min))
        return loc, scale, zs, kls

    def _parent_maps(self, parents: torch.Tensor) -> list[torch.Tensor] | None:
        """Per level, (B, P, *level size): each parent's value painted into its (area-resized) region."""
        if not self.spatial_parents:
            return None
        maps = []
        for size in self.sizes:
            regions = self.parent_regions
            if tuple(size) != tuple(self.img_size):
                regions = F.adaptive_avg_pool2d(regions, size) if self.spatial_dims == 2 else F.adaptive_avg_pool3d(
                    regions, size)
            maps.append(parents.to(regions.dtype)[(...,) + (None,) * self.spatial_dims] * regions)
        return maps

    def forward(
        self, x: torch.Tensor, parents: torch.Tensor, beta: float = 1.0, return_latents: bool = False
    ) -> dict[str, Any]:
        """Negative ELBO of ``x`` given its parents.

        Args:
            x: images in [-1, 1], (B, C, *img_size).
            parents: normalised parents in [-1, 1], (B, P).
            beta: KL weight (warm-up is the trainer's job, see :func:`beta_schedule`).
            return_latents: also return the posterior samples and the likelihood parameters.

        Returns:
            dict with scalars (nats per image element, batch mean) ``elbo`` = the negative ELBO
            used as the loss, ``nll + beta * kl`` (with the free-bits floor applied to the KL when
            ``free_bits > 0``), ``nll`` and ``kl`` (raw, without the floor); with ``return_latents``
            also ``latents`` (list of (B, z_dim, *level size), top first), ``loc`` and ``scale``
            ((B, C, *img_size), the factual likelihood parameters).
        """
        self._check_x(x)
        self._check_parents(parents, x.shape[0])
        acts = self._encode(x)
        loc, scale, zs, kls = self._decode(parents, acts=acts)
        n_elem = x[0].numel()
        nll = discretized_gaussian_nll(x, loc, scale, self.num_bins).mean()
        kl = sum(k.sum() for k in kls) / (x.shape[0] * n_elem)
        if self.free_bits > 0:
            per_channel = [k.flatten(2).sum(2).mean(0) for k in kls]  # (z_dim,) per layer, nats per image
            kl_train = sum(c.clamp(min=self.free_bits).sum() for c in per_channel) / n_elem
        else:
            kl_train = kl
        out: dict[str, Any] = {"elbo": nll + beta * kl_train, "nll": nll, "kl": kl}
        if return_latents:
            out.update(latents=zs, loc=loc, scale=scale)
        return out

    def abduct(self, x: torch.Tensor, parents: torch.Tensor, mean: bool = False) -> list[torch.Tensor]:
        """Posterior latents of every stochastic layer, top (coarsest) first.

        Args:
            x: images in [-1, 1], (B, C, *img_size).
            parents: normalised parents, (B, P).
            mean: return the posterior means instead of samples.

        Returns:
            list of ``num_latent_layers`` tensors, each (B, *latent_shapes[i]).
        """
        self._check_x(x)
        self._check_parents(parents, x.shape[0])
        return self._decode(parents, acts=self._encode(x), mean=mean)[2]

    def decode(
        self, latents: Sequence[torch.Tensor], parents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Likelihood parameters for fixed latents under (any) parents.

        Args:
            latents: list from :meth:`abduct` (or ``forward(..., return_latents=True)``).
            parents: normalised parents (B, P), e.g. counterfactual ones.

        Returns:
            ``(loc, scale)``, each (B, C, *img_size); ``scale >= exp(log_scale_min)``.
        """
        self._check_parents(parents, None)
        self._check_latents(latents, parents.shape[0])
        loc, scale, _, _ = self._decode(parents, latents=latents)
        return loc, scale

    def sample(self, parents: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Draw images from the prior given parents.

        Args:
            parents: normalised parents, (B, P).
            temperature: multiplies every prior standard deviation (0 gives the prior means).

        Returns:
            (B, C, *img_size) likelihood means clamped to [-1, 1].
        """
        self._check_parents(parents, None)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        loc, _, _, _ = self._decode(parents, mean=temperature == 0, temperature=temperature)
        return loc.clamp(-1.0, 1.0)


def _normalise(value: Any) -> Any:
    """Make tuples and lists compare equal (configs may come back from JSON)."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value
