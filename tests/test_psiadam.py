"""PSIAdam, PSIAdamW and PSIAdaSGD: the adaptive angular steps, torch's Adam/AdamW/SGD bit for
bit elsewhere, invariance under rescaling, and the optimizer contract."""

from __future__ import annotations

import copy
import io
import itertools
import math
import re

import geoopt
import pytest
import torch
from torch import nn

import psiopt
from psiopt.optim._adaptive import _multi_tensor_rows, _psiadam_rows, _psiadasgd_rows, _single_tensor_rows


from _rayleigh import psi_param as _psi, rayleigh_loss as _rayleigh_loss, sym as _sym, unit_rows as _unit_rows


def _rayleigh_steps(opt, params, mats, steps):
    for _ in range(steps):
        opt.zero_grad()
        _rayleigh_loss(params, mats).backward()
        opt.step()


ADAPTIVE = {
    "PSIAdam": lambda params, **kw: psiopt.PSIAdam(params, lr=0.05, **kw),
    "PSIAdamW": lambda params, **kw: psiopt.PSIAdamW(params, lr=0.05, **kw),
    "PSIAdaSGD": lambda params, **kw: psiopt.PSIAdaSGD(params, lr=0.3, momentum=0.9, **kw),
}


# -- Euclidean parameters: torch's optimizer bit for bit ----------------------------------

ADAM_CASES = [
    dict(amsgrad=a, weight_decay=wd, maximize=mx, **path)
    for a, wd, mx, path in itertools.product(
        [False, True], [0.0, 0.05], [False, True], [dict(foreach=False), dict(foreach=True), dict(fused=True)]
    )
]


@pytest.mark.parametrize("options", ADAM_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("pair", [(psiopt.PSIAdam, torch.optim.Adam), (psiopt.PSIAdamW, torch.optim.AdamW)], ids=["adam", "adamw"])
def test_euclidean_parameters_follow_torch_adam_bit_for_bit(pair, options) -> None:
    ours_cls, torch_cls = pair
    gen = torch.Generator().manual_seed(1)
    euclid = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(5, 3), (7,), (2, 3, 4)]]
    euclid.append(nn.Parameter(torch.randn(4, 4, generator=gen, dtype=torch.float64)))
    reference = [nn.Parameter(p.detach().clone()) for p in euclid]
    si = _psi((3, 4))
    ours = ours_cls([euclid[0], si, *euclid[1:]], lr=0.01, betas=(0.8, 0.99), **options)
    theirs = torch_cls(reference, lr=0.01, betas=(0.8, 0.99), **options)
    for _ in range(5):
        for p, q in zip(euclid, reference):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        si.grad = torch.randn(si.shape, generator=gen, dtype=si.dtype)
        ours.step()
        theirs.step()
        for p, q in zip(euclid, reference):
            assert torch.equal(p, q)
            for key in theirs.state[q]:
                assert torch.equal(ours.state[p][key], theirs.state[q][key]), key


