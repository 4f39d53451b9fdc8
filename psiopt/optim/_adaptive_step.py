r"""The step of the adaptive optimizers (:class:`psiopt.PSIAdam`, :class:`psiopt.PSIAdaSGD`):
which tensors the compiled kernels step, the kernels' row batches kept from one step to
the next, the checks before any write, and the writes.

``fused`` and ``foreach`` mean what they mean in torch. On the scale-invariant tensors:
``foreach=False`` is the reference loop (:func:`._adaptive._single_tensor_rows`),
``foreach=True`` the multi-tensor torch step (:func:`._adaptive._multi_tensor_rows`),
``fused=True`` the compiled kernels (an error where there are none), and the default
(both ``None``) the kernels where they exist, else torch's default choice between the
other two. The Euclidean parameters get torch's own step with the same options; by
default torch's fused one where torch has it.

A kernel module (numba's :mod:`._cpu_adaptive_kernels` on the CPU; on CUDA, where Triton
is installed, :mod:`._triton_adaptive_kernels`, named by :data:`CUDA_KERNELS`) provides:

* ``supports(t) -> bool``: whether it steps tensor ``t`` (device and dtype);
* ``all_finite(tensors) -> bool | None``: whether every entry is finite (``None``: it
  cannot tell, the caller checks);
* ``AdaptiveRows(rule, params, moments, states, rows, counters, has_rate=...)``: one
  param group's tensors of one dtype, kept from step to step (``rule``: ``"adam"`` or
  ``"adasgd"``;
  ``moments``: the first moments, or ``None``; ``states``: per tensor, the tuple of its
  ``(k,)`` per-group states; ``rows``: per tensor, the map to its ``(k, d)`` row view;
  ``counters``: PSIAdam's ``"step"`` tensors, which the update reads and increments, or
  ``None``; ``has_rate``: each tensor's last state is the virtual squared norm of an
  angular rate), a :class:`_KeptRows` with

  * ``matches(moments, states, counters) -> bool``: whether the kept batch still holds;
  * ``check(grads, others=()) -> list[int] | None``: the check pass; the positions of
    the tensors with a bad row, or ``None`` where an entry of the tensors ``others``
    (the other gradients) is not finite, or it cannot tell;
  * ``update(xs, hyper, *, maximize, skip=(), rate=None) -> list[int]``: the write pass
    (``xs``: per tensor, the rule's scalars where there is no counter, ``None`` for
    zeros; ``hyper``: the group's hyperparameters as a tuple; ``rate``: the angular
    rate's ``(gain, power, pull)``, given exactly to a batch made ``has_rate``); the
    positions of the tensors with a row left as it was (the CUDA module reports them
    through its next ``check`` instead: it reads nothing back in the write pass).

  See :class:`._cpu_adaptive_kernels.AdaptiveRows` and its :data:`RULES`, and
  :class:`._triton_adaptive_kernels.AdaptiveRows`.

The step's algebra is on the docs' algorithms page (*How an adaptive step is computed*):
:func:`psiopt.manifold.one_pass_row_scalars` with each rule's coefficients
(:func:`._adaptive.psiadam_coefficients`, :func:`._adaptive.psiadasgd_coefficients`).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import geoopt
import torch
from torch import Tensor

from torch.optim.optimizer import _get_scalar_dtype

from ..manifold import PSIManifold
from ._adaptive import _psiadam_rows, _rows_update, psiadam_bias_corrections, psiadam_coefficients
from ._functional import _PLAIN, _dtensor_type, _local
from ._params import _check_finite_gradients, _LazyName, _plan_signature, _torch_has_fused
from ._sharded_adaptive import GroupRule, ShardedTensor, group_steps, sharded_tensor, whole_group_sums, write_group_steps

__all__: list[str] = []

CUDA_KERNELS = "psiopt.optim._triton_adaptive_kernels"
"""The module of the adaptive steps' CUDA kernels, used where it can be imported."""


