r"""Triton row kernels of PSISGD's fused step on CUDA (``fused=True``, and the default there).

Imported only when a fused step runs on a CUDA tensor, so ``import psiopt`` does not
import Triton. Triton compiles each kernel the first time it meets a new signature
(dtype, constants) and keeps it in the kernel's own cache: the compiled code of a
function, not user data. With ``TRITON_INTERPRET=1`` the same kernels run on CPU
tensors, which is how the tests check them on machines without a GPU.

Each program handles one row (a group, or the part of a group on this shard): the first
kernel reads it once for its six sums (:func:`psiopt.manifold.step_row_sums`) and flags
a bad row with an atomic maximum, the second reads the sums, forms the group scalars
(:func:`psiopt.manifold.one_pass_step_scalars`, compiled here from its one definition)
and writes the row of weights and of momentum. Nothing is read back to the host: a
refused step is a flag the second kernel reads on the device. Sums accumulate in
float32 (float64 for float64 rows).
"""

from __future__ import annotations

import types

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..manifold import one_pass_step_scalars

__all__ = ["row_sums", "update", "supports"]

# The one home of the step's scalar algebra, compiled by Triton. Triton resolves a jitted
# function's globals and needs triton.language among them: the same code object, with
# globals that hold it (the function itself uses no global).
_step_scalars = triton.jit(
    types.FunctionType(one_pass_step_scalars.__code__, {"tl": tl}, one_pass_step_scalars.__name__)
)

_BLOCK = 1024  # columns per iteration of a program's loop over its row


