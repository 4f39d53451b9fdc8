"""Published optimizers psiopt compares with.

* :class:`SGDG` -- SGD-G of Cho & Lee 2017 ("Riemannian approach to batch
  normalization"): scale-invariant rows on the unit sphere, exponential map, momentum
  by parallel transport, per-unit gradient clipping.
"""

from .sgdg import SGDG, clip_rows

__all__ = ["SGDG", "clip_rows"]
