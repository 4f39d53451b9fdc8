r"""Triton row kernels of the adaptive PSI steps on CUDA: PSIAdam / PSIAdamW and PSIAdaSGD.

One-pass and row-resident as PSISGD's (:mod:`._triton_kernels`), whose two passes they
share: the reduction pass :func:`row_sums` reads each row once for its six sums
(:func:`psiopt.manifold.step_row_sums`, with :math:`m` the first moment or the momentum),
then one kernel per tensor reads the sums and the row's per-group state, writes the new
state and writes the row of weights and of :math:`m` once. The reference is the loop of
:mod:`._adaptive` (:func:`~._adaptive._psiadam_rows`, :func:`~._adaptive._psiadasgd_rows`),
the ground truth of the tests.

The algebra
-----------
On a row :math:`w` with gradient :math:`g` (:math:`-g` with ``maximize``, times a
GradScaler's inverse scale), the sums :math:`a = w\cdot w`, :math:`b = g\cdot w`,
:math:`gg = g\cdot g`, :math:`mg, mw, mm` give everything. The horizontal lift is
:math:`r = a\,g - b\,w`, and the group's invariant squared gradient norm, the squared
norm of the gradient at the unit row :math:`u = w/\|w\|`, is

.. math::

    sq = \|\nabla f(u)\|^2 = \|r\|^2 / a = a\,gg - b^2

(:func:`psiopt.manifold.grad_metric_sq_from_sums`, clamped at 0 against rounding: the
reference forms :math:`\|r\|^2/a`, never negative). Each rule turns :math:`sq` and the
group's state into the coefficients :math:`(\mu, \alpha, c_m, c_r)` of one step and the
new state, the one home of its formula, also called by the reference loop and compiled
by numba for the CPU (:func:`._adaptive.psiadam_coefficients`: :math:`v' = \beta_2 v +
(1-\beta_2) sq`, AMSGrad's maximum, the denominator :math:`\sqrt{\hat v}/\sqrt{1-\beta_2^t}
+ \epsilon` and torch's bias corrections, NAdam's look-ahead with ``nesterov``;
:func:`._adaptive.psiadasgd_coefficients`: :math:`S' = S + sq`, momentum on the step
:math:`r/(\sqrt{S'} + \epsilon)`). The step is then

.. math::

    m' = \mu\, m + \alpha\, r, \qquad w' = s\,(w - c_m m' - c_r r), \qquad
    m_{\text{new}} = m' - s\,q\,w',

the retraction rescaled to the norm :math:`\sqrt a` the group started from and the
transport of :math:`m'` to :math:`w'`, with :math:`(s^2, q)` from the sums alone
(:func:`psiopt.manifold.one_pass_row_scalars`). In terms of the stored rows it is the
elementwise pass of every PSI step (:func:`._triton_kernels._write_row`):
:math:`m' = \mu m + \alpha a\,g - \alpha b\,w`,
:math:`w' = s(1 + c_r b)\,w - s c_r a\,g - s c_m m'`, :math:`m_{\text{new}} = m' - sq\,w'`.

An angular rate (:mod:`._rates`, ``(gain, power, pull)``) scales :math:`c_m, c_r` by
:func:`._adaptive.rate_factor` of the group's virtual squared norm :math:`\nu^2`, which
the step then moves to :func:`._adaptive.next_virtual_sq_norm` of :math:`s^2`: both
compiled from their one definition, as the rules are. A row whose step is not finite (a
state that no step wrote) is left as it was, with its state, and can be flagged on the
device. :mod:`._triton_adaptive_kernels` drives these kernels from the optimizers.

Each kernel handles rows that are whole groups (``rows == groups``: a row's state is
entry ``row`` of the ``(k,)`` state tensors). The host's float64 numbers that change
from step to step (the learning rate, the bias corrections, the rate's gain and pull)
travel as float32 halves (:func:`._triton_kernels.hi_lo`); betas, eps, momentum,
dampening and the rate's power are compile-time constants.
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch
from torch import Tensor

from ..manifold import one_pass_row_scalars
from ._adaptive import (
    next_virtual_sq_norm,
    psiadam_bias_corrections,
    psiadam_coefficients,
    psiadasgd_coefficients,
    rate_factor,
)
from ._triton_kernels import (
    _BLOCK,
    Launch,
    _acc,
    _f64,
    _grad_sq,
    _load_sums,
    _row_major,
    _store_row_state,
    _write_row,
    check_rows,
    compiled,
    device_flag,
    hi_lo,
    row_sums,
)

__all__ = ["row_sums", "psiadam_update", "psiadasgd_update"]



@triton.jit
def _sqrt(x):
    return tl.sqrt(x)


@triton.jit
def _maximum(x, y):
    # Jitted wrappers, not tl.sqrt and tl.maximum themselves: the interpreter swaps
    # triton.language's functions for its own while a kernel runs, and a reference taken
    # before then would miss the swap.
    return tl.maximum(x, y)


_row_scalars = compiled(one_pass_row_scalars)
_psiadam_rule = compiled(psiadam_coefficients, sqrt=_sqrt, maximum=_maximum)
_psiadasgd_rule = compiled(psiadasgd_coefficients, sqrt=_sqrt, maximum=_maximum)
_rate_factor = compiled(rate_factor, sqrt=_sqrt)
_next_virtual_sq_norm = compiled(next_virtual_sq_norm)


@triton.jit
def _adaptive_kernel(
    w_ptr, g_ptr, m_ptr, s0_ptr, s1_ptr, nu_ptr, sums_ptr, refused_ptr, left_ptr, inv_ptr, d, sw, sg, sm,
    lr_hi, lr_lo, x0_hi, x0_lo, x1_hi, x1_lo, x2_hi, x2_lo, gain_hi, gain_lo, pull_hi, pull_lo, sign,
    ADAM: tl.constexpr, BETA1: tl.constexpr, BETA2: tl.constexpr, AMSGRAD: tl.constexpr,
    MOMENTUM: tl.constexpr, DAMPENING: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr, EPS: tl.constexpr,
    HAS_RATE: tl.constexpr, POWER: tl.constexpr, HAS_M: tl.constexpr, HAS_REFUSED: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_INV: tl.constexpr, ACC: tl.constexpr, TINY: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: the rule's coefficients and new state (``ADAM``: PSIAdam's, state
    ``s0`` = v, ``s1`` = v_max, ``x`` = the bias corrections; else PSIAdaSGD's, state
    ``s0`` = S), scaled by an angular rate's factor (``HAS_RATE``: the virtual squared
    norm ``nu``, moved after the step), then the step's scalars and the row written once.
    A row whose step is not finite (a state that no step wrote: changed from outside the
    optimizer) is left as it was, its state too, and marked in ``left`` (``HAS_LEFT``)."""
    row = tl.program_id(0).to(tl.int64)
    inv = tl.load(inv_ptr).to(tl.float64) if HAS_INV else 1.0
    a, b, gg, mg, mw, mm = _load_sums(sums_ptr, row, sign)
    sq = tl.maximum(_grad_sq(a, b, gg), 0.0)
    lr = _f64(lr_hi, lr_lo)
    s0 = tl.load(s0_ptr + row).to(tl.float64)
    if ADAM:
        v_max = tl.load(s1_ptr + row).to(tl.float64) if AMSGRAD else s0
        # The betas and eps as float64 values, not constants: the rule returns beta1 and
        # 1 - beta1, and Triton makes a returned constant a float32.
        mu, alpha, c_m, c_r, new0, new1 = _psiadam_rule(
            sq, s0, v_max, _f64(x0_hi, x0_lo), _f64(x1_hi, x1_lo), _f64(x2_hi, x2_lo), lr,
            tl.full([], BETA1, tl.float64), tl.full([], BETA2, tl.float64), tl.full([], EPS, tl.float64),
            AMSGRAD, NESTEROV,
        )  # fmt: skip
    else:
        mu, alpha, c_m, c_r, new0 = _psiadasgd_rule(sq, s0, FIRST, lr, MOMENTUM, DAMPENING, NESTEROV, EPS)
    if HAS_RATE:
        nu_sq = tl.load(nu_ptr + row).to(tl.float64)
        factor = _rate_factor(_f64(gain_hi, gain_lo), POWER, nu_sq)
        c_m, c_r = c_m * factor, c_r * factor
    s2, q = _row_scalars(a, b, sq, mg, mw, mm, mu, alpha, c_m, c_r)
    s = tl.sqrt(s2)
    # x - x == 0 is false for a NaN or an infinity.
    ok = (a > TINY) & (s - s == 0) & (q - q == 0) & (s * c_m - s * c_m == 0) & (s * c_r - s * c_r == 0)
    if HAS_LEFT:
        tl.atomic_max(left_ptr, tl.where(ok, 0, 1))
    _store_row_state(s0_ptr, row, tl.where(ok, new0, s0), refused_ptr, HAS_REFUSED, ACC)
    if AMSGRAD:  # PSIAdam's only
        _store_row_state(s1_ptr, row, tl.where(ok, new1, v_max), refused_ptr, HAS_REFUSED, ACC)
    if HAS_RATE:
        nu_new = _next_virtual_sq_norm(nu_sq, s2, _f64(pull_hi, pull_lo))
        _store_row_state(nu_ptr, row, tl.where(ok, nu_new, nu_sq), refused_ptr, HAS_REFUSED, ACC)
    ga = sign * inv * a  # r = ga * g - b * w, with g the stored (scaled) gradient
    # A row left as it was takes the identity: m' = m and w' = w, exactly.
    one = tl.full([], 1.0, tl.float64)
    zero = tl.full([], 0.0, tl.float64)
    _write_row(
        w_ptr, g_ptr, m_ptr, refused_ptr, row, d, sw, sg, sm,
        tl.where(ok, mu, one), tl.where(ok, alpha * ga, zero), tl.where(ok, -alpha * b, zero),
        tl.where(ok, s * (1.0 + c_r * b), one), tl.where(ok, -s * c_r * ga, zero), tl.where(ok, -s * c_m, zero),
        tl.where(ok, s * q, zero), HAS_M, HAS_REFUSED, ACC, BLOCK,
    )  # fmt: skip


