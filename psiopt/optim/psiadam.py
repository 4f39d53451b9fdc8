r"""PSIAdam and PSIAdamW: Adam with per-group adaptive angular steps on the PSI manifold."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.optimizer import Optimizer, ParamsT, _get_scalar_dtype, _to_scalar

from ..manifold import PSIManifold
from ._adaptive_step import _AdamRule, _AdamRuleMixin
from ._params import _check_finite, _PSIParamsMixin
from ._rates import adam_rate, check_pull

__all__ = ["PSIAdam", "PSIAdamW"]


ANGULAR_RATES = ("adam", "constant")
"""The angular rates of PSIAdam's scale-invariant groups (its ``angular_rate`` option)."""


def _validate_adam_hyperparameters(
    lr: Any, betas: Any, eps: Any, weight_decay: Any, foreach: bool | None, nesterov: Any, angular_rate: Any
) -> None:
    # The same checks and messages as torch.optim.Adam (capturable is never on here),
    # a finite lr and eps, and a bool nesterov (ours: a truthy string would pass silently).
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be True or False, got {nesterov!r} ({type(nesterov).__name__})")
    if isinstance(lr, Tensor):
        if foreach:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    _check_finite("learning rate", lr)
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    _check_finite("epsilon value", eps)
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not (
        (isinstance(betas[0], float) and isinstance(betas[1], float))
        or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
    ):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            if foreach:
                raise ValueError(f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")
    if angular_rate not in ANGULAR_RATES:
        raise ValueError(f"angular_rate must be one of {', '.join(map(repr, ANGULAR_RATES))}, got {angular_rate!r}")


@functools.lru_cache(maxsize=64)  # a pure function of the group's numbers, asked for several times a step
def _psiadam_rule(
    lr: float, beta1: float, beta2: float, eps: float, amsgrad: bool, nesterov: bool, angular_rate: str,
    weight_decay: float,
) -> _AdamRule:
    """PSIAdam's adaptive rule for these hyperparameters (``weight_decay``: the decoupled
    one, 0 for the L2 term)."""
    rate = None
    if angular_rate == "adam":
        rate = adam_rate(lr, beta1, weight_decay)
        check_pull(rate[2], lr, weight_decay)
    return _AdamRule(beta1, beta2, eps, amsgrad, nesterov, rate)


class PSIAdam(_AdamRuleMixin, _PSIParamsMixin, Optimizer):
    r"""Adam on the PSI manifold: a drop-in replacement for :class:`torch.optim.Adam`.

    Parameters are split as by :class:`psiopt.PSISGD`: scale-invariant ones (in a param
    group naming a ``"grouping"``, as :func:`psiopt.param_groups` makes them, or marked by
    :func:`psiopt.mark_scale_invariant`) and **every other** parameter, which gets :class:`torch.optim.Adam`'s update bit
    for bit (the same function, :func:`torch.optim.adam.adam`, is called on them).

    On a scale-invariant tensor with groups :math:`w_j` and gradient :math:`g`, step
    :math:`t` with learning rate :math:`\eta` is Riemannian Adam on the quotient, with
    one second moment per group, of the gradient at the unit row
    :math:`u_j = w_j/\|w_j\|`:

    .. math::

        r_j &= \|w_j\|^2 P_w(g)_j, \qquad s_j = \|\nabla f(u_j)\|^2 = \|r_j\|^2/\|w_j\|^2\\
        m &\leftarrow \beta_1 m + (1 - \beta_1)\, r, \qquad
        v_j \leftarrow \beta_2 v_j + (1 - \beta_2)\, s_j\\
        d_j &= \frac{m_j / (1 - \beta_1^t)}{\sqrt{v_j / (1 - \beta_2^t)} + \epsilon}, \qquad
        w'_j = \|w_j\|\, \frac{w_j - \eta\, d_j}{\|w_j - \eta\, d_j\|}\\
        m_j &\leftarrow P_{w'}(m)_j \qquad\text{(vector transport to } w'\text{)}

    with ``nesterov=False``. By default (``nesterov=True``) the numerator of :math:`d_j`
    is NAdam's look-ahead (Dozat 2016) with a constant momentum,
    :math:`\beta_1 m_j/(1 - \beta_1^{t+1}) + (1 - \beta_1)\, r_j/(1 - \beta_1^t)`: the
    first moment one step ahead, each term with its own bias correction. With
    ``amsgrad``, :math:`v_j` in :math:`d_j` is replaced by its running maximum.
    :math:`s_j`, :math:`v_j` and :math:`m_j/\|w_j\|` are the same for every
    representative :math:`a_j w_j` of the class, so the step turns :math:`u_j` by the
    same angle, about :math:`\eta` radians while the gradients agree from step to
    step, whatever the scale of :math:`w_j`: runs started from :math:`w` and from
    :math:`a\cdot w` stay equivalent. ``eps`` is in the same invariant units.

    That is the step at ``angular_rate="constant"``. By default (``"adam"``) each group
    carries a virtual squared norm :math:`\nu_j^2` (1 at the start, whatever the
    weights), :math:`\eta` becomes :math:`3\eta/\nu_j` on that group, and after the step
    :math:`\nu_j^2` is multiplied by :math:`\|w_j - \eta_j d_j\|^2/\|w_j\|^2` (the growth
    Adam's step would have given the norm) less PSIAdamW's pull
    :math:`2\eta\lambda(1-\beta_1)/(1+\beta_1)`: Adam's decay of the angular step as the
    norms grow, and AdamW's equilibrium angle, without their dependence on the initial
    norm (the docs' algorithms page, *Angular rates*).

    State, under torch's keys: ``"step"`` (a float32 CPU tensor, as torch keeps it),
    ``"exp_avg"`` (horizontal at the stored weights, the parameter's shape) and
    ``"exp_avg_sq"`` / ``"max_exp_avg_sq"`` and, at the ``"adam"`` rate,
    ``"virtual_sq_norm"`` (one entry per group, shape ``(k,)``), in the
    parameter's dtype as torch stores Adam's state (the step itself computes in float32
    for half-precision parameters).

    Parameters
    ----------
    params : iterable
        Parameters or param groups, as for :class:`torch.optim.Adam`; param groups may
        carry ``"grouping"`` and ``"param_names"`` as for :class:`psiopt.PSISGD`.
    lr : float or Tensor, default 1e-3
        Learning rate: Adam's own. On scale-invariant groups it sets an angle: the first
        steps turn a group by about ``3 * lr`` radians (``lr`` at the constant rate).
    betas, eps, amsgrad, maximize
        As in :class:`torch.optim.Adam`, for both kinds of parameters.
    weight_decay : float, default 0
        L2 penalty (decoupled with ``decoupled_weight_decay=True``, as
        :class:`PSIAdamW`), applied to the Euclidean parameters only; the decoupled one
        is also the ``"adam"`` rate's pull on scale-invariant groups (see Notes).
    foreach, fused : bool, optional
        As in torch. On the scale-invariant groups ``foreach=False`` is the reference
        loop (each tensor's ``(k, d)`` group matrix through the formulas of
        :mod:`psiopt.manifold`), ``foreach=True`` the same as multi-tensor torch
        operations, ``fused=True`` the one-pass compiled kernels (numba on the CPU for
        float32 and float64 tensors; an error where there are none), and the default
        (both ``None``) the kernels where they exist, else torch's default choice of the
        other two. The Euclidean parameters get :func:`torch.optim.adam.adam` with the
        same options, so they follow :class:`torch.optim.Adam` built with them bit for
        bit; with both ``None``, torch's fused step where torch has one (bit for bit
        ``Adam(fused=True)``; torch's own default on the CPU is its per-tensor loop).
    capturable, differentiable
        Only their defaults are supported; other values raise ``ValueError``.
    decoupled_weight_decay : bool, default False
        Use AdamW's decoupled weight decay on the Euclidean parameters.
    nesterov : bool, default True
        NAdam's look-ahead on the scale-invariant groups (the formula above); ``False``
        gives plain Riemannian Adam there. It does not change the Euclidean parameters,
        which always get :class:`torch.optim.Adam`'s update. A param group may set its own.
    angular_rate : {"adam", "constant"}, default "adam"
        How far a scale-invariant group turns per step (above). A state saved before the
        option existed resumes the constant rate it was saved with.

    Notes
    -----
    * **No weight decay on scale-invariant groups** (L2 or decoupled): both only move a
      group along its class (the L2 term :math:`\lambda w_j` is radial, so the
      horizontal projection removes it; :math:`w_j \mapsto (1-\eta\lambda) w_j` is a
      rescaling). Neither changes the network's function or the point of the manifold.
      Under Euclidean Adam their effect on such a group is to keep its norm small and
      so its angular step :math:`\approx \eta\sqrt{d}/\|w_j\|` large; at the ``"adam"``
      rate the decoupled decay does that through the virtual norm, never through the
      weights; at the constant rate schedule the learning rate instead.
    * **Per-group second moments.** A per-coordinate :math:`v` would make the step
      depend on the basis of each group and not be a step on the sphere; one scalar per
      group keeps the direction of :math:`m_j` (as geoopt's ``RiemannianAdam`` does on
      a sphere, whose ``inner`` sums over a row).
    * The checks before a step (non-finite gradients, zero groups, sparse gradients)
      are :class:`psiopt.PSISGD`'s: a refused step changes nothing. (One exception, on
      the compiled kernels: a NaN put into the first moment or the per-group state from
      outside the optimizer, which only the write pass reads, leaves the rows that hold
      it unchanged, and the step raises naming the parameter after the other groups
      were stepped.)
    * **One pass over memory.** The compiled step reads the gradients for the checks,
      then each row of weights, gradient and first moment once, forms the row's six
      sums, its coefficients (:func:`psiopt.optim._adaptive.psiadam_coefficients`) and
      the step's scalars (:func:`psiopt.manifold.one_pass_row_scalars`), and writes the
      row while it is in cache: 6 tensor-sized streams, torch's fused Adam's 7 (the
      docs' algorithms page has the algebra).

    Examples
    --------
    >>> import torch, psiopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8),
    ...                             torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> opt = psiopt.PSIAdam([{"params": [model[0].weight], "grouping": "tensor", "lr": 0.01},
    ...                       {"params": [model[0].bias, *model[1:].parameters()]}], lr=1e-3)
    >>> torch.nn.functional.cross_entropy(model(x), y).backward()
    >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        nesterov: bool = True,
        angular_rate: str = "adam",
    ) -> None:
        name = type(self).__name__
        for option, value, default in (("capturable", capturable, False), ("differentiable", differentiable, False)):
            if value != default:
                raise ValueError(
                    f"{name} does not support {option}={value!r}: the PSI step synchronizes with the host "
                    f"(its checks) and is not differentiable; use {option}={default!r}, or torch.optim.Adam"
                )
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")  # torch's message
        _validate_adam_hyperparameters(lr, betas, eps, weight_decay, foreach, nesterov, angular_rate)
        self._psi_manifolds = {}
        self._row_plans = {}
        defaults = {
            "lr": lr,
            "betas": tuple(map(_to_scalar, betas)),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": False,
            "differentiable": False,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
            "nesterov": nesterov,
            "angular_rate": angular_rate,
            "grouping": None,
        }
        super().__init__(params, defaults)
        self._warn_if_no_scale_invariant()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_psi_manifolds", {})
        self.__dict__.setdefault("_row_plans", {})
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)
            # a state saved before the option existed resumes the step it was taken with
            group.setdefault("nesterov", False)
            group.setdefault("angular_rate", "constant")  # as nesterov: the step the state was saved with
            group.setdefault("grouping", None)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        _validate_adam_hyperparameters(
            group["lr"], group["betas"], group["eps"], group["weight_decay"], group["foreach"], group["nesterov"],
            group["angular_rate"],
        )  # fmt: skip
        self._adam_rule(group)  # the angular rate's own limits

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
        for group in self.param_groups:
            self._adam_rule(group)  # a scheduler may have moved lr past the rate's limits: refused before any write
        self._adaptive_step()
        return loss

    # -- the hooks of the adaptive step (psiopt.optim._adaptive_step) ----------------------
    def _check_euclidean(self, group: dict[str, Any], euclid: list[tuple[Tensor, Any]]) -> None:
        for p, name in euclid:
            if p.grad.is_sparse:
                # torch's message, raised before any parameter is modified
                raise RuntimeError(f"{name}: Adam does not support sparse gradients, please consider SparseAdam instead")

    def _euclidean_update(self, group: dict[str, Any], params: list[Tensor], torch_fused: bool) -> None:
        # torch.optim.Adam's own state initialization and step on these tensors, with the
        # group's fused and foreach; by default torch's fused step where torch has one.
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])
        fused, foreach = group["fused"], group["foreach"]
        if fused is None and foreach is None:
            fused = torch_fused or None
        beta1, beta2 = group["betas"]
        adam(
            params,
            [p.grad for p in params],
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            state_steps,
            amsgrad=group["amsgrad"],
            has_complex=any(torch.is_complex(p) for p in params),
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            foreach=foreach,
            capturable=False,
            differentiable=False,
            fused=fused,
            grad_scale=None,
            found_inf=None,
            decoupled_weight_decay=group["decoupled_weight_decay"],
        )

    def _adam_rule(self, group: dict[str, Any]) -> _AdamRule:
        beta1, beta2 = (float(b) for b in group["betas"])
        weight_decay = group["weight_decay"] if group["decoupled_weight_decay"] else 0.0
        return _psiadam_rule(
            float(group["lr"]), beta1, beta2, group["eps"], group["amsgrad"], group["nesterov"], group["angular_rate"],
            weight_decay,
        )  # fmt: skip


class PSIAdamW(PSIAdam):
    r"""AdamW on the PSI manifold: a drop-in replacement for :class:`torch.optim.AdamW`.

    :class:`PSIAdam` with ``decoupled_weight_decay=True`` and AdamW's default
    ``weight_decay=1e-2``: every parameter that is not scale invariant gets
    :class:`torch.optim.AdamW`'s update bit for bit; scale-invariant groups take
    :class:`PSIAdam`'s adaptive angular step, and their weights are **never decayed**.
    Decoupled decay :math:`w_j \mapsto (1 - \eta\lambda) w_j` is a rescaling, a move
    along the class that leaves the network's function and the point of the PSI manifold
    unchanged; what it does under Euclidean AdamW (shrink the norm, and so enlarge the
    angular step, until the group turns by AdamW's equilibrium angle
    :math:`\sqrt{2\eta\lambda(1-\beta_1)/(1+\beta_1)}` per step) the default ``"adam"``
    angular rate does through each group's virtual norm; at the constant rate, the
    learning rate's schedule is that knob.

    Parameters are those of :class:`PSIAdam` (without ``decoupled_weight_decay``).

    Examples
    --------
    >>> import torch, psiopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.BatchNorm1d(8),
    ...                             torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> opt = psiopt.PSIAdamW(psiopt.param_groups(model, x), lr=1e-3, weight_decay=1e-2)
    >>> torch.nn.functional.cross_entropy(model(x), y).backward()
    >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        nesterov: bool = True,
        angular_rate: str = "adam",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            nesterov=nesterov,
            angular_rate=angular_rate,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # as torch.optim.AdamW: a loaded state keeps the decoupled weight decay
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
