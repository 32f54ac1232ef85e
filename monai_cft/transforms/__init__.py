"""MONAI transforms of monai-cft: sCPR straightening, region masks, structure measurements."""

from .measures import measure_structures

__all__ = ["measure_structures"]
