"""Names and order of the regional structure variables.

A *variable* is one structure measured inside one region, named ``f"{structure}_{region}"``
(for example ``"calcified_mid"``). Throughout monai-cft the variables of an image are ordered
structure-major: every region of the first structure, then every region of the second, and so on.
With the defaults this gives the nine coronary variables of the positional paper::

    lumen_proximal, lumen_mid, lumen_distal,
    calcified_proximal, calcified_mid, calcified_distal,
    noncalcified_proximal, noncalcified_mid, noncalcified_distal

(LA, CPA and NCPA per third of the straightened LAD, in mm^2 for 2D images and mm^3 for 3D).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "DEFAULT_STRUCTURES",
    "DEFAULT_REGIONS",
    "DEFAULT_BOUNDARIES",
    "variable_names",
    "split_variable_name",
]

#: label value of each structure in the ground-truth label maps (0 is background).
DEFAULT_STRUCTURES: dict[str, int] = {"lumen": 1, "calcified": 2, "noncalcified": 3}
#: names of the positional regions along the vessel axis, ostium first.
DEFAULT_REGIONS: tuple[str, ...] = ("proximal", "mid", "distal")
#: fractions of the image length at which the default regions are split.
DEFAULT_BOUNDARIES: tuple[float, ...] = (1.0 / 3.0, 2.0 / 3.0)


def variable_names(structures: Sequence[str] | Mapping[str, int], regions: Sequence[str] | None) -> list[str]:
    """Return the structure-major list of variable names.

    Args:
        structures: structure names (a mapping's keys are used in their order).
        regions: region names; ``None`` or empty means one global region and the variable is
            named after the structure alone (Seg-CFT's global areas).
    """
    names = list(structures.keys()) if isinstance(structures, Mapping) else list(structures)
    if len(set(names)) != len(names):
        raise ValueError(f"structure names must be unique, got {names}.")
    if not regions:
        return names
    regions = list(regions)
    if len(set(regions)) != len(regions):
        raise ValueError(f"region names must be unique, got {regions}.")
    return [f"{s}_{r}" for s in names for r in regions]


def split_variable_name(name: str, structures: Sequence[str], regions: Sequence[str] | None) -> tuple[str, str | None]:
    """Split ``"calcified_mid"`` into ``("calcified", "mid")`` given the known names.

    Raises:
        ValueError: when ``name`` is not one of :func:`variable_names` (the message lists them).
    """
    valid = variable_names(list(structures), regions)
    if name not in valid:
        raise ValueError(f"unknown variable {name!r}; valid variables are {valid}.")
    if not regions:
        return name, None
    idx = valid.index(name)
    return list(structures)[idx // len(regions)], list(regions)[idx % len(regions)]
