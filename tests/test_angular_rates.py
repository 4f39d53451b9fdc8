"""The angular rates of PSISGD (``"sgd"``) and PSIAdam/PSIAdamW (``"adam"``): each scale-invariant
group turns by a step size that a virtual squared norm decays, as SGD's and AdamW's own norms
decay theirs, with the equilibrium angle of the Euclidean optimizer itself."""

from __future__ import annotations

import math

import pytest
import torch

import psiopt
from psiopt.optim._rates import ADAM_RATE_GAIN, SGD_RATE_GAIN


def _unit_rows_loss_gradient(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random gradient of a scale-invariant loss at ``w`` (rows = groups): orthogonal to
    each row, and scaled by ``1/||w_j||`` as the gradient of such a loss is."""
    z = torch.randn(w.shape, generator=gen, dtype=w.dtype)
    sq = (w * w).sum(1, keepdim=True)
    return (z - (z * w).sum(1, keepdim=True) / sq * w) / sq.sqrt()


def _mean_sq_turn(make, steps: int, tail: int, scale: float = 1.0) -> float:
    """The mean squared angle (radians) by which the rows turn per step over the last
    ``tail`` of ``steps`` steps, under random scale-invariant gradients."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(scale * torch.randn(8, 32, dtype=torch.float64))
    opt = make(w)
    gen = torch.Generator().manual_seed(1)
    turns = []
    for _ in range(steps):
        old = w.detach().clone()
        w.grad = _unit_rows_loss_gradient(w.detach(), gen)
        opt.step()
        new = w.detach()
        cos = (old * new).sum(1) / (old.norm(dim=1) * new.norm(dim=1))
        turns.append(torch.arccos(cos.clamp(-1.0, 1.0)).square().mean().item())
    return sum(turns[-tail:]) / tail


def test_psisgd_turns_at_sgds_own_equilibrium_angle() -> None:
    # Spherical motion dynamics: SGD with momentum and weight decay settles where each group
    # turns by sqrt(2 lr wd / (1 + momentum)) per step. The "sgd" rate settles there too, with
    # its norms kept fixed. The reference is SGD itself, measured on the same gradients.
    lr, momentum, wd = 0.1, 0.9, 0.05
    sgd = _mean_sq_turn(lambda w: torch.optim.SGD([w], lr=lr, momentum=momentum, weight_decay=wd), 2500, 1000)
    psi = _mean_sq_turn(
        lambda w: psiopt.PSISGD([{"params": [w], "grouping": "channel"}], lr=lr, momentum=momentum, weight_decay=wd),
        2500,
        1000,
    )
    theory = 2 * lr * wd / (1 + momentum)
    assert sgd == pytest.approx(theory, rel=0.05)
    assert psi == pytest.approx(sgd, rel=0.05)


def test_psiadamw_turns_at_adamws_own_equilibrium_angle() -> None:
    # AdamW's rotational equilibrium (Kosson et al. 2024) is sqrt(2 lr wd (1 - b1) / (1 + b1))
    # per step under noise-dominated gradients; measured on AdamW, then on PSIAdamW.
    lr, wd = 0.05, 0.2
    adamw = _mean_sq_turn(lambda w: torch.optim.AdamW([w], lr=lr, weight_decay=wd), 4000, 1500, scale=0.05)
    psi = _mean_sq_turn(
        lambda w: psiopt.PSIAdamW([{"params": [w], "grouping": "channel"}], lr=lr, weight_decay=wd), 4000, 1500
    )
    theory = 2 * lr * wd * 0.1 / 1.9
    assert adamw == pytest.approx(theory, rel=0.1)
    assert psi == pytest.approx(adamw, rel=0.15)


def _one_step(make, w0: torch.Tensor, grad: torch.Tensor):
    w = torch.nn.Parameter(w0.clone())
    opt = make(w)
    w.grad = grad.clone()
    opt.step()
    return w.detach(), opt.state[w]


def _turn(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    cos = (w0 * w1).sum(1) / (w0.norm(dim=1) * w1.norm(dim=1))
    return torch.arccos(cos.clamp(-1.0, 1.0))


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_psisgd_first_step_turns_every_group_by_the_documented_angle(momentum: float) -> None:
    # Step 1: the first moment is (1 - mu) r, the look-ahead direction (1 + 2 mu)/(1 + mu) r,
    # normalized by the gradient norm at the unit row: every group turns by
    # arctan(kappa lr (1 + 2 mu) / ((1 - mu)(1 + mu))) whatever its gradient's size; the
    # virtual squared norm grows by the factor the retraction grew the norm, 1 + tan^2.
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 7, generator=gen, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [3.0], [10.0], [50.0]])
    grad = _unit_rows_loss_gradient(w0, gen) * torch.tensor([[1e-2], [1.0], [2.0], [1e2], [1.0]], dtype=torch.float64)
    lr, wd = 0.2, 1e-3
    w1, state = _one_step(
        lambda w: psiopt.PSISGD([{"params": [w], "grouping": "channel"}], lr=lr, momentum=momentum, weight_decay=wd),
        w0,
        grad,
    )
    tan = SGD_RATE_GAIN * lr / (1 - momentum) * (1 + 2 * momentum) / (1 + momentum)
    # rtol: eps = 1e-8 next to gradient norms of 1e-2 and more
    torch.testing.assert_close(_turn(w0, w1), torch.full((5,), math.atan(tan), dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(w1.norm(dim=1), w0.norm(dim=1))
    pull = 2 * lr * wd / (1 + momentum)
    torch.testing.assert_close(state["virtual_sq_norm"], torch.full((5,), 1 + tan**2 - pull, dtype=torch.float64))


def test_psiadam_first_step_turns_every_group_by_the_documented_angle() -> None:
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 9, generator=gen, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [10.0], [3.0]])
    grad = _unit_rows_loss_gradient(w0, gen) * torch.tensor([[1e-2], [1.0], [5.0], [1e3]], dtype=torch.float64)
    lr, beta1 = 0.01, 0.9
    w1, state = _one_step(
        lambda w: psiopt.PSIAdamW([{"params": [w], "grouping": "channel"}], lr=lr, weight_decay=0.0, eps=0.0), w0, grad
    )
    tan = ADAM_RATE_GAIN * lr * (1 + 2 * beta1) / (1 + beta1)
    torch.testing.assert_close(_turn(w0, w1), torch.full((4,), math.atan(tan), dtype=torch.float64))
    torch.testing.assert_close(state["virtual_sq_norm"], torch.full((4,), 1 + tan**2, dtype=torch.float64))


