"""The seed systems psiopt compares with, in one place.

* :class:`SGDG` -- SGD-G of Cho & Lee 2017 ("Riemannian approach to batch
  normalization"): scale-invariant rows on the unit sphere, exponential map, momentum
  by parallel transport, per-unit gradient clipping.
* :class:`ENorm` -- equi-normalization (Stock et al. 2019); also ``psiopt.ENorm``.
* :class:`SBWN` -- scaling-based weight normalization; also ``psiopt.SBWN``.
* weight normalization: :func:`data_dependent_init_`, :func:`weight_normed_layers`
  and mean-only batch norm :class:`MeanOnlyBatchNorm1d`/``2d``; also in ``psiopt.nn``.
"""

from .enorm import ENorm
from .mean_only_bn import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d
from .sbwn import SBWN
from .sgdg import SGDG, clip_rows
from .weight_norm import data_dependent_init_, weight_normed_layers

__all__ = [
    "SGDG",
    "clip_rows",
    "ENorm",
    "SBWN",
    "data_dependent_init_",
    "weight_normed_layers",
    "MeanOnlyBatchNorm1d",
    "MeanOnlyBatchNorm2d",
]
