"""PSISGD's step paths at the constant angular rate: the reference loop, the one-pass torch
step (foreach), the fused kernels, and the default; their checks with and without host
synchronization; GradScaler and torch.compile. (The default 'sgd' rate takes the adaptive
step's paths, tested with the other adaptive rules in test_adaptive_paths.py.)"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import pytest
import torch
from torch import nn

import psiopt

PSISGD = functools.partial(psiopt.PSISGD, angular_rate="constant")
HAS_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="the fused CPU kernels need numba (a psiopt dependency; missing here)")

SHAPES = [
    ((4, 3, 3, 3), "channel"),
    ((6, 4, 2, 2), "channel"),
    ((5, 27), "channel"),
    ((8, 2, 2), "block(2)"),
    ((6, 3, 2, 2), "block(3)"),
    ((3, 4), "tensor"),
    ((4, 2, 3, 3), "tensor"),
]
OPTIONS = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    "dampening-maximize": dict(momentum=0.9, dampening=0.2, maximize=True),
    "nesterov": dict(momentum=0.5, nesterov=True),
    "nesterov-maximize": dict(momentum=0.9, nesterov=True, maximize=True),
}
PATHS = {
    "foreach": dict(foreach=True),
    "fused": pytest.param(dict(fused=True), marks=needs_numba),
    "default": dict(),
}


def _params(dtype, channels_last=False, seed=5):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape, _ in SHAPES:
        p = torch.randn(shape, generator=gen, dtype=dtype)
        if channels_last and p.dim() == 4:
            p = p.contiguous(memory_format=torch.channels_last)
        params.append(nn.Parameter(p))
    return params


def _run(params, steps=4, scale=None, **kwargs):
    groups = [{"params": [p], "grouping": g} for p, (_, g) in zip(params, SHAPES)]
    opt = PSISGD(groups, lr=0.1, **kwargs)
    for k in range(steps):
        gen = torch.Generator().manual_seed(100 + k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if scale is not None:
                p.grad.mul_(scale)
        opt.step()
    return opt


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_path_matches_the_reference_loop(dtype, path, options, channels_last) -> None:
    reference = _params(dtype)
    ref_opt = _run(reference, foreach=False, **options)
    params = _params(dtype, channels_last)
    strides = [p.stride() for p in params]
    opt = _run(params, **path, **options)
    eps = 1e-12 if dtype == torch.float64 else 2e-5  # relative to each tensor's largest entry

    def close(x, y):
        torch.testing.assert_close(x, y, rtol=eps, atol=eps * float(y.abs().max()))

    for p, q, stride in zip(params, reference, strides):
        assert p.stride() == stride  # the layout is kept: the step writes in place
        close(p.detach(), q.detach())
        if options["momentum"]:
            buf = opt.state[p]["momentum_buffer"]
            assert buf.stride() == p.stride()
            close(buf, ref_opt.state[q]["momentum_buffer"])


@pytest.mark.parametrize("options", [OPTIONS["dampening-maximize"], OPTIONS["nesterov-maximize"]], ids=["dampening", "nesterov"])
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_many_tensors_of_mixed_dtypes_in_one_group_match_the_reference_loop(path, options) -> None:
    """One param group per grouping, each holding float64 and float32 tensors, contiguous
    and channels-last: the compiled CPU kernels step all of them in one call per dtype
    and pass, so each tensor must still get its own rows, sums and first-step flag."""

    def build():
        params = [*_params(torch.float64), *_params(torch.float32, channels_last=True, seed=6)]
        groupings = [g for _, g in SHAPES] * 2
        by_grouping: dict[str, list] = {}
        for p, g in zip(params, groupings):
            by_grouping.setdefault(g, []).append(p)
        return params, [{"params": ps, "grouping": g} for g, ps in by_grouping.items()]

    (reference, ref_groups), (params, groups) = build(), build()
    opts = [PSISGD(ref_groups, lr=0.1, foreach=False, **options), PSISGD(groups, lr=0.1, **path, **options)]
    for k in range(3):
        gen = torch.Generator().manual_seed(200 + k)
        for p, q in zip(params, reference):
            q.grad = torch.randn(q.shape, generator=gen, dtype=q.dtype)
            p.grad = q.grad.clone()  # contiguous: another layout than the channels-last weights
        for opt in opts:
            opt.step()
    for p, q in zip(params, reference):
        eps = 1e-12 if p.dtype == torch.float64 else 2e-5
        for x, y in ((p.detach(), q.detach()), (opts[1].state[p]["momentum_buffer"], opts[0].state[q]["momentum_buffer"])):
            torch.testing.assert_close(x, y, rtol=eps, atol=eps * float(y.abs().max()))


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_weights_and_buffers_replaced_between_steps_are_the_ones_stepped(path) -> None:
    """The one-pass step keeps row views from one step to the next: a weight given new
    storage (``p.data = ...``) or a momentum buffer replaced (a loaded state dict) must
    be read and written there, not in the memory of the old views."""
    reference, params = _params(torch.float64), _params(torch.float64, channels_last=True)
    groups = [[{"params": [p], "grouping": g} for p, (_, g) in zip(ps, SHAPES)] for ps in (reference, params)]
    opts = [PSISGD(groups[0], lr=0.1, momentum=0.9, foreach=False), PSISGD(groups[1], lr=0.1, momentum=0.9, **path)]
    for k in range(4):
        gen = torch.Generator().manual_seed(300 + k)
        for p, q in zip(params, reference):
            q.grad = torch.randn(q.shape, generator=gen, dtype=q.dtype)
            p.grad = q.grad.clone()
        if k == 2:
            for p in params:
                p.data = p.data.clone()  # same layout, new storage
            opts[1].load_state_dict(opts[1].state_dict())  # new momentum buffers
        for opt in opts:
            opt.step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opts[1].state[p]["momentum_buffer"], opts[0].state[q]["momentum_buffer"], rtol=1e-12, atol=1e-12)


@needs_numba
@pytest.mark.parametrize("change", ["zero-group", "nan-euclidean-gradient", "gradient-layout", "momentum-off"])
def test_kept_row_batches_hand_any_other_step_to_the_general_one(change) -> None:
    """From its second step on, the fused CPU step runs on row batches kept from one step
    to the next (PSISGD._kept_batches_step). A step they cannot take as kept must reach
    the general step with nothing written: it raises, naming the parameter, or steps as
    the reference loop does."""
    reference, params = _params(torch.float64), _params(torch.float64)
    extra = [nn.Parameter(torch.ones(3, dtype=torch.float64)) for _ in range(2)]
    opts = [
        PSISGD([*({"params": [p], "grouping": g} for p, (_, g) in zip(ps, SHAPES)), {"params": [e]}], lr=0.1, momentum=0.9, **path)
        for ps, e, path in ((reference, extra[0], dict(foreach=False)), (params, extra[1], dict(fused=True)))
    ]  # fmt: skip
    for k in range(4):
        gen = torch.Generator().manual_seed(400 + k)
        for p, q in zip(params, reference):
            q.grad = torch.randn(q.shape, generator=gen, dtype=q.dtype)
            p.grad = q.grad.clone()
        extra[0].grad, extra[1].grad = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        if k == 2:
            if change == "zero-group":
                with torch.no_grad():
                    params[1][2].zero_()
            before = [p.detach().clone() for p in (*params, extra[1])]
            buffers = [opts[1].state[p]["momentum_buffer"].clone() for p in (*params, extra[1])]
            if change == "zero-group":
                with pytest.raises(psiopt.ZeroGroupError, match=r"param_groups\[1\]\['params'\]\[0\]"):
                    opts[1].step()
            elif change == "nan-euclidean-gradient":
                extra[1].grad[1] = float("nan")
                with pytest.raises(FloatingPointError, match=r"param_groups\[7\]\['params'\]\[0\].*NaN or infinite"):
                    opts[1].step()
            if change in ("zero-group", "nan-euclidean-gradient"):
                for p, w, m in zip((*params, extra[1]), before, buffers):
                    assert torch.equal(p, w) and torch.equal(opts[1].state[p]["momentum_buffer"], m)
                return
            if change == "gradient-layout":
                for p in params:
                    if p.dim() == 4:
                        p.grad = p.grad.contiguous(memory_format=torch.channels_last)
            else:
                for opt in opts:
                    for group in opt.param_groups:
                        group["momentum"] = 0.0
        for opt in opts:
            opt.step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)


def _kept_batch_optimizers(dtype, seed=7):
    """PSISGD with fused kernels, two steps taken: its next steps run on kept row batches
    (the row-resident write pass). Returns the parameters, the optimizer and a gradient maker."""
    params = _params(dtype, seed=seed)
    opt = PSISGD([{"params": [p], "grouping": g} for p, (_, g) in zip(params, SHAPES)], lr=0.1, momentum=0.9, fused=True)

    def grads(k):
        gen = torch.Generator().manual_seed(500 + k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)

    for k in range(2):
        grads(k)
        opt.step()
    assert all(plan.batch is not None for plan in opt._group_plans.values())
    return params, opt, grads


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [OPTIONS["momentum"], OPTIONS["nesterov-maximize"], OPTIONS["dampening-maximize"]])
def test_kept_row_resident_steps_equal_general_steps_bit_for_bit(dtype, options) -> None:
    """A resumed run takes the general step first, an uninterrupted one the kept
    row-resident step: their sums come from the same compiled loops, so the two runs agree
    bit for bit (the promise of a bit-exact resume)."""
    kept, general = _params(dtype), _params(dtype)

    def make(params):
        return PSISGD([{"params": [p], "grouping": g} for p, (_, g) in zip(params, SHAPES)], lr=0.1, fused=True, **options)

    opt = make(kept)
    state = None
    for k in range(5):
        gen = torch.Generator().manual_seed(700 + k)
        for p, q in zip(kept, general):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
            q.grad = p.grad.clone()
        opt.step()
        fresh = make(general)  # a new optimizer each step: every step is a general one
        if state is not None:
            fresh.load_state_dict(state)
        fresh.step()
        state = fresh.state_dict()
    assert all(plan.batch is not None for plan in opt._group_plans.values())
    for p, q in zip(kept, general):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], fresh.state[q]["momentum_buffer"])


@needs_numba
def test_row_resident_step_sums_momentum_in_float64_where_float32_overflows() -> None:
    """The row-resident pass sums the momentum in the rows' precision; a float32 row whose
    sums overflow (finite entries near 1e19) is summed again in float64, and the step
    agrees with the same step computed in float64 throughout."""
    params32, opt32, grads32 = _kept_batch_optimizers(torch.float32)
    params64, opt64, grads64 = _kept_batch_optimizers(torch.float64)
    with torch.no_grad():
        for p32, p64 in zip(params32, params64):
            p64.copy_(p32.double())
            opt64.state[p64]["momentum_buffer"].copy_(opt32.state[p32]["momentum_buffer"].double())
        huge = opt32.state[params32[2]]["momentum_buffer"]
        huge.mul_(3e19)  # still horizontal: every row's m.m is about 1e40, beyond float32
        opt64.state[params64[2]]["momentum_buffer"].mul_(3e19)
        assert not torch.isfinite((huge * huge).sum(1)).all() and torch.isfinite(huge).all()
    scales = [float(opt64.state[p]["momentum_buffer"].abs().max()) for p in params64]
    grads32(2)
    for p32, p64 in zip(params32, params64):
        p64.grad = p32.grad.double()
    opt32.step(), opt64.step()
    for p32, p64, scale in zip(params32, params64, scales):
        torch.testing.assert_close(p32.detach().double(), p64.detach(), rtol=2e-5, atol=1e-6)
        # The transported momentum is what is left of m' after its part along w' is removed:
        # float32's rounding of m' (about 1e-7 of it) is the tolerance.
        m32, m64 = opt32.state[p32]["momentum_buffer"].double(), opt64.state[p64]["momentum_buffer"]
        torch.testing.assert_close(m32, m64, rtol=1e-4, atol=1e-6 * scale)


@needs_numba
def test_a_new_row_batch_refuses_momentum_buffers_that_hold_non_finite_values() -> None:
    """A kept row batch checks its momentum buffers once, when it is made (its check pass
    reads only weights and gradients afterwards): a non-finite entry makes every check pass
    report a bad row, so that the general step decides."""
    from psiopt.optim import _cpu_kernels

    gen = torch.Generator().manual_seed(9)
    w, g = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    for value, bad in ((0.5, False), (float("inf"), True), (float("nan"), True)):
        m = torch.zeros(4, 6)
        m[2, 3] = value
        batch = _cpu_kernels.RowBatch([w], [m], [w], [m], has_m=True)
        assert batch.row_sums([g]) is bad


@needs_numba
def test_momentum_changed_to_nan_outside_the_optimizer_is_named_and_its_rows_kept() -> None:
    """A momentum buffer that holds a NaN the optimizer did not write (the kept row batch
    checks only what it wrote) reaches the row-resident pass: the rows with it keep their
    weights and momentum, the step raises naming the parameter, and a later step refuses
    the group until the buffer is reset."""
    params, opt, grads = _kept_batch_optimizers(torch.float64)
    buf = opt.state[params[0]]["momentum_buffer"]
    with torch.no_grad():
        buf[1, 0, 0, 0] = float("nan")
    rows_before = params[0].detach()[1].clone(), buf[1].clone()
    others_before = params[1].detach().clone()
    grads(2)
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(4, 3, 3, 3\)\): the momentum buffer holds NaN"):
        opt.step()
    assert torch.equal(params[0].detach()[1], rows_before[0])
    assert torch.equal(buf[1].nan_to_num(), rows_before[1].nan_to_num()) and bool(buf[1].isnan().any())
    assert not torch.equal(params[1].detach(), others_before)  # the other groups were stepped
    assert torch.isfinite(params[0]).all()


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_bfloat16_and_float16_weights_follow_the_reference_loop(path) -> None:
    """Half types take the one-pass torch step (the fused kernels step float32 and float64),
    accumulating in float32; each in-place operation rounds, so the tolerance is the dtype's."""
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
        reference, params = _params(dtype), _params(dtype)
        _run(reference, foreach=False, momentum=0.9)
        if path.get("fused"):
            with pytest.raises(RuntimeError, match="fused=True has no kernel for torch.bfloat16"):
                _run(params, momentum=0.9, **path)
            return
        _run(params, momentum=0.9, **path)
        for p, q in zip(params, reference):
            torch.testing.assert_close(p.detach().float(), q.detach().float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("path", [dict(foreach=False), *PATHS.values()], ids=["loop", *PATHS.keys()])
def test_rescaled_starts_stay_rescaled_on_every_path(path) -> None:
    """The defining property: a start whose groups are rescaled by positive factors gives the
    same iterates, rescaled by the same factors (weights and momentum), to rounding."""
    params = _params(torch.float64)
    gen = torch.Generator().manual_seed(3)
    manifolds = [psiopt.PSIManifold(g) for _, g in SHAPES]
    factors = [torch.exp(4 * torch.rand(m.num_groups(p), generator=gen, dtype=torch.float64) - 2)
               for p, m in zip(params, manifolds)]
    scaled = [nn.Parameter((m.rows(p.detach()) * f.unsqueeze(1)).reshape(p.shape))
              for p, m, f in zip(params, manifolds, factors)]
    mats = []
    for p, m in zip(params, manifolds):
        x = torch.randn(m.rows(p).shape[1], m.rows(p).shape[1], generator=gen, dtype=torch.float64)
        mats.append(x + x.T)

    def loss(ps):
        # Rayleigh quotients of the groups: scale invariant group by group.
        total = 0.0
        for p, m, a in zip(ps, manifolds, mats):
            rows = m.rows(p)
            total = total + ((rows @ a) * rows).sum(1).div((rows * rows).sum(1)).sum()
        return total

    opts = []
    for ps in (params, scaled):
        groups = [{"params": [p], "grouping": g} for p, (_, g) in zip(ps, SHAPES)]
        opts.append(PSISGD(groups, lr=0.05, momentum=0.9, nesterov=True, **path))
    for _ in range(10):
        for ps, opt in zip((params, scaled), opts):
            opt.zero_grad()
            loss(ps).backward()
            opt.step()
    for p, q, m, f in zip(params, scaled, manifolds, factors):
        rows = m.rows
        torch.testing.assert_close(rows(q.detach()), f.unsqueeze(1) * rows(p.detach()), rtol=1e-10, atol=0)
        torch.testing.assert_close(
            rows(opts[1].state[q]["momentum_buffer"]), f.unsqueeze(1) * rows(opts[0].state[p]["momentum_buffer"]),
            rtol=1e-8, atol=1e-14,
        )


@pytest.mark.parametrize("path", [*PATHS.values()], ids=[*PATHS.keys()])
def test_euclidean_parameters_still_follow_torch_sgd_bit_for_bit(path) -> None:
    gen = torch.Generator().manual_seed(1)
    euclid = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(5, 3), (7,)]]
    reference = [nn.Parameter(p.detach().clone()) for p in euclid]
    si = nn.Parameter(torch.randn(4, 3, generator=gen))
    ours = PSISGD([{"params": euclid}, {"params": [si], "grouping": "channel"}], lr=0.1, momentum=0.9, **path)
    # The same options in torch; psiopt's default takes torch's fused step where torch has one.
    theirs = torch.optim.SGD(reference, lr=0.1, momentum=0.9, **(path or dict(fused=True)))
    for _ in range(3):
        for p, q in zip(euclid, reference):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        si.grad = torch.randn(si.shape, generator=gen)
        ours.step()
        theirs.step()
        for p, q in zip(euclid, reference):
            assert torch.equal(p, q)


