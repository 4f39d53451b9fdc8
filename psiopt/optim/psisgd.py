r"""PSISGD: stochastic gradient descent with momentum on the PSI manifold."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import geoopt
import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT
from torch.optim.sgd import sgd

from ..manifold import PSIManifold, ZeroGroupError, any_zero_groups
from ._functional import (
    _by_kernels,
    _elementwise_pass,
    _PLAIN,
    _local,
    _prepare,
    _reduce_across_shards,
    _RowPlan,
    _row_sums_and_flags,
    _single_tensor_psisgd,
)
from ._adaptive_step import _AdamRule, _AdamRuleMixin
from ._rates import check_pull, sgd_rate
from ._params import (
    _NON_FINITE,
    _any_flag,
    _check_finite,
    _check_finite_gradients,
    _non_finite_flag,
    _plan_signature,
    _PSIParamsMixin,
    _torch_has_fused,
)

__all__ = ["PSISGD"]


ANGULAR_RATES = ("sgd", "constant")
"""The angular rates of PSISGD's scale-invariant groups (its ``angular_rate`` option)."""

# The "sgd" rate's second moment decays as Adam's does by default, and its eps is far below
# any gradient norm at a unit row: constants of the rate, not options.
SGD_RATE_BETA2 = 0.999
SGD_RATE_EPS = 1e-8


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


@functools.lru_cache(maxsize=64)  # a pure function of three numbers, asked for several times a step
def _sgd_rate_rule(lr: float, momentum: float, weight_decay: float) -> _AdamRule:
    """The adaptive rule of PSISGD's ``"sgd"`` angular rate for these hyperparameters."""
    if momentum >= 1.0:
        raise ValueError(
            f"angular_rate='sgd' needs momentum < 1 (got {momentum}): its first moment decays by the momentum "
            "and its step size is lr / (1 - momentum); lower the momentum, or use angular_rate='constant'"
        )
    rate = sgd_rate(lr, momentum, weight_decay)
    check_pull(rate[2], lr, weight_decay)
    # The look-ahead always (dampening cancels in a first moment normalized by its weights).
    return _AdamRule(momentum, SGD_RATE_BETA2, SGD_RATE_EPS, False, True, rate, first_moment=momentum != 0)