class _KeptRows:
    """What a kernel module's ``AdaptiveRows`` holds from one step to the next, and
    :meth:`matches`, shared by the kernel modules: the weights (``params``) and where they
    lie, their first moments (``None``: none), per-group states and step counters (0-d
    float32 or float64 CPU tensors, or ``None``)."""

    def __init__(self, params: list[Tensor], moments: list[Tensor] | None, states: list[tuple[Tensor, ...]],
                 counters: list[Tensor] | None) -> None:  # fmt: skip
        self.params, self.moments, self.has_m = params, moments, moments is not None
        self.states = [tuple(s) for s in states]
        self.counters = counters
        if counters is not None and not all(
            c.dim() == 0 and c.is_cpu and c.dtype in (torch.float32, torch.float64) for c in counters
        ):
            # read and incremented on the host, with no wait for a device
            raise ValueError("a step counter must be a 0-d float32 or float64 CPU tensor")
        self.dtype = params[0].dtype if params else torch.float32
        self.layouts = [(p.data_ptr(), p.shape, p.stride()) for p in params]

    def matches(
        self, moments: list[Tensor] | None, states: list[tuple[Tensor, ...]], counters: list[Tensor] | None = None
    ) -> bool:
        """Whether every weight is where it was, with the same shape and strides, and
        ``moments``, ``states`` and ``counters`` (the optimizer's current ones) are the kept
        tensors."""
        if (moments is None) != (self.moments is None) or (counters is None) != (self.counters is None):
            return False
        if len(states) != len(self.states):
            return False
        return (
            all(len(s) == len(kept) and all(x is y for x, y in zip(s, kept)) for s, kept in zip(states, self.states))
            and (moments is None or all(m is kept for m, kept in zip(moments, self.moments)))
            and (counters is None or all(c is kept for c, kept in zip(counters, self.counters)))
            and all((p.data_ptr(), p.shape, p.stride()) == layout for p, layout in zip(self.params, self.layouts))
        )

    def step_grads(self, grads: list[Tensor]) -> list[Tensor]:
        """This step's gradients as the kernels read them: each laid out as its weight, in
        the weights' dtype (a copy where it is not)."""
        return [g if g.dtype == self.dtype and g.stride() == p.stride() else torch.empty_like(p).copy_(g)
                for g, p in zip(grads, self.params)]  # fmt: skip


@dataclass
class _KernelSet:
    """The tensors of one param group that one kernel module steps in one dtype, and
    their kept row batch (``None`` until a general step has made it)."""

    kernels: Any
    entries: list[tuple[Tensor, Any, PSIManifold]]
    rows: list
    positions: list[int]  # where the tensors are in group["params"]
    batch: Any = None

    @property
    def params(self) -> list[Tensor]:
        return [p for p, _, _ in self.entries]


@dataclass
class _AdaptivePlan:
    """How one param group is stepped, kept from one step to the next while its options,
    its parameters and which of them have a gradient stay the same."""

    signature: tuple
    euclid: list[Tensor]
    euclid_positions: list[int]
    loop: list[tuple[Tensor, Any, PSIManifold]]  # the reference or multi-tensor torch step
    kernel_sets: list[_KernelSet] = field(default_factory=list)
    euclid_fused: bool = False  # whether torch's fused step takes the Euclidean tensors
    # DTensors (FSDP2): local shards and one all-reduce (psiopt.optim._sharded_adaptive)
    sharded: list[ShardedTensor] = field(default_factory=list)


