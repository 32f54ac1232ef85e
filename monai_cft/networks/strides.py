"""Stride arithmetic of the HVAE's resolution levels (which axes are downsampled, and the sizes per level)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["resolve_strides", "level_sizes", "expand_per_axis"]


def expand_per_axis(value: int | Sequence[int], n: int, name: str, per: str = "spatial axis") -> tuple[int, ...]:
    """``value`` as ``n`` ints: an int is repeated, a sequence must have ``n`` entries (one per ``per``)."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} needs {n} entries (one per {per}), got {value}.")
    return value


def resolve_strides(
    img_size: Sequence[int], num_levels: int, strides: Sequence[int | Sequence[int]] | None = None
) -> tuple[tuple[int, ...], ...]:
    """Per-axis down-sampling factor between consecutive levels.

    Args:
        img_size: spatial size of level 0, e.g. ``(32, 192)``.
        num_levels: number of levels (the factors are for the ``num_levels - 1`` transitions).
        strides: ``None`` for the default (2 along every axis whose current size is even, else 1,
            so an axis stops shrinking once it is odd, e.g. 1), or one entry per transition, each an
            int (all axes) or a per-axis tuple.

    Returns:
        ``num_levels - 1`` tuples of ``len(img_size)`` ints.

    Raises:
        ValueError: when an explicit factor does not divide the size it is applied to.
    """
    size = tuple(int(s) for s in img_size)
    nd = len(size)
    if strides is not None and len(strides) != num_levels - 1:
        raise ValueError(f"strides needs num_levels - 1 = {num_levels - 1} entries, got {len(strides)}.")
    out = []
    for level in range(num_levels - 1):
        if strides is None:
            factor = tuple(2 if s % 2 == 0 else 1 for s in size)
        else:
            factor = expand_per_axis(strides[level], nd, f"strides[{level}]")
            bad = [(s, f) for s, f in zip(size, factor) if f < 1 or s % f != 0]
            if bad:
                raise ValueError(
                    f"strides[{level}]={factor} does not divide the level-{level} size {size} (size, factor): {bad}."
                )
        out.append(factor)
        size = tuple(s // f for s, f in zip(size, factor))
    return tuple(out)


def level_sizes(img_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Spatial size of every level given the level-0 size and the per-transition factors."""
    sizes = [tuple(int(s) for s in img_size)]
    for factor in strides:
        sizes.append(tuple(s // f for s, f in zip(sizes[-1], factor)))
    return sizes
