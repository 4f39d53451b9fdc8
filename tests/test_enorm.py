"""ENorm: function preserved, L2 norm decreasing to scipy's minimum, optimizer state consistent."""

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import nn

import psiopt
from psiopt.nn import MeanOnlyBatchNorm1d

DT = torch.float64


def _unbalance(model, seed=0):
    """Multiply each layer's weights by a random spread of factors (not function preserving:
    just a badly scaled starting network)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                rows = torch.exp(2 * torch.randn(m.weight.shape[0], generator=gen, dtype=m.weight.dtype))
                m.weight.mul_(rows.reshape((-1,) + (1,) * (m.weight.dim() - 1)))
                if m.bias is not None:
                    m.bias.mul_(rows)
    return model


def _mlp(sizes=(5, 7, 6, 4, 3), bias=True, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    return _unbalance(nn.Sequential(*layers[:-1]).to(DT), seed)


def _cnn(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3),
        nn.LeakyReLU(0.1),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 7),
        nn.ReLU(),
        nn.Dropout(0.0),
        nn.Linear(7, 3),
    ).to(DT)
    return _unbalance(net, seed)


@pytest.mark.parametrize("make, shape", [(_mlp, (20, 5)), (_cnn, (6, 3, 8, 8))])
def test_cycle_keeps_the_function(make, shape):
    net = make()
    x = torch.randn(*shape, dtype=DT)
    before = net(x).detach()
    enorm = psiopt.ENorm(net)
    weights_before = [m.weight.detach().clone() for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for _ in range(3):
        enorm.step()
        torch.testing.assert_close(net(x).detach(), before, rtol=1e-12, atol=1e-12)
    weights_after = [m.weight.detach() for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert any(not torch.allclose(a, b) for a, b in zip(weights_before, weights_after))


def test_cycle_keeps_the_function_through_mean_only_bn_in_training():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), MeanOnlyBatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).to(DT)
    _unbalance(net, 1)
    with torch.no_grad():
        net[1].bias.normal_()
    x = torch.randn(30, 4, dtype=DT)
    before = net(x).detach()
    psiopt.ENorm(net).step()
    torch.testing.assert_close(net(x).detach(), before, rtol=1e-12, atol=1e-12)


def test_mean_only_bn_eval_mode_consistent():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 6), MeanOnlyBatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).to(DT)
    _unbalance(net, 2)
    x = torch.randn(30, 4, dtype=DT)
    net(x)
    with torch.no_grad():
        net[1].bias.normal_()
    net.eval()
    before = net(x).detach()
    psiopt.ENorm(net).step()
    torch.testing.assert_close(net(x).detach(), before, rtol=1e-12, atol=1e-12)


def _weights(net):
    return [m.weight.detach().numpy().astype(np.float64) for m in net if isinstance(m, nn.Linear)]


def _scipy_min_sq_norm(weights):
    """min over log-scales a_k (one per hidden unit) of sum_k ||D_k W_k D_{k-1}^{-1}||^2."""
    hidden = [w.shape[0] for w in weights[:-1]]
    sq = [w**2 for w in weights]
    splits = np.cumsum(hidden)[:-1]

    def fun(a):
        scales = np.split(a, splits)
        total, grad = 0.0, [np.zeros(h) for h in hidden]
        for k, s2 in enumerate(sq):
            row = scales[k] if k < len(hidden) else np.zeros(s2.shape[0])
            col = scales[k - 1] if k > 0 else np.zeros(s2.shape[1])
            term = s2 * np.exp(2 * (row[:, None] - col[None, :]))
            total += term.sum()
            if k < len(hidden):
                grad[k] += 2 * term.sum(1)
            if k > 0:
                grad[k - 1] -= 2 * term.sum(0)
        return total, np.concatenate(grad)

    res = scipy.optimize.minimize(fun, np.zeros(sum(hidden)), jac=True, method="BFGS", options={"gtol": 1e-12, "maxiter": 10000})
    return res.fun


def test_c1_norm_never_increases_and_reaches_the_scipy_minimum():
    net = _mlp(sizes=(4, 6, 5, 3), seed=3)
    enorm = psiopt.ENorm(net)
    norms = [enorm.total_sq_norm()]
    for _ in range(400):
        enorm.step()
        norms.append(enorm.total_sq_norm())
    diffs = np.diff(norms)
    assert np.all(diffs <= 1e-12 * norms[0]), diffs.max()
    assert norms[0] > 2 * norms[-1]  # the unbalanced start was far from the minimum
    expected = _scipy_min_sq_norm(_weights(net))
    assert abs(norms[-1] - expected) <= 1e-6 * expected, (norms[-1], expected)
    # the characterization of the minimum: each hidden unit's in-norm equals its out-norm
    linears = [m for m in net if isinstance(m, nn.Linear)]
    for a, b in zip(linears[:-1], linears[1:]):
        torch.testing.assert_close(a.weight.norm(dim=1), b.weight.norm(dim=0), rtol=1e-5, atol=0)


def test_asymmetric_c_fixed_point():
    c = 1.3
    net = _mlp(sizes=(4, 6, 5, 3), seed=4)
    enorm = psiopt.ENorm(net, c=c)
    for _ in range(400):
        enorm.step()
    linears = [m for m in net if isinstance(m, nn.Linear)]
    for a, b in zip(linears[:-1], linears[1:]):
        torch.testing.assert_close(b.weight.norm(dim=0), c * a.weight.norm(dim=1), rtol=1e-6, atol=0)


def _loss(net, x, y):
    return ((net(x) - y) ** 2).mean()


@pytest.mark.parametrize("make, shape", [(_mlp, (20, 5)), (_cnn, (6, 3, 8, 8))])
def test_sgd_momentum_buffer_follows_the_gradient(make, shape):
    """A buffer equal to the gradient at w must equal the gradient at the rescaled weights
    after the cycle: a rescaling by d maps the gradient by 1/d (rows) and d (columns)."""
    net = make(seed=5)
    x = torch.randn(*shape, dtype=DT)
    y = torch.randn_like(net(x))
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)
    opt.zero_grad()
    _loss(net, x, y).backward()
    opt.step()  # lr 0: weights unchanged, momentum_buffer = gradient
    enorm = psiopt.ENorm(net, opt)
    enorm.step()
    opt.zero_grad()
    _loss(net, x, y).backward()
    for p in net.parameters():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], p.grad, rtol=1e-10, atol=1e-12)


def test_psisgd_momentum_buffer_follows_the_gradient():
    """PSISGD on a network without scale-invariant weights keeps torch SGD's buffers."""
    net = _mlp(seed=10)
    x, y = torch.randn(20, 5, dtype=DT), torch.randn(20, 3, dtype=DT)
    with pytest.warns(UserWarning, match="no scale-invariant parameter"):
        opt = psiopt.PSISGD(net.parameters(), lr=0.0, momentum=0.9)
    _loss(net, x, y).backward()
    opt.step()
    psiopt.ENorm(net, opt).step()
    opt.zero_grad()
    _loss(net, x, y).backward()
    for p in net.parameters():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], p.grad, rtol=1e-10, atol=1e-12)


