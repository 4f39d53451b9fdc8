r"""Functional core of :class:`psiopt.PSISGD`: the PSI step on scale-invariant tensors.

As in :mod:`torch.optim.sgd`, the update exists in several forms:

* :func:`_single_tensor_psisgd`, a plain loop over tensors that chains the formulas of
  :mod:`psiopt.manifold` on each ``(k, d)`` group matrix: the reference, and the ground
  truth of the tests;
* :func:`_one_pass_psisgd`, the fast step, in two passes over memory whatever the
  options: one **reduction pass** computes the six sums of every group
  (:func:`psiopt.manifold.step_row_sums`), the group scalars follow from them
  (:func:`psiopt.manifold.one_pass_step_scalars`), and one **elementwise pass** writes
  the weights and the momentum in place. It runs as multi-tensor (``foreach``) torch
  operations, or as compiled row kernels (``fused``: :mod:`._cpu_kernels`).

One step on the groups :math:`w_j` of one tensor, with learning rate :math:`\eta`,
momentum :math:`\mu`, dampening :math:`\tau` (see :class:`psiopt.PSISGD`):

.. math::

    r &= \mathrm{lift}_w(\nabla f), \quad r_j = \|w_j\|^2 P_w(\nabla_j f)\\
    m &\leftarrow \mu m + (1 - \tau) r \quad (m \leftarrow r \text{ on the first step})\\
    d &= r + \mu m \ \text{(Nesterov)} \quad\text{or}\quad d = m\\
    w'_j &= \|w_j\| \frac{w_j - \eta d_j}{\|w_j - \eta d_j\|}\\
    m &\leftarrow T_{w \to w'}(m)

The stored momentum is always a horizontal vector at the stored weights.

Rows, groups and shards. The one-pass step works on *rows*: a ``(rows, d)`` view of
the tensor's local storage in which each row holds entries of one group. A row is a
whole group, except where a group is split, across the dim-0 shards of an FSDP2
:class:`~torch.distributed.tensor.DTensor` (a ``"tensor"`` grouping, or ``"block"``
groups that straddle a shard boundary): such a tensor has one row per local output
channel, the rows' sums are added group by group, and the partial sums of all such
tensors are all-reduced together, once per step. Within a row the entries are taken
in memory order (channels-last weights need no copy); sums do not depend on the order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from ..grouping import Grouping
from ..manifold import (
    group_sq_norms,
    horizontal_lift_rows,
    normalize_rows,
    one_pass_step_scalars,
    step_row_sums,
    transport_rows,
)

__all__: list[str] = []


# -- the reference loop ------------------------------------------------------------------


def _psisgd_rows(
    w: Tensor,
    grad: Tensor,
    buf: Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> tuple[Tensor, Tensor | None]:
    """The PSI step on one ``(k, d)`` matrix of groups; returns the new rows and the new
    momentum (transported to them), both in accumulation dtype. Nothing is written."""
    if maximize:
        grad = -grad
    w_sq = group_sq_norms(w)
    riem_grad = horizontal_lift_rows(w, grad, w_sq)
    new_buf: Tensor | None = None
    if momentum != 0:
        if buf is None:
            new_buf = riem_grad
        else:
            # torch.optim.SGD's buf.mul_(momentum).add_(grad, alpha=1 - dampening), on a copy:
            # the stored buffer is only written once the whole step has been computed.
            new_buf = buf.to(riem_grad.dtype, copy=True).mul_(momentum).add_(riem_grad, alpha=1 - dampening)
        direction = riem_grad.add(new_buf, alpha=momentum) if nesterov else new_buf
    else:
        direction = riem_grad
    # The norm-keeping representative: the retraction w - lr d, rescaled group by group
    # back to the norms the step started from (fixed norms cannot overflow or underflow).
    w_new = normalize_rows(torch.add(w.to(riem_grad.dtype), direction, alpha=-lr), w_sq)
    if new_buf is not None:
        # w_new has the norms w_sq by construction: the transport's norm ratio is 1.
        new_buf = transport_rows(w_new, new_buf, w_sq, w_sq)
    return w_new, new_buf


def _single_tensor_psisgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    row_fns: list,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """The reference loop: one tensor at a time. ``row_fns[i]`` maps a tensor of the shape
    of ``params[i]`` to its ``(k, d)`` group matrix (:meth:`Grouping.rows`).

    Updates ``params`` in place and replaces ``momentum_buffer_list`` entries (when
    ``momentum != 0``) by the new buffers, of each parameter's shape and dtype.
    """
    for i, param in enumerate(params):
        rows = row_fns[i]
        buf = momentum_buffer_list[i]
        w_new, new_buf = _psisgd_rows(
            rows(param),
            rows(grads[i]),
            None if buf is None else rows(buf),
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            maximize=maximize,
        )
        param.copy_(w_new.reshape(param.shape))
        if new_buf is None:
            continue
        new_buf = new_buf.to(param.dtype).reshape(param.shape)
        if buf is None:
            momentum_buffer_list[i] = new_buf.clone(memory_format=torch.contiguous_format)
        else:
            buf.copy_(new_buf)


# -- rows of the local storage -------------------------------------------------------------


@dataclass(frozen=True)
class _RowPlan:
    """How one scale-invariant tensor's local storage is read as rows.

    ``perm`` orders the dims of the local tensor (the shard of a DTensor, when
    ``sharded``) so that each row is contiguous in memory; ``num_rows`` rows. ``group_of_row`` is ``None`` when every row
    is one whole group; otherwise it gives each row's group among ``num_groups`` groups,
    whose sums are partial here. ``process_group`` (sharded tensors) is the group that
    all-reduces the partial sums and the flags.
    """

    perm: tuple[int, ...] | None  # None: the identity
    num_rows: int
    group_of_row: Tensor | None = None
    num_groups: int = 0
    process_group: object = None
    sharded: bool = False

    def rows(self, x: Tensor) -> Tensor:
        """``x``'s local entries as ``(num_rows, d)``: a view when ``x`` has the layout the
        plan was made for, else a copy (only read from)."""
        if self.sharded:
            x = _local(x)
        if self.perm is not None:
            x = x.permute(self.perm)
        return x.reshape(self.num_rows, -1) if self.num_rows else x.reshape(0, 0)

    def has_row_view(self, x: Tensor) -> bool:
        """Whether :meth:`rows` of ``x`` is a view, so writes to it reach ``x``."""
        x = _local(x) if self.sharded else x
        return (x if self.perm is None else x.permute(self.perm)).is_contiguous()


_PLAIN = (Tensor, torch.nn.Parameter)


def _dtensor_type() -> type | None:
    # A DTensor exists only once torch.distributed.tensor has been imported; looking it
    # up in sys.modules keeps psiopt from importing it (and its start-up cost) itself.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def _local(x: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: writes reach it), or ``x`` itself."""
    if type(x) in _PLAIN:  # the common case, without a module lookup
        return x
    dtensor = _dtensor_type()
    return x.to_local() if dtensor is not None and isinstance(x, dtensor) else x


