r"""Functional core of the adaptive PSI steps: :class:`psiopt.PSIAdam` and :class:`psiopt.PSIAdaSGD`.

Both adapt the *angular* step of every group to the size of the gradient at the unit
row :math:`u_j = w_j/\|w_j\|`. That gradient is :math:`\|w_j\|\,P_w(\nabla_j f)`, and its
squared norm is the metric norm of the Riemannian gradient :math:`r_j = \|w_j\|^2 P_w(\nabla_j f)`:

.. math::

    \|\nabla f(u_j)\|^2 = \frac{\|r_j\|^2}{\|w_j\|^2}
        = \|w_j\|^2\, \|P_w(\nabla_j f)\|^2 ,

the same for every representative :math:`a_j w_j` of the class (``metric_inner_rows``).
Both steps keep a first moment in the units of :math:`r` (a horizontal vector that scales
with the weights) and a second moment per group in those invariant units, so the step
:math:`\eta\, m_j / (\sqrt{v_j} + \epsilon)` turns :math:`u_j` by an angle that does not
depend on the scale of :math:`w_j`.

As in :mod:`psiopt.optim._functional`, each update exists as a plain loop over tensors
(:func:`_single_tensor_rows`, the reference and the ground truth of the tests) and as a
stacked version (:func:`_multi_tensor_rows`) that concatenates the ``(k, d)`` group
matrices of tensors sharing a device, dtype, group size and state status, and runs each
formula once per stack. Row reductions do not mix rows, so both do the same arithmetic
on every group. Every formula is one of :mod:`psiopt.manifold`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach

from ..manifold import group_sq_norms, horizontal_lift_rows, metric_inner_rows, normalize_rows, transport_rows

__all__: list[str] = []

# Most elements stacked into one matrix by the multi-tensor step (4 MiB of float32).
_STACK_NUMEL = 1 << 20

RowStep = Callable[..., tuple[Tensor | None, ...]]


def _riemannian_gradient(w: Tensor, grad: Tensor, maximize: bool) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(w_sq, r, s)``: squared group norms, the Riemannian gradient's horizontal lift
    :math:`r`, and :math:`s_j = \|\nabla f(u_j)\|^2`, the invariant squared gradient norm."""
    if maximize:
        grad = -grad
    w_sq = group_sq_norms(w)
    riem_grad = horizontal_lift_rows(w, grad, w_sq)
    return w_sq, riem_grad, metric_inner_rows(w_sq, riem_grad)


# -- each rule's coefficients: the one home of its formula ---------------------------------
#
# A rule turns a group's invariant squared gradient norm ``sq`` (= ||r||^2 / a = a gg - b^2,
# from the sums of psiopt.manifold.step_row_sums) and its per-group state into the coefficients
# (mu, alpha, c_m, c_r) of psiopt.manifold.one_pass_row_scalars's step and the new state.
# Pure arithmetic plus ``sqrt`` and ``maximum``, so that one definition serves (k, 1)
# tensors in the reference loop and scalars in compiled kernels: numba and Triton compile
# the same code object with their own ``sqrt`` and ``maximum`` (see _cpu_adaptive_kernels).


def sqrt(x):
    """Square root of a tensor or a float (the coefficients' ``sqrt`` in Python)."""
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def maximum(x, y):
    """Elementwise maximum of tensors or floats (the coefficients' ``maximum`` in Python)."""
    return torch.maximum(x, y) if isinstance(x, Tensor) else max(x, y)


def psiadam_bias_corrections(step, beta1, beta2):
    r"""Adam's bias corrections of step ``step`` (counting this one), per tensor:
    :math:`(1 - \beta_1^t,\ 1 - \beta_1^{t+1},\ \sqrt{1 - \beta_2^t})`."""
    return 1.0 - beta1**step, 1.0 - beta1 ** (step + 1), (1.0 - beta2**step) ** 0.5


