"""monai-cft: segmentor-guided counterfactual fine-tuning for MONAI.

Sub-packages are imported lazily so that ``import monai_cft.transforms`` pulls in
nothing heavier than monai, torch and numpy.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
