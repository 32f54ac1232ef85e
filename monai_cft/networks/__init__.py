"""monai-cft networks: the deep structural causal model (HVAE + attribute flows) and the predictors.

* :class:`~monai_cft.networks.hvae.HierarchicalVAE`, presets via :func:`~monai_cft.networks.presets.build_hvae`;
* :class:`~monai_cft.networks.flows.AttributeMechanisms` (zuko conditional flows over a causal graph);
* :class:`~monai_cft.transforms.parents.ParentNormalizer`, :class:`~monai_cft.networks.dscm.DeepSCM`,
  :func:`~monai_cft.networks.dscm.build_dscm`;
* :func:`~monai_cft.networks.predictors.build_segmentor`, :class:`~monai_cft.networks.predictors.ParentRegressor`.
"""

from monai_cft.networks.dscm import DeepSCM, build_dscm
from monai_cft.transforms.parents import ParentNormalizer
from monai_cft.networks.flows import AttributeMechanisms, topological_order
from monai_cft.networks.hvae import HierarchicalVAE, beta_schedule, discretized_gaussian_nll, gaussian_kl
from monai_cft.networks.predictors import ParentRegressor, build_segmentor
from monai_cft.networks.presets import HVAE_PRESETS, build_hvae, match_preset

__all__ = [
    "HierarchicalVAE",
    "beta_schedule",
    "discretized_gaussian_nll",
    "gaussian_kl",
    "HVAE_PRESETS",
    "build_hvae",
    "match_preset",
    "AttributeMechanisms",
    "topological_order",
    "ParentNormalizer",
    "DeepSCM",
    "build_dscm",
    "build_segmentor",
    "ParentRegressor",
]
