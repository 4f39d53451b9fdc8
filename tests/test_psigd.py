"""PSIGD: full-batch gradient descent on the PSI manifold, fixed step and Armijo."""

from __future__ import annotations

import functools
import geoopt
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import psiopt
from psiopt.manifold import group_sq_norms, horizontal_lift_rows, metric_inner_rows, normalize_rows


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


class _TodaysPSIGD:
    """PSIGD's step as it was before its state was bounded and its trials made loss-only
    (psiopt at commit 7ab1881), frozen here so that the new one is compared with it. The
    formulas come from :mod:`psiopt.manifold`, which that change left alone.

    ``entries`` lists ``(param, manifold or None, lr)`` in the order PSIGD visits them
    (param group by param group, its scale-invariant tensors first). ``step`` returns the
    starting loss and the accepted step-size factor :math:`\\beta^n` (0 when all trials fail).
    """

    def __init__(self, entries, line_search, c=1e-4, backtrack=0.5, max_backtracks=50) -> None:
        self.entries, self.line_search = entries, line_search
        self.c, self.backtrack, self.max_backtracks = c, backtrack, max_backtracks

    @torch.no_grad()
    def step(self, closure):
        with torch.enable_grad():
            loss = closure()
        moves, terms = [], []
        for p, manifold, lr in self.entries:
            if manifold is None:
                g = p.grad
                moves.append((p, p.detach().clone(), g.clone(), None, lr, None))
                terms.append(lr * (g.double() * g.double()).sum())
            else:
                w = manifold.rows(p)
                w_sq = group_sq_norms(w)
                r = horizontal_lift_rows(w, manifold.rows(p.grad), w_sq)
                moves.append((p, p.detach().clone(), r, manifold, lr, w_sq))
                terms.append(lr * metric_inner_rows(w_sq, r).sum().double())
        if self.line_search is None:
            self._move(moves, 1.0)
            return loss, 1.0
        decrease = float(torch.stack(terms).sum())
        scale = 1.0
        for _ in range(self.max_backtracks + 1):
            self._move(moves, scale)
            with torch.enable_grad():
                trial = float(closure().detach())
            if trial <= float(loss.detach()) - self.c * scale * decrease:
                return loss, scale
            scale *= self.backtrack
        for p, start, *_ in moves:
            p.copy_(start)
        return loss, 0.0

    @staticmethod
    def _move(moves, scale) -> None:
        for p, start, direction, manifold, lr, w_sq in moves:
            if manifold is None:
                p.copy_(start.add(direction, alpha=-scale * lr))
            else:
                w_new = normalize_rows(manifold.rows(start).to(direction.dtype) - scale * lr * direction, w_sq)
                p.copy_(w_new.reshape(p.shape))


_STEPS = {"rayleigh": 40, "digits": 25}


