r"""Compiled CPU row kernels of PSISGD's fused step (``fused=True``), built with numba.

Imported only when a fused step runs on the CPU, so ``import psiopt`` neither imports
numba nor compiles anything. numba compiles each kernel the first time it meets a new
argument type (float32 or float64 rows) and keeps the machine code in the kernel's own
dispatcher, which is how numba is meant to be used: the compiled code of a function, not
a cache of user data. Compilation takes about a second per dtype, once per process.

Why numba: it is a well-kept compiler (used by the scientific Python stack), its wheels
do not depend on torch, and its loops vectorize: with ``fastmath`` reassociation the six
sums of a row run as one SIMD loop. torch.compile's C++ backend vectorizes row
reductions poorly here (design note, section 6). The ``fastmath`` flags exclude
``nnan`` and ``ninf``: a NaN or infinite sum must survive, because it is how a bad
gradient or weight is detected.

Both kernels handle one row (one group, or one part of a group) per iteration, in the
rows' own precision (float32 or float64); only the per-row scalars are float64.

Each pass is **one compiled call per dtype for all the tensors** of a param group: the
call gets a small int64 table of the tensors' row views (addresses, rows, entries per
row) and reads and writes them in place. Handing numba one array per tensor costs about
as much as the arithmetic on a small model (each array is unboxed on every call); the
table makes the Python cost of a step nearly independent of the number of tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
import torch
from torch import Tensor

from ..manifold import one_pass_step_scalars

__all__ = ["row_sums", "update", "supports", "all_finite", "finite_table", "RowBatch"]

# Reassociation and contraction (vectorized sums, fused multiply-adds); not nnan/ninf.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

# The one home of the step's scalar algebra, compiled for the row loop.
_step_scalars = numba.njit(one_pass_step_scalars, fastmath=_FASTMATH)


_DTYPES = (torch.float32, torch.float64)
_ITEMSIZES = {torch.float32: 4, torch.float64: 8}


def supports(t: Tensor) -> bool:
    """Whether these kernels step ``t``: a CPU float32 or float64 tensor."""
    return t.is_cpu and t.dtype in _DTYPES


@numba.njit(nogil=True)
def _any_bad_row(sums, tiny):  # pragma: no cover - compiled
    # The flag of psiopt.optim._functional._bad_rows. Compiled without fastmath, under which
    # the compiler may assume that no value is infinite or NaN and fold the test away.
    for j in range(sums.shape[0]):
        if not sums[j, 0] > tiny:
            return True
        for c in range(6):
            if not math.isfinite(sums[j, c]):
                return True
    return False


@numba.njit(nogil=True)
def _float64_momentum_sums(w, g, m, j):  # pragma: no cover - compiled
    # Products of float32 or float64 entries summed in float64: finite for finite entries.
    mg = 0.0
    mw = 0.0
    mm = 0.0
    for i in range(w.shape[1]):
        mi = np.float64(m[j, i])  # float() would keep a float32 a float32 here
        mg += mi * np.float64(g[j, i])
        mw += mi * np.float64(w[j, i])
        mm += mi * mi
    return mg, mw, mm


@functools.cache  # one compiled function per dtype, shared by the kernels that call it
def _make_weight_gradient_sums(cast):
    r"""The sums :math:`w\cdot w`, :math:`g\cdot w`, :math:`g\cdot g` of row ``j``, the
    gradient times ``inv``, accumulated in the rows' dtype."""

    @numba.njit(fastmath=_FASTMATH, nogil=True)
    def weight_gradient_sums(w, g, j, inv):  # pragma: no cover - compiled
        a = cast(0.0)
        b = cast(0.0)
        gg = cast(0.0)
        for i in range(w.shape[1]):
            wi = w[j, i]
            gi = g[j, i] * inv
            a += wi * wi
            b += gi * wi
            gg += gi * gi
        return a, b, gg

    return weight_gradient_sums