def _memory_order(x: Tensor) -> tuple[int, ...]:
    """Dim 0 first, then the other dims from the largest stride to the smallest: the
    permutation under which a dense tensor (contiguous, channels-last...) is contiguous."""
    rest = sorted(range(1, x.dim()), key=lambda i: (-x.stride(i), i))
    return (0, *rest)


def _row_plan(param: Tensor, grouping: Grouping, name: str) -> _RowPlan:
    """The :class:`_RowPlan` of a scale-invariant parameter (a plain tensor or a DTensor
    sharded on dim 0)."""
    local = _local(param)
    perm = _memory_order(local)
    if perm == tuple(range(local.dim())):
        perm = None
    channels = param.shape[0]
    if local is param:
        return _RowPlan(perm, grouping.num_groups(param.shape))
    shard_dim, offset = _dim0_shard(param, name)
    n = local.shape[0]
    if shard_dim is None:
        return _RowPlan(perm, grouping.num_groups(param.shape), sharded=True)
    process_group = param.device_mesh.get_group(shard_dim)
    if grouping.kind == "channel":
        return _RowPlan(perm, n, process_group=process_group, sharded=True)
    cpg = channels if grouping.kind == "tensor" else grouping.channels_per_group
    assert cpg is not None
    if _every_shard_aligned(param, shard_dim, cpg):
        return _RowPlan(perm, n // cpg, process_group=process_group, sharded=True)
    group_of_row = torch.arange(offset, offset + n, device=local.device) // cpg
    return _RowPlan(perm, n, group_of_row, channels // cpg, process_group, sharded=True)


def _dim0_shard(param: Tensor, name: str) -> tuple[int | None, int]:
    """For a DTensor: the mesh dim along which dim 0 is sharded (``None`` if replicated)
    and the first global channel of this process's shard."""
    from torch.distributed.tensor import Replicate, Shard

    shard_dims = [i for i, pl in enumerate(param.placements) if isinstance(pl, Shard)]
    bad = [pl for pl in param.placements if not isinstance(pl, (Shard, Replicate))]
    if bad or any(param.placements[i].dim != 0 for i in shard_dims) or len(shard_dims) > 1:
        raise NotImplementedError(
            f"{name} is a DTensor with placements {param.placements}; the PSI step supports DTensors "
            "sharded on dim 0 over one mesh dimension (FSDP2's fully_shard) or replicated. Shard the "
            "scale-invariant weights with fully_shard, or leave them out of this optimizer"
        )
    if not shard_dims:
        return None, 0
    dim = shard_dims[0]
    # torch.chunk's split, the one DTensor and FSDP2 use: ceil(C / n) channels per rank.
    size = param.device_mesh.size(dim)
    per_rank = -(-param.shape[0] // size)
    return dim, min(per_rank * param.device_mesh.get_local_rank(dim), param.shape[0])


def _every_shard_aligned(param: Tensor, dim: int, cpg: int) -> bool:
    """Whether every rank's dim-0 shard starts and ends on a group boundary (the same
    answer on every rank, so all of them lay out the all-reduced buffer the same way)."""
    size = param.device_mesh.size(dim)
    per_rank = -(-param.shape[0] // size)
    return per_rank % cpg == 0 and param.shape[0] % cpg == 0


# -- the one-pass step ---------------------------------------------------------------------


@dataclass
class _Tensors:
    """One scale-invariant tensor in a one-pass step: its plan and its row views."""

    plan: _RowPlan
    w: Tensor
    g: Tensor
    m: Tensor | None
    first: bool
    kernels: object = None  # the compiled row kernels (a module), or None for torch operations


def _prepare(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    plans: list[_RowPlan],
    momentum: float,
    kernels: list,
    row_views: dict | None,
) -> list[_Tensors]:
    """Row views of every tensor; makes the momentum buffers of a first step (zeros, in the
    parameter's layout) and re-lays out a buffer whose layout differs from its parameter's
    (a loaded checkpoint), once, so that every write lands in place.

    ``row_views`` (kept by the optimizer, keyed by parameter; ``None``: no keeping) holds the row views of each
    plain parameter and of its buffer from one step to the next: making a view costs
    microseconds, as much as a small tensor's arithmetic. A kept view is used only while
    its plan and its tensors are the same and start at the same address (so it still
    points into their memory: the view holds its storage alive, so no other tensor can
    be at that address)."""
    out = []
    for i, (p, plan) in enumerate(zip(params, plans)):
        buf = None
        first = False
        if momentum != 0:
            buf = momentum_buffer_list[i]
            if buf is None:
                first = True
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                momentum_buffer_list[i] = buf
            elif not plan.has_row_view(buf):
                buf = torch.empty_like(p, memory_format=torch.preserve_format).copy_(buf)
                momentum_buffer_list[i] = buf
        w, m = _kept_row_views(row_views, p, buf, plan)
        out.append(_Tensors(plan, w, plan.rows(grads[i]), m, first, kernels[i]))
    return out


def _kept_row_views(row_views: dict | None, p: Tensor, buf: Tensor | None, plan: _RowPlan) -> tuple[Tensor, Tensor | None]:
    """The row views of ``p`` and of its momentum buffer ``buf``, from ``row_views`` when
    still valid (see :func:`_prepare`), else made and kept there."""
    if row_views is None or plan.sharded:
        return plan.rows(p), None if buf is None else plan.rows(buf)
    kept = row_views.get(p)
    if (
        kept is None
        or kept[0] is not plan
        or kept[1].data_ptr() != p.data_ptr()
        or kept[2] is not buf
        or (buf is not None and kept[3].data_ptr() != buf.data_ptr())
    ):
        kept = (plan, plan.rows(p), buf, None if buf is None else plan.rows(buf))
        row_views[p] = kept
    return kept[1], kept[3]


def _reduce_across_shards(
    items: list[_Tensors],
    sums: list[Tensor],
    bad: list[Tensor | bool],
    totals: Tensor | None = None,
    *,
    totals_group: object = None,
    whole: list[Tensor | None] | None = None,
) -> Tensor | None:
    """Complete the sums of groups split across shards, and make the flags agree across
    ranks: **one all-reduce** per process group (one per step under FSDP2) of every partial
    group sum, of every sharded tensor's flag, and of ``totals``.

    ``sums[i]`` (``(rows, k)``: :func:`~psiopt.manifold.step_row_sums` or its first
    columns) becomes, for each row, the sums of its whole group; ``bad[i]`` becomes true
    when any rank flagged tensor ``i``. For a tensor with split groups only non-finite
    sums count as a flag before the reduction (a zero part of a group is no error) and a
    zero whole group after it, the same on every rank. ``totals`` (a 1-d float64 tensor: flags as 0/1,
    partial sums) is summed over the ranks and returned (unchanged when nothing is
    reduced); with several process groups it is summed within each, which suits flags
    only. ``totals_group`` makes it reduced over that process group even when no tensor
    of ``items`` is sharded over it. ``whole``, if given, receives for each item the
    ``(groups, k)`` sums of all the groups of a split tensor (``None`` for the others),
    the same on every rank.
    """
    by_group: dict[object, list[int]] = {} if totals_group is None else {totals_group: []}
    for i, t in enumerate(items):
        if t.plan.process_group is not None:
            by_group.setdefault(t.plan.process_group, []).append(i)
    if whole is not None:
        whole[:] = [None] * len(items)
    for group, idx in by_group.items():
        import torch.distributed as dist

        device = items[idx[0]].w.device if idx else totals.device  # type: ignore[union-attr]
        partial = []
        for i in idx:
            plan = items[i].plan
            if plan.group_of_row is not None:
                acc = torch.zeros(plan.num_groups, sums[i].shape[1], dtype=torch.float64, device=device)
                acc.index_add_(0, plan.group_of_row, sums[i].double())
                partial.append(acc.flatten())
        local_bad = [bad[i] if items[i].plan.group_of_row is None else ~torch.isfinite(sums[i]).all() for i in idx]
        flags = [torch.as_tensor(b, dtype=torch.float64, device=device).reshape(1) for b in local_bad]
        if totals is not None:
            flags.append(totals.to(device, torch.float64).reshape(-1))
        buffer = torch.cat([*partial, *flags])
        dist.all_reduce(buffer, group=group)
        offset = 0
        for i in idx:
            plan = items[i].plan
            if plan.group_of_row is not None:
                width = sums[i].shape[1]
                groups = buffer[offset : offset + width * plan.num_groups].view(plan.num_groups, width)
                sums[i] = groups[plan.group_of_row].to(sums[i].dtype)
                if whole is not None:
                    whole[i] = groups
                offset += width * plan.num_groups
        for i in idx:
            bad[i] = buffer[offset] > 0
            if items[i].plan.group_of_row is not None:
                bad[i] = bad[i] | ~(sums[i][:, 0] > torch.finfo(sums[i].dtype).tiny).all()
            offset += 1
        if totals is not None:
            totals = buffer[offset:]
    return totals


def _bad_rows(sums: Tensor) -> Tensor:
    """Per row: a sum is not finite (a NaN or infinite gradient, weight or momentum), or the
    weight's squared norm is zero or underflows (no direction on the manifold)."""
    a = sums[:, 0]
    return ~torch.isfinite(sums).all(dim=1) | ~(a > torch.finfo(a.dtype).tiny)


def _row_sums_and_flags(
    items: list[_Tensors], inv_scale: Tensor | None
) -> tuple[list[Tensor], list[Tensor | bool]]:
    """The reduction pass on this process's rows: every tensor's row sums and a flag per
    tensor, true when one of its rows cannot be stepped (:func:`_reduce_across_shards`
    then completes both for sharded tensors). ``inv_scale`` (a
    GradScaler's inverse scale) only reaches the compiled kernels, the only path a
    scaler hands its scale to."""
    sums: list[Tensor] = [None] * len(items)  # type: ignore[list-item]
    bad: list[Tensor | bool] = [False] * len(items)  # a host kernel's flag is a Python bool
    for kernels, idx in _by_kernels(items).items():
        if kernels is None:
            for i in idx:
                sums[i] = step_row_sums(items[i].w, items[i].g, items[i].m)
            # The rows' checks on all the sums of one dtype and device at once, then one flag per tensor.
            batches: dict[tuple, list[int]] = {}
            for i in idx:
                batches.setdefault((sums[i].dtype, sums[i].device), []).append(i)
            for batch in batches.values():
                rows_bad = _bad_rows(torch.cat([sums[i] for i in batch]))
                for i, tensor_rows in zip(batch, rows_bad.split([sums[i].shape[0] for i in batch])):
                    bad[i] = tensor_rows.any()
            continue
        # One call for all the tensors of these kernels (the compiled CPU kernels batch them).
        row_sums, flags = kernels.row_sums(
            [items[i].w for i in idx], [items[i].g for i in idx], [items[i].m for i in idx], inv_scale
        )
        for i, s, flag in zip(idx, row_sums, flags):
            sums[i], bad[i] = s, flag
    return sums, bad


def _by_kernels(items: list[_Tensors]) -> dict[object, list[int]]:
    """The indices of ``items`` by the kernels that step them (``None``: torch operations)."""
    out: dict[object, list[int]] = {}
    for i, t in enumerate(items):
        out.setdefault(t.kernels, []).append(i)
    return out


def _elementwise_pass(
    items: list[_Tensors],
    sums: list[Tensor],
    refused: Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """The elementwise pass with torch operations, in place on the row views.

    With the group scalars of :func:`~psiopt.manifold.one_pass_step_scalars` and
    :math:`\\sigma = \\pm 1` (``maximize``), the operations are those of

    .. math::

        m' = \\mu m + (1-\\tau)(a\\sigma g - b w), \\quad
        w' = s(w - \\eta d), \\quad m_{\\text{new}} = m' - s q w'

    written into ``m``, then ``w``, then ``m``: each reads only what is still current.
    The tensors of one dtype, device and first-step flag are a batch: their scalars are
    computed once on all their rows, and each operation is one multi-tensor (``foreach``)
    call, with a per-row coefficient for each tensor.
    ``refused`` (a 0-d device flag, or ``None``) turns the whole step into the identity
    without a host synchronization: the scalars become those of no step and the gradient
    is read as zeros.
    """
    batches: dict[tuple, list[int]] = {}
    for i, t in enumerate(items):
        if t.plan.num_rows:
            batches.setdefault((t.w.dtype, t.w.device, t.first), []).append(i)
    for (dtype, _, first), idx in batches.items():
        _elementwise_batch(
            [items[i] for i in idx], torch.cat([sums[i] for i in idx]) if len(idx) > 1 else sums[idx[0]],
            refused, first, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize,
        )  # fmt: skip


def _elementwise_batch(
    items: list[_Tensors],
    sums: Tensor,
    refused: Tensor | None,
    first: bool,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """:func:`_elementwise_pass` on tensors of one dtype, device and first-step flag,
    ``sums`` being their row sums one after the other."""
    sign = -1.0 if maximize else 1.0
    w_dtype = items[0].w.dtype
    dtype = w_dtype if w_dtype in (torch.float32, torch.float64) else torch.float32
    counts = [t.plan.num_rows for t in items]

    def kept(value: Tensor, identity: float) -> Tensor:
        # The scalar of the step, or of no step when the step is refused.
        return value if refused is None else torch.where(refused, identity, value)

    def coef(value: Tensor, identity: float) -> list[Tensor]:
        # One (rows, 1) column per tensor, in the dtype its operations take.
        return list(kept(value, identity).to(dtype).split(counts))

    a, b, gg, mg, mw, mm = (c.unsqueeze(1) for c in sums.unbind(1))
    if maximize:
        b, mg = -b, -mg
    s2, q = one_pass_step_scalars(a, b, gg, mg, mw, mm, lr, momentum, dampening, nesterov, first)
    s = s2.sqrt()
    ws, gs, ms = [t.w for t in items], [t.g for t in items], [t.m for t in items]
    if refused is not None:
        gs = [torch.where(refused, 0.0, g) for g in gs]  # 0 * NaN is NaN: a refused gradient is not read
    if ms[0] is None or nesterov:
        w_coef, g_coef = coef(s * (1 + lr * b), 1.0), coef(-lr * sign * s * a, 0.0)
    if ms[0] is None:
        torch._foreach_mul_(ws, w_coef)
        torch._foreach_addcmul_(ws, gs, g_coef)
        return
    if first:
        torch._foreach_zero_(ms)  # m' = r on the first step
    else:
        torch._foreach_mul_(ms, kept(torch.tensor(momentum, dtype=dtype), 1.0) if refused is not None else momentum)
    damp = 1.0 if first else 1 - dampening
    torch._foreach_addcmul_(ms, gs, coef(sign * damp * a, 0.0))
    torch._foreach_addcmul_(ms, ws, coef(-damp * b, 0.0))
    if nesterov:
        torch._foreach_mul_(ws, w_coef)
        torch._foreach_addcmul_(ws, gs, g_coef)
        torch._foreach_addcmul_(ws, ms, coef(-lr * momentum * s, 0.0))
    else:
        torch._foreach_mul_(ws, coef(s, 1.0))
        torch._foreach_addcmul_(ws, ms, coef(-lr * s, 0.0))
    torch._foreach_addcmul_(ms, ws, coef(-s * q, 0.0))
