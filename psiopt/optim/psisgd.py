r"""PSISGD: stochastic gradient descent with momentum on the PSI manifold."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import geoopt
import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _default_to_fused_or_foreach
from torch.optim.sgd import sgd

from ..grouping import as_grouping
from ..manifold import PSIManifold, any_zero_groups
from ._functional import _multi_tensor_psisgd, _single_tensor_psisgd

__all__ = ["PSISGD"]


class _PSIParamsMixin:
    """What PSISGD and PSIGD share: which parameters are scale invariant, their names in
    error messages, and the checks that run on every weight before any is modified."""

    param_groups: list[dict[str, Any]]
    _psi_manifolds: dict

    def _manifold_of(self, p: Tensor, group: dict[str, Any]) -> PSIManifold | None:
        """The PSI manifold ``p`` is optimized on, or ``None`` for a Euclidean parameter."""
        grouping = group.get("grouping")
        if grouping is not None:
            grouping = as_grouping(grouping)
            if grouping not in self._psi_manifolds:
                self._psi_manifolds[grouping] = PSIManifold(grouping)
            return self._psi_manifolds[grouping]
        if isinstance(p, geoopt.ManifoldParameter) and isinstance(p.manifold, PSIManifold):
            return p.manifold
        return None

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        grouping = group.get("grouping")
        if grouping is not None:
            grouping = as_grouping(grouping)  # a bad value raises here, with its fix
        for j, p in enumerate(group["params"]):
            name = _param_name(group, index, j, p)
            if grouping is not None:
                try:
                    grouping.num_groups(p.shape)
                except ValueError as err:
                    raise ValueError(f"{name}: cannot use grouping {grouping.describe()!r}: {err}") from None
            elif isinstance(p, geoopt.ManifoldParameter) and not isinstance(p.manifold, PSIManifold):
                raise TypeError(
                    f"{name} is a geoopt.ManifoldParameter on {p.manifold}, which "
                    f"{type(self).__name__} does not optimize on; use geoopt.optim.RiemannianSGD for "
                    "it, or unwrap it (torch.nn.Parameter(p.data)) for a Euclidean update"
                )
            if (grouping is not None or self._manifold_of(p, group) is not None) and not p.dtype.is_floating_point:
                raise TypeError(f"{name}: a scale-invariant weight must be a real floating-point tensor, not {p.dtype}")

    def _warn_if_no_scale_invariant(self) -> None:
        if not any(self._manifold_of(p, g) is not None for g in self.param_groups for p in g["params"]):
            warnings.warn(
                f"{type(self).__name__} received no scale-invariant parameter, so every parameter gets a plain "
                "Euclidean update. Mark the model first with psiopt.mark_scale_invariant(model, example_input) "
                "and create the optimizer after marking, or name a grouping in a param group "
                "({'params': [...], 'grouping': 'channel'})",
                UserWarning,
                stacklevel=3,
            )

    def _collect(self) -> list[tuple[dict[str, Any], list[tuple[Tensor, str, PSIManifold]], list[tuple[Tensor, str]]]]:
        """Per param group: its scale-invariant and Euclidean parameters that have a gradient.

        Checks every gradient and every scale-invariant weight before anything is
        modified, so a refused step leaves weights and state untouched.
        """
        plan = []
        for gi, group in enumerate(self.param_groups):
            psi: list[tuple[Tensor, str, PSIManifold]] = []
            euclid: list[tuple[Tensor, str]] = []
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = _param_name(group, gi, j, p)
                manifold = self._manifold_of(p, group)
                if manifold is None:
                    euclid.append((p, name))
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{name} is scale invariant and has a sparse gradient; the PSI step needs each group's "
                        "full gradient. Use a dense gradient (e.g. nn.Embedding(..., sparse=False)) or do not "
                        "mark this weight"
                    )
                psi.append((p, name, manifold))
            plan.append((group, psi, euclid))
        _check_finite_gradients([(p, name) for _, psi, eu in plan for p, name, *_ in (*psi, *eu)])
        psi_all = [(p, name, m) for _, psi, _ in plan for p, name, m in psi]
        if any_zero_groups([m.rows(p.detach()) for p, _, m in psi_all]):
            for p, name, m in psi_all:
                m.check_nonzero_groups(p.detach(), name)
        return plan


def _param_name(group: dict[str, Any], group_index: int, index: int, p: Tensor) -> str:
    names = group.get("param_names")
    if names is not None and index < len(names):
        return f"parameter {names[index]!r}"
    return f"parameter param_groups[{group_index}]['params'][{index}] (shape {tuple(p.shape)})"


def _check_finite_gradients(entries: list[tuple[Tensor, str]]) -> None:
    """Raise, naming the first parameter whose gradient holds a NaN or an infinity."""
    if not entries:
        return
    grads = [g.coalesce().values() if g.is_sparse else g for g in (p.grad for p, _ in entries)]
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(i)
    for idx in by_device.values():
        # A NaN or infinite entry makes the 2-norm NaN or infinite; the 2-norm is one fast
        # multi-tensor kernel (the max-norm is several times slower on CPU). It can also
        # overflow on finite entries, so a flagged tensor is confirmed entry by entry.
        norms = torch._foreach_norm([grads[i] for i in idx])
        finite = torch.stack([n.float() for n in norms]).isfinite()
        if not bool(finite.all()):
            flagged = [idx[int(k)] for k in (~finite).nonzero().flatten()]
            bad = [i for i in flagged if not bool(grads[i].isfinite().all())]
            if not bad:
                continue
            first = bad[0]
            raise FloatingPointError(
                f"{entries[first][1]} has a NaN or infinite gradient; the step was refused and no weight was "
                "changed. Lower the learning rate, clip the gradients, or skip such steps (a "
                "torch.amp.GradScaler skips them for you)"
            )


def _check_finite(name: str, value: Any) -> None:
    """Refuse a NaN or infinite step-size hyperparameter (``lr``, ``eps``) at construction.

    torch's own checks (``lr < 0``) let a NaN or an infinity through, and the first step
    then turns every weight into NaN: nothing the user had would survive it.
    """
    if isinstance(value, Tensor) and value.numel() != 1:
        return  # torch's own "must be 1-element" check names this one
    if not math.isfinite(float(value)):
        raise ValueError(f"Invalid {name}: {float(value)} (it must be a finite number)")


def _validate_sgd_hyperparameters(lr: Any, momentum: float, dampening: float, weight_decay: Any, nesterov: bool) -> None:
    # The same checks and messages as torch.optim.SGD, and a finite lr.
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    _check_finite("learning rate", lr)
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


class PSISGD(_PSIParamsMixin, Optimizer):
    r"""SGD with momentum on the PSI manifold: a drop-in replacement for :class:`torch.optim.SGD`.

    Parameters are split in two:

    * **scale-invariant** ones, each a :class:`geoopt.ManifoldParameter` on a
      :class:`psiopt.PSIManifold` (what :func:`psiopt.mark_scale_invariant` makes), or
      any tensor in a param group that names a grouping,
      ``{"params": [...], "grouping": "channel"}`` (``"tensor"``, ``"block(4)"``, or a
      :class:`psiopt.Grouping`), which then applies to every tensor of that group;
    * **every other** parameter, which gets :class:`torch.optim.SGD`'s update bit for bit
      (the same function, :func:`torch.optim.sgd.sgd`, is called on them): momentum,
      dampening, Nesterov, weight decay, maximize, sparse gradients.

    For a scale-invariant tensor with groups :math:`w_j` (rows of
    :meth:`psiopt.Grouping.rows`) and Euclidean gradient :math:`g = \nabla f(w)`
    (:math:`-\nabla f` with ``maximize``), one step with learning rate :math:`\eta`,
    momentum :math:`\mu` and dampening :math:`\tau` is

    .. math::

        r_j &= \|w_j\|^2 \Bigl(g_j - \frac{\langle g_j, w_j\rangle}{\|w_j\|^2} w_j\Bigr)
            \qquad\text{(Riemannian gradient, horizontal lift)}\\
        m &\leftarrow \begin{cases} r & \text{first step}\\
            \mu\, m + (1 - \tau)\, r & \text{after}\end{cases}\\
        d &= \begin{cases} r + \mu\, m & \text{Nesterov}\\ m & \text{otherwise}\end{cases}\\
        w'_j &= \|w_j\|\, \frac{w_j - \eta\, d_j}{\|w_j - \eta\, d_j\|}
            \qquad\text{(retraction, then the norm-keeping representative)}\\
        m_j &\leftarrow \frac{\|w'_j\|}{\|w_j\|}\Bigl(m_j - \frac{\langle m_j, w'_j\rangle}{\|w'_j\|^2} w'_j\Bigr)
            \qquad\text{(vector transport to } w'\text{)}

    (with ``momentum=0`` there is no :math:`m` and :math:`d = r`). Every formula is the
    one of :mod:`psiopt.manifold` (``horizontal_lift_rows``, ``normalize_rows``,
    ``transport_rows``). The momentum buffer, ``optimizer.state[p]["momentum_buffer"]``
    (the key torch uses), is always a horizontal vector at the stored weights.

    Parameters
    ----------
    params : iterable
        Parameters or param groups (dicts), as for any :class:`torch.optim.Optimizer`;
        ``model.named_parameters()`` also works and puts the names into error messages.
    lr : float or Tensor, default 1e-3
        Learning rate. On a scale-invariant group it is an **angular** step: the unit
        vector :math:`w_j/\|w_j\|` moves by :math:`\eta` times the gradient of the loss
        at that unit vector, whatever :math:`\|w_j\|` is.
    momentum, dampening, nesterov
        As in :class:`torch.optim.SGD`, for both kinds of parameters.
    weight_decay : float, default 0
        L2 penalty, applied to the Euclidean parameters only (see Notes).
    maximize : bool, default False
        Maximize the objective instead.
    foreach : bool, optional
        Use the batched implementation. ``None`` chooses as torch does (batched on CUDA).
        The scale-invariant tensors of one device, dtype and group size are stacked and
        stepped together; the Euclidean ones use torch's own choice.

    Notes
    -----
    Choices, and why:

    * **Kept representative.** After the retraction :math:`w + \xi` (which only grows
      norms: :math:`\|w_j + \xi_j\|^2 = \|w_j\|^2 + \|\xi_j\|^2` for horizontal
      :math:`\xi`), each group is rescaled back to the norm it had before the step. It
      is the same point of the manifold; fixed norms cannot overflow or underflow over
      long runs, and a copy started from :math:`a\cdot w` stays exactly
      :math:`a\cdot w_t` (up to rounding). The transport's norm ratio is then 1.
    * **No weight decay on scale-invariant groups.** :math:`w \mapsto (1 - \eta\lambda) w`
      only moves along the class :math:`[w]` (a vertical move): it does nothing to the
      network's function or to the point of the manifold. Its only effect under plain
      SGD is to raise the effective angular step :math:`\eta/\|w_j\|^2`; here the
      angular step is :math:`\eta` itself, so schedule the learning rate instead.
    * **Own learning rate.** Because the step on scale-invariant groups is angular, it is
      not on the scale of SGD's learning rate. Give them their own param group (and so
      their own schedule with any :mod:`torch.optim.lr_scheduler`)::

          si = [p for _, p in psiopt.scale_invariant_parameters(model)]
          rest = [p for p in model.parameters() if not psiopt.is_scale_invariant(p)]
          PSISGD([{"params": si, "lr": 0.05}, {"params": rest}], lr=0.1, momentum=0.9)

    * **Retraction, not exponential map.** :math:`w + \xi` agrees with the geodesic
      (:meth:`psiopt.PSIManifold.expmap`) to second order, costs no trigonometry, and
      is what makes the step equivariant under rescaling; the transport is the
      projection :meth:`psiopt.PSIManifold.transp`, the one that matches the retraction.
    * **Bad input.** A NaN or infinite gradient (any parameter) makes ``step`` raise
      ``FloatingPointError`` naming the parameter; a scale-invariant group with zero,
      underflowing or non-finite norm raises :class:`psiopt.ZeroGroupError` naming the
      parameter and group; a sparse gradient on a scale-invariant weight raises
      ``RuntimeError``. All checks run on every parameter before any is modified, so a
      refused step leaves weights and momentum untouched.

    Compared with :class:`geoopt.optim.RiemannianSGD` on the same
    :class:`psiopt.PSIManifold` parameters (it calls the manifold's ``egrad2rgrad``,
    ``retr`` and ``retr_transp``): **without momentum** both take the same step on the
    manifold, at every step: geoopt keeps the representative :math:`w + \xi` (norms
    grow each step), PSISGD its rescaled copy, and the normalized groups agree. They
    differ in that

    * geoopt starts the momentum buffer at the *Euclidean* gradient and then adds the
      Riemannian one (:math:`m_1 = \mu \nabla f + (1-\tau) r`); PSISGD starts it at the
      Riemannian gradient, as torch's SGD starts it at the gradient (:math:`m_1 = r`);
    * geoopt adds weight decay to ``p.grad`` in place (the horizontal projection then
      removes it on PSI parameters); PSISGD leaves ``p.grad`` untouched;
    * on parameters that are not on a manifold geoopt runs its own update; PSISGD calls
      torch's, so those parameters follow :class:`torch.optim.SGD` bit for bit.

    Examples
    --------
    >>> import torch, psiopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.BatchNorm1d(8),
    ...                             torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> _ = psiopt.mark_scale_invariant(model, x)
    >>> opt = psiopt.PSISGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> torch.nn.functional.cross_entropy(model(x), y).backward()
    >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        _validate_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
        self._psi_manifolds = {}
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "grouping": None,
        }
        super().__init__(params, defaults)
        self._warn_if_no_scale_invariant()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_psi_manifolds", {})
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("grouping", None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as :meth:`torch.optim.Optimizer.add_param_group`; a
        ``"grouping"`` key makes all its tensors scale invariant with that grouping."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_sgd_hyperparameters(
                group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]
            )
            self._validate_group(group, len(self.param_groups) - 1)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (called with gradients enabled).

        Returns
        -------
        The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group, psi, euclid in self._collect():
            if euclid:
                self._euclidean_step(group, [p for p, _ in euclid])
            if psi:
                self._psi_step(group, psi)
        return loss

    def _euclidean_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        # torch.optim.SGD's own step on these tensors, argument for argument.
        grads = [p.grad for p in params]
        momentum_buffers = [self.state[p].get("momentum_buffer") for p in params] if group["momentum"] != 0 else []
        sgd(
            params,
            grads,
            momentum_buffers,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            has_sparse_grad=any(g.is_sparse for g in grads),
            foreach=group["foreach"],
            fused=None,
        )
        if group["momentum"] != 0:
            for p, buf in zip(params, momentum_buffers):
                self.state[p]["momentum_buffer"] = buf

    def _psi_step(self, group: dict[str, Any], psi: list[tuple[Tensor, str, PSIManifold]]) -> None:
        params = [p for p, _, _ in psi]
        momentum = group["momentum"]
        buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else [None] * len(params)
        foreach = group["foreach"]
        if foreach is None:
            _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
        update = _multi_tensor_psisgd if foreach else _single_tensor_psisgd
        update(
            params,
            [p.grad for p in params],
            buffers,
            [m.rows for _, _, m in psi],
            lr=float(group["lr"]),
            momentum=momentum,
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if momentum != 0:
            for p, buf in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buf