@pytest.mark.parametrize("options", [dict(momentum=0.9, nesterov=True, weight_decay=0.01), dict(momentum=0.5, dampening=0.3, maximize=True)])
@pytest.mark.parametrize("foreach", [False, True])
def test_adasgd_euclidean_parameters_follow_torch_sgd_bit_for_bit(options, foreach) -> None:
    gen = torch.Generator().manual_seed(2)
    euclid = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(5, 3), (7,)]]
    reference = [nn.Parameter(p.detach().clone()) for p in euclid]
    si = _psi((3, 4))
    ours = psiopt.PSIAdaSGD([si, *euclid], lr=0.1, foreach=foreach, **options)
    theirs = torch.optim.SGD(reference, lr=0.1, foreach=foreach, **options)
    for _ in range(4):
        for p, q in zip(euclid, reference):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        si.grad = torch.randn(si.shape, generator=gen, dtype=si.dtype)
        ours.step()
        theirs.step()
        for p, q in zip(euclid, reference):
            assert torch.equal(p, q)
            assert torch.equal(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"])


# -- the step on scale-invariant groups --------------------------------------------------------


def _reference_psiadam(w, grads, lr, beta1, beta2, eps, amsgrad=False, nesterov=False, rate=None):
    """PSIAdam written out row by row from the documented formulas, one group at a time;
    ``rate``: ``(gain, power, pull)`` of an angular rate, ``None`` for the constant one."""
    w = w.clone()
    m = torch.zeros_like(w)
    v = torch.zeros(w.shape[0], dtype=w.dtype)
    v_max = torch.zeros_like(v)
    nu_sq = torch.ones_like(v)  # the virtual squared norm: 1 in the unit-row frame
    for t, g in enumerate(grads, start=1):
        for j in range(w.shape[0]):
            norm = w[j].norm()
            unit = w[j] / norm
            grad_at_unit = norm * (g[j] - (g[j] @ unit) * unit)  # gradient of f at u_j
            m[j] = beta1 * m[j] + (1 - beta1) * norm * grad_at_unit
            v[j] = beta2 * v[j] + (1 - beta2) * (grad_at_unit @ grad_at_unit)
            v_max[j] = max(v_max[j], v[j])
            second = v_max[j] if amsgrad else v[j]
            if nesterov:  # torch.optim.NAdam's numerator with mu_t = beta1 for every t
                riem_grad = norm * grad_at_unit
                numerator = beta1 * m[j] / (1 - beta1 ** (t + 1)) + (1 - beta1) * riem_grad / (1 - beta1**t)
            else:
                numerator = m[j] / (1 - beta1**t)
            d = numerator / ((second / (1 - beta2**t)).sqrt() + eps)
            step = lr
            if rate is not None:
                gain, power, pull = rate
                step = lr * gain / nu_sq[j] ** (power / 2)
            moved = w[j] - step * d
            if rate is not None:  # the norm the retraction would have grown to, less the pull
                nu_sq[j] = nu_sq[j] * (moved @ moved / norm**2 - pull)
            new = norm * moved / moved.norm()
            m[j] = m[j] - (m[j] @ new) / (new @ new) * new
            w[j] = new
    return w, m, v, nu_sq


@pytest.mark.parametrize("angular_rate", ["adam", "constant"])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_psiadam_step_is_the_documented_formula(amsgrad: bool, nesterov: bool, angular_rate: str) -> None:
    w = _psi((4, 6), seed=3)
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(4, 6, generator=gen, dtype=torch.float64) * (0.1 + t) for t in range(5)]
    rate = (3.0, 1.0, 0.0) if angular_rate == "adam" else None  # gain 3, Adam's power 1, no weight decay
    expected_w, expected_m, expected_v, expected_nu_sq = _reference_psiadam(
        w.detach(), grads, 0.05, 0.8, 0.95, 1e-6, amsgrad, nesterov, rate
    )
    opt = psiopt.PSIAdam(
        [w], lr=0.05, betas=(0.8, 0.95), eps=1e-6, amsgrad=amsgrad, nesterov=nesterov, angular_rate=angular_rate
    )
    for g in grads:
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach(), expected_w, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(opt.state[w]["exp_avg"], expected_m, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"], expected_v, rtol=1e-12, atol=1e-15)
    assert float(opt.state[w]["step"]) == 5.0
    if rate is not None:
        torch.testing.assert_close(opt.state[w]["virtual_sq_norm"], expected_nu_sq, rtol=1e-12, atol=0)
        assert (expected_nu_sq > 1.01).all()  # the norm the steps would have grown: the rate decayed
    else:
        assert "virtual_sq_norm" not in opt.state[w]


def test_psiadasgd_step_is_the_documented_formula() -> None:
    w = _psi((3, 5), seed=6)
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
    lr, mu, eps = 0.2, 0.9, 1e-10
    expected = w.detach().clone()
    total = torch.zeros(3, dtype=torch.float64)
    buf = None
    for g in grads:
        norm = expected.norm(dim=1, keepdim=True)
        unit = expected / norm
        grad_at_unit = norm * (g - (g * unit).sum(1, keepdim=True) * unit)
        total += (grad_at_unit * grad_at_unit).sum(1)
        step = norm * grad_at_unit / (total.sqrt().unsqueeze(1) + eps)
        buf = step if buf is None else mu * buf + step
        moved = expected - lr * buf
        expected = norm * moved / moved.norm(dim=1, keepdim=True)
        buf = buf - (buf * expected).sum(1, keepdim=True) / (norm * norm) * expected
    opt = psiopt.PSIAdaSGD([w], lr=lr, momentum=mu, eps=eps)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], buf, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(opt.state[w]["sum"], total, rtol=1e-12, atol=0)


