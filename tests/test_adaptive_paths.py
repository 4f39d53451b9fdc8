"""The step paths of PSIAdam, PSIAdamW and PSIAdaSGD: the reference loop (``foreach=False``),
the multi-tensor torch step (``foreach=True``), the compiled kernels (``fused=True``) and the
default; torch's own step, with the same options, on the other parameters; the checks before
any write; the kept row batches; resuming from a state dict."""

from __future__ import annotations

import copy
import importlib.util
import io

import pytest
import torch
from torch import nn

import psiopt

HAS_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="the fused CPU kernels need numba (a psiopt dependency; missing here)")

SHAPES = [
    ((4, 3, 3, 3), "channel"),
    ((6, 4, 2, 2), "channel"),
    ((5, 27), "channel"),
    ((8, 2, 2), "block(2)"),
    ((3, 4), "tensor"),
]
RULES = {
    "adam": lambda groups, **kw: psiopt.PSIAdam(groups, lr=0.05, betas=(0.8, 0.95), **kw),
    "adam-plain-amsgrad": lambda groups, **kw: psiopt.PSIAdam(groups, lr=0.05, amsgrad=True, nesterov=False, **kw),
    "adamw-maximize": lambda groups, **kw: psiopt.PSIAdamW(groups, lr=0.05, maximize=True, **kw),
    "adasgd": lambda groups, **kw: psiopt.PSIAdaSGD(groups, lr=0.2, momentum=0.9, dampening=0.3, **kw),
    "adasgd-nesterov-maximize": lambda groups, **kw: psiopt.PSIAdaSGD(groups, lr=0.2, momentum=0.9, nesterov=True, maximize=True, **kw),
    "adasgd-plain": lambda groups, **kw: psiopt.PSIAdaSGD(groups, lr=0.2, **kw),
    # PSISGD's default 'sgd' angular rate is PSIAdam's step at a rate from SGD's settings
    "psisgd-weight-decay": lambda groups, **kw: psiopt.PSISGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4, **kw),
    "psisgd-plain-maximize": lambda groups, **kw: psiopt.PSISGD(groups, lr=0.1, maximize=True, **kw),
}
PATHS = {
    "foreach": dict(foreach=True),
    "fused": pytest.param(dict(fused=True), marks=needs_numba),
    "default": dict(),
}
FIRST_MOMENT = {"adam": "exp_avg", "adasgd": "momentum_buffer", "psisgd": "momentum_buffer"}


def _params(dtype, channels_last=False, seed=5):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape, _ in SHAPES:
        p = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        if channels_last and p.dim() == 4:
            p = p.contiguous(memory_format=torch.channels_last)
        params.append(nn.Parameter(p))
    return params


def _groups(params):
    return [{"params": [p], "grouping": g} for p, (_, g) in zip(params, SHAPES)]


def _grads(params, k, scale=1.0):
    gen = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)


def _run(rule, params, steps=4, **kwargs):
    opt = RULES[rule](_groups(params), **kwargs)
    for k in range(steps):
        _grads(params, k)
        opt.step()
    return opt


def _close(x, y, eps):
    torch.testing.assert_close(x, y, rtol=eps, atol=eps * float(y.abs().max()))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_path_matches_the_reference_loop(dtype, path, rule, channels_last) -> None:
    reference, params = _params(dtype), _params(dtype, channels_last)
    ref_opt = _run(rule, reference, foreach=False)
    strides = [p.stride() for p in params]
    opt = _run(rule, params, **path)
    eps = 1e-12 if dtype == torch.float64 else 2e-5  # relative to each tensor's largest entry
    for p, q, stride in zip(params, reference, strides):
        assert p.stride() == stride  # the layout is kept: the step writes in place
        _close(p.detach(), q.detach(), eps)
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key, value in ref_opt.state[q].items():
            assert opt.state[p][key].dtype == value.dtype and opt.state[p][key].shape == value.shape
            _close(opt.state[p][key], value, eps)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("rule", ["adam", "adasgd-nesterov-maximize"])