@functools.cache  # one compiled function per dtype, shared by the kernels that call it
def _make_momentum_sums(cast):
    r"""The sums :math:`m\cdot g`, :math:`m\cdot w`, :math:`m\cdot m` of row ``j``, the
    gradient times ``inv``, accumulated in the rows' dtype. The general step and the
    row-resident one both take a row's sums from this function and
    :func:`_make_weight_gradient_sums`'s, in the same loops, so that their results agree
    bit for bit (a run resumed from a checkpoint takes the general step first)."""

    @numba.njit(fastmath=_FASTMATH, nogil=True)
    def momentum_sums(w, g, m, j, inv):  # pragma: no cover - compiled
        mg = cast(0.0)
        mw = cast(0.0)
        mm = cast(0.0)
        for i in range(w.shape[1]):
            mi = m[j, i]
            mg += mi * (g[j, i] * inv)
            mw += mi * w[j, i]
            mm += mi * mi
        return mg, mw, mm

    return momentum_sums


def _make_row_sums(cast):
    """The reduction row kernel for one dtype, accumulating in that dtype (as
    :func:`psiopt.manifold.step_row_sums` does for float32 and float64)."""

    tiny = float(np.finfo(cast).tiny)
    weight_gradient_sums, momentum_sums = _make_weight_gradient_sums(cast), _make_momentum_sums(cast)

    @numba.njit(fastmath=_FASTMATH, nogil=True)
    def row_sums(w, g, m, has_m, inv_scale, out):  # pragma: no cover - compiled
        inv = cast(inv_scale)
        for j in range(w.shape[0]):
            out[j, 0], out[j, 1], out[j, 2] = weight_gradient_sums(w, g, j, inv)
            if has_m:
                out[j, 3], out[j, 4], out[j, 5] = momentum_sums(w, g, m, j, inv)
            else:
                out[j, 3] = out[j, 4] = out[j, 5] = 0.0
        return _any_bad_row(out, tiny)

    return row_sums


@functools.cache  # one compiled function per dtype, shared by the kernels that call it
def _make_write_row(cast):
    r"""The write loop of one row with momentum, for one dtype: from the row's scalars,
    :math:`m' = \mu m + r`, :math:`w' = s(w - \eta d)`, :math:`m_{new} = m' - s q w'`, in
    place. Returns :math:`\|m_{new}\|^2` accumulated in the rows' precision: a non-finite
    value says that the written momentum holds a non-finite entry (or that its squared
    norm overflows), which the next step checks without reading the buffer again."""

    @numba.njit(fastmath=_FASTMATH, nogil=True)
    def write_row(w, g, m, j, s, q, ga, b, lr, momentum, dampening, nesterov, first):  # pragma: no cover
        d = w.shape[1]
        mu = cast(0.0 if first else momentum)
        damp = 1.0 if first else 1.0 - dampening
        rg = cast(damp * ga)
        rw = cast(-damp * b)
        sq = cast(s * q)
        written = cast(0.0)
        if nesterov:
            # w' = s((1 + lr b) w - lr ga g - lr mu m')
            nw = cast(s * (1.0 + lr * b))
            ng = cast(-lr * s * ga)
            nm = cast(-lr * s * momentum)
            for i in range(d):
                wi = w[j, i]
                gi = g[j, i]
                mp = mu * m[j, i] + rg * gi + rw * wi
                wn = nw * wi + ng * gi + nm * mp
                mn = mp - sq * wn
                w[j, i] = wn
                m[j, i] = mn
                written += mn * mn
        else:
            # w' = s(w - lr m')
            cw = cast(s)
            cm = cast(-lr * s)
            for i in range(d):
                wi = w[j, i]
                mp = mu * m[j, i] + rg * g[j, i] + rw * wi
                wn = cw * wi + cm * mp
                mn = mp - sq * wn
                w[j, i] = wn
                m[j, i] = mn
                written += mn * mn
        return written

    return write_row