def psiadam_coefficients(sq, v, v_max, bc1, bc1_next, bc2_sqrt, lr, beta1, beta2, eps, amsgrad, nesterov):
    r"""PSIAdam's step on one group: returns :math:`(\mu, \alpha, c_m, c_r, v', v'_{max})`.

    :math:`v' = \beta_2 v + (1-\beta_2)\,sq` (and :math:`v'_{max} = \max(v_{max}, v')`
    with ``amsgrad``, which then takes its place in the denominator),
    :math:`D = \sqrt{v'}/\sqrt{1-\beta_2^t} + \epsilon`, :math:`\mu = \beta_1`,
    :math:`\alpha = 1 - \beta_1`, and the step :math:`w - \eta\, d` with
    :math:`d = (m'/(1-\beta_1^t))/D`: :math:`c_m = \eta/((1-\beta_1^t) D)`,
    :math:`c_r = 0`. With ``nesterov``, :math:`d = (\beta_1 m'/(1-\beta_1^{t+1}) +
    (1-\beta_1) r/(1-\beta_1^t))/D`: :math:`c_m = \eta\beta_1/((1-\beta_1^{t+1}) D)`,
    :math:`c_r = \eta(1-\beta_1)/((1-\beta_1^t) D)`. ``bc1, bc1_next, bc2_sqrt`` are
    :func:`psiadam_bias_corrections`.
    """
    v = beta2 * v + (1.0 - beta2) * sq
    second = v
    if amsgrad:
        v_max = maximum(v_max, v)
        second = v_max
    denom = sqrt(second) / bc2_sqrt + eps
    if nesterov:
        c_m = lr * beta1 / (bc1_next * denom)
        c_r = lr * (1.0 - beta1) / (bc1 * denom)
    else:
        c_m = lr / (bc1 * denom)
        c_r = 0.0 * denom
    return beta1, 1.0 - beta1, c_m, c_r, v, v_max


def psiadasgd_coefficients(sq, total, first, lr, momentum, dampening, nesterov, eps):
    r"""PSIAdaSGD's step on one group: returns :math:`(\mu, \alpha, c_m, c_r, S')`.

    :math:`S' = S + sq`, :math:`D = \sqrt{S'} + \epsilon`: the momentum runs on the
    adaptive step :math:`r/D`, so :math:`\alpha = (1-\tau)/D` (:math:`1/D` and
    :math:`\mu = 0` on the ``first`` step, where the buffer starts at :math:`r/D`),
    :math:`\mu` = momentum, and :math:`c_m = \eta, c_r = 0`; with Nesterov
    (:math:`d = r/D + \mu m'`) :math:`c_m = \eta\mu, c_r = \eta/D`. Without momentum
    :math:`w - \eta\, r/D`: :math:`\mu = \alpha = c_m = 0, c_r = \eta/D`.
    """
    total = total + sq
    inv = 1.0 / (sqrt(total) + eps)
    if momentum == 0.0:
        return 0.0 * inv, 0.0 * inv, 0.0 * inv, lr * inv, total
    # Every coefficient a tensor like inv (Triton makes a returned Python float a float32).
    mu = momentum + 0.0 * inv
    alpha = (1.0 - dampening) * inv
    if first:
        mu = 0.0 * inv
        alpha = inv
    if nesterov:
        return mu, alpha, lr * momentum + 0.0 * inv, lr * inv, total
    return mu, alpha, lr + 0.0 * inv, 0.0 * inv, total


def rate_factor(gain, power, nu_sq):
    r"""The factor :math:`\gamma/\nu_j^p` of an angular rate (:mod:`._rates`) on each group's
    step: a rule's coefficients :math:`c_m, c_r` (linear in its learning rate) times it.
    ``power`` is 2 (SGD's law) or 1 (Adam's)."""
    if power == 2.0:
        return gain / nu_sq
    return gain / sqrt(nu_sq)


