"""The Triton kernels against the reference loops: one function per case, on any device.

``tests/test_triton_kernels.py`` runs every case twice: on CPU tensors under Triton's
interpreter, in a child process started with ``TRITON_INTERPRET=1`` (it must be set
before the kernels are defined, and only that process sees it), where this module is
the program (``python tests/_triton_cases.py``, one JSON line per case on stdout); and on
CUDA tensors, in the test process, where a GPU is present. Importing this module imports
neither Triton nor the kernels: :data:`CASES` names the cases for pytest.

Each case returns the largest errors found (weights, optimizer state), relative to each
tensor's largest entry, with the tolerances of its dtype; property cases (bit-for-bit
agreements, refusals) raise when the property fails. Sizes are small: the interpreter runs each program in Python.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

if __name__ == "__main__":  # run as a program: psiopt from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psiopt
from psiopt.grouping import as_grouping

# (shape, grouping): conv channels, a (rows, 27) matrix, GroupNorm blocks, a LayerNorm
# tensor, and one group of 2400 entries, longer than a kernel's block of 1024 columns.
SHAPES = [
    ((4, 3, 3, 3), "channel"),
    ((5, 27), "channel"),
    ((8, 2, 2), "block(2)"),
    ((3, 4), "tensor"),
    ((2, 3, 20, 20), "tensor"),
]
STEPS = 2  # a first step and a general one (the interpreter takes about 30 ms a launch)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# The optimizer state: the same, except in float32, where the transported momentum differs
# from float64's by up to 1e-4 (relative) in the reference loop itself (the projection
# removes a radial part much larger than what remains; the kernels, which form it from
# float64 scalars, are closer to float64 than the loop is).
STATE_TOLERANCE = {**TOLERANCE, torch.float32: 3e-4}

SGD_OPTIONS = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    "dampening-maximize": dict(momentum=0.9, dampening=0.2, maximize=True),
    "nesterov": dict(momentum=0.5, nesterov=True),
    "nesterov-maximize": dict(momentum=0.9, nesterov=True, maximize=True),
    "plain-maximize": dict(momentum=0.0, maximize=True),
}
ADAM_OPTIONS = {
    "nesterov": dict(nesterov=True),
    "plain": dict(nesterov=False),
    "amsgrad-maximize": dict(nesterov=True, amsgrad=True, maximize=True),
    "plain-amsgrad": dict(nesterov=False, amsgrad=True, beta1=0.5, beta2=0.9, eps=1e-3),
}
ADASGD_OPTIONS = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    "dampening-maximize": dict(momentum=0.9, dampening=0.2, maximize=True, eps=1e-2),
    "nesterov": dict(momentum=0.5, nesterov=True),
}
Checks = dict  # what a case measured: {name: (largest relative error, tolerance)}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- helpers ---------------------------------------------------------------------------------


def _params(dtype: torch.dtype, device: str, channels_last: bool = False, seed: int = 5) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape, _ in SHAPES:
        p = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
        if channels_last and p.dim() == 4:
            p = p.contiguous(memory_format=torch.channels_last)
        params.append(nn.Parameter(p))
    return params


def _grads(params: list[torch.Tensor], step: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.device, p.dtype) for p in params]


def _relative_error(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest difference of each pair, relative to the reference's largest entry."""
    assert len(ours) == len(reference) and len(ours) > 0
    worst = 0.0
    for p, q in zip(ours, reference):
        p, q = p.detach().cpu().double(), q.detach().cpu().double()
        worst = max(worst, float((p - q).abs().max() / q.abs().max()))
    return worst


def _checks(dtype, params, reference, state, ref_state) -> Checks:
    """The weights' and the optimizer state's largest relative errors, with their tolerances."""
    assert [x is None for x in state] == [y is None for y in ref_state]
    checks = {"weights": (_relative_error(params, reference), TOLERANCE[dtype])}
    if any(x is not None for x in state):
        pairs = [(x, y) for x, y in zip(state, ref_state) if x is not None]
        checks["state"] = (_relative_error([x for x, _ in pairs], [y for _, y in pairs]), STATE_TOLERANCE[dtype])
    return checks


