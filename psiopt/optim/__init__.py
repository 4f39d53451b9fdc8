"""Optimizers on the PSI manifold: :class:`PSISGD` (stochastic, with momentum) and
:class:`PSIGD` (full batch, with an optional Armijo line search)."""

from .psigd import PSIGD
from .psisgd import PSISGD

__all__ = ["PSISGD", "PSIGD"]