@needs_numba
def test_default_path_is_the_fused_one_where_numba_is_installed() -> None:
    a, b = _params(torch.float32), _params(torch.float32)
    _run(a, momentum=0.9)
    _run(b, momentum=0.9, fused=True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_non_finite_gradient_raises_untouched_on_every_path(path, bad) -> None:
    params = _params(torch.float64)
    opt = _run(params, steps=2, momentum=0.9, **path)
    before = [p.detach().clone() for p in params]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in params]
    params[3].grad[1, 0, 1] = bad
    with pytest.raises(FloatingPointError, match=r"param_groups\[3\]\['params'\]\[0\].*NaN or infinite gradient"):
        opt.step()
    for p, w, m in zip(params, before, buffers):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], m)


@pytest.mark.parametrize("path", [dict(foreach=True), pytest.param(dict(fused=True), marks=needs_numba)], ids=["foreach", "fused"])
@pytest.mark.parametrize("problem", ["nan-gradient", "inf-euclidean-gradient", "zero-group"])
def test_capturable_refuses_the_step_on_the_device_without_raising(path, problem) -> None:
    params = _params(torch.float64)
    euclid = nn.Parameter(torch.randn(3, dtype=torch.float64))
    groups = [{"params": [p], "grouping": g} for p, (_, g) in zip(params, SHAPES)] + [{"params": [euclid]}]
    opt = PSISGD(groups, lr=0.1, momentum=0.9, capturable=True, **path)
    everything = [*params, euclid]
    for p in everything:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.last_step_refused is not None and not opt.last_step_refused
    before = [p.detach().clone() for p in everything]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in everything]
    if problem == "nan-gradient":
        params[0].grad[2, 1] = float("nan")
    elif problem == "inf-euclidean-gradient":
        euclid.grad[0] = float("inf")
    else:
        with torch.no_grad():
            params[2][1] = 0.0
        before[2] = params[2].detach().clone()
    opt.step()  # no exception, no host synchronization needed
    assert opt.last_step_refused.dtype == torch.bool and bool(opt.last_step_refused)
    for p, w, m in zip(everything, before, buffers):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], m)