class _AdaptiveKernelsMixin:
    """The step shared by PSIAdam and PSIAdaSGD (see the module's docstring). Each
    optimizer gives its rule's name and the hooks below."""

    _RULE: str
    param_groups: list[dict[str, Any]]
    state: Any

    # -- the hooks of each optimizer --------------------------------------------------------
    def _euclidean_update(self, group: dict[str, Any], params: list[Tensor], torch_fused: bool) -> None:
        """torch's step on the Euclidean parameters of ``group`` (they have gradients), with
        the group's ``fused`` and ``foreach``; where both are ``None``, torch's fused step
        if ``torch_fused`` (:func:`._params._torch_has_fused` of ``params``)."""
        raise NotImplementedError

    def _check_euclidean(self, group: dict[str, Any], euclid: list[tuple[Tensor, Any]]) -> None:
        """Raise, before anything is written, where torch's step would refuse a Euclidean parameter."""

    def _reference_update(self, group: dict[str, Any], psi: list[tuple[Tensor, Any, PSIManifold]]) -> None:
        """The reference loop or the multi-tensor torch step on these scale-invariant tensors."""
        raise NotImplementedError

    def _new_state(self, group: dict[str, Any], p: Tensor, manifold: PSIManifold) -> None:
        """Make ``p``'s state where it has none (its first moment laid out like ``p``)."""
        raise NotImplementedError

    def _first_moment_key(self, group: dict[str, Any]) -> str | None:
        """The state key of the first moment (a tensor laid out like the weight), or ``None``."""
        raise NotImplementedError

    def _group_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state keys of the per-group states (``(k,)`` tensors), in the rule's order."""
        raise NotImplementedError

    def _counter_key(self, group: dict[str, Any]) -> str | None:
        """The state key of each tensor's step counter (a 0-d tensor that the kernels read
        and increment, from which the rule computes the tensor's scalars), or ``None``."""
        return None

    def _tensor_scalars(self, group: dict[str, Any], params: list[Tensor], first: list[bool]) -> list[tuple] | None:
        """Without step counters, each tensor's scalars for this step (see
        :data:`._cpu_adaptive_kernels.RULES`; ``first``: whether its first moment is new),
        or ``None`` for zeros."""
        return None

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        """The group's hyperparameters as the rule takes them."""
        raise NotImplementedError

    def _rate(self, group: dict[str, Any]) -> tuple[float, float, float] | None:
        """The ``(gain, power, pull)`` of the group's angular rate (:mod:`._rates`), whose
        virtual squared norm is the last of :meth:`_group_state_keys`; ``None``: none."""
        return None

    def _sharded_rule(self, group: dict[str, Any], p: Tensor, first: bool) -> GroupRule:
        """The rule of ``p``'s groups for this step, for the sharded step
        (:data:`._sharded_adaptive.GroupRule`); ``first``: whether its first moment is new."""
        raise NotImplementedError

    # -- DTensors (FSDP2) ---------------------------------------------------------------------
    def _sharded_steps(self, groups: list[tuple[dict[str, Any], list[ShardedTensor]]]) -> list[Any]:
        """Per param group, the checked, unwritten step of its DTensors
        (:mod:`._sharded_adaptive`), or ``None`` where it has none: one all-reduce for all of
        them, which also carries this rank's check of every other gradient, so that every
        rank refuses alike."""
        tensors, moments, firsts = [], [], []
        for group, group_tensors in groups:
            moment_key = self._first_moment_key(group)
            for t in group_tensors:
                firsts.append(moment_key is not None and moment_key not in self.state[t.param])
                self._new_state(group, t.param, t.manifold)
                tensors.append(t)
                moments.append(None if moment_key is None else self.state[t.param][moment_key])
        if not tensors:
            return [None] * len(groups)
        try:
            collected = self._collect(check=False)  # type: ignore[attr-defined]
            _check_finite_gradients([(p, name) for _, psi, eu in collected for p, name, *_ in (*psi, *eu)])
            local_error = None
        except FloatingPointError as error:
            local_error = error
        sums, moment_of, first_of = iter(whole_group_sums(tensors, moments, local_error)), iter(moments), iter(firsts)
        out = []
        for group, group_tensors in groups:
            if not group_tensors:
                out.append(None)
                continue
            states = [self.state[t.param] for t in group_tensors]
            for state in states:
                for key in self._group_state_keys(group):
                    # saved by versions that kept them as replicated DTensors: the local copy is whole
                    state[key] = _local(state[key])
            group_moments = [next(moment_of) for _ in group_tensors]
            rules = [self._sharded_rule(group, t.param, next(first_of)) for t in group_tensors]
            group_states = [[s[key] for key in self._group_state_keys(group)] for s in states]
            steps = group_steps(
                group_tensors, [next(sums) for _ in group_tensors], group_states, rules,
                maximize=group["maximize"], rate=self._rate(group),
            )  # fmt: skip
            out.append((steps, group_moments, group_states))
        return out

    def _write_sharded(self, group: dict[str, Any], steps: Any) -> None:
        """Write what :meth:`_sharded_steps` computed for ``group``, and count the step."""
        group_steps_, moments, group_states = steps
        write_group_steps(group_steps_, moments, group_states, group["maximize"])
        counter = self._counter_key(group)
        if counter is not None:
            for st in group_steps_:
                self.state[st.tensor.param][counter] += 1

    # -- which tensors the kernels step ------------------------------------------------------
    def _adaptive_kernels(self, group: dict[str, Any], p: Tensor):
        """The kernel module that steps ``p``, or ``None`` for the torch steps."""
        fused = group["fused"]
        if fused is False or group["foreach"] is not None or torch.compiler.is_compiling():
            return None
        module = None
        if p.is_cuda and importlib.util.find_spec("triton") is not None:
            try:
                module = importlib.import_module(CUDA_KERNELS)
            except ImportError:
                module = None
        elif p.is_cpu and importlib.util.find_spec("numba") is not None:
            from . import _cpu_adaptive_kernels as module
        if module is not None and module.supports(p):
            return module
        if fused:
            raise RuntimeError(
                f"fused=True has no kernel for {p.dtype} tensors on {p.device.type}: {type(self).__name__}'s fused "
                "kernels step float32 and float64 tensors on the CPU (numba, a psiopt dependency) and floating-point "
                f"tensors on CUDA where {CUDA_KERNELS} imports. Use fused=None (the torch step where there is no kernel)"
            )
        return None

    def _adaptive_plan(self, index: int, group: dict[str, Any], grads: list[Tensor | None]) -> _AdaptivePlan:
        """The :class:`_AdaptivePlan` of ``param_groups[index]``, rebuilt only when its
        options, its parameters (identity, class, manifold), which of them have a gradient,
        or whether torch.compile is tracing change."""
        params = group["params"]
        # While torch.compile traces the step there are no kernels (dynamo does not trace them).
        signature = _plan_signature(group, grads, torch.compiler.is_compiling())
        plans = self.__dict__.setdefault("_adaptive_plans", {})
        kept = plans.get(index)
        if kept is not None and kept.signature == signature:
            return kept
        plan = _AdaptivePlan(signature, [], [], [])
        sets: dict[tuple, _KernelSet] = {}
        dtensor = _dtensor_type()
        for j, p in enumerate(params):
            if grads[j] is None:
                continue
            manifold = self._manifold_of(p, group)  # type: ignore[attr-defined]
            if manifold is None:
                plan.euclid.append(p)
                plan.euclid_positions.append(j)
                continue
            name = _LazyName(group, index, j, p)
            if dtensor is not None and isinstance(p, dtensor):
                # Local rows, and one all-reduce of every group's sums (a group may straddle shards).
                row_plan, _ = self._row_plan(p, name, manifold)  # type: ignore[attr-defined]
                plan.sharded.append(sharded_tensor(p, name, manifold, row_plan))
                continue
            kernels = self._adaptive_kernels(group, p) if type(p) in _PLAIN or isinstance(p, geoopt.ManifoldParameter) else None
            row_plan, has_row_view = (None, False) if kernels is None else self._row_plan(p, name, manifold)  # type: ignore[attr-defined]
            if kernels is None or row_plan.sharded or not has_row_view:
                plan.loop.append((p, name, manifold))
                continue
            kernel_set = sets.setdefault((id(kernels), p.dtype), _KernelSet(kernels, [], [], []))
            kernel_set.entries.append((p, name, manifold))
            kernel_set.rows.append(row_plan.rows)
            kernel_set.positions.append(j)
        plan.kernel_sets = list(sets.values())
        plan.euclid_fused = _torch_has_fused(plan.euclid)
        plans[index] = plan
        return plan

    # -- the step -----------------------------------------------------------------------------
    def _adaptive_step(self) -> None:
        """One step of every param group: the kept batches' step where they all hold, else
        the general step."""
        grads = [[p.grad for p in group["params"]] for group in self.param_groups]
        plans = [self._adaptive_plan(i, group, g) for i, (group, g) in enumerate(zip(self.param_groups, grads))]
        if not self._kept_step(plans, grads):
            self._general_step(plans, grads)

    def _moments_and_states(self, group: dict[str, Any], kernel_set: _KernelSet) -> tuple | None:
        """The first moments, per-group states and step counters of ``kernel_set``'s
        tensors (``None`` for the first moments or counters of a rule without them), or
        ``None`` where one of them is missing."""
        moment_key, state_keys, counter_key = (
            self._first_moment_key(group), self._group_state_keys(group), self._counter_key(group)
        )  # fmt: skip
        keys = state_keys + tuple(k for k in (moment_key, counter_key) if k is not None)
        states = [self.state[p] for p in kernel_set.params]
        if not all(key in state for state in states for key in keys):
            return None
        moments = None if moment_key is None else [state[moment_key] for state in states]
        counters = None if counter_key is None else [state[counter_key] for state in states]
        return moments, [tuple(state[key] for key in state_keys) for state in states], counters

    def _kept_step(self, plans: list[_AdaptivePlan], grads: list[list[Tensor | None]]) -> bool:
        """The whole step on the kept row batches, when every scale-invariant tensor has
        one and they all hold: the check passes (the first also checks every Euclidean
        gradient, in the same compiled call), then torch's step on the Euclidean
        parameters and the write passes. Returns ``False``, having written nothing, where
        the general step is needed (it raises, naming the parameter, or takes the step
        another way)."""
        kernel_sets = []
        for group, plan, group_grads in zip(self.param_groups, plans, grads):
            if plan.loop or plan.sharded:
                return False
            for ks in plan.kernel_sets:
                current = None if ks.batch is None else self._moments_and_states(group, ks)
                if current is None or not ks.batch.matches(*current):
                    return False
                kernel_sets.append((ks, [group_grads[i] for i in ks.positions]))
        if not kernel_sets:
            return False
        others = [g[i] for plan, g in zip(plans, grads) for i in plan.euclid_positions]
        for n, (ks, ks_grads) in enumerate(kernel_sets):
            flagged = ks.batch.check(ks_grads, others if n == 0 else ())
            if flagged is None or flagged:
                return False  # None: a Euclidean gradient not finite, or not one these kernels read
        tampered = []
        for group, plan in zip(self.param_groups, plans):
            if plan.euclid:
                self._euclidean_update(group, plan.euclid, plan.euclid_fused)
            for ks in plan.kernel_sets:
                tampered += self._kernel_update(group, ks, None)
        self._raise_if_tampered(tampered)
        return True

    def _general_step(self, plans: list[_AdaptivePlan], grads: list[list[Tensor | None]]) -> None:
        """Every check first (raising, naming the parameter, before anything is written),
        then new state and new row batches, then the writes."""
        # DTensors first: their groups' sums and every rank's gradient check go in one
        # all-reduce, so that all ranks refuse alike (a rank raising alone would leave the
        # others waiting in a collective).
        sharded = self._sharded_steps([(group, plan.sharded) for group, plan in zip(self.param_groups, plans)])
        # Groups nonzero, and gradients finite unless the sharded step checked them all.
        checked = any(steps is not None for steps in sharded)
        collected = self._collect(gradients_checked=checked)  # type: ignore[attr-defined]
        for group, _, euclid in collected:
            self._check_euclidean(group, euclid)
        for group, plan in zip(self.param_groups, plans):
            for ks in plan.kernel_sets:
                for p, name, _ in ks.entries:
                    held = [t for t in self.state[p].values() if isinstance(t, Tensor) and t.dim() > 0]
                    if held and ks.kernels.all_finite(held) is False:
                        raise FloatingPointError(
                            f"{name}: its optimizer state holds NaN or infinite values; the step was refused and no "
                            "weight was changed. Reset that state (optimizer.state[p]) or load a saved optimizer state"
                        )
        tampered = []
        for group, plan, group_grads, sharded_steps in zip(self.param_groups, plans, grads, sharded):
            overflowed: list[tuple[Tensor, Any, PSIManifold]] = []
            steps = []
            for ks in plan.kernel_sets:
                moment_key = self._first_moment_key(group)
                first = [moment_key is not None and moment_key not in self.state[p] for p in ks.params]
                for p, _, manifold in ks.entries:
                    self._new_state(group, p, manifold)
                    self._lay_out_like(p, ks)
                moments, states, counters = self._moments_and_states(group, ks)
                ks.batch = ks.kernels.AdaptiveRows(
                    self._RULE, ks.params, moments, states, ks.rows, counters, has_rate=self._rate(group) is not None
                )
                # The gradients and norms are finite (checked above): a flagged tensor had sums that
                # overflowed its precision, and takes the reference step, which does not form them.
                flagged = ks.batch.check([group_grads[i] for i in ks.positions])
                overflowed += [ks.entries[i] for i in flagged]
                steps.append((ks, first, flagged))
            if plan.euclid:
                self._euclidean_update(group, plan.euclid, plan.euclid_fused)
            if plan.loop or overflowed:
                self._reference_update(group, [*plan.loop, *overflowed])
            if sharded_steps is not None:
                self._write_sharded(group, sharded_steps)
            for ks, first, flagged in steps:
                tampered += self._kernel_update(group, ks, first, flagged)
                if flagged:
                    ks.batch = None  # its records of the written first moments miss the skipped tensors
        self._raise_if_tampered(tampered)

    def _lay_out_like(self, p: Tensor, ks: _KernelSet) -> None:
        """Give ``p``'s first moment ``p``'s layout, and its per-group states the weights'
        dtype, contiguous, where they differ (a loaded state dict): once, so that every
        write lands in place."""
        state = self.state[p]
        for key, value in list(state.items()):
            if not isinstance(value, Tensor) or value.dim() == 0:
                continue
            if value.shape == p.shape and (value.stride() != p.stride() or value.dtype != p.dtype):
                state[key] = torch.empty_like(p).copy_(value)
            elif value.dim() == 1 and value.shape != p.shape and (value.dtype != p.dtype or not value.is_contiguous()):
                state[key] = value.to(p.dtype).contiguous()

    def _kernel_update(self, group: dict[str, Any], ks: _KernelSet, first: list[bool] | None, skip: list[int] = ()) -> list:
        """The write pass; returns the names of the tensors with a row left as it was.
        ``first``: whether each tensor's first moment is new (``None``: none is)."""
        xs = None if first is None else self._tensor_scalars(group, ks.params, first)
        left = ks.batch.update(xs, self._hyper(group), maximize=group["maximize"], skip=skip, rate=self._rate(group))
        return [ks.entries[i][1] for i in left]

    @staticmethod
    def _raise_if_tampered(names: list) -> None:
        if names:
            raise FloatingPointError(
                f"{', '.join(map(str, names))}: the optimizer state (first moment or per-group state) holds NaN or "
                "infinite values, or the weights a zero or non-finite group, that no step of this optimizer wrote "
                "(changed from outside it, where torch's version counter does not see it), or they give a step "
                "that is not finite; those groups were left unchanged and every other group was stepped. Reset "
                "that state (optimizer.state[p]) or load a saved optimizer state, and re-initialize such groups"
            )


