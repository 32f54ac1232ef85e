"""The inverse of the straightening: an edited sCPR written back into the volume it came from.

``StraightenCPR(..., record_grid=True)`` records the world coordinates of every sCPR pixel
(``meta["scpr_grid_world"]``). :class:`UnstraightenCPR` maps them into the voxels of the original
volume and splats the *change* of every pixel there::

    volume_cf = volume + splat(scpr_cf - scpr)

* ``mode="bilinear"`` (images): trilinear splatting with normalised weights: a voxel receives the
  weighted mean of the changes of the pixels around it (the weights are the trilinear weights with
  which the straightening read it), so a constant change of a region comes back as that change;
* ``mode="nearest"`` (labels): every pixel belongs to the voxel it was read from (rounding); a voxel
  takes the edited value of its closest such pixel when that pixel changed, so label values are kept.

Voxels no changed pixel reaches keep their values bit for bit; an unchanged sCPR gives back the
volume exactly. The result keeps the volume's dtype (integer volumes: the change is rounded), affine
and metadata, so a counterfactual sCPR becomes a counterfactual CCTA that opens with the original
geometry (e.g. in 3D Slicer).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, ensure_tuple_rep

from .cpr import SCPR_GRID_KEY
from .scpr_checks import check_mode, image_and_affine
from .scpr_sampling import sampling_threads

__all__ = ["UnstraightenCPR", "UnstraightenCPRd"]


def _as_list(value: Any) -> tuple[list[Any], bool]:
    if isinstance(value, (list, tuple)):
        return list(value), True
    return [value], False


def _recorded_grid(original: Any, name: str) -> torch.Tensor:
    meta = original.meta if isinstance(original, MetaTensor) else original
    if not isinstance(meta, Mapping) or SCPR_GRID_KEY not in meta:
        raise ValueError(
            f"{name} has no {SCPR_GRID_KEY!r} in its meta: pass the output of StraightenCPR(..., record_grid=True) "
            "(the straightened image before editing)."
        )
    return torch.as_tensor(meta[SCPR_GRID_KEY])


class UnstraightenCPR(Transform):
    """Write edited sCPRs back into the (C, X, Y, Z) volume they were straightened from.

    Args:
        mode: ``"bilinear"`` (trilinear splatting with normalised weights, for images) or ``"nearest"``
            (for label maps; edited values are copied, never mixed).

    Call ``UnstraightenCPR(mode)(volume, edited, original, affine=None)``:

    * ``volume``: (C, X, Y, Z) ``MetaTensor`` (or tensor / ndarray with ``affine``), any dtype: the
      volume ``original`` was straightened from.
    * ``edited``: the edited sCPR, (C, H, W) or (C, H, H, W) (a tensor, e.g. a counterfactual).
    * ``original``: the unedited output of ``StraightenCPR(..., record_grid=True)`` (a ``MetaTensor``
      with ``meta["scpr_grid_world"]``), same shape as ``edited``.
    * several sCPRs of one volume (e.g. one per artery): lists of ``edited`` and ``original``; their
      changes are written one after the other.

    Returns a ``MetaTensor`` like ``volume`` (same shape, dtype, affine and meta; integer dtypes get
    the change rounded): ``volume + splat(edited - original)``. Voxels that no changed pixel reaches
    are unchanged, so an unchanged sCPR gives back ``volume`` exactly. Cost: proportional to the sCPR
    pixels plus one copy of the volume.

    Example::

        >>> import torch; from monai.data import MetaTensor
        >>> from monai_cft.transforms import StraightenCPR
        >>> ct = MetaTensor(torch.zeros(1, 48, 48, 48), affine=torch.diag(torch.tensor([0.5, 0.5, 0.5, 1.0])))
        >>> line = [[12.0, 12.0, 2.0], [12.0, 12.0, 20.0]]
        >>> scpr = StraightenCPR((16, 64), 0.25, padding_value=0.0)(ct, line)
        >>> edited = scpr.clone(); edited[:, 6:10, 10:40] = 100.0
        >>> back = UnstraightenCPR("bilinear")(ct, edited, scpr)
        >>> bool(torch.equal(UnstraightenCPR()(ct, scpr, scpr), ct)), float(back.max()) > 50
        (True, True)
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, mode: str = "bilinear") -> None:
        self.mode = check_mode(mode)

    def __call__(self, volume: Any, edited: Any, original: Any, affine: Any | None = None) -> torch.Tensor:
        with sampling_threads(0):  # scatter of a few hundred thousand values: one thread
            data, aff = image_and_affine(volume, affine, name="volume")
            edits, several = _as_list(edited)
            origs, several_o = _as_list(original)
            if several != several_o or len(edits) != len(origs):
                raise ValueError(f"edited and original must pair up, got {len(edits)} edited and {len(origs)} "
                                 "original sCPRs.")
            x = data.as_tensor() if isinstance(data, MetaTensor) else data
            out = x.clone()
            inv = torch.linalg.inv(aff)
            for k, (e, o) in enumerate(zip(edits, origs)):
                name = f"original[{k}]" if several else "original"
                self._write_back(out, torch.as_tensor(e), o, inv, name)
        if isinstance(volume, MetaTensor):
            meta = dict(volume.meta)
            meta.pop("affine", None)
            return MetaTensor(out, affine=volume.affine, meta=meta, applied_operations=list(volume.applied_operations))
        return MetaTensor(out, affine=aff)

    def _write_back(self, out: torch.Tensor, edited: torch.Tensor, original: Any, inv: torch.Tensor,
                    name: str) -> None:
        grid = _recorded_grid(original, name).to(out.device)
        orig = torch.as_tensor(original)
        orig = orig.as_tensor() if isinstance(orig, MetaTensor) else orig
        edited = edited.as_tensor() if isinstance(edited, MetaTensor) else edited
        if tuple(edited.shape) != tuple(orig.shape):
            raise ValueError(f"the edited sCPR has shape {tuple(edited.shape)} but {name} has {tuple(orig.shape)}.")
        if tuple(grid.shape[:-1]) != tuple(orig.shape[1:]) or orig.shape[0] != out.shape[0]:
            raise ValueError(
                f"{name} of shape {tuple(orig.shape)} (grid {tuple(grid.shape)}) does not fit the volume's "
                f"{out.shape[0]} channel(s); straighten the same volume with record_grid=True."
            )
        compute = torch.float64 if out.dtype == torch.float64 else torch.float32
        diff = edited.to(out.device, compute) - orig.to(out.device, compute)
        valid = torch.isfinite(grid).all(-1)
        changed = valid & (diff != 0).any(0)
        if not bool(changed.any()):
            return
        world = grid[valid].to(torch.float64)
        vox = world @ inv[:3, :3].T.to(out.device) + inv[:3, 3].to(out.device)
        diff, after = diff[:, valid], edited.to(out.device, compute)[:, valid]
        if self.mode == "nearest":
            self._nearest(out, vox, diff, after)
        else:
            self._trilinear(out, vox, diff, compute)

    @staticmethod
    def _box(corner: torch.Tensor, far: torch.Tensor) -> tuple[list[int], list[int], torch.Tensor]:
        """Corner, size and (Q,) linear index of the voxel box spanned by (Q, 3) integer ``corner`` .. ``far``
        (it may extend beyond the volume; only its part inside is written)."""
        lo = corner.min(0).values.tolist()
        size = [int(h) - l_ + 1 for l_, h in zip(lo, far.max(0).values.tolist())]
        rel = corner - torch.tensor(lo, device=corner.device)
        return lo, size, (rel[:, 0] * size[1] + rel[:, 1]) * size[2] + rel[:, 2]

    def _trilinear(self, out: torch.Tensor, vox: torch.Tensor, diff: torch.Tensor, compute: torch.dtype) -> None:
        f = torch.floor(vox)
        frac = (vox - f).to(compute)
        lo, size, base = self._box(f.long(), f.long() + 1)
        # corner-major (2, 2, 2, Q) weights and indices (the long axis innermost)
        offsets = torch.tensor([(c >> 2) * size[1] * size[2] + ((c >> 1) & 1) * size[2] + (c & 1) for c in range(8)],
                               device=out.device)
        lin = (base.unsqueeze(0) + offsets.unsqueeze(1)).view(-1)  # (8 Q,)
        w = torch.ones(1, dtype=compute, device=out.device)
        for k, view in enumerate(((2, 1, 1, -1), (1, 2, 1, -1), (1, 1, 2, -1))):
            w = w * torch.stack([1.0 - frac[:, k], frac[:, k]]).view(view)
        w = w.reshape(8, -1)
        n_box = math.prod(size)
        den = torch.zeros(n_box, dtype=compute, device=out.device).index_add_(0, lin, w.reshape(-1))
        num = torch.zeros(diff.shape[0], n_box, dtype=compute, device=out.device)
        num.index_add_(1, lin, (diff.unsqueeze(1) * w.unsqueeze(0)).reshape(diff.shape[0], -1))
        hit = den > 0
        num[:, hit] /= den[hit]
        self._apply(out, lo, size, num, hit, add=True)

    def _nearest(self, out: torch.Tensor, vox: torch.Tensor, diff: torch.Tensor, after: torch.Tensor) -> None:
        r = torch.round(vox)
        lo, size, lin = self._box(r.long(), r.long())
        dist = ((vox - r) ** 2).sum(-1)
        n_box = math.prod(size)
        closest = torch.full((n_box,), float("inf"), dtype=dist.dtype, device=out.device)
        closest = closest.scatter_reduce(0, lin, dist, "amin")
        pixel = torch.arange(dist.numel(), device=out.device)
        chosen = torch.full((n_box,), -1, dtype=torch.long, device=out.device)
        chosen = chosen.scatter_reduce(0, lin, torch.where(dist == closest[lin], pixel, -1), "amax")  # ties: last
        take = chosen >= 0
        take[take.clone()] = (diff[:, chosen[take]] != 0).any(0)
        values = torch.zeros(after.shape[0], n_box, dtype=after.dtype, device=out.device)
        values[:, take] = after[:, chosen[take]]
        self._apply(out, lo, size, values, take, add=False)

    @staticmethod
    def _apply(out: torch.Tensor, lo: list[int], size: list[int], values: torch.Tensor, hit: torch.Tensor,
               add: bool) -> None:
        """Add (or copy) ``values`` (C, box) into ``out`` where ``hit`` (box), inside the volume only."""
        src, dst = [slice(None)], [slice(None)]
        for k in range(3):
            a, b = max(lo[k], 0), min(lo[k] + size[k], out.shape[k + 1])
            if a >= b:
                return
            src.append(slice(a - lo[k], b - lo[k]))
            dst.append(slice(a, b))
        values = values.view(-1, *size)[tuple(src)]
        hit = hit.view(*size)[tuple(src[1:])]
        box = out[tuple(dst)]
        if not add:
            box[:, hit] = values[:, hit].to(box.dtype)
        elif box.is_floating_point():
            box[:, hit] = box[:, hit] + values[:, hit].to(box.dtype)
        else:
            info = torch.iinfo(box.dtype)
            new = (box[:, hit].to(torch.float64) + values[:, hit].to(torch.float64)).round().clamp(info.min, info.max)
            box[:, hit] = new.to(box.dtype)


