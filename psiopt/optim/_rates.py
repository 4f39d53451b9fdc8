r"""Angular rates: how far a scale-invariant group turns per step, and how that decays.

Under SGD (or Adam) a scale-invariant group :math:`w_j` turns by an angle that depends on
its norm, and the norm moves: the gradient is orthogonal to :math:`w_j`, so a step that
turns the group by :math:`\arctan\omega` multiplies :math:`\|w_j\|^2` by :math:`1 + \omega^2`,
and weight decay shrinks it. The norm is what adapts the Euclidean optimizer's angular
step: it decays while the group turns fast (Arora, Li & Lyu 2019) and settles where growth
and decay balance (the spherical motion dynamics of Wan et al. 2021; Kosson et al. 2024 for
AdamW). It also depends on the initial norm, an arbitrary choice that changes nothing else.

psiopt's optimizers keep each group's norm fixed and carry the part of it that matters as
a **virtual squared norm** :math:`\nu_j^2`: it starts at 1 whatever the weights are (the
unit-row frame), each step multiplies it by the factor by which that step's retraction
grew the norm, :math:`\|w_j - \alpha_j d_j\|^2/\|w_j\|^2`, less the weight decay's
**pull**, and the step size of the group is :math:`\alpha_j = \eta\,\gamma/\nu_j^p` for a
normalized direction :math:`d_j` (one that turns the group by about :math:`\alpha_j`):

=============  =====================  ======  ==========================================
rate           gain :math:`\gamma`    power   pull (per step)
=============  =====================  ======  ==========================================
``"sgd"``      :math:`\kappa/(1-\mu)`    2    :math:`2\eta\lambda/(1+\mu)`
``"adam"``     :math:`\kappa_A`          1    :math:`2\eta\lambda(1-\beta_1)/(1+\beta_1)`
=============  =====================  ======  ==========================================

The powers are the Euclidean optimizers' own: SGD's turn scales as :math:`1/\|w_j\|^2` (its
gradient as :math:`1/\|w_j\|`, and the turn is a step over the norm), Adam's as
:math:`1/\|w_j\|` (its step is normalized entry by entry). The pulls put the virtual norm at
rest exactly where the group turns by the Euclidean optimizer's equilibrium angle per step,
:math:`\sqrt{2\eta\lambda/(1+\mu)}` for SGD with momentum and
:math:`\sqrt{2\eta\lambda(1-\beta_1)/(1+\beta_1)}` for AdamW (the tests measure both against
torch's optimizers). The gains convert a learning rate of SGD (Adam) into the first turns
of a normalized step; the docs' algorithms page says how they were set. The per-row
arithmetic, :func:`._adaptive.rate_factor` and :func:`._adaptive.next_virtual_sq_norm`, is
with the rules it scales, compiled into the kernels with them.
"""

from __future__ import annotations

__all__: list[str] = []

SGD_RATE_GAIN = 1.0 / 30.0
r""":math:`\kappa`: with momentum 0.9, a group's first steps turn it by about ``lr / 3``."""

ADAM_RATE_GAIN = 3.0
r""":math:`\kappa_A`: a group's first steps turn it by about ``3 * lr``."""


def sgd_rate(lr: float, momentum: float, weight_decay: float) -> tuple[float, float, float]:
    """``(gain, power, pull)`` of the ``"sgd"`` rate for a step with these hyperparameters."""
    return SGD_RATE_GAIN / (1.0 - momentum), 2.0, 2.0 * lr * weight_decay / (1.0 + momentum)


def adam_rate(lr: float, beta1: float, weight_decay: float) -> tuple[float, float, float]:
    """``(gain, power, pull)`` of the ``"adam"`` rate (``weight_decay``: the decoupled one;
    0 for coupled L2 decay, whose radial term the horizontal projection removes)."""
    return ADAM_RATE_GAIN, 1.0, 2.0 * lr * weight_decay * (1.0 - beta1) / (1.0 + beta1)


def check_pull(pull: float, lr: float, weight_decay: float) -> None:
    """Refuse a pull of 1 or more: the virtual squared norm would reach zero or below (and
    SGD or AdamW itself would flip the weights' sign at such a weight decay)."""
    if pull >= 1.0:
        raise ValueError(
            f"lr={lr} and weight_decay={weight_decay} pull the virtual squared norm down by {pull:.3g} per step, "
            "which must stay below 1 (the Euclidean optimizer would flip the weights' sign); lower lr or weight_decay"
        )