def _adaptive_launch(
    w: Tensor,
    g: Tensor,
    m: Tensor | None,
    states: tuple[Tensor, Tensor | None],
    sums: Tensor,
    refused: Tensor | None,
    inv_scale: Tensor | None,
    host: tuple[float, float, float],
    *,
    adam: bool,
    lr: float,
    maximize: bool,
    rate: tuple[Tensor, tuple[float, float, float]] | None = None,
    left: Tensor | None = None,
    **constants,
) -> Launch:
    """The launch of :func:`_adaptive_kernel` on one tensor's rows; ``refused``: an int32
    flag (:func:`._triton_kernels.device_flag`); ``host``: the rule's per-tensor numbers;
    ``rate``: the virtual squared norms and the ``(gain, power, pull)`` of an angular
    rate; ``left``: a 0-d int32 flag, set where a row is left as it was."""
    mm = w if m is None else m
    s0, s1 = states
    nu, (gain, power, pull) = (s0, (0.0, 1.0, 0.0)) if rate is None else rate
    x = [part for value in host for part in hi_lo(float(value))]
    return Launch(
        _adaptive_kernel, (w.shape[0],),
        (w, g, mm, s0, s0 if s1 is None else s1, nu, sums, w if refused is None else refused,
         s0 if left is None else left, w if inv_scale is None else inv_scale, w.shape[1], w.stride(0), g.stride(0),
         mm.stride(0), *hi_lo(float(lr)), *x, *hi_lo(float(gain)), *hi_lo(float(pull)), -1.0 if maximize else 1.0),
        dict(ADAM=adam, **{name.upper(): value for name, value in constants.items()}, HAS_RATE=rate is not None,
             POWER=float(power), HAS_M=m is not None, HAS_REFUSED=refused is not None, HAS_LEFT=left is not None,
             HAS_INV=inv_scale is not None, ACC=_acc(w), TINY=torch.finfo(sums.dtype).tiny, BLOCK=_BLOCK),
    )  # fmt: skip


