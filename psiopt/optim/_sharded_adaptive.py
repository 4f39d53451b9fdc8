r"""The adaptive steps (PSIAdam, PSIAdamW, PSISGD's ``"sgd"`` angular rate, PSIAdaSGD) on
DTensors of every grouping: weights sharded on dim 0 by FSDP2's ``fully_shard`` (whose
``"block"`` and ``"tensor"`` groups may be split across the shards), or replicated.

A group's rule needs its whole gradient norm, and the retraction its whole norm, so a
split group cannot be stepped from one shard's entries alone. The step is the one-pass
form of :func:`psiopt.manifold.one_pass_row_scalars`, which needs only six sums per
group:

1. each rank computes the six sums of its local rows (:func:`psiopt.manifold.step_row_sums`)
   and adds them group by group;
2. **one all-reduce** per step (per process group) completes them, with a flag for this
   rank's other gradients: every rank then holds the whole sums of every group;
3. every rank applies the rule to every group, from these sums and the group's state
   (:data:`GroupRule`: the optimizer's coefficients, then :func:`._adaptive.rate_factor`
   and :func:`._adaptive.next_virtual_sq_norm`): the same arithmetic on the same
   numbers, so the per-group states (``exp_avg_sq``, ``max_exp_avg_sq``,
   ``virtual_sq_norm``; PSIAdaSGD's ``sum``) are plain tensors, replicated and equal on
   every rank;
4. each rank writes its local rows with its groups' coefficients.

The first moment is a DTensor laid out like the weight; only its local shard is read and
written. The squared gradient norm of a group is :math:`a\,gg - b^2`
(:func:`psiopt.manifold.grad_metric_sq_from_sums`), from the completed sums: it is not
recomputed from the Riemannian gradient's entries where the two terms nearly cancel, as
the single-process kernels do (that would take a second all-reduce). Every check (a
non-finite sum, a zero group, a non-finite step) is made on the completed sums, so every
rank makes it alike and refuses the step before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..manifold import PSIManifold, grad_metric_sq_from_sums, one_pass_row_scalars, step_row_sums
from ._adaptive import next_virtual_sq_norm, rate_factor
from ._functional import _dim0_shard, _local, _RowPlan

__all__: list[str] = []


@dataclass
class ShardedTensor:
    """One sharded scale-invariant tensor: its row plan, and the group of each local row
    among its ``num_groups`` groups (global indices, the same numbering on every rank)."""

    param: Tensor
    name: Any
    manifold: PSIManifold
    plan: _RowPlan
    group_of_row: Tensor
    num_groups: int


def sharded_tensor(param: Tensor, name: Any, manifold: PSIManifold, plan: _RowPlan) -> ShardedTensor:
    """The :class:`ShardedTensor` of ``param`` (a DTensor), read through ``plan``."""
    num_groups = manifold.num_groups(param)
    local = _local(param)
    if plan.group_of_row is not None:
        return ShardedTensor(param, name, manifold, plan, plan.group_of_row, num_groups)
    # Whole groups on this rank: its rows are consecutive groups, from the first one of its shard.
    _, offset = _dim0_shard(param, str(name))
    first = offset * num_groups // param.shape[0] if param.shape[0] else 0
    index = torch.arange(first, first + plan.num_rows, device=local.device)
    return ShardedTensor(param, name, manifold, plan, index, num_groups)


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def whole_group_sums(
    tensors: list[ShardedTensor], moments: list[Tensor | None], local_error: FloatingPointError | None = None
) -> list[Tensor]:
    """The six sums of :func:`psiopt.manifold.step_row_sums` of every group of each tensor
    (``(num_groups, 6)``, float64), completed across the ranks: one all-reduce per
    process group, which also carries whether this rank found another gradient not
    finite (``local_error``). Raises ``FloatingPointError`` on every rank alike where a
    group has a non-finite sum or a zero norm, or a rank had a ``local_error``; nothing
    is written."""
    partial: list[Tensor] = []
    for t, m in zip(tensors, moments):
        rows = t.plan.rows
        sums = step_row_sums(rows(t.param.detach()), rows(t.param.grad), None if m is None else rows(m))
        acc = torch.zeros(t.num_groups, 6, dtype=torch.float64, device=sums.device)
        partial.append(acc.index_add_(0, t.group_of_row, sums.double()))
    by_group: dict[object, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.plan.process_group is not None:
            by_group.setdefault(t.plan.process_group, []).append(i)
    flagged = local_error is not None
    for group, idx in by_group.items():
        import torch.distributed as dist

        flag = torch.full((1,), float(local_error is not None), dtype=torch.float64, device=partial[idx[0]].device)
        buffer = torch.cat([*(partial[i].flatten() for i in idx), flag])
        dist.all_reduce(buffer, group=group)
        for i, piece in zip(idx, buffer[:-1].split([partial[i].numel() for i in idx])):
            partial[i] = piece.view(-1, 6)
        flagged = flagged or bool(buffer[-1] > 0)
    for t, sums in zip(tensors, partial):
        tiny = torch.finfo(_accumulation(t.param.dtype)).tiny
        bad = ~torch.isfinite(sums).all(dim=1) | ~(sums[:, 0] > tiny)
        if bool(bad.any()):
            groups = bad.nonzero().flatten().tolist()
            raise FloatingPointError(
                f"{t.name}: groups {groups[:8]} ({t.manifold.grouping.describe()} grouping, sharded) have a NaN or "
                "infinite gradient, weight or first moment, or a zero norm; the step was refused and nothing was "
                "changed. Check the loss for NaN or infinity, or re-initialize the zero groups"
            )
    if flagged:
        raise local_error or FloatingPointError(
            "a gradient on another rank holds NaN or infinite values (that rank's error names it); the step was "
            "refused on every rank and nothing was changed. Check the loss for NaN or infinity"
        )
    return partial


GroupRule = Callable[[Tensor, list[Tensor]], tuple]
"""A tensor's rule on all its groups at once: ``(sq, states) -> (mu, alpha, c_m, c_r,
new_states)``, from the invariant squared gradient norms ``sq`` and the per-group states
(float64, ``(num_groups,)``; the virtual squared norm of an angular rate excluded): the
coefficients of :func:`psiopt.manifold.one_pass_row_scalars` (floats or ``(num_groups,)``
tensors) and the new states in the same order. Each optimizer builds it from its own
rule's coefficients (:func:`._adaptive.psiadam_coefficients`,
:func:`._adaptive.psiadasgd_coefficients`)."""


@dataclass
class _GroupStep:
    """A tensor's step, computed and checked, not yet written: per-group coefficients and
    new per-group states."""

    tensor: ShardedTensor
    sums: Tensor
    mu: Tensor
    alpha: Tensor
    c_m: Tensor
    c_r: Tensor
    s2: Tensor
    q: Tensor
    states: list[Tensor]


def group_steps(
    tensors: list[ShardedTensor],
    sums: list[Tensor],
    group_states: list[list[Tensor]],
    rules: list[GroupRule],
    *,
    maximize: bool,
    rate: tuple[float, float, float] | None,
) -> list[_GroupStep]:
    """Each tensor's rule (``rules[i]``) on every one of its groups, in float64, scaled by
    the angular ``rate`` (whose virtual squared norm is the last of ``group_states[i]``).
    Raises ``FloatingPointError`` where a group's step is not finite; nothing is written."""
    out = []
    for t, whole, states, rule in zip(tensors, sums, group_states, rules):
        a, b, gg, mg, mw, mm = whole.unbind(1)
        if maximize:
            b, mg = -b, -mg
        sq = grad_metric_sq_from_sums(a, b, gg).clamp_min(0.0)
        states = [s.double() for s in states]
        nu_sq = states.pop() if rate is not None else None
        mu, alpha, c_m, c_r, new_states = rule(sq, states)
        if rate is not None:
            gain, power, pull = rate
            factor = rate_factor(gain, power, nu_sq)
            c_m, c_r = c_m * factor, c_r * factor
        s2, q = one_pass_row_scalars(a, b, sq, mg, mw, mm, mu, alpha, c_m, c_r)
        if rate is not None:
            new_states.append(next_virtual_sq_norm(nu_sq, s2, pull))
        mu, alpha, c_m, c_r = (torch.as_tensor(x, dtype=torch.float64).expand_as(a) for x in (mu, alpha, c_m, c_r))
        finite = torch.isfinite(s2) & torch.isfinite(q) & torch.isfinite(c_m) & torch.isfinite(c_r)
        if not bool(finite.all()):
            groups = (~finite).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"{t.name}: groups {groups[:8]} (sharded) give a step that is not finite (their optimizer state "
                "holds NaN or infinite values, or an overflow); the step was refused and nothing was changed. Reset "
                "that state (optimizer.state[p]) or load a saved optimizer state"
            )
        out.append(_GroupStep(t, whole, mu, alpha, c_m, c_r, s2, q, new_states))
    return out


