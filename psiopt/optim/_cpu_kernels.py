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
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch import Tensor

from ..manifold import one_pass_step_scalars

__all__ = ["row_sums", "update", "supports"]

# Reassociation and contraction (vectorized sums, fused multiply-adds); not nnan/ninf.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

# The one home of the step's scalar algebra, compiled for the row loop.
_step_scalars = numba.njit(one_pass_step_scalars, fastmath=_FASTMATH)


def supports(t: Tensor) -> bool:
    """Whether these kernels step ``t``: a CPU float32 or float64 tensor."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


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


def _make_row_sums(cast):
    """The reduction row kernel for one dtype, accumulating in that dtype (as
    :func:`psiopt.manifold.step_row_sums` does for float32 and float64)."""

    tiny = float(np.finfo(cast).tiny)

    @numba.njit(fastmath=_FASTMATH, nogil=True)
    def row_sums(w, g, m, has_m, inv_scale, out):  # pragma: no cover - compiled
        k, d = w.shape
        inv = cast(inv_scale)
        for j in range(k):
            a = cast(0.0)
            b = cast(0.0)
            gg = cast(0.0)
            mg = cast(0.0)
            mw = cast(0.0)
            mm = cast(0.0)
            if has_m:
                for i in range(d):
                    wi = w[j, i]
                    gi = g[j, i] * inv
                    mi = m[j, i]
                    a += wi * wi
                    b += gi * wi
                    gg += gi * gi
                    mg += mi * gi
                    mw += mi * wi
                    mm += mi * mi
            else:
                for i in range(d):
                    wi = w[j, i]
                    gi = g[j, i] * inv
                    a += wi * wi
                    b += gi * wi
                    gg += gi * gi
            out[j, 0] = a
            out[j, 1] = b
            out[j, 2] = gg
            out[j, 3] = mg
            out[j, 4] = mw
            out[j, 5] = mm
        return _any_bad_row(out, tiny)

    return row_sums


def _make_update(cast):
    """The elementwise row kernel for one dtype: the group scalars are computed in float64
    and cast once per row, so that the loop over the row runs in the rows' own precision
    (twice the SIMD width for float32)."""

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
            mu = cast(0.0 if first else momentum)
            damp = 1.0 if first else 1.0 - dampening
            rg = cast(damp * ga)
            rw = cast(-damp * b)
            sq = cast(s * q)
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
                    w[j, i] = wn
                    m[j, i] = mp - sq * wn
            else:
                # w' = s(w - lr m')
                cw = cast(s)
                cm = cast(-lr * s)
                for i in range(d):
                    wi = w[j, i]
                    mp = mu * m[j, i] + rg * g[j, i] + rw * wi
                    wn = cw * wi + cm * mp
                    w[j, i] = wn
                    m[j, i] = mp - sq * wn

    return update


_ROW_SUMS = {torch.float32: _make_row_sums(np.float32), torch.float64: _make_row_sums(np.float64)}
_UPDATE = {torch.float32: _make_update(np.float32), torch.float64: _make_update(np.float64)}


def _array(x: Tensor):
    # Row views made under torch.no_grad() do not require grad; a tensor that does is detached.
    return x.detach().numpy() if x.requires_grad else x.numpy()


def _inv(inv_scale: Tensor | None) -> float:
    return 1.0 if inv_scale is None else float(inv_scale)


def row_sums(w: Tensor, g: Tensor, m: Tensor | None, inv_scale: Tensor | None) -> tuple[Tensor, bool]:
    """The ``(rows, 6)`` float64 sums of :func:`psiopt.manifold.step_row_sums`, of the
    gradient times ``inv_scale`` (a GradScaler's ``1 / scale``), in one pass; and whether a
    row is bad (a sum not finite, or a zero or underflowing squared weight norm)."""
    out = torch.empty(w.shape[0], 6, dtype=torch.float64)
    if not w.shape[0]:
        return out, False
    bad = _ROW_SUMS[w.dtype](
        _array(w), _array(g), _array(w if m is None else m), m is not None, _inv(inv_scale), out.numpy()
    )
    return out, bool(bad)


def update(
    w: Tensor,
    g: Tensor,
    m: Tensor | None,
    sums: Tensor,
    refused: Tensor | None,
    inv_scale: Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    first: bool,
    maximize: bool,
) -> None:
    """The elementwise pass, in place on the row views ``w`` and ``m``: the operations of
    :func:`psiopt.optim._functional._elementwise_pass`, one row at a time. A true
    ``refused`` (a CPU flag: reading it costs no synchronization) changes nothing."""
    if w.shape[0] == 0 or (refused is not None and bool(refused)):
        return
    _UPDATE[w.dtype](
        _array(w),
        _array(g),
        _array(w if m is None else m),
        m is not None,
        _array(sums),
        _inv(inv_scale),
        float(lr),
        float(momentum),
        float(dampening),
        bool(nesterov),
        bool(first),
        -1.0 if maximize else 1.0,
    )