def next_virtual_sq_norm(nu_sq, s2, pull):
    r"""The virtual squared norm after a step whose retraction grew the group's squared norm
    by :math:`1/s^2 = \|w_j - \alpha_j d_j\|^2/\|w_j\|^2` (:func:`psiopt.manifold.one_pass_row_scalars`'s
    :math:`s^2`), less the weight decay's ``pull``."""
    return nu_sq * (1.0 / s2 - pull)


# -- the reference loop's row steps --------------------------------------------------------


def _step_rows(
    w: Tensor, w_sq: Tensor, riem_grad: Tensor, m: Tensor | None, has_m: bool, mu, alpha, c_m, c_r
) -> tuple[Tensor, Tensor | None, Tensor]:
    r"""The step of :func:`psiopt.manifold.one_pass_row_scalars`, chaining the manifold's
    formulas: :math:`m' = \mu m + \alpha r` (``m=None`` with ``has_m``: a first step,
    :math:`m' = \alpha r`), the retraction :math:`w - c_m m' - c_r r` rescaled group by
    group to the norms it started from, and :math:`m'` transported to it. Returns the
    new rows, the new first moment (``None`` without one) and the factor by which the
    retraction grew each group's squared norm (:math:`1/s^2`), in accumulation dtype."""
    u = torch.sub(w.to(riem_grad.dtype), c_r * riem_grad)
    new_m = None
    if has_m:
        new_m = alpha * riem_grad if m is None else m.to(riem_grad.dtype) * mu + alpha * riem_grad
        u = u.sub_(c_m * new_m)
    growth = group_sq_norms(u) / w_sq
    w_new = normalize_rows(u, w_sq)
    # w_new has the norms w_sq by construction: the transport's norm ratio is 1.
    return w_new, None if new_m is None else transport_rows(w_new, new_m, w_sq, w_sq), growth


def _psiadam_rows(
    w: Tensor,
    grad: Tensor,
    exp_avg: Tensor | None,
    exp_avg_sq: Tensor,
    *more: Tensor,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
    nesterov: bool,
    amsgrad: bool = False,
    rate: tuple[float, float, float] | None = None,
) -> tuple[Tensor | None, ...]:
    r"""One PSIAdam step on a ``(k, d)`` matrix of groups (``step`` counts this one).

    ``exp_avg`` is ``(k, d)`` and horizontal at ``w`` (``None``: no first moment is kept,
    which with ``beta1 == 0`` and ``nesterov`` is the same step: PSISGD without momentum); ``exp_avg_sq`` and the
    group states of ``more`` are ``(k, 1)``: ``max_exp_avg_sq`` with ``amsgrad``, then the
    virtual squared norm with an angular ``rate`` (``(gain, power, pull)`` of
    :mod:`._rates`: the step is scaled by :func:`rate_factor`, and the virtual norm moves
    by :func:`next_virtual_sq_norm`). Returns the new rows, the first moment transported
    to them (``None`` without one), and the new group states in the same order, all in
    accumulation dtype; nothing is written. The coefficients are
    :func:`psiadam_coefficients`'s: torch's bias corrections and placement of ``eps``
    (:func:`torch.optim.adam._single_tensor_adam`) with :math:`g^2` replaced by the
    invariant :math:`\|\nabla f(u_j)\|^2`, and with ``nesterov`` NAdam's look-ahead
    with a constant momentum (:class:`torch.optim.NAdam` with :math:`\mu_t = \beta_1`).
    """
    more = list(more)
    max_exp_avg_sq = more.pop(0) if amsgrad else None
    nu_sq = more.pop(0) if rate is not None else None
    w_sq, riem_grad, sq_norm = _riemannian_gradient(w, grad, maximize)
    acc = riem_grad.dtype
    v = exp_avg_sq.to(acc)
    mu, alpha, c_m, c_r, new_sq, new_max = psiadam_coefficients(
        sq_norm, v, max_exp_avg_sq.to(acc) if amsgrad else v, *psiadam_bias_corrections(step, beta1, beta2),
        lr, beta1, beta2, eps, amsgrad, nesterov,
    )  # fmt: skip
    if rate is not None:
        gain, power, pull = rate
        factor = rate_factor(gain, power, nu_sq.to(acc))
        c_m, c_r = c_m * factor, c_r * factor
    w_new, new_avg, growth = _step_rows(w, w_sq, riem_grad, exp_avg, exp_avg is not None, mu, alpha, c_m, c_r)
    states = [new_sq, *([new_max] if amsgrad else [])]
    if rate is not None:
        states.append(next_virtual_sq_norm(nu_sq.to(acc), 1.0 / growth, pull))
    return (w_new, new_avg, *states)