def _psiadam_launch(
    w, g, exp_avg, exp_avg_sq, max_exp_avg_sq, sums, refused, inv_scale, *, step, lr, beta1, beta2, eps, maximize,
    nesterov, rate=None, left=None,
) -> Launch:  # fmt: skip
    return _adaptive_launch(
        w, g, exp_avg, (exp_avg_sq, max_exp_avg_sq), sums, refused, inv_scale,
        psiadam_bias_corrections(float(step), float(beta1), float(beta2)), adam=True, lr=lr, maximize=maximize,
        rate=rate, left=left, beta1=float(beta1), beta2=float(beta2), amsgrad=max_exp_avg_sq is not None,
        momentum=0.0, dampening=0.0, first=False, nesterov=bool(nesterov), eps=float(eps),
    )  # fmt: skip


def _psiadasgd_launch(
    w, g, m, sum_sq, sums, refused, inv_scale, *, first, lr, momentum, dampening, nesterov, eps, maximize, left=None
) -> Launch:
    return _adaptive_launch(
        w, g, m, (sum_sq, None), sums, refused, inv_scale, (0.0, 0.0, 0.0), adam=False, lr=lr, maximize=maximize,
        left=left, beta1=0.0, beta2=0.0, amsgrad=False, momentum=float(momentum), dampening=float(dampening),
        first=bool(first), nesterov=bool(nesterov), eps=float(eps),
    )  # fmt: skip


