r"""Compiled CPU row kernels of the adaptive steps (PSIAdam, PSIAdamW, PSIAdaSGD), built with numba.

Imported only when a fused adaptive step runs on the CPU (see :mod:`._cpu_kernels` for
why numba, and how its compiled code is kept). One step on a param group's float32 or
float64 tensors is two compiled calls, each over every tensor of the group, reading
the rows in place from a table of their addresses (:class:`AdaptiveRows`, kept by the
optimizer from one step to the next):

1. the **check pass**: per row, :math:`gg = g\cdot g`, reading the gradient only, and
   whether the row can be stepped (a finite sum, a finite record of the last written
   first moment); where a weight may have been written by anything but the write pass
   (the first step, or an in-place operation that torch's version counter saw), also
   :math:`a = w\cdot w` and :math:`b = g\cdot w` and a nonzero, finite norm (the loops
   of PSISGD's kernels). The call also checks the group's other gradients;
2. the **write pass**, row-resident: per row, the weights, gradient and first moment
   read once for the six sums :math:`a, b, gg, m\cdot g, m\cdot w, m\cdot m`, the
   invariant squared gradient norm :math:`sq = a\,gg - b^2`
   (:func:`psiopt.manifold.grad_metric_sq_from_sums`), the rule's coefficients and new
   per-group state from it (:func:`._adaptive.psiadam_coefficients`,
   :func:`._adaptive.psiadasgd_coefficients`), the step's scalars
   (:func:`psiopt.manifold.one_pass_row_scalars`), and the row written while in cache:

   .. math::

       m' = \mu m + \alpha(a g - b w), \quad
       w' = s\bigl((1 + c_r b) w - c_r a\, g - c_m m'\bigr), \quad
       m \leftarrow m' - s q\, w' .

So a step moves 6 tensor-sized streams (1 + 3 read, 2 written); torch's fused Adam moves
7 (4 read, 3 written). Every formula is compiled from its one Python definition; the
rules' ``sqrt`` and ``maximum`` are bound to numba's here (a CUDA module binds
Triton's). The first moment and the state are checked without a read: the write pass
records each written row's squared norm (column 5 of the kept sums) and the next check
pass refuses a row whose record is not finite; the caller checks a new
:class:`AdaptiveRows`'s state once (:func:`all_finite`). A row that the write pass
cannot step (a zero or non-finite weight norm, or a first moment or state that gives no
finite step: values written from outside the optimizer, behind the version counter) is
left as it is and reported.
"""

from __future__ import annotations

import functools
import math
import types as pytypes
from collections.abc import Callable
from typing import NamedTuple

import numba
import numpy as np
import torch
from torch import Tensor

from ..manifold import grad_metric_sq_from_sums, one_pass_row_scalars
from . import _adaptive
from ._adaptive_step import _KeptRows
from ._cpu_kernels import (
    _FASTMATH,
    _NO_TENSORS,
    _all_finite,
    _any_bad_row,
    _float64_momentum_sums,
    _make_views,
    _make_weight_gradient_sums,
    _pointer,
    all_finite,
    finite_table,
    supports,
)

__all__ = ["AdaptiveRows", "RULES", "all_finite", "supports"]

# Every compiled function of the step: fastmath as _cpu_kernels (no nnan/ninf), and numpy's
# error model, under which a division by zero or the square root of a negative number gives
# an infinity or a NaN (which the write pass tells apart) instead of raising.
_ARITHMETIC = {"fastmath": _FASTMATH, "nogil": True, "error_model": "numpy"}

_row_scalars = numba.njit(one_pass_row_scalars, **_ARITHMETIC)
_grad_sq = numba.njit(grad_metric_sq_from_sums, **_ARITHMETIC)

# Where a gg - b^2 < _CANCELLING a gg (the gradient within about 6 degrees of the weights,
# which a scale-invariant weight's never is), the two terms cancel and the rows' rounding
# of a, b, gg is amplified more than 100 times: sq is then taken from r itself.
_CANCELLING = 1e-2