def test_capturable_needs_the_one_pass_step() -> None:
    with pytest.raises(ValueError, match="capturable=True needs the one-pass step"):
        PSISGD([{"params": [nn.Parameter(torch.ones(2, 2))], "grouping": "channel"}], capturable=True, foreach=False)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        PSISGD([{"params": [nn.Parameter(torch.ones(2, 2))], "grouping": "channel"}], fused=True, foreach=True)


@needs_numba
def test_grad_scaler_hands_its_scale_and_flag_to_the_fused_step() -> None:
    """Under a GradScaler the fused step divides by the scale itself and skips on the
    scaler's found_inf: the scaler neither unscales the gradients nor syncs for the step.
    The scale is a power of two, so the unscaled step is the same bit for bit."""
    plain, scaled = _params(torch.float32), _params(torch.float32)
    ref = _run(plain, steps=1, momentum=0.9, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert scaler.scale(torch.ones(())) == 2.0**10  # what a training step does first; it sets the scale up
    opt = _run(scaled, steps=0, momentum=0.9, fused=True)
    assert opt._step_supports_amp_scaling
    gen = torch.Generator().manual_seed(100)
    for p in scaled:
        p.grad = torch.randn(p.shape, generator=gen) * 2.0**10  # what backward of scaler.scale(loss) gives
    stored = [p.grad.clone() for p in scaled]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p.grad, g) for p, g in zip(scaled, stored))  # not unscaled in place
    for p, q in zip(scaled, plain):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
    # An infinite gradient: the scaler's flag refuses the step, and the scale backs off.
    before = [p.detach().clone() for p in scaled]
    scaled[0].grad[0, 0, 0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, w) for p, w in zip(scaled, before))
    assert not hasattr(opt, "found_inf")  # the scaler removes its attributes after the step