def _problem(name: str, line_search):
    """``(params, loss_fn, reference entries, PSIGD param groups, lr)`` of a comparison problem.

    ``"rayleigh"``: the sum of Rayleigh quotients plus a Euclidean quadratic (float64).
    ``"digits"``: a BatchNorm MLP on 400 scikit-learn digits, full batch (float32), its
    two hidden ``Linear`` weights scale invariant per output channel. The initial steps
    are large enough for the line search to backtrack.
    """
    if name == "rayleigh":
        problem = SumOfRayleighQuotients()
        params = [*problem.params(), nn.Parameter(torch.tensor([3.0, -2.0], dtype=torch.float64))]
        lr = 0.2 if line_search is None else 8.0

        def loss_fn(ps):
            return problem.loss(ps[:2]) + (ps[2] ** 2).sum()

        manifolds = [params[0].manifold, params[1].manifold, None]
        return params, loss_fn, list(zip(params, manifolds, [lr] * 3)), params, lr
    from psiopt.bench.data import load_digits
    from psiopt.bench.models import mlp_bn

    data = load_digits(limit=500)
    torch.manual_seed(0)
    model = mlp_bn(64, hidden=(32, 32))
    lr = 0.5 if line_search is None else 20.0
    scale_invariant = [model[0].weight, model[3].weight]
    others = [p for p in model.parameters() if all(p is not q for q in scale_invariant)]
    channel = psiopt.PSIManifold("channel")
    entries = [(p, channel, lr) for p in scale_invariant] + [(p, None, lr) for p in others]

    def loss_fn(ps):
        return nn.functional.cross_entropy(model(data.x_train), data.y_train)

    groups = [{"params": scale_invariant, "grouping": "channel"}, {"params": others}]
    return [*scale_invariant, *others], loss_fn, entries, groups, lr


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
    sizes = []
    for _ in range(15):
        f0 = closure().item()
        sq_norm = sum(
            ((p.manifold.rows(p.grad) ** 2).sum(1) * (p.manifold.rows(p.detach()) ** 2).sum(1)).sum().item()
            - ((p.manifold.rows(p.grad) * p.manifold.rows(p.detach())).sum(1) ** 2).sum().item()
            for p in params
        ) + (extra.grad ** 2).sum().item()
        returned = opt.step(closure)
        assert returned.item() == f0
        alpha = opt.state[extra]["step_size"]
        assert opt.state[params[0]]["step_size"] == alpha
        sizes.append(alpha)
        with torch.no_grad():
            f1 = loss_fn(everything).item()
        assert 0 < alpha <= 8.0
        assert f1 <= f0 - c * alpha * sq_norm + 1e-12
    assert min(sizes) < 8.0  # it did backtrack
    # the backtracks counted: 8 * 0.5**n for n rejected trials
    assert opt.state[extra]["backtracks"] == sum(round(np.log2(8.0 / a)) for a in sizes) > 0
    assert opt.state[extra]["step"] == 15


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
    assert opt.state[backtracked[0]] == {"step": 1, "step_size": 50.0, "backtracks": 1}
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
    assert opt.state[start[0]] == {"step": 1, "step_size": 0.0, "backtracks": 4}
    for p, b in zip(start, before):
        assert torch.equal(p, b)


def test_state_survives_state_dict() -> None:
    problem = SumOfRayleighQuotients()
    params = problem.params()
    opt = psiopt.PSIGD(params, lr=4.0, line_search=True)
    for _ in range(3):
        opt.step(_closure(opt, problem.loss, params))
    clone = problem.params()
    other = psiopt.PSIGD(clone, lr=4.0, line_search="armijo")
    other.load_state_dict(opt.state_dict())
    assert other.state[clone[0]] == opt.state[params[0]]
    assert opt.state[params[0]]["step"] == 3


def _standard_closure(params, loss_fn):
    def closure():
        for p in params:
            p.grad = None
        loss = loss_fn(params)
        loss.backward()
        return loss

    return closure


def _counting_closure(params, loss_fn, passes, takes_flag: bool):
    """A closure, with or without the ``backward`` flag, that counts its forward passes and
    checks that autograd is on exactly when a gradient is asked for."""
    if not takes_flag:
        standard = _standard_closure(params, loss_fn)

        def closure():
            passes["forward"] += 1
            return standard()

        return closure

    def closure(backward=True):
        passes["forward"] += 1
        assert torch.is_grad_enabled() == backward
        if not backward:
            return loss_fn(params)
        for p in params:
            p.grad = None
        loss = loss_fn(params)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("takes_flag", [True, False], ids=["closure(backward)", "closure()"])
@pytest.mark.parametrize("line_search", [None, "armijo"])
@pytest.mark.parametrize("name", ["rayleigh", "digits"])
def test_iterates_are_those_of_the_psigd_before_the_change_bit_for_bit(name, line_search, takes_flag) -> None:
    params, loss_fn, _, groups, lr = _problem(name, line_search)
    ref_params, ref_loss_fn, entries, _, _ = _problem(name, line_search)
    opt = psiopt.PSIGD(groups, lr=lr, line_search=line_search)
    reference = _TodaysPSIGD(entries, line_search)
    closure = _counting_closure(params, loss_fn, {"forward": 0}, takes_flag)
    ref_closure = _standard_closure(ref_params, ref_loss_fn)
    factors, losses = [], []
    for _ in range(_STEPS[name]):
        loss = opt.step(closure)
        ref_loss, factor = reference.step(ref_closure)
        assert loss.item() == ref_loss.item()
        for p, q in zip(params, ref_params, strict=True):
            assert torch.equal(p, q)
        for p, (_, _, p_lr) in zip(params, entries, strict=True):
            assert opt.state[p]["step_size"] == factor * p_lr
        factors.append(factor)
        losses.append(loss.item())
    assert (min(factors) < 1.0) == (line_search is not None)  # the search backtracked
    assert losses[-1] < 0.5 * losses[0]  # a trajectory that goes somewhere