@numba.njit(**_ARITHMETIC)
def _exact_grad_sq(w, g, j, a, b, sign):  # pragma: no cover - compiled
    r"""sq = \|r\|^2 / a of row ``j``, from :math:`r = a\,(\pm g) - b\,w` entry by entry, in
    float64 (the row is in cache: it was just read for its sums)."""
    rr = 0.0
    ga = sign * a
    for i in range(w.shape[1]):
        ri = ga * np.float64(g[j, i]) - b * np.float64(w[j, i])
        rr += ri * ri
    return rr / a


def _compiled(rule):
    # The rule's one definition, compiled with numba's sqrt and maximum as its globals.
    code = pytypes.FunctionType(rule.__code__, {"sqrt": math.sqrt, "maximum": max}, rule.__name__)
    return numba.njit(code, **_ARITHMETIC)


_adam = _compiled(_adaptive.psiadam_coefficients)
_adasgd = _compiled(_adaptive.psiadasgd_coefficients)
_rate_factor = _compiled(_adaptive.rate_factor)
_next_virtual_sq_norm = _compiled(_adaptive.next_virtual_sq_norm)


_adam_bias_corrections = numba.njit(_adaptive.psiadam_bias_corrections, **_ARITHMETIC)


# Each rule as the write pass calls it. Per row: (sq, state0, state1, x0, x1, x2, hyper) ->
# (mu, alpha, c_m, c_r, new state0, new state1), with x the tensor's scalars and hyper the
# param group's hyperparameters as a tuple of floats (AdaptiveRows.update). Per tensor,
# where the tensor has a step counter: (count, hyper) -> its scalars (x0, x1, x2).


@numba.njit(**_ARITHMETIC)
def _adam_rows(sq, v, v_max, bc1, bc1_next, bc2_sqrt, hyper):  # pragma: no cover - compiled
    lr, beta1, beta2, eps, amsgrad, nesterov = hyper
    return _adam(sq, v, v_max, bc1, bc1_next, bc2_sqrt, lr, beta1, beta2, eps, amsgrad != 0.0, nesterov != 0.0)


@numba.njit(**_ARITHMETIC)
def _adam_tensor(step, hyper):  # pragma: no cover - compiled
    return _adam_bias_corrections(step, hyper[1], hyper[2])


@numba.njit(**_ARITHMETIC)
def _adasgd_rows(sq, total, unused, first, x1, x2, hyper):  # pragma: no cover - compiled
    lr, momentum, dampening, nesterov, eps = hyper
    mu, alpha, c_m, c_r, total = _adasgd(sq, total, first != 0.0, lr, momentum, dampening, nesterov != 0.0, eps)
    return mu, alpha, c_m, c_r, total, total


@numba.njit(**_ARITHMETIC)
def _no_counter(step, hyper):  # pragma: no cover - compiled
    return 0.0, 0.0, 0.0  # never called: an AdaSGD tensor has no step counter


RULES = {"adam": (_adam_rows, _adam_tensor), "adasgd": (_adasgd_rows, _no_counter)}
"""The rules by name, each a pair (per-row coefficients, per-tensor scalars from a step
counter): ``"adam"`` (hyper ``(lr, beta1, beta2, eps, amsgrad, nesterov)``; the tensor's
scalars :func:`._adaptive.psiadam_bias_corrections` of its step counter, ``"step"``, which
the write pass increments; states ``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq``)
and ``"adasgd"`` (hyper ``(lr, momentum, dampening, nesterov, eps)``; no counter, the
tensor's scalars ``(first, 0, 0)`` from the caller; state ``sum``)."""


@functools.cache  # one compiled function per dtype
def _make_write_rows(cast):
    r"""The write loop of row ``j``, in the rows' precision: with a first moment,
    :math:`m' = \mu m + g_a g + w_a w`, :math:`w' = n_w w + n_g g + n_m m'`,
    :math:`m \leftarrow m' - s_q w'`, returning :math:`\|m_{new}\|^2` (the record the next
    check pass reads); without one, :math:`w' = n_w w + n_g g`."""

    @numba.njit(**_ARITHMETIC)
    def write_rows(w, g, m, has_m, j, mu, ga, wa, nw, ng, nm, sq):  # pragma: no cover - compiled
        written = cast(0.0)
        if not has_m:
            for i in range(w.shape[1]):
                w[j, i] = nw * w[j, i] + ng * g[j, i]
            return written
        for i in range(w.shape[1]):
            wi = w[j, i]
            gi = g[j, i]
            mp = mu * m[j, i] + ga * gi + wa * wi
            wn = nw * wi + ng * gi + nm * mp
            mn = mp - sq * wn
            w[j, i] = wn
            m[j, i] = mn
            written += mn * mn
        return written

    return write_rows