def test_mixed_dtypes_and_layouts_in_one_group_match_the_reference_loop(rule, path) -> None:
    """float64 and float32 tensors, contiguous and channels-last, in one param group, with
    gradients in another layout than their weights: each dtype is its own kernel call, and
    each tensor keeps its own rows and state."""

    def build():
        return [*_params(torch.float64), *_params(torch.float32, channels_last=True, seed=6)]

    reference, params = build(), build()

    def groups(ps):
        return [
            {"params": ps[:3] + ps[5:8], "grouping": "channel"},
            {"params": [ps[3], ps[8]], "grouping": "block(2)"},
            {"params": [ps[4], ps[9]], "grouping": "tensor"},
        ]

    opts = [RULES[rule](groups(reference), foreach=False), RULES[rule](groups(params), **path)]
    for k in range(3):
        _grads(reference, k)
        for p, q in zip(params, reference):
            p.grad = q.grad.clone()  # contiguous gradients, channels-last weights
        for opt in opts:
            opt.step()
    for p, q in zip(params, reference):
        _close(p.detach(), q.detach(), 1e-12 if p.dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("rule", ["adam", "adasgd"])
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_half_precision_weights_follow_the_reference_loop(path, rule) -> None:
    """The kernels step float32 and float64: half types take the torch steps (accumulating
    in float32); ``fused=True`` refuses them."""
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
        reference, params = _params(dtype), _params(dtype)
        _run(rule, reference, foreach=False)
        if path.get("fused"):
            with pytest.raises(RuntimeError, match=f"fused=True has no kernel for {dtype}"):
                _run(rule, params, **path)
            return
        _run(rule, params, **path)
        for p, q in zip(params, reference):
            torch.testing.assert_close(p.detach().float(), q.detach().float(), rtol=tol, atol=tol)


# -- the other parameters: torch's step with the same options, bit for bit ----------------------

TORCH_PEERS = {
    "adam": (lambda ps, **kw: psiopt.PSIAdam(ps, lr=0.01, amsgrad=True, weight_decay=0.05, **kw),
             lambda ps, **kw: torch.optim.Adam(ps, lr=0.01, amsgrad=True, weight_decay=0.05, **kw)),
    "adamw": (lambda ps, **kw: psiopt.PSIAdamW(ps, lr=0.01, maximize=True, **kw),
              lambda ps, **kw: torch.optim.AdamW(ps, lr=0.01, maximize=True, **kw)),
    "adasgd": (lambda ps, **kw: psiopt.PSIAdaSGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, **kw),
               lambda ps, **kw: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, **kw)),
    "psisgd": (lambda ps, **kw: psiopt.PSISGD(ps, lr=0.1, momentum=0.9, dampening=0.1, **kw),
               lambda ps, **kw: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, **kw)),
}
# psiopt's options -> torch's: the default takes torch's fused step, where torch's own
# default on the CPU is its per-tensor loop (whose rounding differs from the fused one).
SAME_SETTING = {
    "default": ({}, dict(fused=True)),
    "fused": ({"fused": True}, dict(fused=True)),
    "foreach": ({"foreach": True}, dict(foreach=True)),
    "loop": ({"foreach": False}, dict(foreach=False)),
    "not-fused": ({"fused": False}, dict(fused=False)),
}


@pytest.mark.parametrize("setting", list(SAME_SETTING))
@pytest.mark.parametrize("pair", list(TORCH_PEERS))
def test_euclidean_parameters_follow_torch_with_the_same_options_bit_for_bit(pair, setting) -> None:
    ours_cls, torch_cls = TORCH_PEERS[pair]
    ours_options, torch_options = SAME_SETTING[setting]
    if ours_options.get("fused") and not HAS_NUMBA:
        pytest.skip("fused=True needs numba")
    gen = torch.Generator().manual_seed(1)
    euclid = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(5, 3), (7,), (2, 3, 4)]]
    euclid.append(nn.Parameter(torch.randn(4, 4, generator=gen, dtype=torch.float64)))
    reference = [nn.Parameter(p.detach().clone()) for p in euclid]
    si = nn.Parameter(torch.randn(3, 4, generator=gen))
    ours = ours_cls([{"params": [euclid[0], *euclid[1:]]}, {"params": [si], "grouping": "channel"}], **ours_options)
    theirs = torch_cls(reference, **torch_options)
    for _ in range(4):
        for p, q in zip(euclid, reference):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            q.grad = p.grad.clone()
        si.grad = torch.randn(si.shape, generator=gen)
        ours.step()
        theirs.step()
        for p, q in zip(euclid, reference):
            assert torch.equal(p, q)
            for key, value in theirs.state[q].items():
                assert torch.equal(ours.state[p][key], value), key