@pytest.mark.parametrize("takes_flag", [True, False], ids=["closure(backward)", "closure()"])
@pytest.mark.parametrize("line_search", [None, "armijo"])
def test_a_step_costs_one_backward_pass_with_the_backward_flag(line_search, takes_flag) -> None:
    params, loss_fn, _, groups, lr = _problem("digits", line_search)
    opt = psiopt.PSIGD(groups, lr=lr, line_search=line_search)
    passes = {"forward": 0, "backward": 0}

    def count_backward(grad):
        passes["backward"] += 1

    hook = params[0].register_hook(count_backward)  # runs once per backward pass through the model
    closure = _counting_closure(params, loss_fn, passes, takes_flag)
    steps = 12
    for _ in range(steps):
        opt.step(closure)
        assert opt.state[params[0]]["step_size"] > 0  # accepted
    hook.remove()
    state = opt.state[params[0]]
    assert state["step"] == steps
    assert (state["backtracks"] > 0) == (line_search is not None)
    trials = 0 if line_search is None else steps + state["backtracks"]
    assert passes["forward"] == steps + trials
    assert passes["backward"] == (steps if takes_flag else steps + trials)


class _CallableClosure:
    def __init__(self, closure) -> None:
        self.closure = closure

    def __call__(self, backward=True):
        return self.closure(backward=backward)


@pytest.mark.parametrize(
    "form, takes_flag",
    [
        (lambda c: c, True),
        (lambda c: (lambda *, backward=True: c(backward=backward)), True),  # keyword-only
        (lambda c: _CallableClosure(c), True),
        (lambda c: functools.partial(lambda unused, backward=True: c(backward=backward), None), True),
        (lambda c: (lambda: c()), False),
        (lambda c: (lambda *args, **kwargs: c()), False),  # no parameter named backward
    ],
)
def test_closures_of_every_form_that_name_backward_get_the_flag(form, takes_flag) -> None:
    params, loss_fn, _, groups, lr = _problem("rayleigh", "armijo")
    opt = psiopt.PSIGD(groups, lr=lr, line_search="armijo")
    passes = {"forward": 0, "backward": 0}

    def count_backward(grad):
        passes["backward"] += 1

    params[0].register_hook(count_backward)
    closure = form(_counting_closure(params, loss_fn, passes, takes_flag=True))
    for _ in range(5):
        opt.step(closure)
    assert opt.state[params[0]]["backtracks"] > 0
    assert passes["backward"] == (5 if takes_flag else passes["forward"])


def _state_numbers(opt: torch.optim.Optimizer) -> int:
    """The numbers ``opt.state_dict()`` keeps per parameter: tensor elements, one per Python number."""

    def count(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel()
        if isinstance(value, dict):
            return sum(count(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(count(v) for v in value)
        return 1

    return count(opt.state_dict()["state"])


def test_state_is_as_large_after_1000_steps_as_after_1() -> None:
    params, loss_fn, _, groups, lr = _problem("rayleigh", "armijo")
    opt = psiopt.PSIGD(groups, lr=lr, line_search="armijo", max_backtracks=10)
    closure = _counting_closure(params, loss_fn, {"forward": 0}, takes_flag=True)
    opt.step(closure)
    after_one = _state_numbers(opt)
    keys = {i: sorted(s) for i, s in opt.state_dict()["state"].items()}
    for _ in range(999):
        opt.step(closure)
    assert _state_numbers(opt) == after_one == 3 * len(params)
    assert {i: sorted(s) for i, s in opt.state_dict()["state"].items()} == keys
    assert all(opt.state[p]["step"] == 1000 for p in params)


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