class PSISGD(_AdamRuleMixin, _PSIParamsMixin, Optimizer):
    r"""SGD with momentum on the PSI manifold: a drop-in replacement for :class:`torch.optim.SGD`.

    Parameters are split in two:

    * **scale-invariant** ones: every tensor in a param group that names a grouping,
      ``{"params": [...], "grouping": "channel"}`` (``"tensor"``, ``"block(4)"``, or a
      :class:`psiopt.Grouping`, kept as that text), as :func:`psiopt.param_groups`
      makes them; and any :class:`geoopt.ManifoldParameter` on a
      :class:`psiopt.PSIManifold` (what :func:`psiopt.mark_scale_invariant` makes);
    * **every other** parameter, which gets :class:`torch.optim.SGD`'s update bit for bit
      (the same function, :func:`torch.optim.sgd.sgd`, is called on them): momentum,
      dampening, Nesterov, weight decay, maximize, sparse gradients.

    By default (``angular_rate="sgd"``) the scale-invariant groups turn as SGD with these
    ``lr``, ``momentum`` and ``weight_decay`` would turn them, without SGD's dependence on
    their norms: each group carries a virtual squared norm :math:`\nu_j^2` (starting at 1)
    and takes a step of :math:`\alpha_j = \eta\,\kappa/((1-\mu)\,\nu_j^2)` radians along
    :class:`psiopt.PSIAdam`'s normalized direction (:math:`\beta_1 = \mu`,
    :math:`\beta_2 = 0.999`, the look-ahead), and :math:`\nu_j^2` grows by the factor the
    retraction grew the norm and shrinks by the weight decay's pull
    :math:`2\eta\lambda/(1+\mu)`, so the steps decay as SGD's do and settle at SGD's
    equilibrium angle :math:`\sqrt{2\eta\lambda/(1+\mu)}`. The docs' algorithms page
    (*Angular rates*) derives it. ``angular_rate="constant"`` is the step below.

    For a scale-invariant tensor with groups :math:`w_j` (rows of
    :meth:`psiopt.Grouping.rows`) and Euclidean gradient :math:`g = \nabla f(w)`
    (:math:`-\nabla f` with ``maximize``), one step at the constant rate with learning
    rate :math:`\eta`, momentum :math:`\mu` and dampening :math:`\tau` is

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
        Learning rate: SGD's own, for both kinds of parameters. At the constant rate,
        on a scale-invariant group it is an **angular** step: the unit vector
        :math:`w_j/\|w_j\|` moves by :math:`\eta` times the gradient of the loss at that
        unit vector, whatever :math:`\|w_j\|` is.
    momentum, dampening, nesterov
        As in :class:`torch.optim.SGD`, for both kinds of parameters (at the ``"sgd"``
        rate the scale-invariant groups always take the look-ahead and ignore
        ``dampening`` and ``nesterov``).
    weight_decay : float, default 0
        SGD's L2 penalty on the Euclidean parameters. On scale-invariant groups it is
        never applied to the weights; at the ``"sgd"`` rate it is the pull on the
        virtual norm (see Notes).
    maximize : bool, default False
        Maximize the objective instead.
    foreach : bool, optional
        ``False``: the reference loop, tensor by tensor, chaining the formulas of
        :mod:`psiopt.manifold`. ``True``: the one-pass step as multi-tensor torch
        operations. ``None`` (default): the fused kernels where they exist, else the
        one-pass torch step. The Euclidean parameters get :func:`torch.optim.sgd.sgd`
        with the same ``foreach`` and ``fused`` (bit for bit
        :class:`torch.optim.SGD` built with them); with both ``None``, torch's fused
        step where torch has one (bit for bit ``SGD(fused=True)``).
    fused : bool, optional
        ``True``: the one-pass step as compiled row kernels, Triton on CUDA, numba on the
        CPU (float32 and float64); an error where there is
        none. ``None`` (default): used where available. A :class:`torch.amp.GradScaler`
        then hands the step its scale and ``found_inf`` flag, as to torch's fused
        optimizers: gradients are unscaled inside the kernels and nothing is checked twice.
    capturable : bool, default False
        ``False``: a step that cannot be taken raises (see *Bad input*), which reads one
        flag back to the host (free on the CPU, a pipeline stall on a GPU). ``True``: no
        host synchronization; such a step is refused on the device, leaves weights and
        momentum untouched, and :attr:`last_step_refused` (a 0-d bool tensor) says so.
        Needed for ``torch.compile(..., fullgraph=True)`` and CUDA graphs; needs
        ``angular_rate="constant"``.
    angular_rate : {"sgd", "constant"}, default "sgd"
        How far a scale-invariant group turns per step (the same for every param group
        of the optimizer). ``"sgd"``: SGD's decay and equilibrium from ``lr``,
        ``momentum`` and ``weight_decay``, with the state ``momentum_buffer``,
        ``exp_avg_sq``, ``virtual_sq_norm`` and ``step``. ``"constant"``: the step
        written out above (PSISGD's only step before the rates; a state saved then resumes it).

    Notes
    -----
    Choices, and why:

    * **Kept representative.** After the retraction :math:`w + \xi` (which only grows
      norms: :math:`\|w_j + \xi_j\|^2 = \|w_j\|^2 + \|\xi_j\|^2` for horizontal
      :math:`\xi`), each group is rescaled back to the norm it had before the step. It
      is the same point of the manifold; fixed norms cannot overflow or underflow over
      long runs, and a copy started from :math:`a\cdot w` stays exactly
      :math:`a\cdot w_t` (up to rounding). The transport's norm ratio is then 1.
    * **No weight decay on scale-invariant weights.** :math:`w \mapsto (1 - \eta\lambda) w`
      only moves along the class :math:`[w]` (a vertical move): it does nothing to the
      network's function or to the point of the manifold. Its only effect under plain
      SGD is to raise the effective angular step :math:`\eta/\|w_j\|^2`; the ``"sgd"``
      rate has that effect as the pull on the virtual norm, without touching the weights.
    * **One learning rate.** At the ``"sgd"`` rate the ``lr`` tuned for SGD works as it
      is. At the constant rate the step on scale-invariant groups is an angle per unit
      gradient, not on the scale of SGD's learning rate: give them their own param group
      (and so their own schedule with any :mod:`torch.optim.lr_scheduler`)::

          groups = psiopt.param_groups(model, images, scale_invariant={"lr": 0.05})
          PSISGD(groups, lr=0.1, momentum=0.9, angular_rate="constant")

    * **Retraction, not exponential map.** :math:`w + \xi` agrees with the geodesic
      (:meth:`psiopt.PSIManifold.expmap`) to second order, costs no trigonometry, and
      is what makes the step equivariant under rescaling; the transport is the
      projection :meth:`psiopt.PSIManifold.transp`, the one that matches the retraction.
    * **One pass over memory.** Every quantity of the step follows from six sums per
      group, :math:`w\cdot w, g\cdot w, g\cdot g, m\cdot g, m\cdot w, m\cdot m`
      (:func:`psiopt.manifold.one_pass_step_scalars`): the step reads the weights,
      gradients and momentum once for the sums, then once to write weights and momentum
      in place, the memory traffic of torch's multi-tensor SGD with momentum. It makes no
      ``(k, d)`` temporary and no copy of the weights; channels-last weights are read in
      their own layout. On the compiled CPU kernels, the steps after the first reuse what
      does not change between steps (each group's split of its tensors and the table of
      their rows' addresses), checking that weights and buffers are where they were;
      with momentum they are then row-resident: a check pass reads the weights and
      gradients, and one pass reads each row of weights, gradient and momentum, forms
      the row's momentum sums and writes it while it is in cache (7 tensor-sized streams
      of memory traffic; SGD with momentum moves 5).
    * **Bad input.** A NaN or infinite gradient (any parameter) makes ``step`` raise
      ``FloatingPointError`` naming the parameter; a scale-invariant group with zero,
      underflowing or non-finite norm raises :class:`psiopt.ZeroGroupError` naming the
      parameter and group; a sparse gradient on a scale-invariant weight raises
      ``RuntimeError``. All checks run on every parameter before any is modified, so a
      refused step leaves weights and momentum untouched. (One exception: on the
      row-resident CPU step, a NaN or infinity written into a momentum buffer from
      outside the optimizer is met in the write pass; the groups holding it keep their
      weights and momentum, the others are stepped, and ``FloatingPointError`` names
      the parameter.) The checks come from the sums
      of the one-pass step at no extra read of the scale-invariant tensors. With
      ``capturable=True``, or under a GradScaler, the same checks refuse the step on the
      device instead of raising (a refused first step leaves a zero momentum buffer).
    * **Sharded weights (FSDP2).** A DTensor sharded on dim 0 (``fully_shard``, evenly
      or not) is stepped on its local shard, with no per-operation DTensor dispatch.
      Channel groups, and blocks that do not straddle shards, need no communication;
      a ``"tensor"`` grouping or straddling blocks have their partial sums completed by
      **one all-reduce per step** for all of them, together with the flags of the
      checks (so every rank takes the same decision): :math:`8(6G + T + 1)` bytes for
      :math:`G` split groups and :math:`T` sharded tensors. The weights are never
      gathered. That is the constant rate's step; the ``"sgd"`` rate takes PSIAdam's
      (:mod:`psiopt.optim._sharded_adaptive`): local shards, and one all-reduce of the
      six sums of every group and a flag, :math:`8(6G + 1)` bytes for :math:`G` groups,
      the per-group states replicated on every rank.

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
    >>> opt = psiopt.PSISGD(psiopt.param_groups(model, x), lr=0.1, momentum=0.9)
    >>> torch.nn.functional.cross_entropy(model(x), y).backward()
    >>> opt.step()
    """

    _FIRST_MOMENT = "momentum_buffer"

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
        fused: bool | None = None,
        capturable: bool = False,
        angular_rate: str = "sgd",
    ) -> None:
        _validate_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")  # torch's message
        if capturable and foreach is False:
            raise ValueError(
                "capturable=True needs the one-pass step, which foreach=False turns off; leave foreach at "
                "None (or True), or set fused=True"
            )
        self._psi_manifolds = {}
        self._row_plans: dict[Tensor, tuple[tuple, _RowPlan, bool]] = {}
        self._row_views: dict[Tensor, tuple] = {}
        self._group_plans: dict[int, _GroupPlan] = {}
        self._cpu_kernels = None
        self._triton_kernels = None
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "capturable": capturable,
            "angular_rate": angular_rate,
            "grouping": None,
        }
        super().__init__(params, defaults)
        # As torch's fused optimizers: a torch.amp.GradScaler then hands the step its scale and
        # its found_inf flag (attributes grad_scale, found_inf) instead of unscaling and syncing.
        # The "sgd" rate's step takes unscaled gradients: the scaler unscales them itself.
        self._step_supports_amp_scaling = bool(fused) and angular_rate == "constant"
        #: After each step: ``None``, or with ``capturable=True`` (or under a GradScaler) a 0-d
        #: bool tensor on the parameters' device, true when the step was refused.
        self.last_step_refused: Tensor | None = None
        self._warn_if_no_scale_invariant()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_psi_manifolds", {})
        self.__dict__.setdefault("last_step_refused", None)
        self.__dict__.setdefault("_row_plans", {})
        self.__dict__.setdefault("_row_views", {})
        self.__dict__.setdefault("_group_plans", {})
        self.__dict__.setdefault("_cpu_kernels", None)
        self.__dict__.setdefault("_triton_kernels", None)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("capturable", False)
            group.setdefault("grouping", None)
            # A state saved before angular rates existed resumes the step it was saved with.
            group.setdefault("angular_rate", "constant")

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        _validate_sgd_hyperparameters(
            group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]
        )
        rate = group["angular_rate"]
        if rate not in ANGULAR_RATES:
            raise ValueError(f"angular_rate must be one of {', '.join(map(repr, ANGULAR_RATES))}, got {rate!r}")
        if self.param_groups[0] is not group and rate != self.param_groups[0]["angular_rate"]:
            raise ValueError(
                f"every param group of a PSISGD takes one angular rate: this group asks for {rate!r}, the first for "
                f"{self.param_groups[0]['angular_rate']!r}; use one optimizer per rate"
            )
        if rate == "sgd":
            if group["capturable"]:
                raise ValueError(
                    "capturable=True needs angular_rate='constant': the 'sgd' rate's step checks the gradients on the "
                    "host before any write"
                )
            self._adam_rule(group)  # the rate's own limits

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
        if self.param_groups[0]["angular_rate"] == "sgd":
            for group in self.param_groups:
                self._adam_rule(group)  # a scheduler may have moved lr past the rate's limits: refused before any write
            self._adaptive_step()
            return loss
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        inv_scale = None if grad_scale is None else grad_scale.reciprocal()

        compiling = torch.compiler.is_compiling()
        if grad_scale is None and found_inf is None and not compiling and self._kept_batches_step():
            return loss
        plans = [self._group_plan(index, group, compiling) for index, group in enumerate(self.param_groups)]

        # The reduction pass of every one-pass tensor, then every check, then every write:
        # a refused step changes nothing.
        steps = []
        for group, plan in zip(self.param_groups, plans):
            one_pass = list(plan.one_pass)
            params = [p for p, _, _ in one_pass]
            buffers = self._momentum_buffers(group, params)
            items = _prepare(
                params,
                [p.grad for p in params],
                buffers,
                plan.one_pass_row_plans,
                group["momentum"],
                kernels=plan.kernels,
                # dynamo would trace the kept views as inputs of the compiled step: none while compiling.
                row_views=None if compiling else self._row_views,
            )
            sums, bad = _row_sums_and_flags(items, inv_scale)
            steps.append(_GroupStep(group, list(plan.loop), one_pass, plan.euclid, items, buffers, sums, bad))
        # The other gradients (Euclidean, reference loop) get a device-side flag, unless a
        # GradScaler has checked every gradient already.
        others = [e for st in steps for e in (*st.euclid, *((p, name) for p, name, _ in st.loop))]
        other_flag = None if found_inf is not None else _non_finite_flag([p.grad for p, _ in others], self._cpu_kernels)
        other_flag = self._reduce_across_shards(steps, other_flag)

        no_sync = any(g["capturable"] for g in self.param_groups) or found_inf is not None
        if no_sync:
            refused = self._refused_on_device(steps, other_flag, found_inf)
        else:
            refused = None
            # One host synchronization reads every flag; the checks that name a culprit run only when one is set.
            flagged = _any_flag([*(b for st in steps for b in st.bad), *(() if other_flag is None else (other_flag,))])
            if flagged and other_flag is not None and bool(other_flag):
                _check_finite_gradients(others)  # raises, naming the parameter (or confirms an overflow)
            self._check_or_raise(steps, flagged)
        self.last_step_refused = refused

        for st, plan in zip(steps, plans):
            group = st.group
            if st.euclid:
                self._euclidean_step(group, [p for p, _ in st.euclid], refused, grad_scale, plan.euclid_fused)
            if st.loop:
                self._loop_step(group, st.loop)
            options = {k: group[k] for k in ("momentum", "dampening", "nesterov", "maximize")}
            for kernels, idx in _by_kernels(st.items).items():
                items, sums = [st.items[i] for i in idx], [st.sums[i] for i in idx]
                if kernels is None:
                    _elementwise_pass(items, sums, refused, lr=float(group["lr"]), **options)
                else:
                    kernels.update(
                        [t.w for t in items], [t.g for t in items], [t.m for t in items], sums,
                        [t.first for t in items], refused, inv_scale, lr=float(group["lr"]), **options,
                    )  # fmt: skip
            if group["momentum"] != 0:
                for (p, _, _), buf in zip(st.one_pass, st.buffers):
                    self.state[p]["momentum_buffer"] = buf
        if refused is None and not compiling:
            for st, plan in zip(steps, plans):
                plan.batch = self._row_batch(st)
        return loss

    # -- the "sgd" angular rate: the hooks of the adaptive step (psiopt.optim._adaptive_step) ----
    def _adam_rule(self, group: dict[str, Any]) -> _AdamRule:
        return _sgd_rate_rule(float(group["lr"]), group["momentum"], group["weight_decay"])

    def _euclidean_update(self, group: dict[str, Any], params: list[Tensor], torch_fused: bool) -> None:
        self._euclidean_step(group, params, None, None, torch_fused)

    # -- the step of kept row batches -----------------------------------------------------
    def _row_batch(self, st: _GroupStep) -> Any:
        """The :class:`~psiopt.optim._cpu_kernels.RowBatch` that the next steps of this
        group take, or ``None`` where they need the general step: tensors on other kernels
        (or none), in the reference loop, sharded, of several dtypes, or with momentum
        buffers still to make."""
        kernels = self._cpu_kernels
        if kernels is None or st.loop or st.group["capturable"]:
            return None
        if any(t.kernels is not kernels or t.plan.sharded or t.w.dtype != st.items[0].w.dtype for t in st.items):
            return None
        return kernels.RowBatch(
            [p for p, _, _ in st.one_pass], list(st.buffers), [t.w for t in st.items], [t.m for t in st.items],
            has_m=st.group["momentum"] != 0,
        )  # fmt: skip

    def _kept_batches_step(self) -> bool:
        """The whole step on the kept row batches (:meth:`_row_batch`) where every param
        group has one that still holds: the check passes (with the Euclidean gradients'
        check in the same compiled call), then torch's SGD on the Euclidean tensors and
        the write passes, with none of the general step's preparation; where one batch
        holds every scale-invariant tensor (and has momentum), its check and write pass
        are one compiled call. Returns ``False``, having written nothing, where the
        general step is needed: a batch that no longer holds, a gradient in another
        layout, or a flagged row or gradient (the general step then raises, naming the
        parameter, or steps the tensor whose sums overflowed in the reference loop)."""
        steps = []
        for index, group in enumerate(self.param_groups):
            grads = [p.grad for p in group["params"]]
            plan = self._group_plan(index, group, False, check_layouts=False, grads=grads)
            batch = plan.batch
            if batch is None or batch.has_m != (group["momentum"] != 0) or group["capturable"]:
                return False
            if not batch.matches(self._momentum_buffers(group, batch.params)):
                return False
            steps.append((group, plan, grads))
        writing = [st for st in steps if st[1].batch.params]
        tampered = []
        if len(writing) == 1 and writing[0][1].batch.has_m:
            group, plan, grads = writing[0]
            others = [g[i] for _, pl, g in steps for i in pl.euclid_positions]
            left = plan.batch.step(
                [grads[i] for i in plan.one_pass_positions], others, lr=group["lr"], momentum=group["momentum"],
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
            )  # fmt: skip
            if left is None:
                return False  # nothing written: the general step checks, names, or steps another way
            tampered = [str(plan.one_pass[i][1]) for i in left]
        else:
            for _, plan, grads in steps:
                # The check pass, and in the same compiled call the check of the Euclidean gradients.
                bad = plan.batch.row_sums(
                    [grads[i] for i in plan.one_pass_positions], [grads[i] for i in plan.euclid_positions]
                )
                if bad is None or bad:
                    return False  # None: not dense float32/float64 CPU gradients; the general step checks them
            for group, plan, _ in steps:
                tampered += [str(plan.one_pass[i][1]) for i in plan.batch.update(
                    lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                    nesterov=group["nesterov"], maximize=group["maximize"],
                )]  # fmt: skip
        self.last_step_refused = None
        for group, plan, _ in steps:
            if plan.euclid:
                self._euclidean_step(group, [p for p, _ in plan.euclid], None, None, plan.euclid_fused)
        if tampered:
            raise FloatingPointError(
                f"{', '.join(tampered)}: the momentum buffer holds NaN or infinite values that no step of this "
                "optimizer wrote (changed from outside it); the groups with such values were left unchanged and "
                "every other group was stepped. Reset those buffers (optimizer.state[p]['momentum_buffer']) or "
                "load a saved optimizer state"
            )
        return True

    def _group_plan(
        self,
        index: int,
        group: dict[str, Any],
        compiling: bool,
        check_layouts: bool = True,
        grads: list[Tensor | None] | None = None,
    ) -> _GroupPlan:
        """Which step each tensor of ``group`` (``param_groups[index]``) with a gradient
        takes (:class:`_GroupPlan`), kept from one step to the next: rebuilt only when the
        group's options, its parameters (their identity, class, manifold, row plan) or
        which of them have a gradient change, so that a step does not sort them again.
        ``check_layouts=False`` leaves the row plans and sparse gradients unchecked, for
        the kept row batches, which check the layouts they rely on themselves. ``grads``:
        the gradients of ``group["params"]``, if the caller has them."""
        params = group["params"]
        if grads is None:
            grads = [p.grad for p in params]
        signature = _plan_signature(group, grads, compiling)
        kept = self._group_plans.get(index)
        if (
            kept is not None
            and kept.signature == signature
            and (
                not check_layouts
                or all(self._row_plan(*entry)[0] is row_plan for entry, row_plan in zip(kept.psi, kept.row_plans))
                and not any(p.grad.is_sparse for p, _, _ in kept.psi)  # the build raises, naming it
            )
        ):
            return kept
        _, psi, euclid = self._collect(check=False, groups=[(index, group)])[0]
        row_plans, loop, one_pass, one_pass_row_plans, kernels = [], [], [], [], []
        for entry in psi:
            row_plan, has_row_view = self._row_plan(*entry)
            row_plans.append(row_plan)
            if row_plan.sharded or (group["foreach"] is not False and has_row_view):
                one_pass.append(entry)
                one_pass_row_plans.append(row_plan)
                kernels.append(self._kernels(group, entry[0]))
            else:
                loop.append(entry)
        position = {id(p): i for i, p in enumerate(params)}
        plan = _GroupPlan(
            signature, psi, row_plans, euclid, loop, one_pass, one_pass_row_plans, kernels,
            one_pass_positions=[position[id(p)] for p, _, _ in one_pass],
            euclid_positions=[position[id(p)] for p, _ in euclid],
            euclid_fused=_torch_has_fused([p for p, _ in euclid]),
        )  # fmt: skip
        self._group_plans[index] = plan
        return plan

    def _kernels(self, group: dict[str, Any], p: Tensor):
        """The compiled row kernels for ``p`` (a module), or ``None`` for torch operations.

        ``fused=None`` uses them where they exist (CUDA tensors with Triton installed; CPU
        float32/float64 tensors with numba installed); ``fused=True`` requires them; while
        ``torch.compile`` traces the step, the torch operations are used (dynamo does not
        trace into compiled kernels)."""
        fused = group["fused"]
        if fused is False or group["foreach"] or torch.compiler.is_compiling():
            return None
        local = _local(p)
        if local.is_cuda and (fused or importlib.util.find_spec("triton") is not None):
            if self._triton_kernels is None:
                try:
                    from . import _triton_kernels
                except ImportError as err:
                    raise ImportError(
                        f"fused=True on CUDA runs PSISGD's Triton kernels, and triton failed to import ({err}); "
                        "install the triton that matches your torch, or use fused=None"
                    ) from None
                self._triton_kernels = _triton_kernels
            return self._triton_kernels
        if local.is_cpu and local.dtype in (torch.float32, torch.float64):
            if self._cpu_kernels is None:
                if fused is None and importlib.util.find_spec("numba") is None:
                    return None  # looked up again next step: numba may be installed meanwhile
                try:
                    from . import _cpu_kernels
                except ImportError as err:
                    raise ImportError(
                        f"fused=True on the CPU compiles PSISGD's kernels with numba, which failed to import "
                        f"({err}); reinstall it (pip install numba, a psiopt dependency) or use fused=None"
                    ) from None
                self._cpu_kernels = _cpu_kernels
            return self._cpu_kernels
        if fused:
            raise RuntimeError(
                f"fused=True has no kernel for {local.dtype} tensors on {local.device.type}; psiopt's fused "
                "kernels step float32 and float64 tensors on the CPU and floating-point tensors on CUDA. Use "
                "fused=None (the one-pass torch step)"
            )
        return None

    def _momentum_buffers(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor | None]:
        if group["momentum"] == 0:
            return [None] * len(params)
        return [self.state[p].get("momentum_buffer") for p in params]

    # -- the checks -----------------------------------------------------------------------
    def _check_or_raise(self, steps: list[_GroupStep], flagged: bool) -> None:  # noqa: C901 - one check after another
        """Raise, before anything is written, if a scale-invariant gradient is not finite or
        a group cannot be stepped, naming the parameter. ``flagged``: whether any flag of
        the reduction pass is set (read by the caller, with one host synchronization); the
        reference loop's tensors are checked here (one more synchronization, only where
        there are such tensors). A flagged tensor whose entries are all fine had sums that
        overflowed: it takes the reference loop, which does not form them."""
        loop_all = [(p, name, m) for st in steps for p, name, m in st.loop]
        if any_zero_groups([m.rows(p.detach()) for p, _, m in loop_all]):
            for p, name, m in loop_all:
                m.check_nonzero_groups(p.detach(), name)
        if not flagged:
            return None
        flagged = [(st, k) for st in steps for k, b in enumerate(st.bad) if bool(b)]
        for st, k in flagged:
            p, name, _ = st.one_pass[k]
            if not bool(_local(p.grad).isfinite().all()):
                raise FloatingPointError(f"{name} {_NON_FINITE}")
        for st, k in flagged:
            p, name, m = st.one_pass[k]
            if st.items[k].plan.group_of_row is None:
                m.check_nonzero_groups(_local(p.detach()), name)  # the local rows are whole groups
            elif not bool((st.sums[k][:, 0] > torch.finfo(st.sums[k].dtype).tiny).all()):
                raise ZeroGroupError(
                    f"{name}: a group ({m.grouping.describe()} grouping, shape {tuple(p.shape)}, sharded) has zero, "
                    "underflowing or non-finite norm, so it has no direction on the PSI manifold; re-initialize it"
                )
        for st, k in reversed(flagged):
            p, name, _ = st.one_pass[k]
            if _local(p) is not p:
                raise FloatingPointError(
                    f"{name}: the squared norms of its groups overflow {p.dtype} (huge gradient, weights or "
                    "momentum); the step was refused and no weight was changed. Clip the gradients or lower "
                    "the learning rate"
                )
            st.loop.append(st.one_pass.pop(k))
            st.items.pop(k), st.buffers.pop(k), st.sums.pop(k), st.bad.pop(k)

    @staticmethod
    def _reduce_across_shards(steps: list[_GroupStep], other_flag: Tensor | bool | None) -> Tensor | bool | None:
        """:func:`_reduce_across_shards` over every param group at once: one all-reduce per step."""
        items = [t for st in steps for t in st.items]
        if all(t.plan.process_group is None for t in items):
            return other_flag  # nothing sharded: nothing to reduce, host flags stay on the host
        sums = [x for st in steps for x in st.sums]
        bad = [x for st in steps for x in st.bad]
        totals = None if other_flag is None else torch.as_tensor(other_flag, dtype=torch.float64).reshape(1)
        totals = _reduce_across_shards(items, sums, bad, totals)
        for st in steps:
            n = len(st.items)
            st.sums[:], st.bad[:] = sums[:n], bad[:n]
            del sums[:n], bad[:n]
        return None if totals is None else totals[0] > 0

    @staticmethod
    def _refused_on_device(
        steps: list[_GroupStep], other_flag: Tensor | bool | None, found_inf: Tensor | None
    ) -> Tensor:
        """Without a host synchronization: a 0-d bool flag, true when any group cannot be
        stepped or any gradient is not finite (the GradScaler's ``found_inf``, if given)."""
        flags = [*(b for st in steps for b in st.bad), other_flag, None if found_inf is None else found_inf > 0]
        tensors = [f for f in flags if isinstance(f, Tensor)]
        on_host = [f for f in flags if isinstance(f, bool)]  # the host kernels' flags: one tensor for all
        if on_host:
            tensors.append(torch.tensor(any(on_host)))
        if not tensors:
            return torch.zeros((), dtype=torch.bool)
        device = tensors[0].device
        return torch.stack([f.to(device) for f in tensors]).any()

    # -- the updates ----------------------------------------------------------------------
    def _euclidean_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        refused: Tensor | None,
        grad_scale: Tensor | None,
        torch_fused: bool | None = None,
    ) -> None:
        # torch.optim.SGD's own step on these tensors, argument for argument, with the group's
        # fused and foreach; by default torch's fused step where torch has one (torch_fused:
        # _torch_has_fused(params), if the caller kept it). A refused step that is only known
        # on the device goes through torch's fused SGD, which skips on it.
        grads = [p.grad for p in params]
        momentum_buffers = [self.state[p].get("momentum_buffer") for p in params] if group["momentum"] != 0 else []
        on_device = refused is not None
        if on_device and torch.compiler.is_compiling():
            # dynamo does not trace torch's fused SGD: torch's traced step, then the old values
            # put back where the step is refused (a fresh buffer then starts at zero).
            olds = [p.clone() for p in params]
            old_bufs = [b.clone() if b is not None else torch.zeros_like(p) for p, b in zip(params, momentum_buffers)]
            self._euclidean_step(group, params, None, None)
            for p, old in zip(params, olds):
                p.copy_(torch.where(refused, old, p))
            for p, old in zip(params, old_bufs) if group["momentum"] != 0 else ():
                buf = self.state[p]["momentum_buffer"]
                buf.copy_(torch.where(refused, old, buf))
            return
        hyperparameters = {k: group[k] for k in ("weight_decay", "momentum", "lr", "dampening", "nesterov", "maximize")}
        sharded = [_local(p) is not p for p in params] if on_device else []
        if any(sharded):
            # torch's fused SGD has no DTensor rule: it runs on the local shards, and the
            # buffers it creates are wrapped back into DTensors like their parameters.
            from torch.distributed.tensor import DTensor

            local_buffers = [None if b is None else _local(b) for b in momentum_buffers]
            sgd(
                [_local(p) for p in params],
                [_local(g) for g in grads],
                local_buffers,
                **hyperparameters,
                fused=True,
                grad_scale=grad_scale,
                found_inf=refused.float(),
            )
            for p, is_dtensor, old, new in zip(params, sharded, momentum_buffers, local_buffers):
                if old is None and new is not None:
                    self.state[p]["momentum_buffer"] = (
                        DTensor.from_local(new, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                        if is_dtensor
                        else new
                    )
            return
        has_sparse_grad = any(g.is_sparse for g in grads)
        new_buffers = any(b is None for b in momentum_buffers)
        fused = group["fused"]
        if on_device:
            fused = True
        elif fused is None and group["foreach"] is None and not has_sparse_grad and not torch.compiler.is_compiling():
            fused = _torch_has_fused(params) if torch_fused is None else torch_fused
        sgd(
            params,
            grads,
            momentum_buffers,
            **hyperparameters,
            has_sparse_grad=has_sparse_grad,
            foreach=None if fused else self._euclidean_foreach(group, grads),
            fused=fused or None,
            grad_scale=grad_scale,
            found_inf=refused.float() if on_device else None,
        )
        if new_buffers:  # torch's step made them in the list
            for p, buf in zip(params, momentum_buffers):
                self.state[p]["momentum_buffer"] = buf

    @staticmethod
    def _euclidean_foreach(group: dict[str, Any], grads: list[Tensor]) -> bool | None:
        """The group's ``foreach``; where it is ``None`` and every gradient is a dense CPU
        tensor, ``True``: torch's own choice there is its per-tensor loop, whose Python
        overhead dominates small steps, and its multi-tensor step computes the same bits
        (the same CPU kernels, tensor after tensor)."""
        foreach = group["foreach"]
        if foreach is None and all(type(g) in _PLAIN and g.is_cpu and not g.is_sparse for g in grads):
            return True
        return foreach

    def _loop_step(self, group: dict[str, Any], psi: list[tuple[Tensor, str, PSIManifold]]) -> None:
        params = [p for p, _, _ in psi]
        momentum = group["momentum"]
        buffers = self._momentum_buffers(group, params)
        _single_tensor_psisgd(
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


@dataclass
class _GroupPlan:
    """How one param group is stepped (:meth:`PSISGD._group_plan`): its scale-invariant
    tensors with a gradient (``psi``, each with its row plan) split between the reference
    loop and the one-pass step (with the kernels of each), and its Euclidean ones."""

    signature: tuple
    psi: list[tuple[Tensor, str, PSIManifold]]
    row_plans: list[_RowPlan]
    euclid: list[tuple[Tensor, str]]
    loop: list[tuple[Tensor, str, PSIManifold]]
    one_pass: list[tuple[Tensor, str, PSIManifold]]
    one_pass_row_plans: list[_RowPlan]
    kernels: list
    one_pass_positions: list[int]  # where the one-pass and Euclidean tensors are in group["params"]
    euclid_positions: list[int]
    euclid_fused: bool = False  # whether torch's fused SGD takes the Euclidean tensors (_torch_has_fused)
    batch: Any = None  # the kept row batch of the next steps (PSISGD._row_batch), if any


@dataclass
class _GroupStep:
    """One param group's part of a step, between the reduction pass and the writes."""

    group: dict[str, Any]
    loop: list[tuple[Tensor, str, PSIManifold]]
    one_pass: list[tuple[Tensor, str, PSIManifold]]
    euclid: list[tuple[Tensor, str]]
    items: list
    buffers: list[Tensor | None]
    sums: list[Tensor]
    bad: list[Tensor | bool]