def test_fused_and_foreach_together_are_refused_as_by_torch() -> None:
    p = nn.Parameter(torch.ones(2, 2))
    for make in (psiopt.PSIAdam, psiopt.PSIAdamW, psiopt.PSIAdaSGD):
        with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
            make([{"params": [p], "grouping": "channel"}], fused=True, foreach=True)


# -- the kept row batches ------------------------------------------------------------------------


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", ["adam", "adam-plain-amsgrad", "adasgd-nesterov-maximize", "adasgd-plain", "psisgd-weight-decay"])
def test_resumed_kernel_steps_equal_uninterrupted_ones_bit_for_bit(rule, dtype) -> None:
    """From its second step the kernel path runs on row batches kept from step to step; a run
    resumed from a state dict makes new ones: the two agree bit for bit, weights and state."""
    kept, resumed = _params(dtype), _params(dtype)
    opt = RULES[rule](_groups(kept))
    state = None
    for k in range(5):
        _grads(kept, k)
        for p, q in zip(kept, resumed):
            q.grad = p.grad.clone()
        opt.step()
        fresh = RULES[rule](_groups(resumed))  # a new optimizer at every step
        if state is not None:
            fresh.load_state_dict(state)
        fresh.step()
        buffer = io.BytesIO()
        torch.save(fresh.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    assert all(ks.batch is not None for plan in opt._adaptive_plans.values() for ks in plan.kernel_sets)
    for p, q in zip(kept, resumed):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, fresh.state[q][key]), key


@pytest.mark.parametrize("rule", ["adam", "adasgd", "psisgd-weight-decay"])
@pytest.mark.parametrize("path", [dict(foreach=False), *PATHS.values()], ids=["loop", *PATHS.keys()])
def test_a_state_dict_of_one_path_resumes_on_every_other(rule, path) -> None:
    """State dicts keep torch's keys and shapes on every path (as psiopt has always saved
    them): one saved by the reference loop resumes on the kernels and the torch steps."""
    reference, params = _params(torch.float64), _params(torch.float64)
    ref_opt = _run(rule, reference, steps=6, foreach=False)
    first = _run(rule, params, steps=3, foreach=False)
    resumed = RULES[rule](_groups(params), **path)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for k in range(3, 6):
        _grads(params, k)
        resumed.step()
    for p, q in zip(params, reference):
        _close(p.detach(), q.detach(), 1e-12)
        for key, value in ref_opt.state[q].items():
            _close(resumed.state[p][key], value, 1e-12)


@needs_numba
@pytest.mark.parametrize("rule", ["adam", "adasgd"])
def test_weights_and_state_replaced_between_steps_are_the_ones_stepped(rule) -> None:
    """A weight given new storage, a state dict loaded, or a weight rescaled in place (by an
    operation torch's version counter sees) between two kept steps: the step reads and
    writes the new ones."""
    reference, params = _params(torch.float64), _params(torch.float64, channels_last=True)
    opts = [RULES[rule](_groups(reference), foreach=False), RULES[rule](_groups(params))]
    for k in range(6):
        _grads(reference, k)
        for p, q in zip(params, reference):
            p.grad = q.grad.clone()
        if k == 2:
            for p in params:
                p.data = p.data.clone()  # same layout, new storage
            opts[1].load_state_dict(opts[1].state_dict())
        if k == 4:
            with torch.no_grad():
                for ps in (params, reference):
                    ps[0].mul_(3.0)  # in place, the same on both: a point of the same class
        for opt in opts:
            opt.step()
    for p, q in zip(params, reference):
        _close(p.detach(), q.detach(), 1e-12)


# -- refused steps -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["scale-invariant", "euclidean"])
@pytest.mark.parametrize("rule", ["adam", "adasgd"])
@pytest.mark.parametrize("path", [dict(foreach=False), *PATHS.values()], ids=["loop", *PATHS.keys()])
def test_a_non_finite_gradient_raises_before_anything_changes(path, rule, where, bad) -> None:
    params = _params(torch.float64)
    euclid = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = RULES[rule]([*_groups(params), {"params": [euclid]}], **path)
    everything = [*params, euclid]
    for k in range(3):  # kept batches from the second step on
        _grads(everything, k)
        opt.step()
    before = [p.detach().clone() for p in everything]
    state = copy.deepcopy(opt.state_dict()["state"])
    _grads(everything, 3)
    (params[3] if where == "scale-invariant" else euclid).grad.view(-1)[1] = bad
    name = r"param_groups\[3\]\['params'\]\[0\]" if where == "scale-invariant" else r"param_groups\[5\]\['params'\]\[0\]"
    with pytest.raises(FloatingPointError, match=name + ".*NaN or infinite gradient"):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(everything, before))
    for index, saved in state.items():
        for key, value in saved.items():
            assert torch.equal(opt.state_dict()["state"][index][key], value), key