def _psiadasgd_rows(
    w: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    sum_sq: Tensor,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    eps: float,
    maximize: bool,
) -> tuple[Tensor, Tensor | None, Tensor]:
    r"""One PSIAdaSGD step on a ``(k, d)`` matrix of groups.

    ``sum_sq`` (``(k, 1)``) accumulates :math:`\|\nabla f(u_j)\|^2`; the Riemannian
    gradient divided by :math:`\sqrt{\text{sum}} + \epsilon` is the adaptive angular
    step, on which momentum runs as in :func:`psiopt.optim._functional._psisgd_rows`
    (``momentum_buffer=None``: first step, the buffer starts at that step); the
    coefficients are :func:`psiadasgd_coefficients`'s. Returns the new rows, the
    transported buffer (``None`` without momentum) and the new sums.
    """
    w_sq, riem_grad, sq_norm = _riemannian_gradient(w, grad, maximize)
    first = momentum_buffer is None
    mu, alpha, c_m, c_r, new_sum = psiadasgd_coefficients(
        sq_norm, sum_sq.to(riem_grad.dtype), first, lr, momentum, dampening, nesterov, eps
    )
    w_new, new_buf, _ = _step_rows(w, w_sq, riem_grad, momentum_buffer, momentum != 0, mu, alpha, c_m, c_r)
    return w_new, new_buf, new_sum


# -- drivers: one row step applied to lists of tensors ------------------------------------


def _write(target: Tensor | None, value: Tensor, like: Tensor) -> Tensor:
    """Store ``value`` (rows, accumulation dtype) in ``target``, or as a new tensor shaped
    and typed like the parameter ``like`` when there is none yet; returns the stored tensor."""
    value = value.to(like.dtype).reshape(like.shape)
    if target is None:
        # A copy, not a view of a stack, so each state tensor owns its storage.
        return value.clone(memory_format=torch.contiguous_format)
    target.copy_(value)
    return target


def _single_tensor_rows(
    row_step: RowStep,
    params: list[Tensor],
    grads: list[Tensor],
    row_fns: list[Callable[[Tensor], Tensor]],
    row_states: Sequence[list[Tensor | None]],
    group_states: Sequence[list[Tensor]],
    per_tensor: list[dict[str, Any]],
    **options: Any,
) -> None:
    """The reference loop: ``row_step`` on each tensor's ``(k, d)`` group matrix.

    ``row_states`` are lists (one per kind of state) of tensors shaped like the
    parameters (``None``: not yet created); ``group_states`` lists of ``(k,)`` tensors,
    one entry per group (always created: the optimizer initializes them).
    ``row_step(w, g, *row_states, *group_states, **per_tensor[i], **options)`` returns
    the new rows, then the new states in the same order; entries are updated in place
    (``None`` entries replaced by new tensors; a ``None`` result leaves the entry as it
    was).
    """
    for i, param in enumerate(params):
        rows = row_fns[i]
        states = [None if s[i] is None else rows(s[i]) for s in row_states]
        states += [s[i].unsqueeze(1) for s in group_states]
        w_new, *new_states = row_step(rows(param), rows(grads[i]), *states, **per_tensor[i], **options)
        param.copy_(w_new.reshape(param.shape))
        for kind, new in zip(row_states, new_states):
            if new is not None:
                kind[i] = _write(kind[i], new, param)
        for kind, new in zip(group_states, new_states[len(row_states) :]):
            if new is not None:
                kind[i].copy_(new.squeeze(1))