def psiadam_update(
    ws: list[Tensor],
    gs: list[Tensor],
    exp_avgs: list[Tensor | None],
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
    rate: tuple[float, float, float] | None = None,
    virtual_sq_norms: list[Tensor] | None = None,
    left: list[Tensor] | None = None,
) -> None:
    r"""One PSIAdam step on every tensor, in place: one kernel launch per tensor, one
    program per row, each reading its row once and writing it once.

    Parameters
    ----------
    ws, gs, exp_avgs : lists of ``(k, d)`` CUDA tensors
        Row views (each row a whole group, unit stride along the row) of the weights,
        their gradients (copied if not row-major) and the first moments (``None``
        entries: none is kept, the step of ``beta1 == 0`` with ``nesterov``); ``ws`` and
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
    rate : tuple of float, optional
        The ``(gain, power, pull)`` of an angular rate (:mod:`._rates`): each group's
        :math:`c_m, c_r` times :func:`._adaptive.rate_factor` of its virtual squared
        norm, which then moves by :func:`._adaptive.next_virtual_sq_norm`.
    virtual_sq_norms : list of ``(k,)`` tensors, optional
        The virtual squared norms, given exactly with ``rate``; written.
    left : list of 0-d int32 tensors, optional
        Per tensor, set to 1 where a row is left as it was, its state too: a state that
        gives no finite step (values no step wrote). Such a row is left as it was with
        or without ``left``; nothing is read back to the host.

    Every tensor's layout is checked (:func:`._triton_kernels.check_rows`) before any is
    written.
    """
    for i, w in enumerate(ws):
        check_rows(
            w, {"exp_avg": exp_avgs[i]},
            {"exp_avg_sq": exp_avg_sqs[i], "max_exp_avg_sq": None if max_exp_avg_sqs is None else max_exp_avg_sqs[i],
             "virtual_sq_norm": None if virtual_sq_norms is None else virtual_sq_norms[i]},
        )  # fmt: skip
    if (rate is None) != (virtual_sq_norms is None):
        raise ValueError("an angular rate needs the virtual squared norms, and they need the rate")
    refused = device_flag(refused)
    for i, w in enumerate(ws):
        if w.shape[0]:
            _psiadam_launch(
                w, _row_major(gs[i]), exp_avgs[i], exp_avg_sqs[i], None if max_exp_avg_sqs is None else max_exp_avg_sqs[i],
                sums[i], refused, inv_scale, step=steps[i], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                maximize=maximize, nesterov=nesterov, rate=None if rate is None else (virtual_sq_norms[i], rate),
                left=None if left is None else left[i],
            )()  # fmt: skip


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
    left: list[Tensor] | None = None,
) -> None:
    r"""One PSIAdaSGD step on every tensor, in place: one kernel launch per tensor, one
    program per row, each reading its row once and writing it once.

    ``ws``, ``gs``, ``momentum_buffers``: ``(k, d)`` row views as in
    :func:`psiadam_update` (``None`` buffers without momentum; a first step's buffer is
    allocated by the caller, any values, and ``firsts`` marks it: the buffer then starts
    at this step's scaled gradient). ``sum_sqs``: the per-group accumulators ``(k,)``.
    ``sums``, ``refused``, ``inv_scale``, ``left``: as in :func:`psiadam_update` (the sums
    taken with the momentum buffers). ``lr``, ``momentum``, ``dampening``, ``nesterov``, ``eps``,
    ``maximize``: as in :class:`psiopt.PSIAdaSGD`.
    """
    for i, w in enumerate(ws):
        check_rows(w, {"momentum_buffer": momentum_buffers[i]}, {"sum": sum_sqs[i]})
    refused = device_flag(refused)
    for i, w in enumerate(ws):
        if w.shape[0]:
            _psiadasgd_launch(
                w, _row_major(gs[i]), momentum_buffers[i], sum_sqs[i], sums[i], refused, inv_scale,
                first=firsts[i], lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, eps=eps,
                maximize=maximize, left=None if left is None else left[i],
            )()  # fmt: skip
