"""Optimizers on the PSI manifold: :class:`PSISGD` (stochastic, with momentum),
:class:`PSIAdaSGD` (PSI-SGD with AdaGrad-norm angular steps), :class:`PSIAdam` and
:class:`PSIAdamW` (Adam with per-group adaptive angular steps) and :class:`PSIGD` (full
batch, with an optional Armijo line search)."""

from .psiadam import PSIAdam, PSIAdamW
from .psiadasgd import PSIAdaSGD
from .psigd import PSIGD
from .psisgd import PSISGD

__all__ = ["PSISGD", "PSIAdaSGD", "PSIAdam", "PSIAdamW", "PSIGD"]
