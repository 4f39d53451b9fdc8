r"""What every psiopt optimizer shares: which parameters are scale invariant (a param
group's ``"grouping"``, or a marked :class:`geoopt.ManifoldParameter`), their names in error
messages, the validation of param groups, and the checks that refuse a step before any
weight is written."""

from __future__ import annotations

import math
import warnings
from typing import Any

import geoopt
import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach

from ..grouping import as_grouping
from ..manifold import PSIManifold, any_zero_groups
from ._functional import _PLAIN, _local, _row_plan, _RowPlan

__all__: list[str] = []


class _PSIParamsMixin:
    """What every psiopt optimizer (PSISGD, PSIGD, PSIAdam, PSIAdaSGD) shares: which
    parameters are scale invariant, their names in error messages, the checks that run on
    every weight before any is modified, and how each scale-invariant tensor's local
    storage is read as rows."""

    param_groups: list[dict[str, Any]]
    _psi_manifolds: dict
    _row_plans: dict

    def _manifold_of(self, p: Tensor, group: dict[str, Any]) -> PSIManifold | None:
        """The PSI manifold ``p`` is optimized on, or ``None`` for a Euclidean parameter."""
        grouping = group.get("grouping")
        if grouping is not None:
            # Kept by the group's value itself (its text), so that a step does not parse it again.
            manifold = self._psi_manifolds.get(grouping)
            if manifold is None:
                manifold = self._psi_manifolds[grouping] = PSIManifold(as_grouping(grouping))
            return manifold
        if isinstance(p, geoopt.ManifoldParameter) and isinstance(p.manifold, PSIManifold):
            return p.manifold
        return None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as :meth:`torch.optim.Optimizer.add_param_group`; a
        ``"grouping"`` key makes all its tensors scale invariant with that grouping. A
        group whose hyperparameters, grouping or parameters are refused is not added."""
        # torch refuses a parameter already in another group without saying which: say it here.
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):  # torch's own error for a set stays
            param_group["params"] = params = list(params)
            where = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
            for j, item in enumerate(params):
                p = item[1] if isinstance(item, tuple) else item
                if isinstance(p, Tensor) and p in where:
                    name = (
                        f"parameter {item[0]!r}"
                        if isinstance(item, tuple)
                        else _param_name(param_group, len(self.param_groups), j, p)
                    )
                    raise ValueError(
                        f"{name} is already in param group {where[p]}; a parameter can be in only one param group "
                        "(psiopt.param_groups(model, ...) puts each parameter in exactly one)"
                    )
        super().add_param_group(param_group)  # type: ignore[misc]
        # The optimizer's own hyperparameter checks and the grouping checks, on the group as
        # torch completed it with the defaults; a refused group is not kept.
        group = self.param_groups[-1]
        try:
            self._validate_hyperparameters(group)
            self._validate_group(group, len(self.param_groups) - 1)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        """Each optimizer's checks of a param group's hyperparameters (torch's messages)."""
        raise NotImplementedError

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        grouping = group.get("grouping")
        if grouping is not None:
            grouping = as_grouping(grouping)  # a bad value raises here, with its fix
            # Kept as plain text, so that state_dict() loads with torch.load(weights_only=True).
            group["grouping"] = grouping.describe()
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

    def _row_plan(self, p: Tensor, name: str, manifold: PSIManifold) -> tuple[_RowPlan, bool]:
        """``p``'s :class:`_RowPlan`, and whether ``p`` has a row view under it; kept per
        optimizer (both only depend on ``p``'s local shape, strides and grouping, checked
        on every use with its dtype and device, which choose its kernels) so that a step
        does not redo them."""
        local = _local(p)
        key = (local.shape, local.stride(), local.dtype, local.device, manifold.grouping)
        kept = self._row_plans.get(p)
        if kept is None or kept[0] != key:
            plan = _row_plan(p, manifold.grouping, name)
            kept = (key, plan, plan.has_row_view(p))
            self._row_plans[p] = kept
        return kept[1], kept[2]

    def _warn_if_no_scale_invariant(self) -> None:
        if not any(self._manifold_of(p, g) is not None for g in self.param_groups for p in g["params"]):
            warnings.warn(
                f"{type(self).__name__} received no scale-invariant parameter, so every parameter gets a plain "
                "Euclidean update. Give it the param groups of psiopt.param_groups(model, example_input), "
                "or name a grouping in a param group ({'params': [...], 'grouping': 'channel'})",
                UserWarning,
                stacklevel=3,
            )

    def _collect(
        self, check: bool = True, groups: list[tuple[int, dict[str, Any]]] | None = None,
        gradients_checked: bool = False,
    ) -> list[tuple[dict[str, Any], list[tuple[Tensor, str, PSIManifold]], list[tuple[Tensor, str]]]]:
        """Per param group: its scale-invariant and Euclidean parameters that have a gradient.

        With ``check`` (the default), checks every gradient and every scale-invariant
        weight before anything is modified, so a refused step leaves weights and state
        untouched. ``check=False`` leaves the checks to the caller (PSISGD's one-pass step
        reads them from its reduction pass, without a host synchronization);
        ``gradients_checked`` leaves it the gradients only (the adaptive steps' sharded
        step checked every one of them already). ``groups``: only these ``(index, group)``
        pairs (default: every param group).
        """
        plan = []
        for gi, group in enumerate(self.param_groups) if groups is None else groups:
            psi: list[tuple[Tensor, str, PSIManifold]] = []
            euclid: list[tuple[Tensor, str]] = []
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = _LazyName(group, gi, j, p)
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
        if not check:
            return plan
        if not gradients_checked:
            _check_finite_gradients([(p, name) for _, psi, eu in plan for p, name, *_ in (*psi, *eu)])
        # A DTensor's groups (which may straddle its shards) are checked by the step that
        # completes their sums across the ranks, on every rank alike, before this runs.
        psi_all = [(p, name, m) for _, psi, _ in plan for p, name, m in psi if _local(p) is p]
        if any_zero_groups([m.rows(p.detach()) for p, _, m in psi_all]):
            for p, name, m in psi_all:
                m.check_nonzero_groups(p.detach(), name)
        return plan


class _LazyName:
    """A parameter's name in error messages (:func:`_param_name`), made only when a message
    is: a step names every parameter it might complain about, and the text costs as much as
    a small tensor's arithmetic."""

    __slots__ = ("group", "group_index", "index", "p")

    def __init__(self, group: dict[str, Any], group_index: int, index: int, p: Tensor) -> None:
        self.group, self.group_index, self.index, self.p = group, group_index, index, p

    def __str__(self) -> str:
        return _param_name(self.group, self.group_index, self.index, self.p)


def _param_name(group: dict[str, Any], group_index: int, index: int, p: Tensor) -> str:
    names = group.get("param_names")
    if names is not None and index < len(names):
        return f"parameter {names[index]!r}"
    return f"parameter param_groups[{group_index}]['params'][{index}] (shape {tuple(p.shape)})"


def _check_finite_gradients(entries: list[tuple[Tensor, str]]) -> None:
    """Raise, naming the first parameter whose gradient holds a NaN or an infinity."""
    if not entries:
        return
    grads = [g.coalesce().values() if g.is_sparse else _local(g) for g in (p.grad for p, _ in entries)]
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
            raise FloatingPointError(f"{entries[bad[0]][1]} {_NON_FINITE}")


def _non_finite_flag(grads: list[Tensor], host_kernels=None) -> Tensor | bool | None:
    """A 0-d bool tensor, without a host synchronization: whether the 2-norm of some gradient
    (of this process's shard) is not finite. A NaN or infinity makes it so; so can an
    overflow of finite entries, which :func:`_check_finite_gradients` tells apart.
    ``host_kernels`` (the compiled CPU kernels, once loaded) checks dense CPU gradients
    entry by entry in one call, a fraction of the time of torch's multi-tensor norm on
    small tensors; the flag is then a Python bool (it was computed on the host)."""
    local = [g.coalesce().values() if g.is_sparse else _local(g) for g in grads]
    if not local:
        return None
    finite = None if host_kernels is None else host_kernels.all_finite(local)
    if finite is not None:
        return not finite
    device = local[0].device
    return ~torch.stack([n.to(device, torch.float64) for n in torch._foreach_norm(local)]).isfinite().all()


def _plan_signature(group: dict[str, Any], grads: list[Tensor | None], *extra: Any) -> tuple:
    """What an optimizer's kept plan of the param group ``group`` depends on: the group
    (its identity, ``foreach``, ``fused`` and ``grouping``), ``extra``, its parameters
    (identity, class, and manifold where they carry one) and which of them have a gradient
    (``grads``). Computed at every step: no per-parameter ``isinstance`` (a Parameter
    subclass's is a Python-level check)."""
    params = group["params"]
    types = tuple(map(type, params))
    manifolds = tuple([p.manifold for p, t in zip(params, types) if issubclass(t, geoopt.ManifoldParameter)])
    return (
        id(group), group["foreach"], group["fused"], group["grouping"], *extra,
        tuple(map(id, params)), types, tuple([g is None for g in grads]), manifolds,
    )  # fmt: skip


def _torch_has_fused(params: list[Tensor]) -> bool:
    """Whether torch's fused optimizer kernels take ``params`` (plain floating-point tensors
    on a device they support; not DTensors, for which torch's fused SGD has no sharding
    rule): where they do, ``fused=None`` gives the Euclidean parameters torch's fused
    step. Depends only on the tensors' class, device and dtype, so the optimizers keep the
    answer with their step plans."""
    return (
        bool(params)
        and all(type(p) in _PLAIN for p in params)
        and _default_to_fused_or_foreach(params, differentiable=False, use_fused=True)[0]
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


def _any_flag(flags: list[Tensor | bool]) -> bool:
    """Whether any flag is set: Python bools (from host kernels) are read directly, tensors
    with one synchronization."""
    if any(f for f in flags if not isinstance(f, Tensor)):
        return True
    tensors = [f for f in flags if isinstance(f, Tensor)]
    return bool(torch.stack([f.to(tensors[0].device) for f in tensors]).any()) if tensors else False


_NON_FINITE = (
    "has a NaN or infinite gradient; the step was refused and no weight was changed. Lower the learning rate, "
    "clip the gradients, or skip such steps (a torch.amp.GradScaler skips them for you)"
)