def write_group_steps(
    steps: list[_GroupStep], moments: list[Tensor | None], group_states: list[list[Tensor]], maximize: bool
) -> None:
    r"""Write each tensor's local rows and its first moment's (:math:`m' = \mu m + \alpha r`,
    :math:`w' = s(w - c_m m' - c_r r)`, :math:`m \leftarrow m' - s\,q\,w'`, with
    :math:`r = a g - b w` from the whole groups' sums), then the per-group states."""
    sign = -1.0 if maximize else 1.0
    for st, m, states in zip(steps, moments, group_states):
        t = st.tensor
        rows = t.plan.rows
        w, g = rows(t.param.detach()), rows(t.param.grad)
        acc = _accumulation(w.dtype)
        index = t.group_of_row

        def per_row(x: Tensor) -> Tensor:
            return x[index].to(acc).unsqueeze(1)

        a, b = per_row(st.sums[:, 0]), per_row(sign * st.sums[:, 1])
        s = per_row(st.s2.sqrt())
        w_acc = w.to(acc)
        r = a * (sign * g.to(acc)) - b * w_acc
        u = w_acc - per_row(st.c_r) * r
        new_m = None
        if m is not None:
            new_m = m_rows = rows(m).to(acc) * per_row(st.mu) + per_row(st.alpha) * r
            u = u - per_row(st.c_m) * m_rows
        w_new = s * u
        _write_rows(t, t.param.detach(), w_new)
        if new_m is not None:
            _write_rows(t, m, new_m - s * per_row(st.q) * w_new)
        for state, new in zip(states, st.states):
            state.copy_(new)


def _write_rows(t: ShardedTensor, target: Tensor, rows: Tensor) -> None:
    """Store ``rows`` (``(num_rows, d)``, the plan's row order) in ``target``'s local entries."""
    local = _local(target)
    permuted = local if t.plan.perm is None else local.permute(t.plan.perm)
    permuted.copy_(rows.reshape(permuted.shape))