def test_psisgd_virtual_norm_decays_the_step_like_sgds_norm() -> None:
    # Without momentum the direction is the gradient over its RMS, which turns a group by
    # exactly its step size (first step: the RMS is the gradient itself). So the turns follow
    # the recursion of SGD's own norm: tan(turn_t) = kappa * lr / nu_t^2, and
    # nu_{t+1}^2 = nu_t^2 (1 + tan^2(turn_t)): each step decays the next, whatever the gradients.
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(3, 6, generator=gen, dtype=torch.float64))
    lr = 5.0
    opt = psiopt.PSISGD([{"params": [w], "grouping": "channel"}], lr=lr)
    nu_sq = torch.ones(3, dtype=torch.float64)
    for _ in range(6):
        old = w.detach().clone()
        w.grad = _unit_rows_loss_gradient(old, gen) * 10 ** torch.empty(3, 1, dtype=torch.float64).uniform_(-2, 2)
        # One step, from a fresh second moment each time: the RMS is this step's gradient norm.
        if opt.state[w]:
            opt.state[w]["exp_avg_sq"].zero_()
            opt.state[w]["step"].zero_()
        opt.step()
        tan = torch.tan(_turn(old, w.detach()))
        torch.testing.assert_close(tan, SGD_RATE_GAIN * lr / nu_sq, rtol=1e-6, atol=0)  # eps = 1e-8 beside G
        nu_sq = nu_sq * (1 + tan**2)
        torch.testing.assert_close(opt.state[w]["virtual_sq_norm"], nu_sq, rtol=1e-12, atol=0)
    assert float(nu_sq.min()) > 1.05  # the decay did something: the last turns are smaller