def test_compiled_step_has_no_graph_break_in_the_no_sync_mode() -> None:
    params = _params(torch.float32)[:3]
    euclid = nn.Parameter(torch.randn(4))
    groups = [{"params": params, "grouping": "channel"}, {"params": [euclid]}]
    opt = PSISGD(groups, lr=0.1, momentum=0.9, capturable=True)
    twin_params = [nn.Parameter(p.detach().clone()) for p in [*params, euclid]]
    twin = PSISGD([{"params": twin_params[:3], "grouping": "channel"}, {"params": twin_params[3:]}],
                         lr=0.1, momentum=0.9, capturable=True, foreach=True)
    torch._dynamo.reset()
    step = torch.compile(opt.step, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    for k in range(3):
        gen = torch.Generator().manual_seed(k)
        for p, q in zip([*params, euclid], twin_params):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        step()
        twin.step()
    for p, q in zip([*params, euclid], twin_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def _synchronizations(step) -> int:
    """How many times ``step()`` synchronizes the host with the GPU (torch's sync debug
    mode warns at each one)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def _cuda_model_params() -> tuple[list[nn.Parameter], nn.Parameter]:
    return [nn.Parameter(p.detach().cuda()) for p in _params(torch.float32)], nn.Parameter(torch.randn(7, device="cuda"))


def _cuda_optimizer(params, euclid, **options) -> psiopt.PSISGD:
    groups = [{"params": [p], "grouping": g} for p, (_, g) in zip(params, SHAPES)] + [{"params": [euclid]}]
    opt = PSISGD(groups, lr=0.1, momentum=0.9, **options)
    for _ in range(2):  # a first step (it makes the buffers), then the step measured
        for p in [*params, euclid]:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in [*params, euclid]:
        p.grad = torch.randn_like(p)
    return opt


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capturable_step_does_not_synchronize_on_cuda() -> None:
    """capturable=True promises no host synchronization: the fused (Triton) step, the
    checks on the device and torch's fused SGD on the Euclidean parameter."""
    params, euclid = _cuda_model_params()
    opt = _cuda_optimizer(params, euclid, capturable=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not bool(opt.last_step_refused)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", [dict(), dict(foreach=True)], ids=["default", "foreach"])
def test_default_step_synchronizes_once_on_cuda(path) -> None:
    """capturable=False reads one flag back to the host, to raise on bad input: one
    synchronization per step, with scale-invariant and Euclidean parameters."""
    params, euclid = _cuda_model_params()
    opt = _cuda_optimizer(params, euclid, **path)
    assert _synchronizations(opt.step) == 1


@pytest.mark.parametrize("problem", ["none", "nan-gradient", "inf-euclidean-gradient", "nan-momentum"])
def test_one_batch_steps_checks_and_writes_in_one_call(problem) -> None:
    """With every scale-invariant tensor in one param group (as psiopt.param_groups makes
    them, the others in their own group), a kept step's check and write passes are one
    compiled call: it agrees with the reference loop, refuses a non-finite gradient before
    anything is written, and names a momentum buffer changed from outside."""
    channel = [i for i, (_, g) in enumerate(SHAPES) if g == "channel"]

    def build(path):
        params = _params(torch.float64)
        euclid = nn.Parameter(torch.linspace(-1.0, 1.0, 5, dtype=torch.float64))
        psi = [params[i] for i in channel]
        opt = PSISGD([{"params": psi, "grouping": "channel"}, {"params": [euclid]}], lr=0.1, momentum=0.9, **path)
        return [*psi, euclid], opt

    (reference, ref_opt), (params, opt) = build(dict(foreach=False)), build(dict(fused=True))
    for k in range(4):
        gen = torch.Generator().manual_seed(800 + k)
        for p, q in zip(params, reference):
            q.grad = torch.randn(q.shape, generator=gen, dtype=q.dtype)
            p.grad = q.grad.clone()
        if k < 3:
            ref_opt.step()
            opt.step()
            continue
        assert len([plan for plan in opt._group_plans.values() if plan.batch is not None and plan.batch.params]) == 1
        before = [p.detach().clone() for p in params]
        buffers = [opt.state[p]["momentum_buffer"].clone() for p in params]
        if problem == "nan-gradient":
            params[1].grad[2, 0, 0, 0] = float("nan")
            with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[1\].*NaN or infinite gradient"):
                opt.step()
        elif problem == "inf-euclidean-gradient":
            params[-1].grad[3] = float("inf")
            with pytest.raises(FloatingPointError, match=r"param_groups\[1\]\['params'\]\[0\].*NaN or infinite gradient"):
                opt.step()
        if problem in ("nan-gradient", "inf-euclidean-gradient"):
            for p, w, m in zip(params, before, buffers):
                assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], m)
            return
        if problem == "nan-momentum":
            opt.state[params[0]]["momentum_buffer"][1, 0, 0, 0] = float("nan")
            with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[0\].*momentum buffer holds NaN"):
                opt.step()
            assert torch.equal(params[0].detach()[1], before[0][1])  # the row with the NaN kept its weights
            assert not torch.equal(params[1], before[1]) and not torch.equal(params[-1], before[-1])  # the rest stepped
            return
        kept = [plan.batch for plan in opt._group_plans.values()]
        ref_opt.step()
        opt.step()
        assert all(b is plan.batch for b, plan in zip(kept, opt._group_plans.values()))  # the kept step took it
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)
