r"""Triton row kernels of PSISGD's fused step on CUDA (``fused=True``, and the default there),
and the two passes every PSI step's kernels share (:mod:`._triton_adaptive` builds
PSIAdam's and PSIAdaSGD's on them).

Imported only when a fused step runs on a CUDA tensor, so ``import psiopt`` does not
import Triton. Triton compiles each kernel the first time it meets a new signature
(dtype, constants) and keeps it in the kernel's own cache: the compiled code of a
function, not user data. With ``TRITON_INTERPRET=1`` the same kernels run on CPU
tensors, which is how the tests check them against the reference loops on machines
without a GPU; the tests also compile every launch for a Hopper GPU (``sm_90``), which
needs no GPU either.

Each program handles one row (a group, or the part of a group on this shard):

* the **reduction pass** (:func:`row_sums`) reads the row once for its six sums
  (:func:`psiopt.manifold.step_row_sums`) and flags a bad row with an atomic maximum;
* the **elementwise pass** reads the sums, forms the row's coefficients and writes the
  row of weights and of momentum once: with :math:`m' = \mu m + \rho_g g + \rho_w w`,
  :math:`w' = c_w w + c_g g + c_m m'` and :math:`m_{\text{new}} = m' - c_q w'`
  (:func:`_write_row`), every PSI step's update. For PSISGD the coefficients come from
  :func:`psiopt.manifold.one_pass_step_scalars`, compiled here from its one definition
  (:func:`_sgd_coefficients`).

Nothing is read back to the host: a refused step is a flag the elementwise pass reads on
the device. Sums accumulate in float32 (float64 for float64 rows); the per-row scalars
are computed in float64 and cast once to the accumulation type. A float argument of a
Triton kernel is float32, so the host's float64 numbers that vary from step to step
(the learning rate) travel as two float32 halves (:func:`hi_lo`); the numbers that stay
fixed (momentum, betas, eps) are compile-time constants, exact in float64.
"""

from __future__ import annotations

import struct
import types
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..manifold import grad_metric_sq_from_sums, one_pass_step_scalars

__all__ = ["row_sums", "update", "supports", "Launch", "hi_lo", "compiled", "check_rows", "device_flag"]


def compiled(fn, **names: Any) -> Any:
    """A pure-arithmetic function (of :mod:`psiopt.manifold`, or a rule's coefficients) as
    a Triton device function, from its one definition.

    Triton resolves a jitted function's globals: the same code object, with globals that
    hold triton.language, the ``names`` the function calls (a rule's ``sqrt`` and
    ``maximum``, bound to Triton's) and its module's name, which Triton's compiler reads
    (without it, compiling fails where the interpreter does not look)."""
    return triton.jit(types.FunctionType(fn.__code__, {"tl": tl, "__name__": fn.__module__, **names}, fn.__name__))


_step_scalars = compiled(one_pass_step_scalars)
_grad_sq = compiled(grad_metric_sq_from_sums)

_BLOCK = 1024  # columns per iteration of a program's loop over its row


def supports(t: Tensor) -> bool:
    """Whether these kernels step ``t``: a CUDA floating-point tensor (or any tensor
    under Triton's interpreter)."""
    return t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel, its grid, its arguments and its compile-time
    constants. The tests compile each launch the code makes for a GPU they do not have."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constants: dict

    def __call__(self) -> None:
        # Fused multiply-adds, named here: Triton 3.9 warns when it is left to its default,
        # which it means to change.
        self.kernel[self.grid](*self.args, **self.constants, enable_fp_fusion=True)