def _make_update(cast):
    """The elementwise row kernel for one dtype: the group scalars are computed in float64
    and cast once per row, so that the loop over the row runs in the rows' own precision
    (twice the SIMD width for float32)."""
    write_row = _make_write_row(cast)

    @numba.njit(fastmath=_FASTMATH, nogil=True)
    def update(w, g, m, has_m, sums, inv_scale, lr, momentum, dampening, nesterov, first, sign):  # pragma: no cover
        k, d = w.shape
        for j in range(k):
            a = sums[j, 0]
            b = sign * sums[j, 1]
            s2, q = _step_scalars(
                a, b, sums[j, 2], sign * sums[j, 3], sums[j, 4], sums[j, 5], lr, momentum, dampening, nesterov, first
            )
            s = math.sqrt(s2)
            ga = sign * inv_scale * a  # r = ga * g - b * w, with g the stored (scaled) gradient
            if not has_m:
                cw = cast(s * (1.0 + lr * b))
                cg = cast(-lr * s * ga)
                for i in range(d):
                    w[j, i] = cw * w[j, i] + cg * g[j, i]
                continue
            write_row(w, g, m, j, s, q, ga, b, lr, momentum, dampening, nesterov, first)

    return update


def _make_guard(cast):
    r"""The check pass of the row-resident step (:class:`RowBatch`), for one dtype: the
    weight and gradient sums :math:`a = w\cdot w`, :math:`b = g\cdot w`, :math:`gg = g\cdot g`
    of every row into columns 0-2 of ``out``, reading the weights and gradients only.
    Whether a row is bad: those sums (or the squared norm of the momentum written by the
    last step, column 5) not finite, or a zero or underflowing squared weight norm."""

    tiny = float(np.finfo(cast).tiny)
    weight_gradient_sums = _make_weight_gradient_sums(cast)

    @numba.njit(fastmath=_FASTMATH, nogil=True)
    def guard(w, g, inv_scale, out):  # pragma: no cover - compiled
        # Columns 3 and 4 stay 0 in a RowBatch: _any_bad_row then checks what the guard must.
        # inv_scale is 1, passed at run time so that the sums are those of row_sums.
        inv = cast(inv_scale)
        for j in range(w.shape[0]):
            out[j, 0], out[j, 1], out[j, 2] = weight_gradient_sums(w, g, j, inv)
        return _any_bad_row(out, tiny)

    return guard


def _make_resident_update(cast):
    r"""The write pass of the row-resident step, for one dtype, with momentum: per row, the
    momentum sums :math:`m\cdot g, m\cdot w, m\cdot m` (reading the row of the weights,
    gradient and momentum from memory), then the row's write loop while the row is still
    in cache; so the pass moves the bytes of torch's SGD with momentum. A row whose
    momentum sums overflow the rows' precision has them again in float64 (the entries
    are finite where this kernel wrote them: :meth:`RowBatch.row_sums` checks its record).
    Column 5 of ``sums`` gets the squared norm of the written momentum, for the next
    step's check. A row whose momentum holds a non-finite entry all the same (written
    from outside the optimizer) is left as it is; the kernel returns whether there was
    one."""
    write_row, momentum_sums = _make_write_row(cast), _make_momentum_sums(cast)

    @numba.njit(fastmath=_FASTMATH, nogil=True)
    def resident_update(w, g, m, sums, inv_scale, lr, momentum, dampening, nesterov, sign):  # pragma: no cover
        inv = cast(inv_scale)  # 1, at run time (see guard)
        bad = False
        for j in range(w.shape[0]):
            mg, mw, mm = momentum_sums(w, g, m, j, inv)
            mg64, mw64, mm64 = np.float64(mg), np.float64(mw), np.float64(mm)
            if not (math.isfinite(mg64) and math.isfinite(mw64) and math.isfinite(mm64)):
                mg64, mw64, mm64 = _float64_momentum_sums(w, g, m, j)
                if not (math.isfinite(mg64) and math.isfinite(mw64) and math.isfinite(mm64)):
                    bad = True  # a non-finite momentum entry that this kernel did not write: row left as it is
                    sums[j, 5] = math.inf
                    continue
            a = sums[j, 0]
            b = sign * sums[j, 1]
            s2, q = _step_scalars(a, b, sums[j, 2], sign * mg64, mw64, mm64, lr, momentum, dampening, nesterov, False)
            sums[j, 5] = write_row(w, g, m, j, math.sqrt(s2), q, sign * a, b, lr, momentum, dampening, nesterov, False)
        return bad

    return resident_update


