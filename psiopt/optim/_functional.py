r"""Functional core of :class:`psiopt.PSISGD`: the PSI step on scale-invariant tensors.

As in :mod:`torch.optim.sgd`, the update exists twice: :func:`_single_tensor_psisgd`, a
plain loop over tensors (the reference, and the ground truth of the tests), and
:func:`_multi_tensor_psisgd`, which stacks the ``(k, d)`` group matrices of all tensors
that share a device, dtype and group size ``d`` into one matrix and runs each formula
once per stack. Both call the formulas of :mod:`psiopt.manifold` (their one home) on
row matrices; nothing here re-derives them.

One step on the groups :math:`w_j` of one tensor, with learning rate :math:`\eta`,
momentum :math:`\mu`, dampening :math:`\tau` (see :class:`psiopt.PSISGD`):

.. math::

    r &= \mathrm{lift}_w(\nabla f), \quad r_j = \|w_j\|^2 P_w(\nabla_j f)\\
    m &\leftarrow \mu m + (1 - \tau) r \quad (m \leftarrow r \text{ on the first step})\\
    d &= r + \mu m \ \text{(Nesterov)} \quad\text{or}\quad d = m\\
    w'_j &= \|w_j\| \frac{w_j - \eta d_j}{\|w_j - \eta d_j\|}\\
    m &\leftarrow T_{w \to w'}(m)

The stored momentum is always a horizontal vector at the stored weights.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from ..manifold import group_sq_norms, horizontal_lift_rows, normalize_rows, transport_rows

__all__: list[str] = []

# Most elements stacked into one matrix by the multi-tensor step (4 MiB of float32).
_STACK_NUMEL = 1 << 20


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


def _multi_tensor_psisgd(
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
    """Batched version of :func:`_single_tensor_psisgd`.

    Tensors with the same device, dtype, group size ``d`` and momentum status (first
    step or not) are stacked, up to ``_STACK_NUMEL`` elements per stack: their group
    matrices are concatenated into one ``(K, d)`` matrix, the step runs once on it, and the results are split back and
    written with :func:`torch._foreach_copy_`. Row reductions do not mix rows, so each
    group's arithmetic is the same as in the loop.
    """
    if not params:
        return
    same_kind: dict[tuple, list[int]] = defaultdict(list)
    for i, param in enumerate(params):
        rows = row_fns[i](param)
        has_buf = momentum != 0 and momentum_buffer_list[i] is not None
        same_kind[(param.device, param.dtype, rows.shape[1], has_buf)].append(i)
    # Stacks are capped in size: stacking saves kernel launches on many small tensors,
    # while copying large ones into a stack only costs memory traffic and allocations.
    stacks: list[tuple[torch.dtype, bool, list[int]]] = []
    for (_, dtype, _, has_buf), members in same_kind.items():
        chunk: list[int] = []
        chunk_numel = 0
        for i in members:
            if chunk and chunk_numel + params[i].numel() > _STACK_NUMEL:
                stacks.append((dtype, has_buf, chunk))
                chunk, chunk_numel = [], 0
            chunk.append(i)
            chunk_numel += params[i].numel()
        stacks.append((dtype, has_buf, chunk))

    for dtype, has_buf, idx in stacks:
        w_rows = [row_fns[i](params[i]) for i in idx]
        sizes = [r.shape[0] for r in w_rows]
        w = torch.cat(w_rows) if len(idx) > 1 else w_rows[0]
        g = torch.cat([row_fns[i](grads[i]) for i in idx]) if len(idx) > 1 else row_fns[idx[0]](grads[idx[0]])
        buf = None
        if has_buf:
            buf_rows = [row_fns[i](momentum_buffer_list[i]) for i in idx]
            buf = torch.cat(buf_rows) if len(idx) > 1 else buf_rows[0]
        w_new, new_buf = _psisgd_rows(
            w, g, buf, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize
        )
        new_params = [x.reshape(params[i].shape) for i, x in zip(idx, w_new.to(dtype).split(sizes))]
        torch._foreach_copy_([params[i] for i in idx], new_params)
        if new_buf is None:
            continue
        pieces = [x.reshape(params[i].shape) for i, x in zip(idx, new_buf.to(dtype).split(sizes))]
        if has_buf:
            # Written into the existing buffers: no allocation, and state keeps its tensors.
            torch._foreach_copy_([momentum_buffer_list[i] for i in idx], pieces)
        else:
            for i, x in zip(idx, pieces):
                # A copy, not a view of the stack, so each buffer owns its storage.
                momentum_buffer_list[i] = x.clone(memory_format=torch.contiguous_format)