def hi_lo(x: float) -> tuple[float, float]:
    """``x`` as two float32 numbers whose sum is ``x`` to 48 bits (a float argument of a
    Triton kernel is float32); the kernel adds them in float64 (:func:`_f64`)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


@triton.jit
def _f64(hi, lo):
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


# -- the reduction pass ------------------------------------------------------------------


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


def _acc(t: Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _row_major(x: Tensor) -> Tensor:
    # Rows are read with unit stride; a gradient in another layout is copied (it is only read).
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def check_rows(w: Tensor, rows: dict[str, Tensor | None], states: dict[str, Tensor | None] | None = None) -> None:
    """Refuse, before any launch, tensors the kernels would write at wrong addresses: the
    ``(k, d)`` weights ``w`` and the other ``rows`` must have unit stride along a row (the
    row view of a tensor in its memory order); the per-group ``states`` must be contiguous
    ``(k,)`` vectors. Host-side: reads only shapes and strides. ``None`` entries are absent."""
    k, d = w.shape
    for name, x in {"weights": w, **rows}.items():
        if x is not None and (x.shape != w.shape or (d > 1 and x.stride(1) != 1)):
            raise ValueError(
                f"{name}: the kernels write rows of shape {tuple(w.shape)} with unit stride along a row, got shape "
                f"{tuple(x.shape)} and strides {x.stride()}; pass the row view of a tensor in its memory order"
            )
    for name, x in (states or {}).items():
        if x is not None and (x.shape != (k,) or x.stride(0) != 1):
            raise ValueError(
                f"{name}: a per-group state must be a contiguous ({k},) tensor, one entry per row, got shape "
                f"{tuple(x.shape)} and strides {x.stride()}"
            )


def device_flag(refused: Tensor | None) -> Tensor | None:
    """A refusal flag as the kernels read it (int32 on the device); once per step."""
    return None if refused is None else refused.to(torch.int32)


def _row_sums_launch(
    w: Tensor, g: Tensor, m: Tensor | None, inv_scale: Tensor | None, out: Tensor, bad: Tensor
) -> Launch:
    mm = w if m is None else m
    return Launch(
        _row_sums_kernel, (w.shape[0],),
        (w, g, mm, out, bad, w if inv_scale is None else inv_scale, w.shape[1], w.stride(0), g.stride(0), mm.stride(0)),
        dict(TINY=torch.finfo(out.dtype).tiny, HAS_M=m is not None, HAS_INV=inv_scale is not None, ACC=_acc(w),
             BLOCK=_BLOCK),
    )  # fmt: skip


def _row_sums(w: Tensor, g: Tensor, m: Tensor | None, inv_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """The ``(rows, 6)`` sums of :func:`psiopt.manifold.step_row_sums` (float32, float64 for
    float64 rows) of the gradient times ``inv_scale``, and a 0-d bool flag on the device:
    whether a row is bad (a sum not finite, or a zero or underflowing squared weight norm)."""
    acc_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    out = torch.empty(w.shape[0], 6, dtype=acc_dtype, device=w.device)
    bad = torch.zeros((), dtype=torch.int32, device=w.device)
    if w.shape[0]:
        _row_sums_launch(w, _row_major(g), m, inv_scale, out, bad)()
    return out, bad > 0


def row_sums(
    ws: list[Tensor], gs: list[Tensor], ms: list[Tensor | None], inv_scale: Tensor | None
) -> tuple[list[Tensor], list[Tensor]]:
    """Every tensor's sums and flag (see ``_row_sums``), one kernel launch per tensor.
    ``ms``: the momentum (PSISGD, PSIAdaSGD) or first moment (PSIAdam) of each tensor."""
    out = [_row_sums(w, g, m, inv_scale) for w, g, m in zip(ws, gs, ms)]
    return [s for s, _ in out], [b for _, b in out]


# -- the elementwise pass ----------------------------------------------------------------


@triton.jit
def _load_sums(sums_ptr, row, sign):
    """A row's six sums in float64, those with the gradient times ``sign`` (-1: maximize)."""
    a = tl.load(sums_ptr + row * 6).to(tl.float64)
    b = sign * tl.load(sums_ptr + row * 6 + 1).to(tl.float64)
    gg = tl.load(sums_ptr + row * 6 + 2).to(tl.float64)
    mg = sign * tl.load(sums_ptr + row * 6 + 3).to(tl.float64)
    mw = tl.load(sums_ptr + row * 6 + 4).to(tl.float64)
    mm = tl.load(sums_ptr + row * 6 + 5).to(tl.float64)
    return a, b, gg, mg, mw, mm


@triton.jit
def _store_row_state(ptr, row, value, refused_ptr, HAS_REFUSED: tl.constexpr, ACC: tl.constexpr):
    """Store a row's scalar state (a second moment, a sum of squares) in its dtype, through
    the accumulation type as the reference rounds it, unless the step is refused (a flag
    on the device)."""
    value = value.to(ACC).to(ptr.dtype.element_ty)
    if HAS_REFUSED:
        tl.store(ptr + row, value, mask=tl.load(refused_ptr) == 0)
    else:
        tl.store(ptr + row, value)


@triton.jit
def _sgd_coefficients(
    a, b, gg, mg, mw, mm, gscale, lr,
    MOMENTUM: tl.constexpr, DAMPENING: tl.constexpr, NESTEROV: tl.constexpr, FIRST: tl.constexpr, HAS_M: tl.constexpr,
):  # fmt: skip
    """A PSI-SGD step's row coefficients for :func:`_write_row` (float64), from the row's
    sums of the gradient it steps along, :math:`\\hat g = \\gamma g` with ``gscale``
    :math:`\\gamma` (the sign of maximize, a GradScaler's inverse scale, PSIAdaSGD's
    adaptive factor) and :math:`g` the stored gradient: :math:`m' = \\mu m + (1-\\tau)\\,
    (a\\hat g - b w)` and :math:`w' = s(w - \\eta d)`."""
    s2, q = _step_scalars(a, b, gg, mg, mw, mm, lr, MOMENTUM, DAMPENING, NESTEROV, FIRST)
    s = tl.sqrt(s2)
    ga = gscale * a  # r = ga * g - b * w
    if FIRST:
        mu = tl.full([], 0.0, tl.float64)
        damp = tl.full([], 1.0, tl.float64)
    else:
        mu = tl.full([], MOMENTUM, tl.float64)
        damp = tl.full([], 1.0 - DAMPENING, tl.float64)
    rg = damp * ga
    rw = -damp * b
    if NESTEROV:  # w' = s((1 + lr b) w - lr ga g - lr mu m')
        cw = s * (1.0 + lr * b)
        cg = -lr * s * ga
        cm = -lr * s * MOMENTUM
    elif HAS_M:  # w' = s(w - lr m')
        cw = s
        cg = 0.0 * s
        cm = -lr * s
    else:  # w' = s((1 + lr b) w - lr ga g)
        cw = s * (1.0 + lr * b)
        cg = -lr * s * ga
        cm = 0.0 * s
    return mu, rg, rw, cw, cg, cm, s * q


