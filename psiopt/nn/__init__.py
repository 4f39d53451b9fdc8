"""Layers and initializers for the seeds' other normalization schemes.

* :func:`data_dependent_init_` -- weight normalization's data-dependent initialization,
  for layers reparameterized with :func:`torch.nn.utils.parametrizations.weight_norm`.
* :class:`MeanOnlyBatchNorm1d`, :class:`MeanOnlyBatchNorm2d` -- mean-only batch
  normalization, weight normalization's companion layer.

They live with the other seed systems in :mod:`psiopt.baselines`.
"""

from ..baselines.mean_only_bn import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d
from ..baselines.weight_norm import data_dependent_init_, weight_normed_layers

__all__ = [
    "data_dependent_init_",
    "weight_normed_layers",
    "MeanOnlyBatchNorm1d",
    "MeanOnlyBatchNorm2d",
]
