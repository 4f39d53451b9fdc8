r"""PSIGD: full-batch Riemannian gradient descent on the PSI manifold, with Armijo backtracking."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ..manifold import (
    PSIManifold,
    ZeroGroupError,
    grad_metric_sq_from_sums,
    group_sq_norms,
    horizontal_lift_rows,
    metric_inner_rows,
    normalize_rows,
    step_row_sums,
)
from ._functional import _bad_rows, _dim0_shard, _elementwise_pass, _local, _reduce_across_shards, _Tensors
from ._params import _any_flag, _check_finite, _check_finite_gradients, _non_finite_flag, _PSIParamsMixin

__all__ = ["PSIGD"]

_LINE_SEARCHES = (None, "armijo")


def _as_float(loss: Any) -> float:
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


def _takes_backward_flag(closure: Callable[..., Any]) -> bool:
    """Whether ``closure`` accepts a ``backward`` keyword (see :class:`PSIGD`)."""
    try:
        parameters = inspect.signature(closure).parameters
    except (TypeError, ValueError):  # a callable without a signature: the standard closure()
        return False
    flag = parameters.get("backward")
    return flag is not None and flag.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class PSIGD(_PSIParamsMixin, Optimizer):
    r"""Gradient descent on the PSI manifold, for full-batch problems.

    Scale-invariant parameters are recognized as by :class:`psiopt.PSISGD` (a param
    group with a ``"grouping"`` key, as :func:`psiopt.param_groups` makes, or a marked
    :class:`geoopt.ManifoldParameter` on a :class:`psiopt.PSIManifold`); every other
    parameter takes a Euclidean gradient step.
    ``step(closure)`` needs the closure, which evaluates the loss on all the data, and
    returns the loss at the point the step started from.

    The closure may take a keyword argument ``backward`` (``def closure(backward=True)``).
    PSIGD then calls ``closure(backward=True)`` once per step, at the starting point (the
    closure zeroes the gradients, computes the loss, calls ``loss.backward()`` and returns
    the loss), and ``closure(backward=False)`` at each line-search trial, under
    :func:`torch.no_grad` (the closure only computes and returns the loss): a step costs
    one backward pass and :math:`1 +` (trials) forward passes. The gradient at the
    accepted point is computed by the next step's first call, so never when no step
    follows, and after a step ``p.grad`` holds the gradient at its starting point. A
    closure without the argument, the standard ``closure()`` of ``torch.optim``, is
    called the same way and gives the same iterates, but it runs ``backward`` at every
    trial too.

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

    Every parameter ``p`` a step moves keeps three numbers in ``optimizer.state[p]``,
    saved by :meth:`state_dict` and of the same size after any number of steps:
    ``"step"``, the steps taken; ``"step_size"``, the last accepted step size
    (:math:`\beta^n \mathrm{lr}` of the parameter's group, ``lr`` without line search,
    0 when the search gave up); ``"backtracks"``, the rejected trials of all steps. To
    keep the history of the step sizes, read ``"step_size"`` after each step.

    On a scale-invariant group the step size is an angular step, the same for every
    representative of a class: started from :math:`a\cdot w`, the iterates are
    :math:`a\cdot w_t` and the step sizes and iteration counts are the same.

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

    **Sharded weights (FSDP2).** DTensors sharded on dim 0 (``fully_shard``, evenly or
    not) are stepped on their local shards. A step makes **one all-reduce**, whatever
    the number of trials, of :math:`8(3G + T + 2)` bytes for :math:`G` groups split
    across shards (a ``"tensor"`` grouping, straddling blocks) and :math:`T` sharded
    scale-invariant weights: the split groups' sums :math:`\|w_j\|^2,
    \langle g_j, w_j\rangle, \|g_j\|^2`, the refusal flags (a bad gradient or group on
    one rank refuses the step on all), and each rank's part of
    :math:`\|\operatorname{grad} f\|_w^2` (its whole groups and Euclidean shards). The
    trial points follow from the same sums (:math:`r_j \perp w_j`, so
    :math:`\|w_j - \alpha r_j\|^2 = \|w_j\|^2 + \alpha^2\|r_j\|^2`) and need no
    communication. PSIGD does not reduce the loss: under FSDP2 the closure must return
    the **same global loss on every rank** (e.g. the ranks' mean, all-reduced), so that
    every rank takes the same accept/reject decisions.
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
        self._row_plans: dict = {}
        self.line_search = line_search
        self.c = c
        self.backtrack = backtrack
        self.max_backtracks = max_backtracks
        super().__init__(params, {"lr": lr, "grouping": None})
        self._warn_if_no_scale_invariant()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_psi_manifolds", {})
        self.__dict__.setdefault("_row_plans", {})

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        _check_finite("learning rate", group["lr"])
        if not group["lr"] > 0.0:
            raise ValueError(f"Invalid learning rate: {group['lr']} (PSIGD needs a positive step size)")

    @torch.no_grad()
    def step(self, closure: Callable[..., Any] | None = None) -> Any:
        """One gradient step; ``closure`` (required) recomputes the loss, and its gradients
        when called with no argument or ``backward=True``.

        Returns
        -------
        The loss at the starting point, as the closure returned it.
        """
        if closure is None:
            raise TypeError(
                "PSIGD.step needs a closure: a function that zeroes the gradients, computes the loss on all "
                "the data, calls loss.backward() and returns the loss (e.g. optimizer.step(closure)); the "
                "line search evaluates it at trial points. Give it a keyword argument backward=True and "
                "skip the zeroing and loss.backward() when it is False: trials then cost no backward pass"
            )
        takes_flag = _takes_backward_flag(closure)
        with torch.enable_grad():
            loss = closure(backward=True) if takes_flag else closure()
        sharded = any(_local(p) is not p for g in self.param_groups for p in g["params"] if p.grad is not None)
        # Sharded steps are checked from the flags of their all-reduce, on every rank at once:
        # a rank raising alone would leave the others waiting in it.
        plan = self._collect(check=not sharded)
        trials = self._sharded_trials(plan) if sharded else _Trials.of_plain_tensors(plan)
        if trials is None:
            return loss

        if self.line_search is None:
            trials.move(1.0)
            self._record(trials.lrs, 1.0, rejected=0)
            return loss

        f0 = _as_float(loss)
        decrease = trials.decrease
        scale = 1.0
        for rejected in range(self.max_backtracks + 1):
            trials.move(scale)
            trial = _as_float(self._trial_loss(closure, takes_flag))
            if trial <= f0 - self.c * scale * decrease:  # False for NaN: a rejection
                self._record(trials.lrs, scale, rejected)
                return loss
            scale *= self.backtrack
        trials.restore()
        self._record(trials.lrs, 0.0, self.max_backtracks + 1)
        return loss

    @staticmethod
    def _trial_loss(closure: Callable[..., Any], takes_flag: bool) -> Any:
        """The loss at the current (trial) weights; a gradient only if the closure insists."""
        if takes_flag:
            return closure(backward=False)  # under step's no_grad: no graph is built
        with torch.enable_grad():
            return closure()

    def _sharded_trials(self, plan: list) -> _Trials | None:
        r"""The trials of a step on DTensors (FSDP2): local shards, and one all-reduce.

        Per scale-invariant tensor, the reduction pass gives each row's
        :math:`a = \|w_j\|^2, b = \langle g_j, w_j\rangle, \|g_j\|^2`
        (:func:`~psiopt.manifold.step_row_sums`); one all-reduce completes the groups split
        across shards, shares the refusal flags and sums the partial squared norm of the
        Riemannian gradient (the local whole groups, the sharded Euclidean gradients).
        Every trial then follows from these sums: the retraction with kept norm is the
        one-pass PSISGD step without momentum, with learning rate :math:`\alpha`
        (:math:`\|w_j - \alpha r_j\|^2 = a + \alpha^2 \|r_j\|^2` since :math:`r_j \perp w_j`),
        so trials communicate nothing.
        """
        items: list[_Tensors] = []
        sums: list[Tensor] = []
        bad: list[Tensor | bool] = []
        psi_all: list[tuple[Tensor, str, PSIManifold, float]] = []
        euclid: list[tuple[Tensor, str, Tensor, float]] = []  # (param, name, local gradient, lr)
        for group, psi, eu in plan:
            lr = float(group["lr"])
            for p, name, manifold in psi:
                row_plan, has_row_view = self._row_plan(p, name, manifold)
                if not has_row_view:
                    raise NotImplementedError(
                        f"{name}: its local shard is not dense, so PSIGD cannot step it in place; shard it with "
                        "fully_shard, which keeps local shards dense"
                    )
                w = row_plan.rows(p)
                g = row_plan.rows(p.grad).clone()  # a closure without the backward flag overwrites p.grad
                row_sums = step_row_sums(w, g)[:, :3]
                items.append(_Tensors(row_plan, w, g, None, False))
                sums.append(row_sums)
                # A zero row of a split group is no error: only its whole group's norm counts.
                whole_rows = row_plan.group_of_row is None
                bad.append(_bad_rows(row_sums).any() if whole_rows else ~torch.isfinite(row_sums).all())
                psi_all.append((p, name, manifold, lr))
            for p, name in eu:
                g = _local(p.grad)
                euclid.append((p, name, (g.to_dense() if g.is_sparse else g).clone(), lr))
        if not items and not euclid:
            return None

        process_groups = {t.plan.process_group for t in items if t.plan.process_group is not None}
        split_euclid = []  # whether each Euclidean gradient is a dim-0 shard, whose norm is partial
        for p, name, _, _ in euclid:
            shard_dim = _dim0_shard(p, name)[0] if _local(p) is not p else None
            split_euclid.append(shard_dim is not None)
            if shard_dim is not None:
                process_groups.add(p.device_mesh.get_group(shard_dim))
        if len(process_groups) > 1:
            raise NotImplementedError(
                "PSIGD's parameters are sharded over several process groups; its line search sums the gradient "
                "norm over one. Shard every parameter over the same device mesh (one fully_shard mesh)"
            )
        device = (items[0].w if items else euclid[0][2]).device
        # Replicated quantities (whole groups on every rank, plain tensors) are counted once,
        # the partial ones (shards) are summed over the ranks.
        partial = torch.zeros((), dtype=torch.float64, device=device)
        replicated = torch.zeros((), dtype=torch.float64, device=device)
        for t, row_sums, (*_, lr) in zip(items, sums, psi_all):
            if t.plan.group_of_row is None:
                term = lr * grad_metric_sq_from_sums(*row_sums.double().unbind(1)).sum()
                if t.plan.process_group is not None:
                    partial = partial + term
                else:
                    replicated = replicated + term
        for (_, _, g, lr), split in zip(euclid, split_euclid):
            term = lr * (g.double() * g.double()).sum()
            if split:
                partial = partial + term
            else:
                replicated = replicated + term
        local_flags = [b for t, b in zip(items, bad) if t.plan.process_group is None]
        euclid_flag = _non_finite_flag([g for _, _, g, _ in euclid])
        flag = torch.stack(
            [torch.as_tensor(f, device=device).reshape(()) for f in (*local_flags, euclid_flag) if f is not None]
            or [torch.zeros((), dtype=torch.bool, device=device)]
        ).any()
        whole: list[Tensor | None] = []
        totals = _reduce_across_shards(
            items,
            sums,
            bad,
            torch.stack([flag.double(), partial]),
            totals_group=next(iter(process_groups), None),
            whole=whole,
        )
        split_groups = [(w_sums, lr, i) for i, (w_sums, (*_, lr)) in enumerate(zip(whole, psi_all)) if w_sums is not None]
        zero_split = [bool((~(w_sums[:, 0] > torch.finfo(w_sums.dtype).tiny)).any()) for w_sums, _, _ in split_groups]
        if bool(totals[0] > 0) or _any_flag(bad) or any(zero_split):
            self._refuse_sharded(psi_all, items, bad, [i for (_, _, i), z in zip(split_groups, zero_split) if z], euclid)
        decrease = totals[1] + replicated
        for w_sums, lr, _ in split_groups:
            decrease = decrease + lr * grad_metric_sq_from_sums(*w_sums.unbind(1)).sum()
        return _Trials.of_shards(items, sums, psi_all, euclid, float(decrease))

    @staticmethod
    def _refuse_sharded(psi_all: list, items: list, bad: list, zero_split: list[int], euclid: list) -> None:
        """Raise for a refused sharded step, naming the parameter; every rank raises."""
        _check_finite_gradients([(p, name) for p, name, *_ in (*psi_all, *euclid)])  # this rank's gradients
        for i in zero_split:
            p, name, manifold, _ = psi_all[i]
            raise ZeroGroupError(
                f"{name}: a group ({manifold.grouping.describe()} grouping, shape {tuple(p.shape)}, sharded) has "
                "zero or underflowing norm, so it has no direction on the PSI manifold; re-initialize it"
            )
        for (p, name, manifold, _), t, flagged in zip(psi_all, items, bad):
            if bool(flagged) and t.plan.group_of_row is None:
                manifold.check_nonzero_groups(_local(p.detach()), name)  # this rank's rows are whole groups
        flagged_names = [name for (_, name, *_), flagged in zip(psi_all, bad) if bool(flagged)]
        where = flagged_names[0] if flagged_names else "a parameter"
        raise FloatingPointError(
            f"{where} has, on another rank, a NaN or infinite gradient, a non-finite weight or a zero group; the "
            "step was refused on every rank and no weight was changed"
        )

    def _record(self, lrs: list[tuple[Tensor, float]], scale: float, rejected: int) -> None:
        """Count a step and its ``rejected`` trials, and keep its step size ``scale * lr``."""
        for p, lr in lrs:
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            state["step_size"] = scale * lr
            state["backtracks"] = state.get("backtracks", 0) + rejected


class _Trials:
    r"""The trial points of one step: ``move(scale)`` puts every parameter at the trial point
    for step sizes ``scale * lr`` from the saved start, ``restore()`` puts back the start
    exactly; ``decrease`` is :math:`\sum_i \mathrm{lr}_i \|\operatorname{grad}_i f\|_w^2`
    and ``lrs`` lists ``(param, lr)``."""

    def __init__(self, move: Callable[[float], None], restore: Callable[[], None], decrease: float, lrs: list) -> None:
        self.move, self.restore, self.decrease, self.lrs = move, restore, decrease, lrs

    @classmethod
    def of_plain_tensors(cls, plan: list) -> _Trials | None:
        """Plain tensors: the directions are materialized (the lift :math:`r`, the gradient)."""
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
            return None

        def move(scale: float) -> None:
            for p, start, direction, manifold, lr, w_sq in entries:
                step = scale * lr
                if manifold is None:
                    p.copy_(start.add(direction, alpha=-step))
                else:
                    w = manifold.rows(start)
                    w_new = normalize_rows(w.to(direction.dtype) - step * direction, w_sq)
                    p.copy_(w_new.reshape(p.shape))

        def restore() -> None:
            for p, start, *_ in entries:
                p.copy_(start)

        decrease = float(torch.stack([t.cpu() for t in sq_norm_terms]).sum())
        return cls(move, restore, decrease, [(e[0], e[4]) for e in entries])

    @classmethod
    def of_shards(cls, items: list[_Tensors], sums: list[Tensor], psi: list, euclid: list, decrease: float) -> _Trials:
        """Local shards, in place: the scale-invariant rows with their completed sums
        (``psi`` and ``euclid`` list ``(param, name, ..., lr)``)."""
        lrs = [lr for *_, lr in psi]
        starts = [t.w.clone() for t in items]
        six = [torch.nn.functional.pad(s, (0, 3)) for s in sums]  # no momentum: its three sums are zero
        euclid_starts = [_local(p).clone() for p, *_ in euclid]

        def move(scale: float) -> None:
            for t, row_sums, start, lr in zip(items, six, starts, lrs):
                t.w.copy_(start)
                # The PSISGD step without momentum is the retraction with kept norm.
                _elementwise_pass(
                    [t], [row_sums], None, lr=scale * lr, momentum=0.0, dampening=0.0, nesterov=False, maximize=False
                )
            for (p, _, g, lr), start in zip(euclid, euclid_starts):
                _local(p).copy_(start.add(g, alpha=-scale * lr))

        def restore() -> None:
            for t, start in zip(items, starts):
                t.w.copy_(start)
            for (p, *_), start in zip(euclid, euclid_starts):
                _local(p).copy_(start)

        return cls(move, restore, decrease, [(p, lr) for p, *_, lr in (*psi, *euclid)])