@triton.jit
def _write_row(
    w_ptr, g_ptr, m_ptr, refused_ptr, row, d, sw, sg, sm, mu, rg, rw, cw, cg, cm, cq,
    HAS_M: tl.constexpr, HAS_REFUSED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The elementwise pass on one row, in place, given its coefficients (float64, cast
    once to ``ACC``): :math:`m' = \\mu m + \\rho_g g + \\rho_w w`,
    :math:`w' = c_w w + c_g g + c_m m'`, :math:`m_{\\text{new}} = m' - c_q w'`; nothing is
    written when the step is refused. Each program reads and writes its row once."""
    mu, rg, rw = mu.to(ACC), rg.to(ACC), rw.to(ACC)
    cw, cg, cm, cq = cw.to(ACC), cg.to(ACC), cm.to(ACC), cq.to(ACC)
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < d
        if HAS_REFUSED:
            # The flag loaded as a vector: Triton's interpreter refuses a mask made with a scalar.
            mask = mask & (tl.load(refused_ptr + cols * 0) == 0)
        w = tl.load(w_ptr + row * sw + cols, mask=mask, other=0.0)
        g = tl.load(g_ptr + row * sg + cols, mask=mask, other=0.0).to(ACC)
        wf = w.to(ACC)
        if HAS_M:
            m = tl.load(m_ptr + row * sm + cols, mask=mask, other=0.0)
            mp = mu * m.to(ACC) + rg * g + rw * wf
            wn = cw * wf + cg * g + cm * mp
            tl.store(m_ptr + row * sm + cols, (mp - cq * wn).to(m.dtype), mask=mask)
        else:
            wn = cw * wf + cg * g
        tl.store(w_ptr + row * sw + cols, wn.to(w.dtype), mask=mask)


@triton.jit
def _update_kernel(
    w_ptr, g_ptr, m_ptr, sums_ptr, refused_ptr, inv_ptr, d, sw, sg, sm, lr_hi, lr_lo, sign,
    MOMENTUM: tl.constexpr, DAMPENING: tl.constexpr, NESTEROV: tl.constexpr, FIRST: tl.constexpr,
    HAS_M: tl.constexpr, HAS_REFUSED: tl.constexpr, HAS_INV: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    inv = tl.load(inv_ptr).to(tl.float64) if HAS_INV else 1.0
    a, b, gg, mg, mw, mm = _load_sums(sums_ptr, row, sign)
    mu, rg, rw, cw, cg, cm, cq = _sgd_coefficients(
        a, b, gg, mg, mw, mm, sign * inv, _f64(lr_hi, lr_lo), MOMENTUM, DAMPENING, NESTEROV, FIRST, HAS_M
    )
    _write_row(w_ptr, g_ptr, m_ptr, refused_ptr, row, d, sw, sg, sm, mu, rg, rw, cw, cg, cm, cq, HAS_M, HAS_REFUSED, ACC, BLOCK)


def _update_launch(
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
) -> Launch:
    mm = w if m is None else m
    return Launch(
        _update_kernel, (w.shape[0],),
        (w, g, mm, sums, w if refused is None else refused, w if inv_scale is None else inv_scale,
         w.shape[1], w.stride(0), g.stride(0), mm.stride(0), *hi_lo(float(lr)), -1.0 if maximize else 1.0),
        dict(MOMENTUM=float(momentum), DAMPENING=float(dampening), NESTEROV=bool(nesterov), FIRST=bool(first),
             HAS_M=m is not None, HAS_REFUSED=refused is not None, HAS_INV=inv_scale is not None, ACC=_acc(w),
             BLOCK=_BLOCK),
    )  # fmt: skip


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
    """PSISGD's elementwise pass of every tensor, in place on the row views ``ws`` and
    ``ms`` (the operations of :func:`psiopt.optim._functional._elementwise_pass`), one
    kernel launch per tensor, one program per row; a true ``refused`` flag (read on the
    device) makes every program write nothing."""
    for w, m in zip(ws, ms):  # every tensor checked before any is written
        check_rows(w, {"momentum": m})
    refused = device_flag(refused)
    for w, g, m, s, first in zip(ws, gs, ms, sums, firsts):
        if w.shape[0]:
            _update_launch(
                w, _row_major(g), m, s, refused, inv_scale,
                lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, first=first, maximize=maximize,
            )()  # fmt: skip
