r"""PSIGD: full-batch Riemannian gradient descent on the PSI manifold, with Armijo backtracking."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ..manifold import PSIManifold, group_sq_norms, horizontal_lift_rows, metric_inner_rows, normalize_rows
from .psisgd import _check_finite, _PSIParamsMixin

__all__ = ["PSIGD"]

_LINE_SEARCHES = (None, "armijo")


def _as_float(loss: Any) -> float:
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


class PSIGD(_PSIParamsMixin, Optimizer):
    r"""Gradient descent on the PSI manifold, for full-batch problems.

    Scale-invariant parameters are recognized as by :class:`psiopt.PSISGD` (marked
    :class:`geoopt.ManifoldParameter` on a :class:`psiopt.PSIManifold`, or a param group
    with a ``"grouping"`` key); every other parameter takes a Euclidean gradient step.
    ``step(closure)`` needs the closure (it evaluates the loss on all the data and calls
    ``backward``) and returns the loss at the point the step started from.

    One step from :math:`w`, with :math:`g = \nabla f(w)`: the search direction is
    the Riemannian gradient, on scale-invariant groups its horizontal lift
    :math:`r_j = \|w_j\|^2 (g_j - \langle g_j, w_j\rangle w_j/\|w_j\|^2)`, elsewhere
    :math:`r = g`. Its squared norm in the PSI metric is

    .. math::

        \|\operatorname{grad} f\|_w^2 = \sum_j \frac{\|r_j\|^2}{\|w_j\|^2}
            + \sum_{\text{Euclidean}} \|g\|^2 .

    The trial point for a step :math:`\alpha` is the retraction
    :math:`R_w(-\alpha r)`, kept at the norm-keeping representative:
    :math:`\|w_j\| (w_j - \alpha r_j)/\|w_j - \alpha r_j\|` on scale-invariant groups,
    :math:`w - \alpha g` elsewhere.

    * ``line_search=None``: :math:`\alpha` is each param group's ``lr``.
    * ``line_search="armijo"``: start from :math:`\alpha_0 =` ``lr`` and multiply by
      ``backtrack`` (:math:`\beta`) until

      .. math::

          f(R_w(-\alpha r)) \le f(w) - c\, \alpha\, \|\operatorname{grad} f\|_w^2,

      with ``c`` the sufficient-decrease constant. With several param groups, every
      group's ``lr`` is multiplied by the same factor :math:`\beta^n` and the right-hand
      side is :math:`f(w) - c \sum_i \beta^n \mathrm{lr}_i \|\operatorname{grad}_i f\|_w^2`
      (the directional derivative along the scaled direction). Each
      trial starts from the saved weights, and a rejected trial's weights are replaced
      by the saved ones exactly. If ``max_backtracks`` trials are rejected (a gradient
      at rounding level, near a minimum) the weights stay exactly where they were and
      the recorded step size is 0.

    The accepted step size of each step (:math:`\beta^n \mathrm{lr}` of the parameter's
    group; ``lr`` without line search) is appended to
    ``optimizer.state[p]["step_sizes"]`` for every parameter ``p``, and saved by
    :meth:`state_dict`. On a scale-invariant group the step size is an angular step,
    the same for every representative of a class: started from :math:`a\cdot w`, the
    iterates are :math:`a\cdot w_t` and the step sizes and iteration counts are the same.

    Parameters
    ----------
    params : iterable
        Parameters or param groups.
    lr : float
        The step size (``line_search=None``) or the initial trial step (``"armijo"``).
    line_search : {None, "armijo"}, default None
        ``True`` is accepted as a synonym of ``"armijo"``.
    c : float, default 1e-4
        Sufficient-decrease constant of the Armijo condition, in ``(0, 1)``.
    backtrack : float, default 0.5
        Factor the trial step is multiplied by after a rejection, in ``(0, 1)``.
    max_backtracks : int, default 50
        Trials after the first before the step gives up (weights unchanged).

    Notes
    -----
    Errors are those of :class:`psiopt.PSISGD` (non-finite gradient, zero group, sparse
    gradient on a scale-invariant weight), raised before any weight changes. There is
    no momentum and no weight decay (on scale-invariant groups it would be a vertical
    move; on the others, add it to the loss). A non-finite trial loss counts as a
    rejection.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        *,
        line_search: str | bool | None = None,
        c: float = 1e-4,
        backtrack: float = 0.5,
        max_backtracks: int = 50,
    ) -> None:
        if line_search is True:
            line_search = "armijo"
        elif line_search is False:
            line_search = None
        if line_search not in _LINE_SEARCHES:
            raise ValueError(f"unknown line_search {line_search!r}; use None (fixed step) or 'armijo'")
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        _check_finite("learning rate", lr)
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr} (PSIGD needs a positive step size)")
        if not 0.0 < c < 1.0:
            raise ValueError(f"Invalid Armijo constant c: {c}; it must lie in (0, 1)")
        if not 0.0 < backtrack < 1.0:
            raise ValueError(f"Invalid backtrack factor: {backtrack}; it must lie in (0, 1)")
        if not isinstance(max_backtracks, int) or max_backtracks < 0:
            raise ValueError(f"Invalid max_backtracks: {max_backtracks}; use a non-negative int")
        self._psi_manifolds = {}
        self.line_search = line_search
        self.c = c
        self.backtrack = backtrack
        self.max_backtracks = max_backtracks
        super().__init__(params, {"lr": lr, "grouping": None})
        self._warn_if_no_scale_invariant()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_psi_manifolds", {})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; a ``"grouping"`` key makes all its tensors scale invariant."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_finite("learning rate", group["lr"])
            if not group["lr"] > 0.0:
                raise ValueError(f"Invalid learning rate: {group['lr']} (PSIGD needs a positive step size)")
            self._validate_group(group, len(self.param_groups) - 1)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One gradient step; ``closure`` (required) recomputes the loss and its gradients.

        Returns
        -------
        The loss at the starting point, as the closure returned it.
        """
        if closure is None:
            raise TypeError(
                "PSIGD.step needs a closure: a function that zeroes the gradients, computes the loss on all "
                "the data, calls loss.backward() and returns the loss (e.g. optimizer.step(closure)); the "
                "line search evaluates it at trial points"
            )
        with torch.enable_grad():
            loss = closure()
        plan = self._collect()
        # Per tensor: (param, start, direction, rows-or-None, group lr, start sq norms).
        entries = []
        sq_norm_terms: list[Tensor] = []
        for group, psi, euclid in plan:
            lr = float(group["lr"])
            for p, _, manifold in psi:
                w = manifold.rows(p)
                w_sq = group_sq_norms(w)
                r = horizontal_lift_rows(w, manifold.rows(p.grad), w_sq)
                entries.append((p, p.detach().clone(), r, manifold, lr, w_sq))
                sq_norm_terms.append(lr * metric_inner_rows(w_sq, r).sum().double())
            for p, _ in euclid:
                g = p.grad.to_dense() if p.grad.is_sparse else p.grad
                entries.append((p, p.detach().clone(), g.clone(), None, lr, None))
                sq_norm_terms.append(lr * (g.double() * g.double()).sum())
        if not entries:
            return loss

        if self.line_search is None:
            self._move(entries, 1.0)
            self._record(entries, 1.0)
            return loss

        f0 = _as_float(loss)
        decrease = float(torch.stack([t.cpu() for t in sq_norm_terms]).sum())
        scale = 1.0
        for _ in range(self.max_backtracks + 1):
            self._move(entries, scale)
            with torch.enable_grad():
                trial = _as_float(closure())
            if trial <= f0 - self.c * scale * decrease:  # False for NaN: a rejection
                self._record(entries, scale)
                return loss
            scale *= self.backtrack
        for p, start, *_ in entries:
            p.copy_(start)
        self._record(entries, 0.0)
        return loss

    @staticmethod
    def _move(entries: list, scale: float) -> None:
        """Set every parameter to its trial point for step ``scale * lr``, from the saved start."""
        for p, start, direction, manifold, lr, w_sq in entries:
            step = scale * lr
            if manifold is None:
                p.copy_(start.add(direction, alpha=-step))
            else:
                w = manifold.rows(start)
                w_new = normalize_rows(w.to(direction.dtype) - step * direction, w_sq)
                p.copy_(w_new.reshape(p.shape))

    def _record(self, entries: list, scale: float) -> None:
        for p, _, _, _, lr, _ in entries:
            self.state[p].setdefault("step_sizes", []).append(scale * lr)