@pytest.mark.parametrize("rule", ["adam", "adasgd"])
@pytest.mark.parametrize("path", [dict(foreach=False), *PATHS.values()], ids=["loop", *PATHS.keys()])
def test_a_group_zeroed_in_place_between_steps_raises_before_anything_changes(path, rule) -> None:
    """An in-place write to a weight (torch's version counter sees it) makes the next check
    pass read the weights: a zero group is refused before any write, naming the parameter."""
    params = _params(torch.float64)
    opt = _run(rule, params, steps=3, **path)
    with torch.no_grad():
        params[1][2].zero_()
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict()["state"])
    _grads(params, 3)
    with pytest.raises(psiopt.ZeroGroupError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(params, before))
    for index, saved in state.items():
        for key, value in saved.items():
            assert torch.equal(opt.state_dict()["state"][index][key], value), key


@needs_numba
@pytest.mark.parametrize("rule", ["adam", "adasgd"])
def test_state_changed_to_nan_outside_the_optimizer_is_named_and_its_rows_kept(rule) -> None:
    """A NaN written into the first moment from outside the optimizer (the kept batch reads
    only what it wrote) reaches the write pass: those rows keep their weights and state,
    the other groups are stepped, the step raises naming the parameter; the next step
    refuses before any write until the state is reset."""
    params = _params(torch.float64)
    opt = _run(rule, params, steps=3)
    key = FIRST_MOMENT[rule]
    with torch.no_grad():
        opt.state[params[0]][key][1, 0, 0, 0] = float("nan")
    row_before = params[0].detach()[1].clone()
    others_before = params[1].detach().clone()
    _grads(params, 3)
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(4, 3, 3, 3\)\): the optimizer state"):
        opt.step()
    assert torch.equal(params[0].detach()[1], row_before) and torch.isfinite(params[0]).all()
    assert not torch.equal(params[1].detach(), others_before)
    before = [p.detach().clone() for p in params]
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[0\].*its optimizer state holds NaN"):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(params, before))


@needs_numba
def test_float32_gradient_sums_that_overflow_take_the_reference_step() -> None:
    """Finite float32 gradients whose squared norm overflows float32: the check pass flags
    them, and that tensor takes the reference loop (which computes the same step) while
    the others stay on the kernels."""
    reference, params = _params(torch.float32), _params(torch.float32)
    ref_opt, opt = _run("adam", reference, steps=2, foreach=False), _run("adam", params, steps=2)
    for ps in (reference, params):
        _grads(ps, 2)
        ps[2].grad.mul_(1e19)  # entries near 1e19: finite, their squares are not
    assert torch.isfinite(params[2].grad).all() and not torch.isfinite((params[2].grad.double() ** 2).sum().float())
    for o in (ref_opt, opt):
        o.step()
    for p, q in zip(params, reference):
        _close(p.detach(), q.detach(), 2e-5)


# -- the defining property on every path ----------------------------------------------------------


@pytest.mark.parametrize("rule", ["adam", "adasgd-nesterov-maximize", "psisgd-weight-decay"])
@pytest.mark.parametrize("path", [dict(foreach=False), *PATHS.values()], ids=["loop", *PATHS.keys()])
def test_rescaled_starts_stay_rescaled_on_every_path(path, rule) -> None:
    params = _params(torch.float64)
    gen = torch.Generator().manual_seed(3)
    manifolds = [psiopt.PSIManifold(g) for _, g in SHAPES]
    factors = [torch.exp(4 * torch.rand(m.num_groups(p), generator=gen, dtype=torch.float64) - 2) for p, m in zip(params, manifolds)]
    scaled = [nn.Parameter((m.rows(p.detach()) * f.unsqueeze(1)).reshape(p.shape)) for p, m, f in zip(params, manifolds, factors)]
    mats = []
    for p, m in zip(params, manifolds):
        x = torch.randn(m.rows(p).shape[1], m.rows(p).shape[1], generator=gen, dtype=torch.float64)
        mats.append(x + x.T)

    def loss(ps):  # Rayleigh quotients of the groups: scale invariant group by group
        total = 0.0
        for p, m, a in zip(ps, manifolds, mats):
            rows = m.rows(p)
            total = total + ((rows @ a) * rows).sum(1).div((rows * rows).sum(1)).sum()
        return total

    opts = [RULES[rule](_groups(ps), **path) for ps in (params, scaled)]
    for _ in range(10):
        for ps, opt in zip((params, scaled), opts):
            opt.zero_grad()
            loss(ps).backward()
            opt.step()
    key = FIRST_MOMENT[rule.split("-")[0]]
    for p, q, m, f in zip(params, scaled, manifolds, factors):
        torch.testing.assert_close(m.rows(q.detach()), f.unsqueeze(1) * m.rows(p.detach()), rtol=1e-10, atol=0)
        torch.testing.assert_close(
            m.rows(opts[1].state[q][key]), f.unsqueeze(1) * m.rows(opts[0].state[p][key]), rtol=1e-8, atol=1e-14
        )