@dataclass(frozen=True)
class _AdamRule:
    """How a param group's scale-invariant tensors take PSIAdam's step
    (:func:`._adaptive.psiadam_coefficients`): its hyperparameters, and the angular rate
    that scales it (``(gain, power, pull)`` of :mod:`._rates`, or ``None`` for the
    constant rate). ``first_moment``: whether a first moment is kept (without one, and
    with ``beta1 == 0`` and the look-ahead, the direction is this step's gradient)."""

    beta1: float
    beta2: float
    eps: float
    amsgrad: bool
    nesterov: bool
    rate: tuple[float, float, float] | None
    first_moment: bool = True


class _AdamRuleMixin(_AdaptiveKernelsMixin):
    """The hooks of the adaptive step for the optimizers whose scale-invariant groups take
    PSIAdam's step: :class:`psiopt.PSIAdam` (and PSIAdamW), and :class:`psiopt.PSISGD`
    with its ``"sgd"`` angular rate. Each gives its :meth:`_adam_rule`; the state is
    ``step`` (the tensor's step counter), ``exp_avg`` (the first moment, laid out like the
    weight; ``momentum_buffer`` in PSISGD), ``exp_avg_sq`` (one second moment per group), ``max_exp_avg_sq`` (AMSGrad)
    and ``virtual_sq_norm`` (with an angular rate)."""

    _RULE = "adam"
    # PSISGD keeps its first moment under torch's SGD name, PSIAdam under Adam's
    _FIRST_MOMENT = "exp_avg"

    def _adam_rule(self, group: dict[str, Any]) -> _AdamRule:
        raise NotImplementedError

    def _new_state(self, group: dict[str, Any], p: Tensor, manifold: PSIManifold) -> None:
        state = self.state[p]
        # A DTensor's per-group states are replicated on every rank, as plain tensors (_sharded_adaptive).
        owner = _local(p)
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
        key = self._first_moment_key(group)
        if key is not None and key not in state:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for key in self._group_state_keys(group):
            if key not in state:
                # the second moments in the invariant units of ||grad f(u_j)||^2; nu^2 starts at 1
                state[key] = (owner.new_ones if key == "virtual_sq_norm" else owner.new_zeros)(manifold.num_groups(p))

    def _first_moment_key(self, group: dict[str, Any]) -> str | None:
        return self._FIRST_MOMENT if self._adam_rule(group).first_moment else None

    def _group_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        rule = self._adam_rule(group)
        return ("exp_avg_sq", *(("max_exp_avg_sq",) if rule.amsgrad else ()),
                *(("virtual_sq_norm",) if rule.rate is not None else ()))  # fmt: skip

    def _counter_key(self, group: dict[str, Any]) -> str | None:
        return "step"  # the kernels take each tensor's bias corrections from it, and increment it

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        rule = self._adam_rule(group)
        return (float(group["lr"]), rule.beta1, rule.beta2, rule.eps, rule.amsgrad, rule.nesterov)

    def _rate(self, group: dict[str, Any]) -> tuple[float, float, float] | None:
        return self._adam_rule(group).rate

    def _reference_update(self, group: dict[str, Any], psi: list[tuple[Tensor, Any, PSIManifold]]) -> None:
        rule = self._adam_rule(group)
        params = [p for p, _, _ in psi]
        for p, _, manifold in psi:
            self._new_state(group, p, manifold)
        states = [self.state[p] for p in params]
        _rows_update(group["foreach"], params)(
            _psiadam_rows,
            params,
            [p.grad for p in params],
            [m.rows for _, _, m in psi],
            [[s[self._FIRST_MOMENT] if rule.first_moment else None for s in states]],
            [[s[key] for s in states] for key in self._group_state_keys(group)],
            [{"step": float(s["step"]) + 1.0} for s in states],
            lr=float(group["lr"]),
            beta1=rule.beta1,
            beta2=rule.beta2,
            eps=rule.eps,
            maximize=group["maximize"],
            nesterov=rule.nesterov,
            amsgrad=rule.amsgrad,
            rate=rule.rate,
        )
        for s in states:
            s["step"] += 1

    def _sharded_rule(self, group: dict[str, Any], p: Tensor, first: bool) -> GroupRule:
        rule, lr = self._adam_rule(group), float(group["lr"])
        corrections = psiadam_bias_corrections(float(self.state[p]["step"]) + 1.0, rule.beta1, rule.beta2)

        def adam(sq: Tensor, states: list[Tensor]) -> tuple:
            v = states[0]
            mu, alpha, c_m, c_r, new_v, new_max = psiadam_coefficients(
                sq, v, states[1] if rule.amsgrad else v, *corrections,
                lr, rule.beta1, rule.beta2, rule.eps, rule.amsgrad, rule.nesterov,
            )  # fmt: skip
            return mu, alpha, c_m, c_r, [new_v, *([new_max] if rule.amsgrad else [])]

        return adam