def test_psiadasgd_first_step_turns_every_group_by_lr() -> None:
    w = _psi((5, 7), seed=8)
    start = _unit_rows(w)
    w.grad = torch.randn(5, 7, dtype=torch.float64) * torch.logspace(-3, 3, 5, dtype=torch.float64).unsqueeze(1)
    psiopt.PSIAdaSGD([w], lr=0.1, eps=0.0).step()
    # the retraction w - lr*||w||*unit tangent: tan(angle) = lr, whatever the gradient's size
    angles = torch.atan2(torch.linalg.vector_norm(_unit_rows(w) - (start * _unit_rows(w)).sum(1, keepdim=True) * start, dim=1), (start * _unit_rows(w)).sum(1))
    torch.testing.assert_close(angles, torch.full((5,), math.atan(0.1), dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_first_moment_is_horizontal_and_norms_are_kept(name: str) -> None:
    a = _sym(6, 1)
    w = _psi((4, 6), seed=2)
    norms = torch.linalg.vector_norm(w.detach(), dim=1)
    opt = ADAPTIVE[name]([w])
    _rayleigh_steps(opt, [w], [a], 6)
    key = "momentum_buffer" if name == "PSIAdaSGD" else "exp_avg"
    cos = (opt.state[w][key] * w.detach()).sum(1) / (opt.state[w][key].norm(dim=1) * w.detach().norm(dim=1))
    assert cos.abs().max() < 1e-12
    torch.testing.assert_close(torch.linalg.vector_norm(w.detach(), dim=1), norms, rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", list(ADAPTIVE))
@pytest.mark.parametrize("grouping", ["channel", "tensor", "block(2)"])
def test_rescaled_start_gives_rescaled_iterates(name: str, grouping: str) -> None:
    w = _psi((4, 6), grouping, seed=5)
    k, d = w.manifold.rows(w).shape
    a = _sym(d, 2)
    factors = torch.logspace(-3, 3, k, dtype=torch.float64).unsqueeze(1)
    v = geoopt.ManifoldParameter((w.manifold.rows(w.detach()) * factors).reshape(w.shape), manifold=w.manifold)
    for p in (w, v):
        _rayleigh_steps(ADAPTIVE[name]([p]), [p], [a], 30)
    torch.testing.assert_close(v.manifold.rows(v.detach()), factors * w.manifold.rows(w.detach()), rtol=1e-11, atol=0)


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_weight_decay_is_not_applied_to_scale_invariant_groups(name: str) -> None:
    """Weight decay is never applied to a scale-invariant weight. PSIAdam's coupled L2 term
    is radial (the projection removes it), PSIAdaSGD has no rate; PSIAdamW's decoupled
    decay acts only through the 'adam' rate's pull, so at the constant rate it does nothing."""
    a = _sym(5, 3)
    w, v = _psi((3, 5), seed=1), _psi((3, 5), seed=1)
    options = {"angular_rate": "constant"} if name == "PSIAdamW" else {}
    _rayleigh_steps(ADAPTIVE[name]([w], weight_decay=0.5, **options), [w], [a], 5)
    _rayleigh_steps(ADAPTIVE[name]([v], weight_decay=0.0, **options), [v], [a], 5)
    assert torch.equal(w, v)


def test_psiadamw_weight_decay_slows_the_rates_decay_and_keeps_the_norms() -> None:
    """At the 'adam' rate, AdamW's decay pulls the virtual norm down (the group keeps
    turning faster than without decay) while the stored norms stay where they started."""
    a = _sym(5, 3)
    w, v = _psi((3, 5), seed=1), _psi((3, 5), seed=1)
    norms = w.detach().norm(dim=1)
    decayed, plain = psiopt.PSIAdamW([w], lr=0.05, weight_decay=0.5), psiopt.PSIAdamW([v], lr=0.05, weight_decay=0.0)
    _rayleigh_steps(decayed, [w], [a], 5)
    _rayleigh_steps(plain, [v], [a], 5)
    assert (decayed.state[w]["virtual_sq_norm"] < plain.state[v]["virtual_sq_norm"]).all()
    torch.testing.assert_close(w.detach().norm(dim=1), norms, rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_maximize_negates_the_gradient_on_scale_invariant_groups(name: str) -> None:
    a = _sym(5, 4)
    w, v = _psi((3, 5)), _psi((3, 5))
    opt_max = ADAPTIVE[name]([w], maximize=True)
    opt_min = ADAPTIVE[name]([v])
    for _ in range(5):
        opt_max.zero_grad()
        (-_rayleigh_loss([w], [a])).backward()
        opt_max.step()
        opt_min.zero_grad()
        _rayleigh_loss([v], [a]).backward()
        opt_min.step()
    torch.testing.assert_close(w.detach(), v.detach(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_converges_to_the_smallest_eigenvalue(name: str) -> None:
    a = _sym(8, 9)
    w = _psi((3, 8), seed=4)
    opt = ADAPTIVE[name]([w])
    _rayleigh_steps(opt, [w], [a], 400)
    smallest = torch.linalg.eigvalsh(a)[0]
    torch.testing.assert_close(_rayleigh_loss([w], [a]).detach() / 3, smallest, rtol=0, atol=1e-3)


ROW_STEPS = {
    "adam": (_psiadam_rows, dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, maximize=False, nesterov=True), 1),
    "adam-plain": (_psiadam_rows, dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, maximize=False, nesterov=False), 1),
    "adam-amsgrad": (_psiadam_rows, dict(lr=0.05, beta1=0.8, beta2=0.9, eps=1e-8, maximize=True, nesterov=True), 2),
    "adasgd": (_psiadasgd_rows, dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, eps=1e-10, maximize=False), 1),
    "adasgd-plain": (_psiadasgd_rows, dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, eps=1e-10, maximize=False), 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(ROW_STEPS))
def test_foreach_matches_the_reference_loop(case: str, dtype) -> None:
    row_step, options, num_group_states = ROW_STEPS[case]
    is_adam = row_step is _psiadam_rows
    gen = torch.Generator().manual_seed(5)
    shapes = [((4, 3, 3, 3), "channel"), ((6, 3, 3, 3), "channel"), ((5, 27), "channel"), ((8, 2, 2), "block(2)"), ((3, 4), "tensor")]
    manifolds = [psiopt.PSIManifold(g) for _, g in shapes]
    params = [torch.randn(s, generator=gen, dtype=dtype) for s, _ in shapes]
    loop_params = [p.clone() for p in params]

    def fresh_states():
        row = [[torch.zeros_like(p) if is_adam else None for p in params]]
        per_group = [[torch.zeros(m.num_groups(p), dtype=dtype) for p, m in zip(params, manifolds)] for _ in range(num_group_states)]
        return row, per_group

    loop_states, multi_states = fresh_states(), fresh_states()
    rows = [m.rows for m in manifolds]
    for t in range(1, 5):
        grads = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
        per_tensor = [{"step": float(t)} if is_adam else {} for _ in params]
        _single_tensor_rows(row_step, loop_params, grads, rows, *loop_states, per_tensor, **options)
        _multi_tensor_rows(row_step, params, grads, rows, *multi_states, per_tensor, **options)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-14)
    for p, q in zip(params, loop_params):
        torch.testing.assert_close(p, q, **tol)
    for kind_multi, kind_loop in zip(sum(multi_states, []), sum(loop_states, [])):
        for b, c in zip(kind_multi, kind_loop):
            assert (b is None) == (c is None)
            if b is not None:
                torch.testing.assert_close(b, c, **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_half_precision_weights_follow_a_float32_reference(name: str, dtype) -> None:
    a = _sym(16, 2, torch.float32) / 16
    w32 = _psi((8, 16), dtype=torch.float32)
    start = (w32.detach() * 1e-3).to(dtype)  # squared norms underflow in half precision
    w32.data.copy_(start.float())
    wh = geoopt.ManifoldParameter(start.clone(), manifold=psiopt.PSIManifold("channel"))
    opts = [ADAPTIVE[name]([p]) for p in (w32, wh)]
    for _ in range(10):
        for p, opt in zip((w32, wh), opts):
            opt.zero_grad()
            _rayleigh_loss([p], [a]).backward()
            opt.step()
    assert all(t.dtype == dtype for t in opts[1].state[wh].values() if t.dim() > 0)
    assert torch.isfinite(wh).all()
    tol = 3e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(_unit_rows(wh).float(), _unit_rows(w32), rtol=0, atol=tol)


# -- the optimizer contract ------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_resume_from_checkpoint_is_exact(name: str, foreach: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    psiopt.mark_scale_invariant(model, x)

    def make(m):
        return ADAPTIVE[name](m.parameters(), weight_decay=1e-3, foreach=foreach)

    def train(m, opt, steps):
        for t in steps:
            idx = torch.arange(t, t + 16) % 32
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()

    straight = copy.deepcopy(model)
    train(straight, make(straight), range(10))
    first = copy.deepcopy(model)
    first_opt = make(first)
    train(first, first_opt, range(4))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_opt, range(4, 10))
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_grouping_key_and_param_names(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    plain = nn.Parameter(torch.randn(4, 6, generator=gen, dtype=torch.float64))
    norms = torch.linalg.vector_norm(plain.detach(), dim=1)
    opt = ADAPTIVE[name]([{"params": [plain], "grouping": "channel", "param_names": ["conv.weight"]}])
    plain.grad = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(torch.linalg.vector_norm(plain.detach(), dim=1), norms, rtol=1e-13, atol=0)
    plain.grad = torch.full((4, 6), float("nan"), dtype=torch.float64)
    before = plain.detach().clone()
    with pytest.raises(FloatingPointError, match="'conv.weight'"):
        opt.step()
    assert torch.equal(plain, before)


def test_sparse_gradient_on_a_euclidean_parameter_raises_as_torch_before_any_write() -> None:
    emb = nn.Embedding(5, 3, sparse=True)
    si = _psi((3, 4))
    opt = psiopt.PSIAdam([si, *emb.parameters()], lr=0.1)
    si.grad = torch.randn(3, 4, dtype=torch.float64)
    emb(torch.tensor([1, 2])).sum().backward()
    before = si.detach().clone()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        opt.step()
    assert torch.equal(si, before) and len(opt.state) == 0


BAD_ADAM = [
    dict(lr=-0.1), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)), dict(weight_decay=-1.0),
    dict(betas=(0.9, torch.tensor(0.99))), dict(lr=torch.ones(2)), dict(lr=float("nan")),
]


@pytest.mark.parametrize("kwargs", BAD_ADAM, ids=str)
@pytest.mark.parametrize("pair", [(psiopt.PSIAdam, torch.optim.Adam), (psiopt.PSIAdamW, torch.optim.AdamW)], ids=["adam", "adamw"])
def test_invalid_hyperparameters_raise_as_torch(pair, kwargs) -> None:
    ours_cls, torch_cls = pair
    with pytest.raises(ValueError) as torch_error:
        torch_cls([nn.Parameter(torch.ones(2))], **kwargs)
    with pytest.raises(ValueError, match=re.escape(str(torch_error.value))):
        ours_cls([_psi((2, 2))], **kwargs)


@pytest.mark.parametrize(
    "make",
    [
        lambda p, v: psiopt.PSIAdam([p], lr=v),
        lambda p, v: psiopt.PSIAdam([p], eps=v),
        lambda p, v: psiopt.PSIAdamW([p], lr=v),
        lambda p, v: psiopt.PSIAdaSGD([p], lr=v),
        lambda p, v: psiopt.PSIAdaSGD([p], lr=0.1, eps=v),
        lambda p, v: psiopt.PSISGD([p], lr=v),
        lambda p, v: psiopt.PSIGD([p], lr=v),
        lambda p, v: psiopt.PSISGD([p], lr=0.1).add_param_group({"params": [_psi((2, 2), seed=9)], "lr": v}),
    ],
    ids=["adam-lr", "adam-eps", "adamw-lr", "adasgd-lr", "adasgd-eps", "psisgd-lr", "psigd-lr", "psisgd-add-group"],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_lr_or_eps_is_refused_at_construction(make, value) -> None:
    with pytest.raises(ValueError, match=r"Invalid (learning rate|epsilon value): (nan|inf)"):
        make(_psi((2, 2)), value)


@pytest.mark.parametrize("option", [dict(capturable=True), dict(differentiable=True)], ids=str)
def test_unsupported_torch_options_raise_clearly(option) -> None:
    with pytest.raises(ValueError, match=f"PSIAdam does not support {next(iter(option))}=True"):
        psiopt.PSIAdam([_psi((2, 2))], **option)


@pytest.mark.parametrize("value", ["yes", 1, None])
@pytest.mark.parametrize("where", ["constructor", "param group"])
def test_non_bool_nesterov_is_refused(where: str, value) -> None:
    message = re.escape(f"nesterov must be True or False, got {value!r}")
    if where == "constructor":
        with pytest.raises(TypeError, match=message):
            psiopt.PSIAdamW([_psi((2, 2))], nesterov=value)
        return
    opt = psiopt.PSIAdam([_psi((2, 2))])
    with pytest.raises(TypeError, match=message):
        opt.add_param_group({"params": [_psi((3, 2), seed=2)], "nesterov": value})
    assert len(opt.param_groups) == 1


def test_state_saved_without_nesterov_resumes_the_plain_step() -> None:
    # A checkpoint from before the option existed was taken with the plain step: loading it
    # must go on with that step, not switch to the new default mid-run.
    a = _sym(6, 5)
    plain, resumed = _psi((4, 6), seed=7), _psi((4, 6), seed=7)
    plain_opt = psiopt.PSIAdam([plain], lr=0.05, nesterov=False)
    _rayleigh_steps(plain_opt, [plain], [a], 3)
    old_state = copy.deepcopy(plain_opt.state_dict())  # state_dict() shares the tensors
    del old_state["param_groups"][0]["nesterov"]
    resumed.data.copy_(plain.detach())
    resumed_opt = psiopt.PSIAdam([resumed], lr=0.05)
    resumed_opt.load_state_dict(old_state)
    assert resumed_opt.param_groups[0]["nesterov"] is False
    _rayleigh_steps(plain_opt, [plain], [a], 3)
    _rayleigh_steps(resumed_opt, [resumed], [a], 3)
    assert torch.equal(plain, resumed)


def test_nesterov_changes_only_the_scale_invariant_step() -> None:
    gen = torch.Generator().manual_seed(3)
    runs = []
    for nesterov in (False, True):
        si, euclid = _psi((3, 4), seed=1), nn.Parameter(torch.ones(5, dtype=torch.float64))
        opt = psiopt.PSIAdam([si, euclid], lr=0.05, nesterov=nesterov)
        for _ in range(3):
            si.grad = torch.randn(3, 4, generator=gen.manual_seed(3), dtype=torch.float64)
            euclid.grad = torch.randn(5, generator=gen, dtype=torch.float64)
            opt.step()
        runs.append((si.detach().clone(), euclid.detach().clone()))
    assert torch.equal(runs[0][1], runs[1][1])
    assert not torch.allclose(runs[0][0], runs[1][0])


def test_adamw_keeps_decoupled_weight_decay_after_loading() -> None:
    opt = psiopt.PSIAdamW([_psi((2, 2))])
    state = opt.state_dict()
    state["param_groups"][0]["decoupled_weight_decay"] = False
    opt.load_state_dict(state)
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    assert opt.defaults["weight_decay"] == 1e-2


def test_adasgd_add_param_group_takes_the_adaptive_defaults() -> None:
    opt = psiopt.PSIAdaSGD([_psi((2, 2))], lr=0.1, eps=1e-6, initial_accumulator_value=0.5)
    opt.add_param_group({"params": [_psi((3, 2), seed=2)]})
    assert opt.param_groups[1]["eps"] == 1e-6 and opt.param_groups[1]["initial_accumulator_value"] == 0.5
    with pytest.raises(ValueError, match="Invalid initial_accumulator_value value: -1"):
        opt.add_param_group({"params": [_psi((3, 2), seed=3)], "initial_accumulator_value": -1.0})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_warns_without_scale_invariant_parameters(name: str) -> None:
    with pytest.warns(UserWarning, match="no scale-invariant parameter"):
        ADAPTIVE[name](nn.Linear(3, 2).parameters())


@pytest.mark.parametrize("module", ["psiopt.optim.psiadam", "psiopt.optim.psiadasgd"])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# -- the defining property, on a real BN network in float64 ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda m: psiopt.PSIAdam(m.parameters(), lr=0.01),
        lambda m: psiopt.PSIAdam(m.parameters(), lr=0.01, nesterov=False),
        lambda m: psiopt.PSIAdamW(m.parameters(), lr=0.01, amsgrad=True),
        lambda m: psiopt.PSIAdaSGD(m.parameters(), lr=0.2, momentum=0.9, nesterov=True),
    ],
    ids=["adam", "adam-plain", "adamw-amsgrad", "adasgd"],
)
def test_equivalent_weights_follow_equivalent_trajectories(make) -> None:
    from test_invariance_property import assert_equivalent_trajectories

    assert_equivalent_trajectories(make)


