"""SGD-G (Cho & Lee 2017): its own invariants, its clipping, and a Rayleigh-quotient check."""

import geoopt
import pytest
import scipy.linalg
import torch

import psiopt
from psiopt.baselines import SGDG
from psiopt.manifold import expmap_rows, horizontal_projection_rows, parallel_transport_rows

DT = torch.float64


def _psi(x, grouping="channel"):
    return geoopt.ManifoldParameter(x, manifold=psiopt.PSIManifold(grouping))


def _rayleigh_problem(k=4, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mats = []
    for _ in range(k):
        b = torch.randn(d, d, generator=gen, dtype=DT)
        mats.append((b + b.T) / 2)
    return torch.stack(mats)


def _rayleigh(w, mats):
    """sum_j w_j^T A_j w_j / ||w_j||^2: scale invariant per row."""
    num = torch.einsum("kd,kde,ke->k", w, mats, w)
    return (num / (w * w).sum(1)).sum()


def test_parallel_transport_rows_is_the_geodesic_velocity_and_an_isometry():
    torch.manual_seed(0)
    w = torch.randn(5, 6, dtype=DT) * 2.5
    xi = horizontal_projection_rows(w, torch.randn(5, 6, dtype=DT))
    v = horizontal_projection_rows(w, torch.randn(5, 6, dtype=DT))
    end = expmap_rows(w, xi)
    moved_xi = parallel_transport_rows(w, xi, xi)
    h = 1e-6
    velocity = (expmap_rows(w, xi * (1 + h)) - expmap_rows(w, xi * (1 - h))) / (2 * h)
    torch.testing.assert_close(moved_xi, velocity, rtol=1e-7, atol=1e-7)
    moved_v = parallel_transport_rows(w, xi, v)
    torch.testing.assert_close((moved_v * end).sum(1), torch.zeros(5, dtype=DT), atol=1e-12, rtol=0)
    torch.testing.assert_close(moved_v.norm(dim=1), v.norm(dim=1))
    torch.testing.assert_close((moved_v * moved_xi).sum(1), (v * xi).sum(1))
    # no movement, no change
    torch.testing.assert_close(parallel_transport_rows(w, torch.zeros_like(xi), v), v)


def test_rows_stay_unit_norm_and_momentum_stays_tangent():
    mats = _rayleigh_problem(seed=1)
    torch.manual_seed(1)
    w = _psi(torch.randn(4, 8, dtype=DT) * 3.0)  # starts off the sphere
    opt = SGDG([w], lr=0.2, momentum=0.9, grad_clip=0.5)
    for _ in range(60):
        opt.zero_grad()
        _rayleigh(w, mats).backward()
        opt.step()
        y = w.detach()
        torch.testing.assert_close(y.norm(dim=1), torch.ones(4, dtype=DT), rtol=0, atol=1e-14)
        tau = opt.state[w]["momentum_buffer"]
        cos = (tau * y).sum(1) / tau.norm(dim=1).clamp_min(1e-300)
        assert float(cos.abs().max()) < 1e-12


def test_first_step_uses_the_gradient_at_the_unit_representative():
    """Starting from a*w or w (a per row) gives the same SGD-G iterates."""
    mats = _rayleigh_problem(seed=2)
    torch.manual_seed(2)
    base = torch.randn(4, 8, dtype=DT)
    scales = torch.tensor([0.01, 1.0, 7.0, 300.0], dtype=DT)[:, None]
    runs = []
    for start in (base, base * scales):
        w = _psi(start.clone())
        opt = SGDG([w], lr=0.1, momentum=0.8, grad_clip=None)
        for _ in range(10):
            opt.zero_grad()
            _rayleigh(w, mats).backward()
            opt.step()
        runs.append(w.detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-12)


def test_clipping_caps_the_angle_of_a_step():
    torch.manual_seed(3)
    w = _psi(torch.nn.functional.normalize(torch.randn(6, 5, dtype=DT), dim=1))
    grad = torch.randn(6, 5, dtype=DT) * torch.tensor([1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0], dtype=DT)[:, None]
    lr, nu = 0.05, 0.5
    tangent_norm = horizontal_projection_rows(w.detach(), grad).norm(dim=1)
    before = w.detach().clone()
    opt = SGDG([w], lr=lr, grad_clip=nu)
    w.grad = grad.clone()
    opt.step()
    angle = torch.arccos(((before * w.detach()).sum(1)).clamp(-1, 1))
    expected = lr * torch.clamp(tangent_norm, max=nu)
    torch.testing.assert_close(angle, expected, rtol=1e-6, atol=1e-9)
    assert bool((tangent_norm > nu).any()) and bool((tangent_norm < nu).any())  # both regimes seen


def test_one_step_matches_algorithm_1_by_hand():
    torch.manual_seed(4)
    y0 = torch.nn.functional.normalize(torch.randn(3, 4, dtype=DT), dim=1)
    g1, g2 = torch.randn(3, 4, dtype=DT), torch.randn(3, 4, dtype=DT)
    lr, mom = 0.3, 0.7
    w = _psi(y0.clone())
    opt = SGDG([w], lr=lr, momentum=mom, grad_clip=None)
    w.grad = g1.clone()
    opt.step()
    w.grad = g2.clone()
    opt.step()

    def unit(v):
        return v / v.norm(dim=1, keepdim=True)

    # by hand, the sphere formulas written out
    h1 = g1 - (g1 * y0).sum(1, keepdim=True) * y0
    d1 = -lr * h1
    n1 = d1.norm(dim=1, keepdim=True)
    y1 = torch.cos(n1) * y0 + torch.sin(n1) * unit(d1)
    tau1 = n1 * (torch.cos(n1) * unit(d1) - torch.sin(n1) * y0)
    h2 = g2 - (g2 * y1).sum(1, keepdim=True) * y1
    d2 = mom * tau1 - lr * h2
    n2 = d2.norm(dim=1, keepdim=True)
    y2 = torch.cos(n2) * y1 + torch.sin(n2) * unit(d2)
    torch.testing.assert_close(w.detach(), y2, rtol=0, atol=1e-13)


def test_rayleigh_quotient_reaches_the_smallest_eigenvalues():
    mats = _rayleigh_problem(k=3, d=10, seed=5)
    torch.manual_seed(5)
    w = _psi(torch.randn(3, 10, dtype=DT))
    opt = SGDG([w], lr=0.1, momentum=0.9, grad_clip=1.0)
    for _ in range(600):
        opt.zero_grad()
        _rayleigh(w, mats).backward()
        opt.step()
    for j in range(3):
        evals, evecs = scipy.linalg.eigh(mats[j].numpy())
        value = float(w[j].detach() @ mats[j] @ w[j].detach())
        assert value == pytest.approx(evals[0], abs=1e-9)
        assert abs(float(w[j].detach() @ torch.from_numpy(evecs[:, 0]))) == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
        dict(momentum=0.5, dampening=0.3),
        dict(),
    ],
)
def test_other_parameters_get_torch_sgd(kwargs):
    torch.manual_seed(6)
    a = torch.randn(5, 3, dtype=DT, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ours, ref = SGDG([a], lr=0.1, **kwargs), torch.optim.SGD([b], lr=0.1, **kwargs)
    target = torch.randn(5, 3, dtype=DT)
    for _ in range(5):
        for p, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            ((p - target) ** 3).sum().backward()
            opt.step()
    assert torch.equal(a, b)


def test_sphere_flag_per_group():
    torch.manual_seed(7)
    plain = torch.randn(3, 4, dtype=DT, requires_grad=True)
    marked = _psi(torch.randn(3, 4, dtype=DT))
    opt = SGDG([{"params": [plain], "sphere": True}, {"params": [marked], "sphere": False}], lr=0.1)
    plain.grad = torch.randn(3, 4, dtype=DT)
    marked.grad = torch.randn(3, 4, dtype=DT)
    before = marked.detach().clone()
    opt.step()
    torch.testing.assert_close(plain.detach().norm(dim=1), torch.ones(3, dtype=DT))
    torch.testing.assert_close(marked.detach(), before - 0.1 * marked.grad)


def test_tensor_grouping_uses_one_sphere():
    w = _psi(torch.randn(2, 3, 2, dtype=DT), grouping="tensor")
    w.grad = torch.randn_like(w)
    SGDG([w], lr=0.1).step()
    assert float(w.detach().norm()) == pytest.approx(1.0, abs=1e-14)


def test_bad_arguments_and_zero_rows_are_refused():
    p = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        SGDG([p], lr=-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        SGDG([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="grad_clip"):
        SGDG([p], lr=0.1, grad_clip=0.0)
    w = _psi(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    w.grad = torch.ones(2, 2)
    with pytest.raises(psiopt.ZeroGroupError, match="group"):
        SGDG([w], lr=0.1).step()


def test_docstring_examples_run():
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("psiopt.baselines.sgdg"), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