def test_psisgd_group_with_a_grouping_is_refused():
    net = _mlp(seed=11)
    opt = psiopt.PSISGD([{"params": [net[0].weight], "grouping": "channel"}, {"params": list(net.parameters())[1:]}], lr=0.1)
    with pytest.raises(TypeError, match="grouping"):
        psiopt.ENorm(net, opt).step()


def test_without_the_optimizer_buffers_go_stale():
    """The same check fails when ENorm is not told about the optimizer (the test can fail)."""
    net = _mlp(seed=6)
    x, y = torch.randn(20, 5, dtype=DT), torch.randn(20, 3, dtype=DT)
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)
    _loss(net, x, y).backward()
    opt.step()
    psiopt.ENorm(net).step()
    opt.zero_grad()
    _loss(net, x, y).backward()
    w = net[0].weight
    assert not torch.allclose(opt.state[w]["momentum_buffer"], w.grad, rtol=1e-3)


def test_adam_state_follows_the_gradient():
    net = _mlp(seed=7)
    x, y = torch.randn(20, 5, dtype=DT), torch.randn(20, 3, dtype=DT)
    opt = torch.optim.Adam(net.parameters(), lr=0.0, betas=(0.8, 0.9))
    _loss(net, x, y).backward()
    opt.step()
    psiopt.ENorm(net, opt).step()
    opt.zero_grad()
    _loss(net, x, y).backward()
    for p in net.parameters():
        torch.testing.assert_close(opt.state[p]["exp_avg"], 0.2 * p.grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], 0.1 * p.grad**2, rtol=1e-10, atol=1e-14)


def test_unknown_optimizer_state_is_refused_before_any_change():
    net = _mlp(seed=8)
    opt = torch.optim.Adagrad(net.parameters(), lr=0.1)
    _loss(net, torch.randn(4, 5, dtype=DT), torch.randn(4, 3, dtype=DT)).backward()
    opt.step()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(TypeError, match="'sum'"):
        psiopt.ENorm(net, opt).step()
    for p, b in zip(net.parameters(), before):
        assert torch.equal(p, b)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.lin(x)


@pytest.mark.parametrize(
    "model, error, match",
    [
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)), TypeError, "SBWN or psiopt.PSISGD"),
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), TypeError, "Tanh"),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), _Residual(), nn.Linear(4, 2)), TypeError, "_Residual"),
        (nn.Sequential(_Residual(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), TypeError, "residual"),
        (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 2, 1)), TypeError, "groups=2"),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Conv1d(4, 2, 1)), TypeError, "reshape"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2)), TypeError, "Flatten"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(6, 2)), ValueError, "not a multiple"),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU()), ValueError, "at least two weight layers"),
        (_Residual(), TypeError, "nn.Sequential"),
        (nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2)), TypeError, "parametrized"),
    ],
)
def test_unsupported_models_are_refused(model, error, match):
    with pytest.raises(error, match=match):
        psiopt.ENorm(model)


def test_bad_c_and_optimizer_are_refused():
    net = _mlp()
    with pytest.raises(ValueError, match="c must be"):
        psiopt.ENorm(net, c=0.0)
    with pytest.raises(TypeError, match="optimizer"):
        psiopt.ENorm(net, optimizer=object())


def test_dead_unit_is_left_alone():
    net = _mlp(seed=9)
    with torch.no_grad():
        net[0].weight[2].zero_()
    x = torch.randn(10, 5, dtype=DT)
    before = net(x).detach()
    enorm = psiopt.ENorm(net)
    enorm.step()
    assert torch.isfinite(net[2].weight).all()
    assert float(enorm.factors()[0][2]) == 1.0
    torch.testing.assert_close(net(x).detach(), before, rtol=1e-12, atol=1e-12)


def test_docstring_examples_run():
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("psiopt.baselines.enorm"), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_prelu_passes_a_unit_scale_like_relu():
    # PReLU is positively homogeneous per channel, as psiopt.layers says for every user.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 2))
    with torch.no_grad():
        net[0].weight.mul_(5.0)
    x = torch.randn(8, 4)
    before = net(x)
    enorm = psiopt.ENorm(net)
    norm_before = enorm.total_sq_norm()
    for _ in range(10):
        enorm.step()
    assert torch.allclose(net(x), before, atol=1e-5) and enorm.total_sq_norm() < norm_before