def _rows(params: list[torch.Tensor]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    return [as_grouping(g).rows for _, g in SHAPES][: len(params)]


def _row_views(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    views = [rows(t) for rows, t in zip(_rows(tensors), tensors)]
    assert all(v.data_ptr() == t.data_ptr() for v, t in zip(views, tensors))  # written through
    return views


# -- PSISGD, through the optimizer ------------------------------------------------------------


def _triton_psisgd(params, **options) -> psiopt.PSISGD:
    """PSISGD whose one-pass tensors all take the Triton kernels (on CPU tensors: the
    interpreter's), grouped as :data:`SHAPES`."""
    from psiopt.optim import _triton_kernels

    class TritonPSISGD(psiopt.PSISGD):
        def _kernels(self, group, p):
            return _triton_kernels

    groups = [{"params": [p], "grouping": g} for p, (_, g) in zip(params, SHAPES)]
    return TritonPSISGD(groups, lr=0.1, angular_rate="constant", **options)


def _reference_psisgd(dtype, options) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    params = _params(dtype, "cpu")
    groups = [{"params": [p], "grouping": g} for p, (_, g) in zip(params, SHAPES)]
    opt = psiopt.PSISGD(
        groups, lr=0.1, foreach=False, angular_rate="constant", **{k: v for k, v in options.items() if k != "capturable"}
    )
    for k in range(STEPS):
        for p, g in zip(params, _grads(params, k)):
            p.grad = g
        opt.step()
    return params, [opt.state[p].get("momentum_buffer") for p in params]


def psisgd_matches_the_loop(device: str, dtype: str, options: str, capturable: bool = False) -> Checks:
    dtype_ = DTYPES[dtype]
    opts = dict(SGD_OPTIONS[options], **({"capturable": True} if capturable else {}))
    params = _params(dtype_, device, channels_last=dtype_ in (torch.float64, torch.float32))
    opt = _triton_psisgd(params, **opts)
    for k in range(STEPS):
        for p, g in zip(params, _grads(params, k)):
            p.grad = g
        opt.step()
        if capturable:
            assert not bool(opt.last_step_refused)
    reference, ref_buffers = _reference_psisgd(dtype_, opts)
    return _checks(dtype_, params, reference, [opt.state[p].get("momentum_buffer") for p in params], ref_buffers)


def psisgd_under_a_grad_scaler_is_the_unscaled_step(device: str) -> Checks:
    """A power-of-two scale: the kernels unscale exactly, so the steps agree bit for bit;
    an infinite gradient: the scaler's flag refuses the step on the device."""
    plain, scaled = _params(torch.float32, device), _params(torch.float32, device)
    plain_opt = _triton_psisgd(plain, momentum=0.9, fused=True)
    opt = _triton_psisgd(scaled, momentum=0.9, fused=True)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    for k in range(2):
        for p, q, g in zip(plain, scaled, _grads(plain, k)):
            p.grad, q.grad = g, g * 2.0**10
        plain_opt.step()
        scaler.scale(torch.ones((), device=device))  # what a training step does first: it sets the scale up
        scaler.step(opt)
        scaler.update()
    for p, q in zip(plain, scaled):
        assert torch.equal(p, q) and torch.equal(plain_opt.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"])
    before = [p.detach().clone() for p in scaled]
    scaled[1].grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, b) for p, b in zip(scaled, before))
    return {}


def psisgd_refuses_bad_steps_without_writing(device: str) -> Checks:
    """A NaN gradient under ``capturable`` is refused on the device; a zero group raises;
    neither writes a weight."""
    params = _params(torch.float32, device)
    for capturable in (True, False):
        opt = _triton_psisgd(params, momentum=0.9, capturable=capturable)
        for p, g in zip(params, _grads(params, 0)):
            p.grad = g
        if capturable:
            params[1].grad[0, 0] = float("nan")
        else:
            with torch.no_grad():
                params[1][3] = 0.0  # a whole group (channel 3)
        before = [p.detach().clone() for p in params]
        try:
            opt.step()
            assert capturable and bool(opt.last_step_refused), "the bad step was taken"
        except psiopt.ZeroGroupError:
            assert not capturable
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    return {}


# -- PSIAdam and PSIAdaSGD, through their kernels ----------------------------------------------


def _adaptive_state(params, kind: str, amsgrad: bool = False) -> dict[str, list[torch.Tensor]]:
    groups = [as_grouping(g).num_groups(p.shape) for p, (_, g) in zip(params, SHAPES)]
    if kind == "adam":
        state = {
            "exp_avg": [torch.zeros_like(p) for p in params],
            "exp_avg_sq": [p.new_zeros(k) for p, k in zip(params, groups)],
        }
        if amsgrad:
            state["max_exp_avg_sq"] = [p.new_zeros(k) for p, k in zip(params, groups)]
        return state
    return {"sum": [p.new_full((k,), 0.0) for p, k in zip(params, groups)]}


def _row_sums_and_flag(ws, gs, ms, inv_scale):
    from psiopt.optim._triton_adaptive import row_sums

    sums, bad = row_sums(ws, gs, ms, inv_scale)
    return sums, torch.stack(bad).any()


def _triton_adam_step(params, grads, state, step, inv_scale=None, *, amsgrad=False, lr=0.05, **options):
    from psiopt.optim._triton_adaptive import psiadam_update

    ws, gs, ms = _row_views(params), _row_views(grads), _row_views(state["exp_avg"])
    sums, refused = _row_sums_and_flag(ws, gs, ms, inv_scale)
    psiadam_update(
        ws, gs, ms, state["exp_avg_sq"], state["max_exp_avg_sq"] if amsgrad else None, [float(step)] * len(ws),
        sums, refused, inv_scale, lr=lr, **options,
    )  # fmt: skip
    return refused


def _adam_options(options: dict) -> dict:
    out = dict(beta1=0.9, beta2=0.999, eps=1e-8, maximize=False)
    out.update(options)
    return out


def psiadam_matches_the_loop(device: str, dtype: str, options: str) -> Checks:
    from psiopt.optim._adaptive import _psiadam_rows, _single_tensor_rows

    dtype_ = DTYPES[dtype]
    opts = _adam_options(ADAM_OPTIONS[options])
    amsgrad = opts.pop("amsgrad", False)
    reference, params = _params(dtype_, "cpu"), _params(dtype_, device)
    ref_state, state = _adaptive_state(reference, "adam", amsgrad), _adaptive_state(params, "adam", amsgrad)
    group_kinds = ["exp_avg_sq", "max_exp_avg_sq"] if amsgrad else ["exp_avg_sq"]
    for k in range(STEPS):
        with torch.no_grad():
            _single_tensor_rows(
                _psiadam_rows, reference, _grads(reference, k), _rows(reference), [ref_state["exp_avg"]],
                [ref_state[kind] for kind in group_kinds], [{"step": float(k + 1)}] * len(reference),
                lr=0.05, beta1=opts["beta1"], beta2=opts["beta2"], eps=opts["eps"], maximize=opts["maximize"],
                nesterov=opts["nesterov"], amsgrad=amsgrad, rate=None,
            )  # fmt: skip
            refused = _triton_adam_step(params, _grads(params, k), state, k + 1, amsgrad=amsgrad, **opts)
        assert not bool(refused)
    return _checks(dtype_, params, reference, [t for kind in state for t in state[kind]],
                   [t for kind in state for t in ref_state[kind]])  # fmt: skip


def _triton_adasgd_step(params, grads, state, buffers, first, inv_scale=None, *, lr=0.1, **options):
    from psiopt.optim._triton_adaptive import psiadasgd_update

    has_m = options.get("momentum", 0.0) != 0
    ws, gs = _row_views(params), _row_views(grads)
    ms = _row_views(buffers) if has_m else [None] * len(ws)
    sums, refused = _row_sums_and_flag(ws, gs, ms, inv_scale)
    psiadasgd_update(ws, gs, ms, state["sum"], sums, [first] * len(ws), refused, inv_scale, lr=lr, **options)
    return refused


def _adasgd_options(options: dict) -> dict:
    out = dict(momentum=0.0, dampening=0.0, nesterov=False, eps=1e-10, maximize=False)
    out.update(options)
    return out


def psiadasgd_matches_the_loop(device: str, dtype: str, options: str) -> Checks:
    from psiopt.optim._adaptive import _psiadasgd_rows, _single_tensor_rows

    dtype_ = DTYPES[dtype]
    opts = _adasgd_options(ADASGD_OPTIONS[options])
    reference, params = _params(dtype_, "cpu"), _params(dtype_, device)
    ref_state, state = _adaptive_state(reference, "adasgd"), _adaptive_state(params, "adasgd")
    ref_buffers: list[torch.Tensor | None] = [None] * len(reference)
    buffers = [torch.zeros_like(p) for p in params]
    for k in range(STEPS):
        with torch.no_grad():
            _single_tensor_rows(
                _psiadasgd_rows, reference, _grads(reference, k), _rows(reference), [ref_buffers], [ref_state["sum"]],
                [{}] * len(reference), lr=0.1, **opts,
            )  # fmt: skip
            refused = _triton_adasgd_step(params, _grads(params, k), state, buffers, k == 0, **opts)
        assert not bool(refused)
    has_m = opts["momentum"] != 0
    return _checks(dtype_, params, reference, [*state["sum"], *(buffers if has_m else [])],
                   [*ref_state["sum"], *(ref_buffers if has_m else [])])  # fmt: skip


def adaptive_kernels_unscale_exactly_and_refuse_on_the_device(device: str) -> Checks:
    """PSIAdam (AMSGrad) and PSIAdaSGD (momentum): a power-of-two GradScaler scale gives
    the unscaled step bit for bit; a refused step (a NaN gradient's flag) writes nothing,
    the rows nor the per-group state."""
    scale = 2.0**12
    inv = torch.tensor(1 / scale, device=device)
    for kind in ("adam", "adasgd"):
        plain, scaled = _params(torch.float32, device), _params(torch.float32, device)
        states = [_adaptive_state(ps, kind, amsgrad=True) for ps in (plain, scaled)]
        buffers = [[torch.zeros_like(p) for p in ps] for ps in (plain, scaled)]
        with torch.no_grad():
            for k in range(STEPS):
                for ps, state, bufs, factor, inv_scale in zip((plain, scaled), states, buffers, (1.0, scale), (None, inv)):
                    grads = _grads(ps, k, factor)
                    if kind == "adam":
                        _triton_adam_step(ps, grads, state, k + 1, inv_scale, amsgrad=True, **_adam_options({"nesterov": True}))
                    else:
                        _triton_adasgd_step(ps, grads, state, bufs, k == 0, inv_scale, **_adasgd_options({"momentum": 0.9}))
            for x, y in zip([*plain, *buffers[0], *(t for v in states[0].values() for t in v)],
                            [*scaled, *buffers[1], *(t for v in states[1].values() for t in v)]):  # fmt: skip
                assert torch.equal(x, y), kind
            everything = [*scaled, *buffers[1], *(t for v in states[1].values() for t in v)]
            before = [t.clone() for t in everything]
            grads = _grads(scaled, STEPS)
            grads[2][1, 0, 1] = float("nan")
            if kind == "adam":
                refused = _triton_adam_step(scaled, grads, states[1], STEPS + 1, inv, amsgrad=True, **_adam_options({"nesterov": True}))
            else:
                refused = _triton_adasgd_step(scaled, grads, states[1], buffers[1], False, inv, **_adasgd_options({"momentum": 0.9}))
            assert bool(refused), kind
            assert all(torch.equal(t, b) for t, b in zip(everything, before)), kind
    return {}


def adaptive_kernels_read_gradients_in_any_layout(device: str) -> Checks:
    """A gradient whose rows are not contiguous (a transposed matrix) is read as a copy:
    the step is the one of the same gradient stored row by row, bit for bit."""
    for kind in ("adam", "adasgd"):
        results = []
        for transposed in (False, True):
            params = _params(torch.float32, device)
            state = _adaptive_state(params, kind)
            grads = _grads(params, 0)
            if transposed:
                grads[1] = grads[1].T.contiguous().T  # (5, 27) with strides (1, 5)
                assert grads[1].stride() == (1, 5)
            with torch.no_grad():
                if kind == "adam":
                    from psiopt.optim._triton_adaptive import psiadam_update, row_sums

                    ws, ms = _row_views(params), _row_views(state["exp_avg"])
                    gs = [rows(g) for rows, g in zip(_rows(grads), grads)]
                    sums, _ = row_sums(ws, gs, ms, None)
                    psiadam_update(ws, gs, ms, state["exp_avg_sq"], None, [1.0] * len(ws), sums,
                                   lr=0.05, **_adam_options({"nesterov": True}))  # fmt: skip
                else:
                    from psiopt.optim._triton_adaptive import psiadasgd_update, row_sums

                    ws = _row_views(params)
                    gs = [rows(g) for rows, g in zip(_rows(grads), grads)]
                    sums, _ = row_sums(ws, gs, [None] * len(ws), None)
                    psiadasgd_update(ws, gs, [None] * len(ws), state["sum"], sums, [True] * len(ws),
                                     lr=0.1, **_adasgd_options({}))  # fmt: skip
            results.append(params)
        assert all(torch.equal(p, q) for p, q in zip(*results)), kind
    return {}


# -- the adaptive steps through the optimizers (psiopt.optim._triton_adaptive_kernels) ----------

OPTIMIZER_STEPS = 3  # a general step, then two on the kept batches
# (class name, options): PSIAdam with its "adam" angular rate (no pull), PSIAdamW with
# weight decay (the rate's pull), PSIAdaSGD, and PSISGD's default "sgd" angular rate.
ADAPTIVE_OPTIMIZERS = {
    "psiadam-plain": ("PSIAdam", dict(lr=0.05)),
    "psiadam-nesterov-amsgrad-maximize": ("PSIAdam", dict(lr=0.05, nesterov=True, amsgrad=True, maximize=True)),
    "psiadamw-decay": ("PSIAdamW", dict(lr=0.05, weight_decay=0.5, nesterov=True)),
    "psiadasgd-momentum": ("PSIAdaSGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    "psisgd-rate-momentum-decay": ("PSISGD", dict(lr=0.1, momentum=0.9, weight_decay=5e-3)),
    "psisgd-rate-plain": ("PSISGD", dict(lr=0.1, momentum=0.0)),
}


def _adaptive_optimizer(name: str, params: list[nn.Parameter], *, triton: bool, **options):
    """The optimizer ``name`` on ``params`` grouped as :data:`SHAPES`, with a Euclidean
    parameter (``params[-1]``) in a group of its own: with ``triton``, every
    scale-invariant tensor takes the Triton adaptive kernels (on CPU tensors: the
    interpreter's); else the reference loop (``foreach=False``)."""
    cls = getattr(psiopt, name)
    if triton:
        from psiopt.optim import _triton_adaptive_kernels

        class Triton(cls):
            def _adaptive_kernels(self, group, p):
                return _triton_adaptive_kernels

        cls = Triton
    else:
        options = dict(options, foreach=False)
    groups = [{"params": [p], "grouping": g} for p, (_, g) in zip(params, SHAPES)] + [{"params": params[-1:]}]
    return cls(groups, **options)


def _adaptive_params(dtype: torch.dtype, device: str) -> list[nn.Parameter]:
    bias = torch.randn(7, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(device, dtype)
    return [*_params(dtype, device), nn.Parameter(bias)]


def _state_tensors(opt, params) -> dict[str, list[torch.Tensor]]:
    """The optimizer state of ``params`` by key, ``step`` with the rest."""
    keys = sorted({key for p in params for key in opt.state[p]})
    return {key: [opt.state[p][key] for p in params if key in opt.state[p]] for key in keys}


def _assert_kept_triton_batches(opt) -> None:
    """Every scale-invariant tensor was stepped by the Triton module, whose batches are kept."""
    from psiopt.optim import _triton_adaptive_kernels

    plans = list(opt._adaptive_plans.values())
    assert all(not plan.loop and plan.kernel_sets for plan in plans[: len(SHAPES)])
    for plan in plans:
        for ks in plan.kernel_sets:
            assert isinstance(ks.batch, _triton_adaptive_kernels.AdaptiveRows)


def adaptive_optimizer_matches_the_loop(device: str, dtype: str, optimizer: str) -> Checks:
    """Several steps of the optimizer with the Triton adaptive kernels against the
    reference loop: the weights and every state tensor (the step counters exactly)."""
    dtype_ = DTYPES[dtype]
    name, options = ADAPTIVE_OPTIMIZERS[optimizer]
    ours, reference = _adaptive_params(dtype_, device), _adaptive_params(dtype_, "cpu")
    opts = [_adaptive_optimizer(name, ps, triton=t, **options) for ps, t in ((ours, True), (reference, False))]
    for k in range(OPTIMIZER_STEPS):
        for ps, opt in zip((ours, reference), opts):
            for p, g in zip(ps, _grads(ps, k)):
                p.grad = g
            opt.step()
    _assert_kept_triton_batches(opts[0])
    states = [_state_tensors(opt, ps) for ps, opt in zip((ours, reference), opts)]
    assert states[0].keys() == states[1].keys(), (states[0].keys(), states[1].keys())
    assert "exp_avg_sq" in states[0] or "sum" in states[0]
    checks = {"weights": (_relative_error(ours, reference), TOLERANCE[dtype_])}
    for key, tensors in states[0].items():
        if key == "step":
            assert all(torch.equal(x.cpu(), y) for x, y in zip(tensors, states[1][key])), key
        else:
            checks[key] = (_relative_error(tensors, states[1][key]), STATE_TOLERANCE[dtype_])
    return checks


def adaptive_optimizer_refuses_non_finite_gradients_before_any_write(device: str) -> Checks:
    """On the kept batches (after a first step), a NaN in a scale-invariant gradient or in
    the Euclidean one raises, and no weight or state is written."""
    for where in (2, -1):
        params = _adaptive_params(torch.float32, device)
        opt = _adaptive_optimizer("PSIAdamW", params, triton=True, lr=0.05, weight_decay=0.5)
        for k in range(2):
            for p, g in zip(params, _grads(params, k)):
                p.grad = g
            if k == 1:
                params[where].grad.view(-1)[1] = float("nan")
                before = [t.clone() for t in [*params, *(t for ts in _state_tensors(opt, params).values() for t in ts)]]
                try:
                    opt.step()
                except FloatingPointError:
                    pass
                else:
                    raise AssertionError(f"a NaN gradient (parameter {where}) was stepped")
                after = [*params, *(t for ts in _state_tensors(opt, params).values() for t in ts)]
                assert all(torch.equal(x, y) for x, y in zip(after, before)), where
            else:
                opt.step()
    return {}


def adaptive_optimizer_leaves_and_then_refuses_a_tampered_state(device: str) -> Checks:
    """A NaN written into a per-group state behind the optimizer's back: the next step
    (on the kept batches, which do not read the state) leaves that row as it was and
    steps the others; the step after reports it (the check pass reads the write pass's
    device flag) and raises, naming the state, before any write."""
    params = _adaptive_params(torch.float32, device)
    opt = _adaptive_optimizer("PSIAdam", params, triton=True, lr=0.05)

    def step(k):
        for p, g in zip(params, _grads(params, k)):
            p.grad = g
        opt.step()

    step(0)
    step(1)
    opt.state[params[0]]["exp_avg_sq"][0] = float("nan")  # channel 0 of the conv weight
    before = params[0].detach().clone()
    step(2)
    assert torch.equal(params[0][0], before[0]) and not torch.equal(params[0][1:], before[1:])
    before = [p.detach().clone() for p in params]
    try:
        step(3)
    except FloatingPointError as err:
        assert "optimizer state holds NaN" in str(err), err
    else:
        raise AssertionError("a NaN state was stepped")
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    return {}


# -- the cases -------------------------------------------------------------------------------


def _cases() -> dict[str, Callable[[str], Checks]]:
    cases: dict[str, Callable[[str], Checks]] = {}

    def add(name: str, fn: Callable, **kwargs) -> None:
        cases[name] = lambda device, fn=fn, kwargs=kwargs: fn(device, **kwargs)

    # Every option in float64; the float32 kernels (float32 sums, other code) on a few.
    for options in SGD_OPTIONS:
        add(f"psisgd-float64-{options}", psisgd_matches_the_loop, dtype="float64", options=options)
    for options in ("plain", "dampening-maximize", "nesterov-maximize"):
        add(f"psisgd-float32-{options}", psisgd_matches_the_loop, dtype="float32", options=options)
    add("psisgd-float32-capturable", psisgd_matches_the_loop, dtype="float32", options="momentum", capturable=True)
    add("psisgd-bfloat16-nesterov-maximize", psisgd_matches_the_loop, dtype="bfloat16", options="nesterov-maximize")
    add("psisgd-float16-dampening-maximize", psisgd_matches_the_loop, dtype="float16", options="dampening-maximize")
    add("psisgd-grad-scaler", psisgd_under_a_grad_scaler_is_the_unscaled_step)
    add("psisgd-refusals", psisgd_refuses_bad_steps_without_writing)
    for options in ADAM_OPTIONS:
        add(f"psiadam-float64-{options}", psiadam_matches_the_loop, dtype="float64", options=options)
    for options in ADASGD_OPTIONS:
        add(f"psiadasgd-float64-{options}", psiadasgd_matches_the_loop, dtype="float64", options=options)
    for options in ("nesterov", "plain-amsgrad"):
        add(f"psiadam-float32-{options}", psiadam_matches_the_loop, dtype="float32", options=options)
    for options in ("momentum", "dampening-maximize"):
        add(f"psiadasgd-float32-{options}", psiadasgd_matches_the_loop, dtype="float32", options=options)
    add("psiadam-bfloat16-nesterov", psiadam_matches_the_loop, dtype="bfloat16", options="nesterov")
    add("psiadam-float16-amsgrad-maximize", psiadam_matches_the_loop, dtype="float16", options="amsgrad-maximize")
    add("psiadasgd-bfloat16-nesterov", psiadasgd_matches_the_loop, dtype="bfloat16", options="nesterov")
    add("adaptive-grad-scale-and-refusal", adaptive_kernels_unscale_exactly_and_refuse_on_the_device)
    add("adaptive-gradient-layouts", adaptive_kernels_read_gradients_in_any_layout)
    # Through the optimizers: every one in float64; PSIAdamW and PSISGD's rate in float32.
    for optimizer in ADAPTIVE_OPTIMIZERS:
        add(f"optimizer-float64-{optimizer}", adaptive_optimizer_matches_the_loop, dtype="float64", optimizer=optimizer)
    for optimizer in ("psiadamw-decay", "psisgd-rate-momentum-decay"):
        add(f"optimizer-float32-{optimizer}", adaptive_optimizer_matches_the_loop, dtype="float32", optimizer=optimizer)
    add("optimizer-non-finite-gradients", adaptive_optimizer_refuses_non_finite_gradients_before_any_write)
    add("optimizer-tampered-state", adaptive_optimizer_leaves_and_then_refuses_a_tampered_state)
    return cases


CASES = _cases()


def run(name: str, device: str) -> dict:
    """One case's result: ``{"case", "checks"}`` (see :data:`Checks`; property cases check
    by raising, and have none), or ``{"case", "failure"}`` with the traceback."""
    try:
        checks = CASES[name](device)
    except Exception:  # reported to the test, which fails with it
        return {"case": name, "failure": traceback.format_exc()}
    return {"case": name, "checks": checks}


if __name__ == "__main__":
    for case in sys.argv[1:] or CASES:
        print(json.dumps(run(case, "cpu")), flush=True)