# -- state dicts saved before the compiled kernels ---------------------------------------------

V0_STATES = "data/adaptive_states_v0.pt"  # by psiopt at 599b86d: see data/make_adaptive_states_v0.py
V0_SHAPES = [((4, 3, 3, 3), "channel"), ((6, 4), "tensor"), ((5,), None)]
V0_CONFIGS = {
    "psiadam": lambda groups, **kw: psiopt.PSIAdam(groups, lr=0.05, betas=(0.8, 0.95), **kw),
    "psiadamw-amsgrad": lambda groups, **kw: psiopt.PSIAdamW(groups, lr=0.05, amsgrad=True, weight_decay=0.1, **kw),
    "psiadasgd": lambda groups, **kw: psiopt.PSIAdaSGD(groups, lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.01, **kw),
}


@pytest.mark.parametrize("config", list(V0_CONFIGS))
@pytest.mark.parametrize("path", [dict(foreach=False), *PATHS.values()], ids=["loop", *PATHS.keys()])
def test_a_state_dict_saved_before_the_kernels_resumes_as_that_code_went_on(path, config) -> None:
    """A state dict written by the code before the compiled kernels (3 steps), loaded with
    ``weights_only=True`` on every path, takes the next 3 steps as that code did (its own
    continuation is in the file), to float64 rounding."""
    import pathlib

    saved = torch.load(pathlib.Path(__file__).parent / V0_STATES, weights_only=True)[config]
    params = [nn.Parameter(w.clone()) for w in saved["weights"]]
    groups = [{"params": [p], "grouping": g} if g else {"params": [p]} for p, (_, g) in zip(params, V0_SHAPES)]
    opt = V0_CONFIGS[config](groups, **path)
    opt.load_state_dict(saved["state_dict"])
    for k in range(3, 6):
        gen = torch.Generator().manual_seed(100 + k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    for p, expected in zip(params, saved["final_weights"]):
        _close(p.detach(), expected, 1e-12)
    state = opt.state_dict()["state"]
    assert state.keys() == saved["final_state"].keys()
    for index, expected in saved["final_state"].items():
        assert state[index].keys() == expected.keys()
        for key, value in expected.items():
            assert state[index][key].dtype == value.dtype and state[index][key].shape == value.shape
            _close(state[index][key], value, 1e-12)


@needs_numba
@pytest.mark.parametrize("counter_dtype", [torch.float32, torch.float64])
def test_the_kernels_count_steps_in_torchs_step_tensors(counter_dtype) -> None:
    """PSIAdam keeps torch's ``"step"`` (a 0-d tensor of torch's scalar dtype: float64 under
    a float64 default dtype); the kernels read each tensor's bias corrections from it and
    increment it, as the reference loop does."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(counter_dtype)
    try:
        reference, params = _params(torch.float64), _params(torch.float64)
        ref_opt, opt = _run("adam", reference, steps=5, foreach=False), _run("adam", params, steps=5, fused=True)
    finally:
        torch.set_default_dtype(previous)
    for p, q in zip(params, reference):
        assert opt.state[p]["step"].dtype == counter_dtype and float(opt.state[p]["step"]) == 5.0
        _close(p.detach(), q.detach(), 1e-12)


@needs_numba
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_the_check_pass_finds_a_non_finite_gradient_in_any_row(rows) -> None:
    """The check pass reads the gradient rows two at a time (the first half with the second):
    a NaN or infinity in any row, of an even or odd count, is found; the others pass."""
    from psiopt.optim import _cpu_adaptive_kernels

    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, 7, generator=gen, dtype=torch.float64)
    batch = _cpu_adaptive_kernels.AdaptiveRows("adasgd", [w], None, [(torch.zeros(rows, dtype=torch.float64),)], [lambda x: x])
    g = torch.randn(rows, 7, generator=gen, dtype=torch.float64)
    assert batch.check([g]) == []
    batch.update(None, (0.1, 0.0, 0.0, 0.0, 1e-10), maximize=False)  # the next check reads the gradients only
    for row in range(rows):
        for bad in (float("nan"), float("inf")):
            g_bad = g.clone()
            g_bad[row, 6] = bad
            assert batch.check([g_bad]) == [0], (row, bad)
        assert batch.check([g]) == []


@needs_numba
@pytest.mark.parametrize("rule", ["adam", "adasgd"])
def test_kept_batches_serve_param_groups_with_only_euclidean_parameters(rule) -> None:
    """psiopt.param_groups gives the Euclidean parameters a param group of their own: the
    kept batches still take every step from the second on (the first batch's check pass
    checks their gradients), and the result is the reference loop's."""
    reference, params = _params(torch.float64), _params(torch.float64)
    extra = [nn.Parameter(torch.linspace(-1.0, 1.0, 3, dtype=torch.float64)) for _ in range(2)]
    opts = [RULES[rule]([*_groups(ps), {"params": [e]}], **path)
            for ps, e, path in ((reference, extra[0], dict(foreach=False)), (params, extra[1], {}))]  # fmt: skip
    batches = []
    for k in range(4):
        _grads([*reference, extra[0]], k)
        for p, q in zip([*params, extra[1]], [*reference, extra[0]]):
            p.grad = q.grad.clone()
        for opt in opts:
            opt.step()
        batches.append([ks.batch for plan in opts[1]._adaptive_plans.values() for ks in plan.kernel_sets])
    assert all(b is c for b, c in zip(batches[1], batches[3]))  # made by the first step, kept since
    for p, q in zip([*params, extra[1]], [*reference, extra[0]]):
        _close(p.detach(), q.detach(), 1e-12)


@needs_numba
@pytest.mark.parametrize("rule", ["adam", "adasgd"])
def test_a_group_zeroed_behind_the_version_counter_is_named_and_left_as_it_is(rule) -> None:
    """A write through ``.data`` does not move torch's version counter, so the check pass
    does not read that weight: the write pass meets the zero group, leaves it as it is,
    steps the others and raises naming the parameter."""
    params = _params(torch.float64)
    opt = _run(rule, params, steps=3)
    params[1].data[2].zero_()
    others_before = params[0].detach().clone()
    _grads(params, 3)
    with pytest.raises(FloatingPointError, match=r"param_groups\[1\]\['params'\]\[0\].*zero or non-finite group"):
        opt.step()
    assert not params[1].detach()[2].any() and torch.isfinite(params[1]).all()
    assert not torch.equal(params[0].detach(), others_before)


@needs_numba
@pytest.mark.parametrize("rule", ["adam", "adasgd"])
def test_a_gradient_nearly_along_the_weights_gives_the_float64_step_in_float32(rule) -> None:
    """Where the gradient is nearly parallel to its group (a weight that is not scale
    invariant), a·gg and b² cancel: float32 sums would leave a negative or wrong squared
    gradient norm. The kernels then take it from r itself, and a float32 step agrees
    with the reference loop run in float64."""
    gen = torch.Generator().manual_seed(11)
    w64 = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    params = {dtype: [nn.Parameter(w64.to(dtype))] for dtype in (torch.float32, torch.float64)}
    opts = {dtype: RULES[rule]([{"params": ps, "grouping": "channel"}], **({"fused": True} if dtype == torch.float32 else {"foreach": False}))
            for dtype, ps in params.items()}  # fmt: skip
    for k in range(3):
        noise = torch.randn(6, 40, generator=gen, dtype=torch.float64)
        for dtype, ps in params.items():
            ps[0].grad = (-3.0 * ps[0].detach().double() + 1e-3 * noise).to(dtype)  # about 0.02 degrees from -w
            opts[dtype].step()
    w32, w64 = params[torch.float32][0].detach(), params[torch.float64][0].detach()
    assert torch.isfinite(w32).all()
    torch.testing.assert_close(w32.double(), w64, rtol=1e-4, atol=1e-4 * float(w64.abs().max()))