@functools.cache  # one compiled function per dtype
def _make_six_sums(cast):
    r"""The six sums of row ``j``, :math:`w\cdot w, g\cdot w, g\cdot g, m\cdot g, m\cdot w,
    m\cdot m`, in one loop, accumulated in the rows' dtype: three rows read from memory at
    once (the write pass's only read of them; two loops, one per three sums, measured
    slower with cold caches, where more streams at once bring more bandwidth)."""

    @numba.njit(**_ARITHMETIC)
    def six_sums(w, g, m, j):  # pragma: no cover - compiled
        a = cast(0.0)
        b = cast(0.0)
        gg = cast(0.0)
        mg = cast(0.0)
        mw = cast(0.0)
        mm = cast(0.0)
        for i in range(w.shape[1]):
            wi = w[j, i]
            gi = g[j, i]
            mi = m[j, i]
            a += wi * wi
            b += gi * wi
            gg += gi * gi
            mg += mi * gi
            mw += mi * wi
            mm += mi * mi
        return a, b, gg, mg, mw, mm

    return six_sums


@functools.cache  # one compiled function per dtype
def _make_gradient_sq(cast):
    r""":math:`g\cdot g` of rows ``j`` and ``j2``, accumulated in the rows' dtype, in one
    loop: two streams from memory at once (a single one brings less bandwidth; measured
    about 10% faster with cold caches)."""

    @numba.njit(**_ARITHMETIC)
    def gradient_sq(g, j, j2):  # pragma: no cover - compiled
        gg = cast(0.0)
        gg2 = cast(0.0)
        for i in range(g.shape[1]):
            gg += g[j, i] * g[j, i]
            gg2 += g[j2, i] * g[j2, i]
        return gg, gg2

    return gradient_sq


def _make_check(cast):
    r"""The check pass on one tensor's rows, for one dtype: :math:`g\cdot g` per row into
    column 2 of ``out``, and with ``read_weights`` :math:`w\cdot w` and :math:`g\cdot w`
    into columns 0 and 1 (the loops of PSISGD's kernels). Whether a row is bad: a sum not
    finite, a zero or underflowing :math:`w\cdot w` (column 0 keeps the value the last
    write pass found, when the weights are not read), or a non-finite record of the
    last written first moment (column 5)."""
    tiny = float(np.finfo(cast).tiny)
    weight_gradient_sums, gradient_sq = _make_weight_gradient_sums(cast), _make_gradient_sq(cast)

    @numba.njit(**_ARITHMETIC)
    def check(w, g, read_weights, out):  # pragma: no cover - compiled
        k = g.shape[0]
        if read_weights:
            inv = cast(1.0)  # the shared sum loops take a gradient scale; these steps have none
            for j in range(k):
                out[j, 0], out[j, 1], out[j, 2] = weight_gradient_sums(w, g, j, inv)
        else:
            half = k // 2  # rows j and half + j together; the last one of an odd count with itself
            for j in range(half):
                out[j, 2], out[half + j, 2] = gradient_sq(g, j, half + j)
            if k % 2:
                out[k - 1, 2] = gradient_sq(g, k - 1, k - 1)[0]
        return _any_bad_row(out, tiny)

    return check