class UnstraightenCPRd(MapTransform):
    """Dictionary version of :class:`UnstraightenCPR`.

    Args:
        keys: keys of the volumes to write into ((C, X, Y, Z) ``MetaTensor``).
        edited_keys: per volume key, the key of its edited sCPR(s) (one or a list).
        original_keys: per volume key, the key of the unedited ``StraightenCPR(record_grid=True)`` output(s).
        mode: one mode or one per key (``"bilinear"`` images, ``"nearest"`` labels).
        output_keys: where to store the results (default: replace ``keys``).
        allow_missing_keys: skip volume keys that are absent.
    """

    backend = UnstraightenCPR.backend

    def __init__(self, keys: KeysCollection, edited_keys: KeysCollection, original_keys: KeysCollection,
                 mode: str | Sequence[str] = "bilinear", output_keys: KeysCollection | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        n = len(self.keys)
        self.edited_keys = ensure_tuple_rep(edited_keys, n)
        self.original_keys = ensure_tuple_rep(original_keys, n)
        self.output_keys = self.keys if output_keys is None else ensure_tuple_rep(output_keys, n)
        self.inverters = [UnstraightenCPR(m) for m in ensure_tuple_rep(mode, n)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, edited, original, out_key, inv in self.key_iterator(d, self.edited_keys, self.original_keys,
                                                                    self.output_keys, self.inverters):
            for k in (edited, original):
                if k not in d:
                    raise KeyError(f"key {k!r} (needed to write back into {key!r}) not found; available: {list(d)}.")
            d[out_key] = inv(d[key], d[edited], d[original])
        return d


