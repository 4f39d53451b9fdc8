r"""Triton row kernels of the adaptive PSI steps on CUDA: PSIAdam / PSIAdamW and PSIAdaSGD.

One-pass and row-resident as PSISGD's (:mod:`._triton_kernels`), whose two passes they
share: the reduction pass :func:`row_sums` reads each row once for its six sums
(:func:`psiopt.manifold.step_row_sums`, with :math:`m` the first moment or the momentum),
and one kernel per step reads the sums and the row's scalar state, writes the new
scalar state and writes the row of weights and of :math:`m` once. The reference is
the loop of :mod:`._adaptive` (:func:`~._adaptive._psiadam_rows`,
:func:`~._adaptive._psiadasgd_rows`), the ground truth of the tests.

The algebra
-----------
On a row :math:`w` with gradient :math:`g` (:math:`-g` with ``maximize``, times a
GradScaler's inverse scale), the sums :math:`a = w\cdot w`, :math:`b = g\cdot w`,
:math:`gg = g\cdot g`, :math:`mg, mw, mm` give everything: the horizontal lift is
:math:`r = a\,g - b\,w`, and the invariant squared gradient norm at the unit row is

.. math::

    \sigma = \|\nabla f(u)\|^2 = \|r\|^2 / a = a\,gg - b^2

(:func:`psiopt.manifold.grad_metric_sq_from_sums`, clamped at 0 against rounding).

**PSIAdam**, step :math:`t`: :math:`v' = \beta_2 v + (1-\beta_2)\sigma`
(:math:`\hat v = \max(v_{\max}, v')` with AMSGrad, else :math:`v'`), the denominator
:math:`\delta = \sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon`, the first moment
:math:`m' = \beta_1 m + (1-\beta_1) r` and the step :math:`d = c_m m' + c_r r` with

.. math::

    c_m = \frac{\eta\,\beta_1}{(1-\beta_1^{t+1})\,\delta},\quad
    c_r = \frac{\eta\,(1-\beta_1)}{(1-\beta_1^t)\,\delta} \quad\text{(Nesterov)},
    \qquad c_m = \frac{\eta}{(1-\beta_1^t)\,\delta},\quad c_r = 0 \quad\text{(plain)}.

:func:`psiopt.manifold.adam_step_scalars` turns the sums and :math:`(c_m, c_r)` into
:math:`(s^2, q)`, and the row is written as
:math:`m' = \beta_1 m + (1-\beta_1)(a g - b w)`,
:math:`w' = s\,((1 + c_r b)\,w - c_r a\,g - c_m m')` (the retraction, rescaled to the
norm :math:`\sqrt a` it started from) and :math:`m_{\text{new}} = m' - s q\,w'` (the
transport of :math:`m'` to :math:`w'`).

**PSIAdaSGD**: :math:`S' = S + \sigma` and the row's adaptive factor
:math:`\kappa = 1/(\sqrt{S'} + \epsilon)`; the step is PSISGD's on the gradient
:math:`\kappa g`, whose lift is :math:`\kappa r` and whose sums are
:math:`(a, \kappa b, \kappa^2 gg, \kappa\, mg, mw, mm)`: PSISGD's coefficients
(:func:`._triton_kernels._sgd_coefficients`, from
:func:`psiopt.manifold.one_pass_step_scalars`), first step and Nesterov included.

Each row's step sizes are computed in one place, :func:`_adam_row_steps` (the
:math:`c_m, c_r` of PSIAdam) and :func:`_adasgd_row_factor` (PSIAdaSGD's
:math:`\kappa`): a further per-group factor on the step multiplies there.

Each kernel handles rows that are whole groups (``rows == groups``: a row's scalar
state is entry ``row`` of the ``(k,)`` state tensor). The host's float64 numbers that
change from step to step (the learning rate and the bias corrections) travel as float32
halves (:func:`._triton_kernels.hi_lo`); betas, eps, momentum and dampening are
compile-time constants.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..manifold import adam_step_scalars
from ._triton_kernels import (
    _BLOCK,
    Launch,
    _acc,
    _f64,
    _grad_sq,
    _load_sums,
    _row_major,
    _sgd_coefficients,
    _store_row_state,
    _write_row,
    check_rows,
    compiled,
    device_flag,
    hi_lo,
    row_sums,
)

__all__ = ["row_sums", "psiadam_update", "psiadasgd_update", "adam_host_steps"]

_adam_scalars = compiled(adam_step_scalars)


# -- PSIAdam -------------------------------------------------------------------------------


def adam_host_steps(step: float, *, lr: float, beta1: float, beta2: float, nesterov: bool) -> tuple[float, float, float]:
    r"""The host's part of a PSIAdam step's sizes at step ``step`` (1 on the first):
    :math:`(\eta_m, \eta_r, \sqrt{1-\beta_2^t})`, with :math:`c_m = \eta_m/\delta` and
    :math:`c_r = \eta_r/\delta` (see the module's algebra); the bias corrections and the
    placement of eps are :func:`torch.optim.adam`'s."""
    bias_correction1 = 1 - beta1**step
    if nesterov:
        step_m, step_r = lr * beta1 / (1 - beta1 ** (step + 1)), lr * (1 - beta1) / bias_correction1
    else:
        step_m, step_r = lr / bias_correction1, 0.0
    return step_m, step_r, (1 - beta2**step) ** 0.5


@triton.jit
def _adam_row_steps(second, bias_correction2_sqrt, step_m, step_r, EPS: tl.constexpr):
    """This row's step sizes :math:`(c_m, c_r)`: the host's over the row's denominator."""
    denom = tl.sqrt(second) / bias_correction2_sqrt + EPS
    return step_m / denom, step_r / denom


@triton.jit
def _psiadam_kernel(
    w_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, sums_ptr, refused_ptr, inv_ptr, d, sw, sg, sm,
    step_m_hi, step_m_lo, step_r_hi, step_r_lo, bc2_hi, bc2_lo, sign,
    BETA1: tl.constexpr, BETA2: tl.constexpr, EPS: tl.constexpr, AMSGRAD: tl.constexpr,
    HAS_REFUSED: tl.constexpr, HAS_INV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    inv = tl.load(inv_ptr).to(tl.float64) if HAS_INV else 1.0
    a, b, gg, mg, mw, mm = _load_sums(sums_ptr, row, sign)
    # The second moment, per group, of the invariant squared gradient norm.
    v = BETA2 * tl.load(v_ptr + row).to(tl.float64) + (1.0 - BETA2) * tl.maximum(_grad_sq(a, b, gg), 0.0)
    _store_row_state(v_ptr, row, v, refused_ptr, HAS_REFUSED, ACC)
    if AMSGRAD:
        v = tl.maximum(tl.load(vmax_ptr + row).to(tl.float64), v)
        _store_row_state(vmax_ptr, row, v, refused_ptr, HAS_REFUSED, ACC)
    step_m, step_r = _adam_row_steps(v, _f64(bc2_hi, bc2_lo), _f64(step_m_hi, step_m_lo), _f64(step_r_hi, step_r_lo), EPS)
    s2, q = _adam_scalars(a, b, gg, mg, mw, mm, BETA1, step_m, step_r)
    s = tl.sqrt(s2)
    ga = sign * inv * a  # r = ga * g - b * w, with g the stored (scaled) gradient
    _write_row(
        w_ptr, g_ptr, m_ptr, refused_ptr, row, d, sw, sg, sm,
        tl.full([], BETA1, tl.float64), (1.0 - BETA1) * ga, -(1.0 - BETA1) * b,
        s * (1.0 + step_r * b), -s * step_r * ga, -s * step_m, s * q,
        True, HAS_REFUSED, ACC, BLOCK,
    )  # fmt: skip


def _psiadam_launch(
    w: Tensor,
    g: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    sums: Tensor,
    refused: Tensor | None,
    inv_scale: Tensor | None,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
    nesterov: bool,
) -> Launch:
    step_m, step_r, bias_correction2_sqrt = adam_host_steps(step, lr=lr, beta1=beta1, beta2=beta2, nesterov=nesterov)
    return Launch(
        _psiadam_kernel, (w.shape[0],),
        (w, g, exp_avg, exp_avg_sq, exp_avg_sq if max_exp_avg_sq is None else max_exp_avg_sq, sums,
         w if refused is None else refused, w if inv_scale is None else inv_scale,
         w.shape[1], w.stride(0), g.stride(0), exp_avg.stride(0),
         *hi_lo(step_m), *hi_lo(step_r), *hi_lo(bias_correction2_sqrt), -1.0 if maximize else 1.0),
        dict(BETA1=float(beta1), BETA2=float(beta2), EPS=float(eps), AMSGRAD=max_exp_avg_sq is not None,
             HAS_REFUSED=refused is not None, HAS_INV=inv_scale is not None, ACC=_acc(w), BLOCK=_BLOCK),
    )  # fmt: skip


def psiadam_update(
    ws: list[Tensor],
    gs: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    steps: list[float],
    sums: list[Tensor],
    refused: Tensor | None = None,
    inv_scale: Tensor | None = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
    nesterov: bool,
) -> None:
    r"""One PSIAdam step on every tensor, in place: one kernel launch per tensor, one
    program per row, each reading its row once and writing it once.

    Parameters
    ----------
    ws, gs, exp_avgs : lists of ``(k, d)`` CUDA tensors
        Row views (each row a whole group, unit stride along the row) of the weights,
        their gradients (copied if not row-major) and the first moments; ``ws`` and
        ``exp_avgs`` are written through.
    exp_avg_sqs, max_exp_avg_sqs : lists of ``(k,)`` tensors
        The per-group second moments (``max_exp_avg_sqs`` with AMSGrad, else ``None``).
    steps : list of float
        Each tensor's step count, this step included (1 on the first step).
    sums : list of ``(k, 6)`` tensors
        :func:`row_sums` of ``(ws, gs, exp_avgs, inv_scale)``, taken before this call.
    refused : 0-d tensor, optional
        A device flag (``any`` of :func:`row_sums`' flags, a GradScaler's ``found_inf``):
        when true, nothing at all is written; nothing is read back to the host.
    inv_scale : 0-d tensor, optional
        A GradScaler's ``1 / scale``: the gradients are unscaled in the kernels.
    lr, beta1, beta2, eps, maximize, nesterov
        As in :class:`psiopt.PSIAdam`.
    """
    for i, w in enumerate(ws):  # every tensor checked before any is written
        check_rows(
            w, {"exp_avg": exp_avgs[i]},
            {"exp_avg_sq": exp_avg_sqs[i], "max_exp_avg_sq": None if max_exp_avg_sqs is None else max_exp_avg_sqs[i]},
        )  # fmt: skip
    refused = device_flag(refused)
    for i, w in enumerate(ws):
        if w.shape[0]:
            _psiadam_launch(
                w, _row_major(gs[i]), exp_avgs[i], exp_avg_sqs[i], None if max_exp_avg_sqs is None else max_exp_avg_sqs[i],
                sums[i], refused, inv_scale, step=float(steps[i]), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                maximize=maximize, nesterov=nesterov,
            )()  # fmt: skip


# -- PSIAdaSGD -----------------------------------------------------------------------------


@triton.jit
def _adasgd_row_factor(sum_sq, EPS: tl.constexpr):
    """This row's adaptive factor :math:`\\kappa = 1/(\\sqrt{S'} + \\epsilon)` on its gradient."""
    return 1.0 / (tl.sqrt(sum_sq) + EPS)


@triton.jit
def _psiadasgd_kernel(
    w_ptr, g_ptr, m_ptr, sum_ptr, sums_ptr, refused_ptr, inv_ptr, d, sw, sg, sm, lr_hi, lr_lo, sign,
    EPS: tl.constexpr, MOMENTUM: tl.constexpr, DAMPENING: tl.constexpr, NESTEROV: tl.constexpr, FIRST: tl.constexpr,
    HAS_M: tl.constexpr, HAS_REFUSED: tl.constexpr, HAS_INV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    inv = tl.load(inv_ptr).to(tl.float64) if HAS_INV else 1.0
    a, b, gg, mg, mw, mm = _load_sums(sums_ptr, row, sign)
    sum_sq = tl.load(sum_ptr + row).to(tl.float64) + tl.maximum(_grad_sq(a, b, gg), 0.0)
    _store_row_state(sum_ptr, row, sum_sq, refused_ptr, HAS_REFUSED, ACC)
    k = _adasgd_row_factor(sum_sq, EPS)
    mu, rg, rw, cw, cg, cm, cq = _sgd_coefficients(
        a, k * b, k * k * gg, k * mg, mw, mm, k * sign * inv, _f64(lr_hi, lr_lo),
        MOMENTUM, DAMPENING, NESTEROV, FIRST, HAS_M,
    )  # fmt: skip
    _write_row(w_ptr, g_ptr, m_ptr, refused_ptr, row, d, sw, sg, sm, mu, rg, rw, cw, cg, cm, cq, HAS_M, HAS_REFUSED, ACC, BLOCK)


def _psiadasgd_launch(
    w: Tensor,
    g: Tensor,
    m: Tensor | None,
    sum_sq: Tensor,
    sums: Tensor,
    refused: Tensor | None,
    inv_scale: Tensor | None,
    *,
    first: bool,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    eps: float,
    maximize: bool,
) -> Launch:
    mm = w if m is None else m
    return Launch(
        _psiadasgd_kernel, (w.shape[0],),
        (w, g, mm, sum_sq, sums, w if refused is None else refused, w if inv_scale is None else inv_scale,
         w.shape[1], w.stride(0), g.stride(0), mm.stride(0), *hi_lo(float(lr)), -1.0 if maximize else 1.0),
        dict(EPS=float(eps), MOMENTUM=float(momentum), DAMPENING=float(dampening), NESTEROV=bool(nesterov),
             FIRST=bool(first), HAS_M=m is not None, HAS_REFUSED=refused is not None, HAS_INV=inv_scale is not None,
             ACC=_acc(w), BLOCK=_BLOCK),
    )  # fmt: skip


def psiadasgd_update(
    ws: list[Tensor],
    gs: list[Tensor],
    momentum_buffers: list[Tensor | None],
    sum_sqs: list[Tensor],
    sums: list[Tensor],
    firsts: list[bool],
    refused: Tensor | None = None,
    inv_scale: Tensor | None = None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    eps: float,
    maximize: bool,
) -> None:
    r"""One PSIAdaSGD step on every tensor, in place: one kernel launch per tensor, one
    program per row, each reading its row once and writing it once.

    ``ws``, ``gs``, ``momentum_buffers``: ``(k, d)`` row views as in
    :func:`psiadam_update` (``None`` buffers without momentum; a first step's buffer is
    allocated by the caller, any values, and ``firsts`` marks it: the buffer then starts
    at this step's scaled gradient). ``sum_sqs``: the per-group accumulators ``(k,)``.
    ``sums``, ``refused``, ``inv_scale``: as in :func:`psiadam_update` (the sums taken
    with the momentum buffers). ``lr``, ``momentum``, ``dampening``, ``nesterov``, ``eps``,
    ``maximize``: as in :class:`psiopt.PSIAdaSGD`.
    """
    for i, w in enumerate(ws):  # every tensor checked before any is written
        check_rows(w, {"momentum_buffer": momentum_buffers[i]}, {"sum": sum_sqs[i]})
    refused = device_flag(refused)
    for i, w in enumerate(ws):
        if w.shape[0]:
            _psiadasgd_launch(
                w, _row_major(gs[i]), momentum_buffers[i], sum_sqs[i], sums[i], refused, inv_scale,
                first=firsts[i], lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, eps=eps,
                maximize=maximize,
            )()  # fmt: skip