@intrinsic
def _pointer(typingctx, address):  # pragma: no cover - compiled
    """An int64 address as a ``void*``, for :func:`numba.carray`."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.int64), codegen


# Columns of the int64 table that describes the tensors of one batched call, one row per
# tensor: the addresses of its weight, gradient, momentum (the weight's when there is
# none) and sums rows, its number of rows and of entries per row, and its first-step flag.
_W, _G, _M, _S, _ROWS, _COLS, _FIRST = range(7)


def _make_views(cast):
    """The compiled ``views(table, t)``: tensor ``t``'s (rows, entries) views of weight,
    gradient and momentum, and its (rows, 6) sums, from the addresses in row ``t`` of a
    table whose first columns are ``_W, _G, _M, _S, _ROWS, _COLS`` (this module's tables
    and :mod:`._cpu_adaptive_kernels`')."""

    @numba.njit(nogil=True)
    def views(table, t):  # pragma: no cover - compiled
        k, d = table[t, _ROWS], table[t, _COLS]
        return (
            numba.carray(_pointer(table[t, _W]), (k, d), cast),
            numba.carray(_pointer(table[t, _G]), (k, d), cast),
            numba.carray(_pointer(table[t, _M]), (k, d), cast),
            numba.carray(_pointer(table[t, _S]), (k, 6), np.float64),
        )

    return views


class _Passes(NamedTuple):
    """The compiled batched calls for one dtype (:func:`_make_batched`)."""

    row_sums: Callable
    update: Callable
    guard: Callable
    resident_update: Callable
    checked_resident_update: Callable


def _make_batched(cast) -> _Passes:
    """The passes over every tensor of one dtype, one compiled call each: the rows of
    tensor ``t`` are read in place from the addresses in row ``t`` of ``table``. The
    general step takes ``row_sums`` then ``update``; a kept :class:`RowBatch` with
    momentum takes ``guard`` then ``resident_update``."""
    row_sums_kernel, update_kernel = _make_row_sums(cast), _make_update(cast)
    guard_kernel, resident_kernel = _make_guard(cast), _make_resident_update(cast)
    views = _make_views(cast)

    @numba.njit(nogil=True)
    def row_sums(table, has_m, inv_scale, bad):  # pragma: no cover - compiled
        for t in range(table.shape[0]):
            if table[t, _ROWS] > 0:
                w, g, m, sums = views(table, t)
                bad[t] = row_sums_kernel(w, g, m, has_m, inv_scale, sums)

    @numba.njit(nogil=True)
    def update(table, has_m, inv_scale, lr, momentum, dampening, nesterov, sign):  # pragma: no cover - compiled
        for t in range(table.shape[0]):
            if table[t, _ROWS] > 0:
                w, g, m, sums = views(table, t)
                first = table[t, _FIRST] != 0
                update_kernel(w, g, m, has_m, sums, inv_scale, lr, momentum, dampening, nesterov, first, sign)

    @numba.njit(nogil=True)
    def guard(table, inv_scale, bad, others):  # pragma: no cover - compiled
        # Also whether every entry of the tensors of `others` (finite_table) is finite.
        for t in range(table.shape[0]):
            if table[t, _ROWS] > 0:
                w, g, _, sums = views(table, t)
                bad[t] = guard_kernel(w, g, inv_scale, sums)
        return _all_finite(others)

    @numba.njit(nogil=True)
    def resident_update(table, inv_scale, lr, momentum, dampening, nesterov, sign, bad):  # pragma: no cover - compiled
        for t in range(table.shape[0]):
            if table[t, _ROWS] > 0:
                w, g, m, sums = views(table, t)
                bad[t] = resident_kernel(w, g, m, sums, inv_scale, lr, momentum, dampening, nesterov, sign)

    @numba.njit(nogil=True)
    def checked_resident_update(table, inv_scale, lr, momentum, dampening, nesterov, sign, bad, others):  # pragma: no cover
        # guard, then only if no row is bad and every entry of `others` is finite,
        # resident_update: a whole kept step in one call. Returns whether it wrote.
        if not guard(table, inv_scale, bad, others):
            return False
        for t in range(table.shape[0]):
            if bad[t]:
                return False
        resident_update(table, inv_scale, lr, momentum, dampening, nesterov, sign, bad)
        return True

    return _Passes(row_sums, update, guard, resident_update, checked_resident_update)


_BATCHED = {torch.float32: _make_batched(np.float32), torch.float64: _make_batched(np.float64)}


@numba.njit(nogil=True)
def _all_finite(table):  # pragma: no cover - compiled
    # table (finite_table): address, number of entries, itemsize (4: float32, 8: float64) of dense tensors.
    for t in range(table.shape[0]):
        n = table[t, 1]
        if n == 0:
            continue
        if table[t, 2] == 4:
            x32 = numba.carray(_pointer(table[t, 0]), (n,), np.float32)
            for i in range(n):
                if not math.isfinite(x32[i]):
                    return False
        else:
            x64 = numba.carray(_pointer(table[t, 0]), (n,), np.float64)
            for i in range(n):
                if not math.isfinite(x64[i]):
                    return False
    return True


def _dense_rows(x: Tensor) -> Tensor:
    # The kernels read a row view from its address, row after row: one that is not
    # contiguous (a gradient in another layout) is copied, as it is only read.
    return x if x.is_contiguous() else x.contiguous()


def _table(ws, gs, ms, sums, firsts) -> np.ndarray:
    # The addresses of the rows the kernels write through must be those of the tensors.
    if not all(w.is_contiguous() and (m is None or m.is_contiguous()) for w, m in zip(ws, ms)):
        raise RuntimeError("PSISGD's fused CPU kernels write weights and momentum in place: their row views must be contiguous")
    return np.array(
        [
            (w.data_ptr(), g.data_ptr(), (w if m is None else m).data_ptr(), s.data_ptr(), w.shape[0], w.shape[1], f)
            for w, g, m, s, f in zip(ws, gs, ms, sums, firsts)
        ],
        dtype=np.int64,
    ).reshape(-1, 7)


def _by_dtype(ws: list[Tensor]) -> list[tuple[torch.dtype, list[int]]]:
    """The indices of ``ws`` by dtype (usually all of one)."""
    dtype = ws[0].dtype if ws else None
    if all(w.dtype == dtype for w in ws):
        return [(dtype, list(range(len(ws))))] if ws else []
    out: dict[torch.dtype, list[int]] = {}
    for i, w in enumerate(ws):
        out.setdefault(w.dtype, []).append(i)
    return list(out.items())


def _inv(inv_scale: Tensor | None) -> float:
    return 1.0 if inv_scale is None else float(inv_scale)


def row_sums(
    ws: list[Tensor], gs: list[Tensor], ms: list[Tensor | None], inv_scale: Tensor | None
) -> tuple[list[Tensor], list[bool]]:
    """For every tensor ``i`` (row views ``ws[i]``, ``gs[i]``, ``ms[i]``, the weight and
    momentum views contiguous, every ``ms[i]`` ``None`` or none of them): the ``(rows, 6)``
    float64 sums of :func:`psiopt.manifold.step_row_sums`, of the gradient times
    ``inv_scale`` (a GradScaler's ``1 / scale``), in one pass; and whether a row is bad (a
    sum not finite, or a zero or underflowing squared weight norm). One compiled call
    per dtype for all the tensors."""
    counts = [w.shape[0] for w in ws]
    sums = list(torch.empty(sum(counts), 6, dtype=torch.float64).split_with_sizes(counts))
    bad = [False] * len(ws)
    has_m = bool(ms) and ms[0] is not None
    inv = _inv(inv_scale)
    for dtype, idx in _by_dtype(ws):
        grads = [_dense_rows(gs[i]) for i in idx]  # kept alive across the call
        table = _table([ws[i] for i in idx], grads, [ms[i] for i in idx], [sums[i] for i in idx], [0] * len(idx))
        flags = np.zeros(len(idx), dtype=np.bool_)
        _BATCHED[dtype].row_sums(table, has_m, inv, flags)
        for i, flag in zip(idx, flags.tolist()):
            bad[i] = flag
    return sums, bad


def update(
    ws: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor | None],
    sums: list[Tensor],
    firsts: list[bool],
    refused: Tensor | None,
    inv_scale: Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """The elementwise pass, in place on the row views ``ws`` and ``ms``: the operations of
    :func:`psiopt.optim._functional._elementwise_pass`, one row at a time, one compiled
    call per dtype. A true ``refused`` (a CPU flag: reading it costs no synchronization)
    changes nothing."""
    if not ws or (refused is not None and bool(refused)):
        return
    has_m = ms[0] is not None
    inv = _inv(inv_scale)
    for dtype, idx in _by_dtype(ws):
        grads = [_dense_rows(gs[i]) for i in idx]
        # The sums of split groups come back from the all-reduce as new tensors.
        rows_sums = [_dense_rows(sums[i] if sums[i].dtype == torch.float64 else sums[i].double()) for i in idx]
        table = _table([ws[i] for i in idx], grads, [ms[i] for i in idx], rows_sums, [firsts[i] for i in idx])
        _BATCHED[dtype].update(table, has_m, inv, float(lr), float(momentum), float(dampening), bool(nesterov),
                           -1.0 if maximize else 1.0)  # fmt: skip


def finite_table(tensors: list[Tensor]) -> np.ndarray | None:
    """The table with which a compiled call checks that every entry of ``tensors`` is
    finite (address, entries, itemsize per tensor), or ``None`` when a tensor is not a
    dense CPU float32 or float64 tensor (the caller then checks them)."""
    rows = []
    for t in tensors:
        itemsize = _ITEMSIZES.get(t.dtype)
        if itemsize is None or t.layout != torch.strided or not t.is_cpu or not t.is_contiguous():
            return None
        rows.append((t.data_ptr(), t.numel(), itemsize))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def all_finite(tensors: list[Tensor]) -> bool | None:
    """Whether every entry of ``tensors`` is finite, in one compiled call; ``None`` when a
    tensor is not a dense CPU float32 or float64 tensor (the caller then checks them)."""
    table = finite_table(tensors)
    return None if table is None else _all_finite(table)


_NO_TENSORS = np.zeros((0, 3), dtype=np.int64)


class RowBatch:
    """One param group's scale-invariant tensors as the compiled calls read them, kept by
    the optimizer from one step to the next (see :meth:`psiopt.PSISGD.step`).

    The table of the rows' addresses (weights, momentum buffers, sums) is made once; a
    step writes in the gradients' addresses and makes two compiled calls. It holds
    while every weight and buffer stays where it was and every gradient is laid out as
    its weight: :meth:`matches` and :meth:`row_sums` check that on every step, and say
    when the caller must take its general step instead.

    With momentum the step is **row-resident**: the check pass (:meth:`row_sums`) reads
    only the weights and gradients (their sums, and every check of the general step),
    and the write pass (:meth:`update`) reads each row of weights, gradient and momentum
    once, takes its momentum sums and writes the row while it is in cache. So a step
    moves 7 tensor-sized streams (2 + 3 read, 2 written) where the two passes of the
    general step move 8 and torch's SGD with momentum 5. The momentum buffers are
    checked without a read: the write pass records the squared norm of each row it
    wrote, and the next check pass refuses a row whose record is not finite; a new
    batch checks its buffers once.
    """

    def __init__(
        self, params: list[Tensor], buffers: list[Tensor | None], ws: list[Tensor], ms: list[Tensor | None], has_m: bool
    ) -> None:
        self.params, self.buffers, self.has_m = params, buffers, has_m
        self.dtype = ws[0].dtype if ws else torch.float32
        if any(w.dtype != self.dtype for w in ws) or any((m is not None) != has_m for m in ms):
            raise ValueError("a RowBatch holds tensors of one dtype, all with momentum buffers (has_m) or none")
        self.layouts = [(p.data_ptr(), p.shape, p.stride()) for p in params]
        counts = [w.shape[0] for w in ws]
        self.sums = list(torch.zeros(sum(counts), 6, dtype=torch.float64).split_with_sizes(counts))
        if has_m and all_finite([m for m in ms if m is not None]) is False:
            for rows_sums in self.sums:
                rows_sums[:, 5] = math.inf  # the check pass refuses them: the general step decides
        self.table = _table(ws, ws, ms, self.sums, [0] * len(ws)) if ws else np.zeros((0, 7), dtype=np.int64)
        self.flags = np.zeros(len(ws), dtype=np.bool_)
        self._views = (ws, ms)  # the table points into them

    def matches(self, momentum_buffers: list[Tensor | None]) -> bool:
        """Whether every weight is where it was, with the same shape and strides, and
        ``momentum_buffers`` (the optimizer's current ones) are the kept ones."""
        return all(b is kept for b, kept in zip(momentum_buffers, self.buffers)) and all(
            (p.data_ptr(), p.shape, p.stride()) == layout for p, layout in zip(self.params, self.layouts)
        )

    def _bind_gradients(self, grads: list[Tensor], others: list[Tensor]) -> np.ndarray | None:
        """Point the table at this step's gradients and return the table of ``others``;
        ``None`` (nothing changed) when a gradient is not laid out as its weight or one of
        ``others`` is not a dense CPU float32 or float64 tensor."""
        addresses = []
        for g, (_, _, stride) in zip(grads, self.layouts):
            if g.layout != torch.strided or g.dtype != self.dtype or g.stride() != stride:
                return None
            addresses.append(g.data_ptr())
        others_table = finite_table(others) if others else _NO_TENSORS
        if others_table is not None and addresses:
            self.table[:, _G] = addresses
        return others_table

    def row_sums(self, grads: list[Tensor], others: list[Tensor] = ()) -> bool | None:
        """The check pass with these gradients, and in the same compiled call the check that
        every entry of ``others`` (the group's other gradients) is finite: whether a row is
        bad (a weight or gradient sum not finite, a zero or underflowing squared weight
        norm, or a momentum row written non-finite by the last step) or an entry of
        ``others`` is not finite, or ``None`` (nothing computed) when a gradient is not
        laid out as its weight or one of ``others`` is not a dense CPU float32 or float64
        tensor."""
        others_table = self._bind_gradients(grads, others)
        if others_table is None:
            return None
        finite = _BATCHED[self.dtype].guard(self.table, 1.0, self.flags, others_table)
        return not finite or bool(self.flags.any())

    def step(
        self, grads: list[Tensor], others: list[Tensor], *, lr: float, momentum: float, dampening: float,
        nesterov: bool, maximize: bool,
    ) -> list[int] | None:  # fmt: skip
        """:meth:`row_sums` then, only where it finds nothing, :meth:`update`, with momentum,
        in one compiled call (a step whose other writes need not come between the two).
        Returns ``None`` where :meth:`row_sums` would not return ``False`` (nothing is then
        written), else what :meth:`update` returns."""
        others_table = self._bind_gradients(grads, others)
        if others_table is None:
            return None
        wrote = _BATCHED[self.dtype].checked_resident_update(
            self.table, 1.0, float(lr), float(momentum), float(dampening), bool(nesterov),
            -1.0 if maximize else 1.0, self.flags, others_table,
        )  # fmt: skip
        if not wrote:
            return None
        return np.flatnonzero(self.flags).tolist() if self.flags.any() else []

    def update(self, *, lr: float, momentum: float, dampening: float, nesterov: bool, maximize: bool) -> list[int]:
        """The write pass after :meth:`row_sums`, in place: row-resident with momentum,
        else :func:`update`'s. Returns the positions (in ``params``) of the tensors whose
        momentum buffer held a non-finite entry that the last step did not write (changed
        from outside the optimizer): their bad rows were left unchanged."""
        if not self.params:
            return []
        sign = -1.0 if maximize else 1.0
        passes = _BATCHED[self.dtype]
        if not self.has_m:
            passes.update(self.table, False, 1.0, float(lr), float(momentum), float(dampening), bool(nesterov), sign)
            return []
        self.flags[:] = False
        passes.resident_update(
            self.table, 1.0, float(lr), float(momentum), float(dampening), bool(nesterov), sign, self.flags
        )
        return np.flatnonzero(self.flags).tolist() if self.flags.any() else []
