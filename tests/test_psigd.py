"""PSIGD: full-batch gradient descent on the PSI manifold, fixed step and Armijo."""

from __future__ import annotations

import geoopt
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import psiopt


def _spd(d: int, seed: int, low: float = 1.0, gap: float = 0.5) -> torch.Tensor:
    """A symmetric matrix with eigenvalues ``low, low + gap, ...`` in a random basis."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    eigs = low + gap * torch.arange(d, dtype=torch.float64)
    return (q * eigs) @ q.T


class SumOfRayleighQuotients:
    """:math:`f = \\sum_j w_j^T A w_j / \\|w_j\\|^2` over the rows of a ``channel`` weight
    (matrix ``a_rows``) plus one ``tensor``-grouped weight (matrix ``a_whole``)."""

    def __init__(self) -> None:
        self.a_rows, self.a_whole = _spd(6, 0), _spd(8, 1, low=-2.0, gap=0.3)
        self.k = 3
        smallest = scipy.linalg.eigh(self.a_rows.numpy(), eigvals_only=True)[0]
        smallest_whole = scipy.linalg.eigh(self.a_whole.numpy(), eigvals_only=True)[0]
        self.f_star = self.k * smallest + smallest_whole

    def params(self, scale_rows: torch.Tensor | float = 1.0, scale_whole: float = 1.0, seed: int = 7):
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randn(self.k, 6, generator=gen, dtype=torch.float64) * scale_rows
        whole = torch.randn(2, 4, generator=gen, dtype=torch.float64) * scale_whole
        return [
            geoopt.ManifoldParameter(rows, manifold=psiopt.PSIManifold("channel")),
            geoopt.ManifoldParameter(whole, manifold=psiopt.PSIManifold("tensor")),
        ]

    def loss(self, params) -> torch.Tensor:
        rows, whole = params
        quotient_rows = ((rows @ self.a_rows) * rows).sum(1) / (rows * rows).sum(1)
        v = whole.reshape(-1)
        return quotient_rows.sum() + v @ self.a_whole @ v / (v @ v)


def _closure(opt, loss_fn, params):
    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    return closure


def _iterations_to(problem, params, opt, tol=1e-10, max_iters=2000) -> int:
    closure = _closure(opt, problem.loss, params)
    for it in range(max_iters):
        with torch.no_grad():
            if problem.loss(params).item() - problem.f_star <= tol:
                return it
        opt.step(closure)
    raise AssertionError(f"no convergence to {tol} in {max_iters} iterations")


@pytest.mark.parametrize("line_search", [None, "armijo"])
def test_reaches_smallest_eigenvalues_in_the_same_iterations_at_any_scale(line_search) -> None:
    problem = SumOfRayleighQuotients()
    counts = []
    for rows_scale, whole_scale in [(1.0, 1.0), (torch.tensor([[1e-2], [1.0], [1e2]], dtype=torch.float64), 1e2), (1e2, 1e-2)]:
        params = problem.params(rows_scale, whole_scale)
        lr = 0.2 if line_search is None else 2.0
        opt = psiopt.PSIGD(params, lr=lr, line_search=line_search)
        counts.append(_iterations_to(problem, params, opt))
        with torch.no_grad():
            gap = problem.loss(params).item() - problem.f_star
        assert 0 <= gap + 1e-12 and gap <= 1e-10
        # every row ended at the bottom eigenvector of its matrix
        eigvecs = scipy.linalg.eigh(problem.a_rows.numpy())[1]
        rows = params[0].detach().numpy()
        cosines = np.abs(rows @ eigvecs[:, 0]) / np.linalg.norm(rows, axis=1)
        np.testing.assert_allclose(cosines, 1.0, atol=1e-9)
    assert counts[0] == counts[1] == counts[2] and counts[0] > 5


def test_update_of_every_group_is_horizontal() -> None:
    problem = SumOfRayleighQuotients()
    params = problem.params()
    start = [p.detach().clone() for p in params]

    def not_invariant(ps):  # a radial term: its gradient has a vertical part, which PSIGD ignores
        return problem.loss(ps) + 0.7 * sum((p * p).sum() for p in ps)

    opt = psiopt.PSIGD(params, lr=0.05)
    opt.step(_closure(opt, not_invariant, params))
    for p, w0 in zip(params, start):
        w, w_new = p.manifold.rows(w0), p.manifold.rows(p.detach())
        # w_new = c (w + xi): recover the tangent step xi, group by group
        sq = (w * w).sum(1, keepdim=True)
        xi = w_new * sq / (w_new * w).sum(1, keepdim=True) - w
        g = p.manifold.rows(p.grad)  # gradient at the start: the closure ran there only
        riem = sq * (g - (g * w).sum(1, keepdim=True) / sq * w)
        torch.testing.assert_close(xi, -0.05 * riem, rtol=1e-10, atol=1e-13)
        assert ((xi * w).sum(1).abs() <= 1e-13 * sq.squeeze(1)).all()
        torch.testing.assert_close((w_new * w_new).sum(1), sq.squeeze(1), rtol=1e-14, atol=0)


def test_armijo_condition_holds_for_every_accepted_step() -> None:
    problem = SumOfRayleighQuotients()
    params = problem.params()
    extra = nn.Parameter(torch.tensor([3.0, -2.0], dtype=torch.float64))  # a Euclidean parameter

    def loss_fn(ps):
        return problem.loss(ps[:2]) + (ps[2] ** 2).sum()

    everything = [*params, extra]
    c = 0.3
    opt = psiopt.PSIGD(everything, lr=8.0, line_search="armijo", c=c)
    closure = _closure(opt, loss_fn, everything)
    for _ in range(15):
        f0 = closure().item()
        sq_norm = sum(
            ((p.manifold.rows(p.grad) ** 2).sum(1) * (p.manifold.rows(p.detach()) ** 2).sum(1)).sum().item()
            - ((p.manifold.rows(p.grad) * p.manifold.rows(p.detach())).sum(1) ** 2).sum().item()
            for p in params
        ) + (extra.grad ** 2).sum().item()
        returned = opt.step(closure)
        assert returned.item() == f0
        alpha = opt.state[extra]["step_sizes"][-1]
        assert opt.state[params[0]]["step_sizes"][-1] == alpha
        with torch.no_grad():
            f1 = loss_fn(everything).item()
        assert 0 < alpha <= 8.0
        assert f1 <= f0 - c * alpha * sq_norm + 1e-12
    sizes = opt.state[extra]["step_sizes"]
    assert len(sizes) == 15 and min(sizes) < 8.0  # it did backtrack


def test_rejected_trials_restore_weights_exactly() -> None:
    problem = SumOfRayleighQuotients()
    start = problem.params()
    # Backtracking once from lr = 100 vs a fixed step of 50: the same weights, bit for bit.
    backtracked, fixed = problem.params(), problem.params()
    calls = {"n": 0}

    def reject_first_trial(ps):
        calls["n"] += 1
        return problem.loss(ps) + (1e6 if calls["n"] == 2 else 0.0)

    opt = psiopt.PSIGD(backtracked, lr=100.0, line_search="armijo", c=1e-12)
    opt.step(_closure(opt, reject_first_trial, backtracked))
    assert opt.state[backtracked[0]]["step_sizes"] == [50.0]
    ref = psiopt.PSIGD(fixed, lr=50.0)
    ref.step(_closure(ref, problem.loss, fixed))
    for p, q in zip(backtracked, fixed):
        assert torch.equal(p, q)

    # Every trial rejected: the weights are exactly where they started, step size 0.
    def always_worse(ps):
        calls["n"] += 1
        return problem.loss(ps) + (calls["n"] > 1) * 1e6

    calls["n"] = 0
    opt = psiopt.PSIGD(start, lr=1.0, line_search="armijo", max_backtracks=3)
    before = [p.detach().clone() for p in start]
    opt.step(_closure(opt, always_worse, start))
    assert calls["n"] == 5
    assert opt.state[start[0]]["step_sizes"] == [0.0]
    for p, b in zip(start, before):
        assert torch.equal(p, b)


def test_step_sizes_survive_state_dict() -> None:
    problem = SumOfRayleighQuotients()
    params = problem.params()
    opt = psiopt.PSIGD(params, lr=4.0, line_search=True)
    for _ in range(3):
        opt.step(_closure(opt, problem.loss, params))
    clone = problem.params()
    other = psiopt.PSIGD(clone, lr=4.0, line_search="armijo")
    other.load_state_dict(opt.state_dict())
    assert other.state[clone[0]]["step_sizes"] == opt.state[params[0]]["step_sizes"]


def test_step_requires_a_closure() -> None:
    w = SumOfRayleighQuotients().params()
    opt = psiopt.PSIGD(w, lr=0.1)
    with pytest.raises(TypeError, match="PSIGD.step needs a closure"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "Invalid learning rate"),
        (dict(lr=0.1, line_search="wolfe"), "unknown line_search"),
        (dict(lr=0.1, c=1.5), "Armijo constant"),
        (dict(lr=0.1, backtrack=1.0), "backtrack factor"),
        (dict(lr=0.1, max_backtracks=-1), "max_backtracks"),
    ],
)
def test_invalid_options(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        psiopt.PSIGD(SumOfRayleighQuotients().params(), **kwargs)


def test_non_finite_gradient_and_zero_group_refuse_the_step() -> None:
    problem = SumOfRayleighQuotients()
    params = problem.params()
    before = [p.detach().clone() for p in params]
    opt = psiopt.PSIGD(params, lr=0.1)

    def nan_closure():
        opt.zero_grad()
        loss = problem.loss(params)
        loss.backward()
        params[1].grad[0, 0] = float("nan")
        return loss

    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step(nan_closure)
    with torch.no_grad():
        params[0][1] = 0.0
    before[0][1] = 0.0
    opt.zero_grad(set_to_none=False)  # finite (zero) gradients: only the zero group is wrong
    with pytest.raises(psiopt.ZeroGroupError, match=r"param_groups\[0\]\['params'\]\[0\].*group\(s\) 1 of 3"):
        opt.step(lambda: torch.tensor(0.0))
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_warns_without_scale_invariant_parameters() -> None:
    with pytest.warns(UserWarning, match="no scale-invariant parameter"):
        psiopt.PSIGD([nn.Parameter(torch.ones(2))], lr=0.1)
