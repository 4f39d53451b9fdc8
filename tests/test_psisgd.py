"""PSISGD: the PSI step, torch's SGD bit for bit elsewhere, and the optimizer contract."""

from __future__ import annotations

import copy
import io
import itertools
import re

import geoopt
import pytest
import torch
from torch import nn

import psiopt


from _rayleigh import psi_param as _psi, rayleigh_loss as _rayleigh_loss, sym as _sym, unit_rows as _unit_rows


# -- Euclidean parameters: torch.optim.SGD bit for bit ----------------------------------

SGD_CASES = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx, foreach=fe)
    for m, d, n, wd, mx, fe in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.01], [False, True], [False, True])
    if not (n and (m == 0 or d != 0))
]


@pytest.mark.parametrize("options", SGD_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_euclidean_parameters_follow_torch_sgd_bit_for_bit(options) -> None:
    gen = torch.Generator().manual_seed(1)
    euclid = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(5, 3), (7,), (2, 3, 4)]]
    euclid.append(nn.Parameter(torch.randn(4, 4, generator=gen, dtype=torch.float64)))
    reference = [nn.Parameter(p.detach().clone()) for p in euclid]
    si = _psi((3, 4))
    # In one group with a scale-invariant weight, as with model.parameters().
    ours = psiopt.PSISGD([euclid[0], si, *euclid[1:]], lr=0.1, **options)
    theirs = torch.optim.SGD(reference, lr=0.1, **options)
    for _ in range(4):
        for p, q in zip(euclid, reference):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        si.grad = torch.randn(si.shape, generator=gen, dtype=si.dtype)
        ours.step()
        theirs.step()
        for p, q in zip(euclid, reference):
            assert torch.equal(p, q)
            if options["momentum"]:
                assert torch.equal(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"])


def test_sparse_gradient_on_euclidean_parameter_follows_torch() -> None:
    emb, ref = nn.Embedding(10, 3, sparse=True), nn.Embedding(10, 3, sparse=True)
    ref.load_state_dict(emb.state_dict())
    si = _psi((2, 3))
    ours = psiopt.PSISGD([emb.weight, si], lr=0.5)
    theirs = torch.optim.SGD(ref.parameters(), lr=0.5)
    idx = torch.tensor([1, 4, 4, 7])
    emb(idx).pow(2).sum().backward()
    ref(idx).pow(2).sum().backward()
    si.grad = torch.ones_like(si)
    ours.step()
    theirs.step()
    assert torch.equal(emb.weight, ref.weight)


# -- the PSI step ------------------------------------------------------------------------


def test_one_step_is_the_retraction_of_the_riemannian_gradient_at_kept_norms() -> None:
    w = _psi((4, 3, 2))  # four groups of six
    start = w.detach().clone()
    rows = start.reshape(4, -1)
    grad = torch.randn(4, 3, 2, dtype=torch.float64)
    w.grad = grad.clone()
    psiopt.PSISGD([w], lr=0.3, angular_rate="constant").step()
    g = grad.reshape(4, -1)
    sq = (rows * rows).sum(1, keepdim=True)
    riem = sq * (g - (g * rows).sum(1, keepdim=True) / sq * rows)
    moved = rows - 0.3 * riem
    expected = moved * torch.sqrt(sq / (moved * moved).sum(1, keepdim=True))
    torch.testing.assert_close(w.detach().reshape(4, -1), expected, rtol=1e-13, atol=1e-15)
    # The norms are kept; the radial part of the gradient had no effect.
    torch.testing.assert_close(w.detach().reshape(4, -1).norm(dim=1), rows.norm(dim=1), rtol=1e-14, atol=0)
    w2 = _psi((4, 3, 2))
    w2.grad = grad + 5.0 * start  # plus a radial (vertical) component
    psiopt.PSISGD([w2], lr=0.3, angular_rate="constant").step()
    torch.testing.assert_close(w2.detach(), w.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_buffer_is_horizontal_and_transported(nesterov: bool) -> None:
    w = _psi((6, 5))
    a = _sym(5, 3)
    opt = psiopt.PSISGD([w], lr=0.05, momentum=0.9, nesterov=nesterov)
    for _ in range(5):
        opt.zero_grad()
        _rayleigh_loss([w], [a]).backward()
        opt.step()
        buf = opt.state[w]["momentum_buffer"]
        assert buf.shape == w.shape and buf.dtype == w.dtype
        # horizontal at the stored weights: orthogonal to every group
        inner = (buf.reshape(6, -1) * w.detach().reshape(6, -1)).sum(1)
        assert inner.abs().max() < 1e-12 * buf.norm() * w.detach().norm()


def test_weight_decay_is_not_applied_to_scale_invariant_groups() -> None:
    w, v = _psi((3, 4)), _psi((3, 4))
    grad = torch.randn(3, 4, dtype=torch.float64)
    w.grad, v.grad = grad.clone(), grad.clone()
    psiopt.PSISGD([w], lr=0.1, momentum=0.9, weight_decay=0.5).step()
    psiopt.PSISGD([v], lr=0.1, momentum=0.9).step()
    assert torch.equal(w, v)


def test_maximize_negates_the_gradient_on_scale_invariant_groups() -> None:
    w, v = _psi((3, 4)), _psi((3, 4))
    grad = torch.randn(3, 4, dtype=torch.float64)
    w.grad, v.grad = grad.clone(), -grad
    psiopt.PSISGD([w], lr=0.1, maximize=True).step()
    psiopt.PSISGD([v], lr=0.1).step()
    assert torch.equal(w, v)


def test_rescaled_start_gives_rescaled_iterates() -> None:
    a = _sym(6, 0)
    w = _psi((5, 6))
    factors = torch.logspace(-2, 2, 5, dtype=torch.float64).unsqueeze(1)
    v = geoopt.ManifoldParameter(w.detach() * factors, manifold=psiopt.PSIManifold("channel"))
    opts = [psiopt.PSISGD([p], lr=0.1, momentum=0.9, nesterov=True) for p in (w, v)]
    for _ in range(30):
        for p, opt in zip((w, v), opts):
            opt.zero_grad()
            _rayleigh_loss([p], [a]).backward()
            opt.step()
    torch.testing.assert_close(v.detach(), factors * w.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("foreach", [False, True])
def test_half_precision_weights_follow_a_float32_reference(dtype, foreach) -> None:
    a = _sym(16, 2, torch.float32) / 16
    w32 = _psi((8, 16), dtype=torch.float32)
    # Tiny weights: their squared norms underflow in half precision, not in float32.
    start = (w32.detach() * 1e-3).to(dtype)
    w32.data.copy_(start.float())
    wh = geoopt.ManifoldParameter(start.clone(), manifold=psiopt.PSIManifold("channel"))
    opts = [psiopt.PSISGD([p], lr=0.05, momentum=0.9, foreach=foreach) for p in (w32, wh)]
    for _ in range(10):
        for p, opt in zip((w32, wh), opts):
            opt.zero_grad()
            _rayleigh_loss([p], [a]).backward()
            opt.step()
    assert wh.dtype == dtype and opts[1].state[wh]["momentum_buffer"].dtype == dtype
    assert torch.isfinite(wh).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(_unit_rows(wh).float(), _unit_rows(w32), rtol=0, atol=tol)


def test_group_lr_and_scheduler_apply_to_scale_invariant_groups() -> None:
    a = _sym(4, 1)
    ws = [_psi((3, 4), seed=s) for s in (0, 0)]
    opt = psiopt.PSISGD([ws[0]], lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    manual = psiopt.PSISGD([ws[1]], lr=0.2, momentum=0.9)
    for t in range(6):
        for p, o in ((ws[0], opt), (ws[1], manual)):
            o.zero_grad()
            _rayleigh_loss([p], [a]).backward()
        manual.param_groups[0]["lr"] = 0.2 * 0.1 ** (t // 2)
        opt.step()
        manual.step()
        sched.step()
        assert torch.equal(ws[0], ws[1])
    frozen = _psi((3, 4))
    before = frozen.detach().clone()
    free = nn.Parameter(torch.ones(2))
    opt = psiopt.PSISGD([{"params": [frozen], "lr": 0.0}, {"params": [free]}], lr=0.1)
    frozen.grad, free.grad = torch.ones_like(frozen), torch.ones(2)
    opt.step()
    assert torch.equal(frozen, before) and torch.equal(free, torch.full((2,), 0.9))


def test_grouping_key_makes_plain_tensors_scale_invariant() -> None:
    plain = nn.Parameter(_psi((4, 6)).detach().clone())
    marked = _psi((4, 6))
    grad = torch.randn(4, 6, dtype=torch.float64)
    plain.grad, marked.grad = grad.clone(), grad.clone()
    psiopt.PSISGD([{"params": [plain], "grouping": "channel"}], lr=0.1).step()
    psiopt.PSISGD([marked], lr=0.1).step()
    assert torch.equal(plain, marked)
    with pytest.raises(ValueError, match="unknown grouping kind"):
        psiopt.PSISGD([{"params": [plain], "grouping": "rows"}])
    with pytest.raises(ValueError, match=r"block\(3\).*not a multiple"):
        psiopt.PSISGD([{"params": [plain], "grouping": "block(3)"}])


def test_add_param_group() -> None:
    w = _psi((3, 4))
    opt = psiopt.PSISGD([w], lr=0.1, momentum=0.9)
    extra = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    opt.add_param_group({"params": [extra], "grouping": "tensor", "lr": 0.05})
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["nesterov"] is False
    extra.grad = torch.randn(3, 4, dtype=torch.float64)
    norm = extra.detach().norm()
    opt.step()
    torch.testing.assert_close(extra.detach().norm(), norm, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": -1.0})
    assert len(opt.param_groups) == 2


def test_closure_is_called_and_its_loss_returned() -> None:
    w = _psi((3, 4))
    a = _sym(4, 0)
    opt = psiopt.PSISGD([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = _rayleigh_loss([w], [a])
        loss.backward()
        return loss

    first = opt.step(closure)
    assert torch.is_tensor(first) and opt.step(closure).item() < first.item()


@pytest.mark.parametrize("foreach", [False, True])
def test_resume_from_checkpoint_is_exact(foreach) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    psiopt.mark_scale_invariant(model, x)

    def make(m):
        return psiopt.PSISGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=foreach)

    def train(m, opt, steps):
        for t in range(steps):
            idx = torch.arange(t, t + 16) % 32
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()

    straight = copy.deepcopy(model)
    straight_opt = make(straight)
    train(straight, straight_opt, 10)

    first = copy.deepcopy(model)
    first_opt = make(first)
    train(first, first_opt, 4)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = copy.deepcopy(model)  # a fresh, marked model
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    for t in range(4, 10):
        idx = torch.arange(t, t + 16) % 32
        resumed_opt.zero_grad()
        nn.functional.cross_entropy(resumed(x[idx]), y[idx]).backward()
        resumed_opt.step()
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# -- interop with geoopt ------------------------------------------------------------------


def test_agrees_with_geoopt_riemannian_sgd_without_momentum() -> None:
    a = _sym(5, 4)
    w, v = _psi((4, 5)), _psi((4, 5))
    ours = psiopt.PSISGD([w], lr=0.1, angular_rate="constant")
    theirs = geoopt.optim.RiemannianSGD([v], lr=0.1)
    for _ in range(20):
        for p, opt in ((w, ours), (v, theirs)):
            opt.zero_grad()
            _rayleigh_loss([p], [a]).backward()
            opt.step()
    # The same points of the manifold; geoopt kept w + xi (its norms grew), PSISGD did not.
    torch.testing.assert_close(_unit_rows(w), _unit_rows(v), rtol=0, atol=1e-12)
    assert (v.detach().norm(dim=1) > w.detach().norm(dim=1) * (1 + 1e-6)).all()


def test_differs_from_geoopt_momentum_start_as_documented() -> None:
    # geoopt's first momentum buffer is mu * (Euclidean grad) + (1 - tau) * (Riemannian grad);
    # PSISGD's is the Riemannian gradient, as torch's SGD starts from the gradient.
    w, v = _psi((4, 5)), _psi((4, 5))
    grad = torch.randn(4, 5, dtype=torch.float64)
    w.grad, v.grad = grad.clone(), grad.clone()
    ours = psiopt.PSISGD([w], lr=0.1, momentum=0.9)
    theirs = geoopt.optim.RiemannianSGD([v], lr=0.1, momentum=0.9)
    ours.step()
    theirs.step()
    assert (_unit_rows(w) - _unit_rows(v)).abs().max() > 1e-3


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=-0.1), dict(momentum=-0.5), dict(weight_decay=-1.0), dict(nesterov=True), dict(nesterov=True, momentum=0.9, dampening=0.1), dict(lr=torch.ones(2))],
)
def test_invalid_hyperparameters_raise_as_torch(kwargs) -> None:
    with pytest.raises(ValueError) as torch_error:
        torch.optim.SGD([nn.Parameter(torch.ones(2))], **kwargs)
    with pytest.raises(ValueError, match=re.escape(str(torch_error.value))):
        psiopt.PSISGD([_psi((2, 2))], **kwargs)


def test_warns_without_scale_invariant_parameters() -> None:
    with pytest.warns(UserWarning, match="no scale-invariant parameter.*psiopt.param_groups"):
        psiopt.PSISGD(nn.Linear(3, 2).parameters(), lr=0.1)


def test_rejects_parameters_on_other_geoopt_manifolds() -> None:
    sphere = geoopt.ManifoldParameter(torch.tensor([1.0, 0.0]), manifold=geoopt.Sphere())
    with pytest.raises(TypeError, match="geoopt.ManifoldParameter on Sphere.*RiemannianSGD"):
        psiopt.PSISGD([_psi((2, 2)), sphere])


def test_sparse_gradient_on_scale_invariant_weight_raises() -> None:
    w = _psi((3, 2))
    w.grad = torch.eye(3, 2, dtype=torch.float64).to_sparse()
    with pytest.raises(RuntimeError, match="scale invariant and has a sparse gradient"):
        psiopt.PSISGD([w], lr=0.1).step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("foreach", [False, True, None])
def test_non_finite_gradient_refuses_the_step_untouched(bad, foreach) -> None:
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    psiopt.mark_scale_invariant(model, x)
    opt = psiopt.PSISGD(model.named_parameters(), lr=0.1, momentum=0.9, foreach=foreach)
    model(x).sum().backward()
    opt.step()
    weights = [p.detach().clone() for p in model.parameters()]
    buffers = {p: opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    model(x).sum().backward()
    model[2].bias.grad[1] = bad  # the last parameter: every other one would be stepped first
    with pytest.raises(FloatingPointError, match=r"parameter '2.bias' has a NaN or infinite gradient"):
        opt.step()
    for p, before in zip(model.parameters(), weights):
        assert torch.equal(p, before)
        assert torch.equal(opt.state[p]["momentum_buffer"], buffers[p])


def test_huge_finite_gradient_whose_norm_overflows_is_not_refused() -> None:
    """The finite check screens with a 2-norm, which overflows here (1e30^2 > float32 max):
    a gradient that is finite entry by entry must still be stepped, like torch's SGD would.
    (The 'sgd' rate keeps a mean square of the gradients in the weights' dtype, as torch's
    Adam does, and overflows with it: the constant rate is the one that takes this step.)"""
    w = torch.nn.Parameter(torch.ones(3, 2))
    w.grad = torch.full((3, 2), 1e30)
    opt = psiopt.PSISGD([{"params": [w], "grouping": "channel"}], lr=1e-31, angular_rate="constant")
    assert torch.isinf(torch.linalg.vector_norm(w.grad))
    before = w.detach().clone()
    opt.step()
    assert torch.isfinite(w).all()
    assert torch.equal(w.detach(), before)  # the gradient is radial here: its horizontal part is 0
    w.grad = torch.tensor([[1e30, -1e30], [0.0, 0.0], [0.0, 0.0]])
    opt.step()
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), before)


@pytest.mark.parametrize("tiny", [0.0, 1e-200])
def test_zero_or_underflowing_group_raises_untouched(tiny) -> None:
    good = nn.Parameter(torch.ones(3, dtype=torch.float64))
    w = _psi((4, 3))
    with torch.no_grad():
        w[2] = tiny
    before = [good.detach().clone(), w.detach().clone()]
    opt = psiopt.PSISGD([{"params": [good]}, {"params": [w]}], lr=0.1)
    good.grad, w.grad = torch.ones(3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(psiopt.ZeroGroupError, match=r"param_groups\[1\]\['params'\]\[0\].*group\(s\) 2 of 4"):
        opt.step()
    assert torch.equal(good, before[0]) and torch.equal(w, before[1])


# -- devices -----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("foreach", [None, False, True])
def test_cuda_matches_cpu(foreach) -> None:
    a = _sym(5, 0)
    cpu = [_psi((4, 5)), nn.Parameter(torch.randn(3, dtype=torch.float64))]
    gpu = [geoopt.ManifoldParameter(cpu[0].detach().cuda(), manifold=psiopt.PSIManifold()), nn.Parameter(cpu[1].detach().cuda())]
    opts = [psiopt.PSISGD(ps, lr=0.1, momentum=0.9, foreach=foreach) for ps in (cpu, gpu)]
    for _ in range(5):
        for ps, opt in zip((cpu, gpu), opts):
            opt.zero_grad()
            (_rayleigh_loss([ps[0]], [a.to(ps[0].device)]) + (ps[1] ** 2).sum()).backward()
            opt.step()
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-12, atol=1e-13)