def _make_update(cast, rule):
    """The write pass on one tensor's rows, for one dtype and rule: returns whether a row
    was left as it was (a zero or non-finite weight row, or a first moment or state that
    gives no finite step)."""
    tiny = float(np.finfo(cast).tiny)
    write_rows, six_sums = _make_write_rows(cast), _make_six_sums(cast)
    weight_gradient_sums = _make_weight_gradient_sums(cast)

    @numba.njit(**_ARITHMETIC)
    def update(w, g, m, has_m, sums, s0, s1, nu_sq, n_states, x0, x1, x2, hyper, rate, sign):  # pragma: no cover
        inv = cast(1.0)
        bad = False
        has_rate, gain, power, pull = rate
        for j in range(w.shape[0]):
            mg = mw = mm = 0.0
            if has_m:
                a32, b32, gg32, mg32, mw32, mm32 = six_sums(w, g, m, j)
                mg, mw, mm = np.float64(mg32), np.float64(mw32), np.float64(mm32)
                if not (math.isfinite(mg) and math.isfinite(mw) and math.isfinite(mm)):
                    mg, mw, mm = _float64_momentum_sums(w, g, m, j)  # float32 sums that overflowed
                mg = sign * mg
            else:
                a32, b32, gg32 = weight_gradient_sums(w, g, j, inv)
            a, b, gg = np.float64(a32), sign * np.float64(b32), np.float64(gg32)
            sq = _grad_sq(a, b, gg)
            if not sq > _CANCELLING * a * gg:  # g nearly along w: a gg and b^2 cancel; sq from r itself
                sq = _exact_grad_sq(w, g, j, a, b, sign)
            mu, alpha, c_m, c_r, new0, new1 = rule(sq, s0[j], s1[j], x0, x1, x2, hyper)
            if has_rate:
                factor = _rate_factor(gain, power, np.float64(nu_sq[j]))
                c_m, c_r = c_m * factor, c_r * factor
            s2, q = _row_scalars(a, b, sq, mg, mw, mm, mu, alpha, c_m, c_r)
            s = math.sqrt(s2)
            if not (a > tiny and math.isfinite(s) and math.isfinite(q) and math.isfinite(s * c_m) and math.isfinite(s * c_r)):
                bad = True  # see AdaptiveRows.update: the row is left as it is
                sums[j, 5] = math.inf
                continue
            sums[j, 0] = a
            sums[j, 5] = write_rows(
                w, g, m, has_m, j, cast(mu), cast(sign * alpha * a), cast(-alpha * b), cast(s * (1.0 + c_r * b)),
                cast(-sign * s * c_r * a), cast(-s * c_m), cast(s * q),
            )  # fmt: skip
            if n_states > 0:
                s0[j] = new0
            if n_states > 1:
                s1[j] = new1
            if has_rate:
                nu_sq[j] = _next_virtual_sq_norm(np.float64(nu_sq[j]), s2, pull)
        return bad

    return update


# Columns of the int64 table of one batched call, one row per tensor: the addresses of the
# rows of weights, gradient, first moment (the weights' without one) and sums, the rows
# and entries per row, whether the check pass reads the weights, the addresses of up to
# two per-group states of the rule and of the virtual squared norm of an angular rate (the
# sums' where there are none: never read), and the address of the tensor's step counter
# (0: none) with its itemsize (4: float32, 8: float64).
_W, _G, _M, _S, _ROWS, _COLS, _READ_W, _STATE0, _STATE1, _NU_SQ, _COUNTER, _COUNTER_SIZE = range(12)


class _Passes(NamedTuple):
    check: Callable
    update: Callable


@functools.cache  # compiled on first use, per dtype and rule
def _make_batched(dtype: torch.dtype, rule_name: str) -> _Passes:
    cast = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    rows_rule, tensor_rule = RULES[rule_name]
    check_kernel, update_kernel = _make_check(cast), _make_update(cast, rows_rule)

    views = _make_views(cast)  # the first six columns of the table are _cpu_kernels'

    @numba.njit(nogil=True)
    def check(table, bad, others):  # pragma: no cover - compiled
        # Also whether every entry of the tensors of `others` (finite_table) is finite.
        for t in range(table.shape[0]):
            if table[t, _ROWS] > 0:
                w, g, _, sums = views(table, t)
                bad[t] = check_kernel(w, g, table[t, _READ_W] != 0, sums)
        return _all_finite(others)

    @numba.njit(nogil=True)
    def update(table, xs, hyper, rate, has_m, n_states, sign, skip, bad):  # pragma: no cover - compiled
        for t in range(table.shape[0]):
            k = table[t, _ROWS]
            if skip[t]:
                continue
            x0, x1, x2 = xs[t, 0], xs[t, 1], xs[t, 2]
            count = 0.0
            if table[t, _COUNTER] != 0:  # this step is the counter's next
                if table[t, _COUNTER_SIZE] == 4:
                    count = np.float64(numba.carray(_pointer(table[t, _COUNTER]), (1,), np.float32)[0]) + 1.0
                else:
                    count = numba.carray(_pointer(table[t, _COUNTER]), (1,), np.float64)[0] + 1.0
                x0, x1, x2 = tensor_rule(count, hyper)
            if k > 0:
                w, g, m, sums = views(table, t)
                bad[t] = update_kernel(
                    w, g, m, has_m, sums,
                    numba.carray(_pointer(table[t, _STATE0]), (k,), cast),
                    numba.carray(_pointer(table[t, _STATE1]), (k,), cast),
                    numba.carray(_pointer(table[t, _NU_SQ]), (k,), cast),
                    n_states, x0, x1, x2, hyper, rate, sign,
                )  # fmt: skip
            if table[t, _COUNTER] != 0:
                if table[t, _COUNTER_SIZE] == 4:
                    numba.carray(_pointer(table[t, _COUNTER]), (1,), np.float32)[0] = count
                else:
                    numba.carray(_pointer(table[t, _COUNTER]), (1,), np.float64)[0] = count

    return _Passes(check, update)