@pytest.mark.slow
def test_negative_control_euclidean_adam_drifts() -> None:
    from test_invariance_property import _setup, _train

    images, labels, models, _, batches = _setup(seed=0)
    deviations, _ = _train(list(models[:2]), lambda m: torch.optim.Adam(m.parameters(), lr=0.01), images, labels, batches)
    assert deviations[:, 0].max() > 1e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_cuda_matches_cpu(name: str, foreach) -> None:
    a = _sym(5, 0)
    cpu = [_psi((4, 5)), nn.Parameter(torch.randn(3, dtype=torch.float64))]
    gpu = [geoopt.ManifoldParameter(cpu[0].detach().cuda(), manifold=psiopt.PSIManifold()), nn.Parameter(cpu[1].detach().cuda())]
    opts = [ADAPTIVE[name](ps, foreach=foreach) for ps in (cpu, gpu)]
    for _ in range(5):
        for ps, opt in zip((cpu, gpu), opts):
            opt.zero_grad()
            (_rayleigh_loss([ps[0]], [a.to(ps[0].device)]) + (ps[1] ** 2).sum()).backward()
            opt.step()
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-12, atol=1e-13)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pair", [(psiopt.PSIAdam, torch.optim.Adam), (psiopt.PSIAdamW, torch.optim.AdamW)], ids=["adam", "adamw"])
def test_cuda_euclidean_parameters_follow_torch_bit_for_bit(pair) -> None:
    # By default psiopt gives them torch's fused step (torch's own default on CUDA is its
    # multi-tensor one, which rounds differently).
    ours_cls, torch_cls = pair
    gen = torch.Generator().manual_seed(3)
    euclid = [nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in [(5, 3), (7,)]]
    reference = [nn.Parameter(p.detach().clone()) for p in euclid]
    si = geoopt.ManifoldParameter(torch.randn(3, 4, generator=gen).cuda(), manifold=psiopt.PSIManifold())
    ours = ours_cls([si, *euclid], lr=0.01)
    theirs = torch_cls(reference, lr=0.01, fused=True)
    for _ in range(4):
        for p, q in zip(euclid, reference):
            g = torch.randn(p.shape, generator=gen).cuda()
            p.grad, q.grad = g.clone(), g.clone()
        si.grad = torch.randn(si.shape, generator=gen).cuda()
        ours.step()
        theirs.step()
    for p, q in zip(euclid, reference):
        assert torch.equal(p, q)