def _multi_tensor_rows(
    row_step: RowStep,
    params: list[Tensor],
    grads: list[Tensor],
    row_fns: list[Callable[[Tensor], Tensor]],
    row_states: Sequence[list[Tensor | None]],
    group_states: Sequence[list[Tensor]],
    per_tensor: list[dict[str, Any]],
    **options: Any,
) -> None:
    """Batched version of :func:`_single_tensor_rows`, same arguments and effects.

    Tensors with the same device, dtype, group size ``d``, per-tensor arguments and
    state status (created or not) are stacked, up to ``_STACK_NUMEL`` elements per
    stack; the row step runs once per stack and the results are split back and written
    with :func:`torch._foreach_copy_`.
    """
    if not params:
        return
    same_kind: dict[Hashable, list[int]] = defaultdict(list)
    for i, param in enumerate(params):
        status = tuple(s[i] is None for s in row_states)
        key = (param.device, param.dtype, row_fns[i](param).shape[1], status, tuple(sorted(per_tensor[i].items())))
        same_kind[key].append(i)
    # Stacking saves kernel launches on many small tensors; copying large ones into a
    # stack only costs memory traffic, hence the cap.
    stacks: list[list[int]] = []
    for members in same_kind.values():
        chunk: list[int] = []
        chunk_numel = 0
        for i in members:
            if chunk and chunk_numel + params[i].numel() > _STACK_NUMEL:
                stacks.append(chunk)
                chunk, chunk_numel = [], 0
            chunk.append(i)
            chunk_numel += params[i].numel()
        stacks.append(chunk)

    def cat(tensors: list[Tensor]) -> Tensor:
        return torch.cat(tensors) if len(tensors) > 1 else tensors[0]

    for idx in stacks:
        w_rows = [row_fns[i](params[i]) for i in idx]
        sizes = [r.shape[0] for r in w_rows]
        states = [None if s[idx[0]] is None else cat([row_fns[i](s[i]) for i in idx]) for s in row_states]
        states += [cat([s[i] for i in idx]).unsqueeze(1) for s in group_states]
        w_new, *new_states = row_step(
            cat(w_rows), cat([row_fns[i](grads[i]) for i in idx]), *states, **per_tensor[idx[0]], **options
        )
        dtype = params[idx[0]].dtype
        torch._foreach_copy_(
            [params[i] for i in idx], [x.reshape(params[i].shape) for i, x in zip(idx, w_new.to(dtype).split(sizes))]
        )
        kinds = [(kind, True) for kind in row_states] + [(kind, False) for kind in group_states]
        for (kind, row_shaped), new in zip(kinds, new_states):
            if new is None:
                continue
            pieces = new.to(dtype).split(sizes)
            pieces = [x.reshape(params[i].shape) if row_shaped else x.reshape(-1) for i, x in zip(idx, pieces)]
            if kind[idx[0]] is not None:
                # Written into the existing tensors: no allocation, and state keeps its tensors.
                torch._foreach_copy_([kind[i] for i in idx], pieces)
            else:
                for i, x in zip(idx, pieces):
                    kind[i] = x.clone(memory_format=torch.contiguous_format)


def _rows_update(foreach: bool | None, params: list[Tensor]):
    """:func:`_multi_tensor_rows` or :func:`_single_tensor_rows`, as a param group's
    ``foreach`` asks; where it is ``None``, torch's default choice for ``params``."""
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return _multi_tensor_rows if foreach else _single_tensor_rows