class AdaptiveRows(_KeptRows):
    """One param group's scale-invariant tensors as the compiled calls read them, kept by
    the optimizer from one step to the next: the entry point of these kernels.

    ``rule`` names the step (:data:`RULES`). ``params`` are the weights, of one dtype;
    ``rows[i]`` maps a tensor laid out like ``params[i]`` to its ``(k, d)`` row view, one
    row per group (a view: the row plan of a plain tensor with a row view).
    ``moments[i]`` is the first moment of ``params[i]``, laid out like it, or
    ``moments=None`` for a rule without one; ``states[i]`` a tuple of 0 to 2 contiguous
    ``(k,)`` tensors of the weights' dtype, the per-group state that the rule reads and
    writes, followed, with ``has_rate``, by the virtual squared norm of an angular rate
    (:mod:`._rates`; same layout), which scales the rule's step and which the update
    moves; ``counters[i]`` (``None``: none) a 0-d float32 or float64 CPU tensor, the step
    count from which the rule computes the tensor's scalars, incremented by each update.
    The caller checks the first moments and states once (:func:`all_finite`) before it
    makes a batch: afterwards only what the kernels wrote is read.

    A step is :meth:`check`, then, if no row is bad, :meth:`update`. Both hold while the
    weights stay where they were and the first moments and states are the same tensors
    (:meth:`matches`).
    """

    def __init__(self, rule: str, params: list[Tensor], moments: list[Tensor] | None,
                 states: list[tuple[Tensor, ...]], rows: list, counters: list[Tensor] | None = None, *,
                 has_rate: bool = False) -> None:  # fmt: skip
        super().__init__(params, moments, states, counters)
        self.rule, self.has_rate = rule, has_rate
        self.n_states = len(self.states[0]) - has_rate if params else 0  # the rule's own states
        ws = [r(p) for r, p in zip(rows, params)]
        ms = None if moments is None else [r(m) for r, m in zip(rows, moments)]
        if (
            any(p.dtype != self.dtype for p in params)
            or any(len(s) != self.n_states + has_rate for s in self.states)
            or not 0 <= self.n_states <= 2
        ):
            raise ValueError(
                "AdaptiveRows holds tensors of one dtype with the same number (0 to 2) of per-group states of the "
                "rule, then the virtual squared norm where has_rate"
            )
        if not all(w.is_contiguous() for w in ws) or (ms is not None and not all(m.is_contiguous() for m in ms)):
            raise RuntimeError("the adaptive kernels write weights and first moments in place: their row views must be contiguous")
        counts = [w.shape[0] for w in ws]
        self.sums = list(torch.zeros(sum(counts), 6, dtype=torch.float64).split_with_sizes(counts))
        table = []
        for i, (w, rows_sums) in enumerate(zip(ws, self.sums)):
            state = self.states[i]
            if any(s.shape != (w.shape[0],) or s.dtype != self.dtype or not s.is_contiguous() for s in state):
                raise ValueError("each per-group state must be a contiguous (rows,) tensor of the weights' dtype")
            unused = rows_sums.data_ptr()  # a valid address, never read
            rule_states = [s.data_ptr() for s in state[: self.n_states]] + [unused] * (2 - self.n_states)
            nu_sq = state[-1].data_ptr() if has_rate else unused
            m = w if ms is None else ms[i]
            counter = (0, 0) if counters is None else (counters[i].data_ptr(), counters[i].element_size())
            table.append((w.data_ptr(), w.data_ptr(), m.data_ptr(), rows_sums.data_ptr(), *w.shape, 0,
                          *rule_states, nu_sq, *counter))  # fmt: skip
        self.table = np.array(table, dtype=np.int64).reshape(-1, 12)
        self.flags = np.zeros(len(params), dtype=np.bool_)
        self.skip = np.zeros(len(params), dtype=np.bool_)
        self.xs = np.zeros((len(params), 3), dtype=np.float64)
        self.versions = [None] * len(params)  # the first check reads the weights
        self._views = (ws, ms)  # the table points into them
        self._grads: list[Tensor] | None = None

    def check(self, grads: list[Tensor], others: list[Tensor] = ()) -> list[int] | None:
        """The check pass with these gradients (any layout: one not laid out as its weight
        is copied into that layout for this step), and in the same compiled call the check
        that every entry of ``others`` (the group's other gradients) is finite. Returns the
        positions of the tensors with a bad row: a gradient sum not finite, a first-moment
        row that the last step wrote non-finite, or, where the weights may have been
        written by anything but this batch's update (the first check, or a changed version
        counter: an in-place operation on the parameter), a weight sum not finite or a
        zero or underflowing squared norm. The weights that only the update wrote are not
        read: its write pass has their sums at hand, and leaves a bad row as it is (see
        :meth:`update`). ``None`` where an entry of ``others`` is not finite, or one of
        them is not a dense CPU float32 or float64 tensor, or a gradient is sparse."""
        others_table = finite_table(others) if others else _NO_TENSORS
        if others_table is None or any(g.layout != torch.strided for g in grads):
            return None
        self._grads = self.step_grads(grads)
        if self.params:
            self.table[:, _G] = [g.data_ptr() for g in self._grads]
        self.table[:, _READ_W] = [p._version != v for p, v in zip(self.params, self.versions)]
        if not _make_batched(self.dtype, self.rule).check(self.table, self.flags, others_table):
            return None
        return np.flatnonzero(self.flags).tolist() if self.flags.any() else []

    def update(self, xs: list[tuple[float, float, float]] | None, hyper: tuple[float, ...], *, maximize: bool,
               skip: list[int] = (), rate: tuple[float, float, float] | None = None) -> list[int]:  # fmt: skip
        """The write pass after :meth:`check`, in place, but on the tensors at the positions
        ``skip``. ``xs[i]``: tensor ``i``'s scalars where it has no step counter (``None``:
        zeros), ``hyper``: the group's hyperparameters (see
        :data:`RULES`), ``rate``: the ``(gain, power, pull)`` of the angular rate (given
        exactly when the batch was made ``has_rate``). Each counter of a tensor stepped is incremented. Returns the
        positions of the tensors with a row left as it was:
        a weight row with a zero, underflowing or non-finite squared norm, or a first
        moment or state that gives no finite step (values that this batch did not write:
        changed from outside the optimizer, behind the version counter)."""
        if not self.params:
            return []
        if xs is not None:
            self.xs[:] = xs
        elif self.xs.any():
            self.xs[:] = 0.0
        self.skip[:] = False
        if skip:
            self.skip[list(skip)] = True
        self.flags[:] = False
        if (rate is not None) != self.has_rate:
            raise ValueError("an angular rate is given exactly to a batch made with has_rate")
        rate_args = (1.0, *map(float, rate)) if rate is not None else (0.0, 0.0, 0.0, 0.0)
        _make_batched(self.dtype, self.rule).update(
            self.table, self.xs, tuple(float(h) for h in hyper), rate_args, self.has_m, self.n_states,
            -1.0 if maximize else 1.0, self.skip, self.flags,
        )  # fmt: skip
        self._grads = None
        self.versions = [p._version for p in self.params]
        return np.flatnonzero(self.flags).tolist() if self.flags.any() else []