@pytest.mark.parametrize(
    "make",
    [
        lambda m: psiopt.PSISGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda m: psiopt.PSIAdam(m.parameters(), lr=0.03, amsgrad=True),
    ],
    ids=["psisgd-weight-decay", "psiadam-amsgrad"],
)
def test_the_rates_keep_rescaled_starts_equivalent(make) -> None:
    # The default rates of PSISGD and PSIAdam(W) run in test_invariance_property and
    # test_psiadam; here the weight decay's pull on the virtual norm, and AMSGrad's state.
    from test_invariance_property import assert_equivalent_trajectories

    assert_equivalent_trajectories(make)


def test_the_sgd_rate_ignores_dampening_and_nesterov_on_scale_invariant_groups() -> None:
    # Its first moment is an average normalized by its weights and its direction always the
    # look-ahead: dampening and nesterov are torch's options for the other parameters only.
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    grads = [_unit_rows_loss_gradient(w0, gen) for _ in range(4)]

    def run(**options) -> torch.Tensor:
        w = torch.nn.Parameter(w0.clone())
        opt = psiopt.PSISGD([{"params": [w], "grouping": "channel"}], lr=0.3, momentum=0.9, **options)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        return w.detach()

    plain = run()
    torch.testing.assert_close(run(nesterov=True), plain, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(run(dampening=0.5), plain, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: psiopt.PSISGD(p, lr=0.1, angular_rate="adam"), "angular_rate must be one of 'sgd', 'constant'"),
        (lambda p: psiopt.PSIAdam(p, angular_rate="sgd"), "angular_rate must be one of 'adam', 'constant'"),
        (lambda p: psiopt.PSISGD(p, lr=0.1, momentum=1.0), "angular_rate='sgd' needs momentum < 1"),
        (lambda p: psiopt.PSISGD(p, lr=100.0, momentum=0.9, weight_decay=0.01), "must stay below 1"),
        (lambda p: psiopt.PSISGD(p, lr=0.1, momentum=0.9, capturable=True), "capturable=True needs angular_rate"),
        (
            lambda p: psiopt.PSISGD([*p, {"params": [torch.nn.Parameter(torch.randn(2))], "angular_rate": "constant"}]),
            "every param group of a PSISGD takes one angular rate",
        ),
    ],
)
def test_bad_rate_options_are_refused_at_construction(make, message: str) -> None:
    w = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match=message):
        make([{"params": [w], "grouping": "channel"}])


def test_a_bad_lr_set_later_is_refused_before_any_write() -> None:
    w = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    opt = psiopt.PSISGD([{"params": [w], "grouping": "channel"}], lr=0.1, momentum=0.9, weight_decay=0.1)
    w.grad = _unit_rows_loss_gradient(w.detach(), torch.Generator().manual_seed(0))
    before = w.detach().clone()
    opt.param_groups[0]["lr"] = 1e3  # a scheduler's mistake: 2 * lr * wd / (1 + mu) = 105
    with pytest.raises(ValueError, match="must stay below 1"):
        opt.step()
    assert torch.equal(w.detach(), before)
    assert not opt.state[w]


@pytest.mark.parametrize("name", ["PSISGD", "PSIAdam"])
def test_a_state_saved_without_angular_rates_resumes_the_constant_step(name: str) -> None:
    # Param groups saved before the option existed have no "angular_rate": they resume the
    # step they were saved with.
    make = getattr(psiopt, name)
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    grads = [_unit_rows_loss_gradient(w0, gen) for _ in range(3)]
    w = torch.nn.Parameter(w0.clone())
    old = make([{"params": [w], "grouping": "channel"}], lr=0.05, angular_rate="constant")
    saved = old.state_dict()
    for group in saved["param_groups"]:
        del group["angular_rate"]
    ref_w = torch.nn.Parameter(w0.clone())
    ref = make([{"params": [ref_w], "grouping": "channel"}], lr=0.05, angular_rate="constant")
    new = make([{"params": [w], "grouping": "channel"}], lr=0.05)
    new.load_state_dict(saved)
    assert new.param_groups[0]["angular_rate"] == "constant"
    for g in grads:
        w.grad, ref_w.grad = g.clone(), g.clone()
        new.step()
        ref.step()
    torch.testing.assert_close(w.detach(), ref_w.detach(), rtol=0, atol=0)