def supports(t: Tensor) -> bool:
    """Whether these kernels step ``t``: a CUDA floating-point tensor (or any tensor
    under Triton's interpreter)."""
    return t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _row_sums_kernel(
    w_ptr, g_ptr, m_ptr, out_ptr, bad_ptr, inv_ptr, d, sw, sg, sm,
    TINY: tl.constexpr, HAS_M: tl.constexpr, HAS_INV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    inv = tl.load(inv_ptr).to(ACC) if HAS_INV else 1.0
    a = tl.zeros([BLOCK], ACC)
    b = tl.zeros([BLOCK], ACC)
    gg = tl.zeros([BLOCK], ACC)
    mg = tl.zeros([BLOCK], ACC)
    mw = tl.zeros([BLOCK], ACC)
    mm = tl.zeros([BLOCK], ACC)
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < d
        w = tl.load(w_ptr + row * sw + cols, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + row * sg + cols, mask=mask, other=0.0).to(ACC) * inv
        a += w * w
        b += g * w
        gg += g * g
        if HAS_M:
            m = tl.load(m_ptr + row * sm + cols, mask=mask, other=0.0).to(ACC)
            mg += m * g
            mw += m * w
            mm += m * m
    a = tl.sum(a, 0)
    b = tl.sum(b, 0)
    gg = tl.sum(gg, 0)
    mg = tl.sum(mg, 0)
    mw = tl.sum(mw, 0)
    mm = tl.sum(mm, 0)
    tl.store(out_ptr + row * 6, a)
    tl.store(out_ptr + row * 6 + 1, b)
    tl.store(out_ptr + row * 6 + 2, gg)
    tl.store(out_ptr + row * 6 + 3, mg)
    tl.store(out_ptr + row * 6 + 4, mw)
    tl.store(out_ptr + row * 6 + 5, mm)
    # x - x == 0 is false for a NaN or an infinity.
    finite = (a - a == 0) & (b - b == 0) & (gg - gg == 0) & (mg - mg == 0) & (mw - mw == 0) & (mm - mm == 0)
    tl.atomic_max(bad_ptr, tl.where(finite & (a > TINY), 0, 1))


@triton.jit
def _update_kernel(
    w_ptr, g_ptr, m_ptr, sums_ptr, refused_ptr, inv_ptr, d, sw, sg, sm, lr_hi, lr_lo, sign,
    MOMENTUM: tl.constexpr, DAMPENING: tl.constexpr, NESTEROV: tl.constexpr, FIRST: tl.constexpr,
    HAS_M: tl.constexpr, HAS_REFUSED: tl.constexpr, HAS_INV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    # The group scalars in float64 (one set per row), then cast once to the row's precision.
    lr = tl.cast(lr_hi, tl.float64) + tl.cast(lr_lo, tl.float64)  # a float argument is float32 in Triton
    inv = tl.load(inv_ptr).to(tl.float64) if HAS_INV else 1.0
    a = tl.load(sums_ptr + row * 6).to(tl.float64)
    b = sign * tl.load(sums_ptr + row * 6 + 1).to(tl.float64)
    gg = tl.load(sums_ptr + row * 6 + 2).to(tl.float64)
    mg = sign * tl.load(sums_ptr + row * 6 + 3).to(tl.float64)
    mw = tl.load(sums_ptr + row * 6 + 4).to(tl.float64)
    mm = tl.load(sums_ptr + row * 6 + 5).to(tl.float64)
    s2, q = _step_scalars(a, b, gg, mg, mw, mm, lr, MOMENTUM, DAMPENING, NESTEROV, FIRST)
    s64 = tl.sqrt(s2)
    ga64 = sign * inv * a  # r = ga * g - b * w, with g the stored (scaled) gradient
    if FIRST:
        mu = tl.full([], 0.0, ACC)
        damp = tl.full([], 1.0, tl.float64)
    else:
        mu = tl.full([], MOMENTUM, ACC)
        damp = tl.full([], 1.0 - DAMPENING, tl.float64)
    rg = (damp * ga64).to(ACC)  # m' = mu m + rg g + rw w
    rw = (-damp * b).to(ACC)
    if NESTEROV:  # w' = s((1 + lr b) w - lr ga g - lr mu m')
        cw = (s64 * (1.0 + lr * b)).to(ACC)
        cg = (-lr * s64 * ga64).to(ACC)
        cm = (-lr * s64 * MOMENTUM).to(ACC)
    elif HAS_M:  # w' = s(w - lr m')
        cw = s64.to(ACC)
        cg = (0.0 * s64).to(ACC)
        cm = (-lr * s64).to(ACC)
    else:  # w' = s((1 + lr b) w - lr ga g)
        cw = (s64 * (1.0 + lr * b)).to(ACC)
        cg = (-lr * s64 * ga64).to(ACC)
        cm = (0.0 * s64).to(ACC)
    sq = (s64 * q).to(ACC)
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < d
        if HAS_REFUSED:
            mask = mask & (tl.load(refused_ptr + cols * 0) == 0)  # a refused step writes nothing
        w = tl.load(w_ptr + row * sw + cols, mask=mask, other=0.0)
        g = tl.load(g_ptr + row * sg + cols, mask=mask, other=0.0).to(ACC)
        wf = w.to(ACC)
        if HAS_M:
            m = tl.load(m_ptr + row * sm + cols, mask=mask, other=0.0)
            mp = mu * m.to(ACC) + rg * g + rw * wf
            wn = cw * wf + cg * g + cm * mp
            tl.store(m_ptr + row * sm + cols, (mp - sq * wn).to(m.dtype), mask=mask)
        else:
            wn = cw * wf + cg * g
        tl.store(w_ptr + row * sw + cols, wn.to(w.dtype), mask=mask)


def _acc(t: Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _row_major(x: Tensor) -> Tensor:
    # Rows are read with unit stride; a gradient in another layout is copied (it is only read).
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def _row_sums(w: Tensor, g: Tensor, m: Tensor | None, inv_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """The ``(rows, 6)`` sums of :func:`psiopt.manifold.step_row_sums` (float32, float64 for
    float64 rows) of the gradient times ``inv_scale``, and a 0-d bool flag on the device:
    whether a row is bad (a sum not finite, or a zero or underflowing squared weight norm)."""
    acc_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    out = torch.empty(w.shape[0], 6, dtype=acc_dtype, device=w.device)
    bad = torch.zeros((), dtype=torch.int32, device=w.device)
    if w.shape[0]:
        g = _row_major(g)
        mm = w if m is None else m
        _row_sums_kernel[(w.shape[0],)](
            w, g, mm, out, bad, w if inv_scale is None else inv_scale, w.shape[1],
            w.stride(0), g.stride(0), mm.stride(0),
            TINY=torch.finfo(acc_dtype).tiny, HAS_M=m is not None, HAS_INV=inv_scale is not None, ACC=_acc(w), BLOCK=_BLOCK,
        )  # fmt: skip
    return out, bad > 0


def _update(
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
    """The elementwise pass, in place on the row views ``w`` and ``m`` (the operations of
    :func:`psiopt.optim._functional._elementwise_pass`), one row per program; a true
    ``refused`` flag (read on the device) makes every program write nothing."""
    if w.shape[0] == 0:
        return
    g = _row_major(g)
    mm = w if m is None else m
    lr_hi = float(torch.tensor(float(lr), dtype=torch.float32))  # lr = lr_hi + lr_lo to 48 bits
    _update_kernel[(w.shape[0],)](
        w, g, mm, sums, w if refused is None else refused.to(torch.int32), w if inv_scale is None else inv_scale, w.shape[1],
        w.stride(0), g.stride(0), mm.stride(0), lr_hi, float(lr) - lr_hi, -1.0 if maximize else 1.0,
        MOMENTUM=float(momentum), DAMPENING=float(dampening), NESTEROV=bool(nesterov), FIRST=bool(first),
        HAS_M=m is not None, HAS_REFUSED=refused is not None, HAS_INV=inv_scale is not None, ACC=_acc(w),
        BLOCK=_BLOCK,
    )  # fmt: skip


def row_sums(
    ws: list[Tensor], gs: list[Tensor], ms: list[Tensor | None], inv_scale: Tensor | None
) -> tuple[list[Tensor], list[Tensor]]:
    """Every tensor's sums and flag (see ``_row_sums``), one kernel launch per tensor."""
    out = [_row_sums(w, g, m, inv_scale) for w, g, m in zip(ws, gs, ms)]
    return [s for s, _ in out], [b for _, b in out]


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
    """The elementwise pass of every tensor (see ``_update``), one kernel launch per tensor."""
    for w, g, m, s, first in zip(ws, gs, ms, sums, firsts):
        _update(
            w, g, m, s, refused, inv_scale,
            lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, first=first, maximize=maximize,
        )  # fmt: skip
