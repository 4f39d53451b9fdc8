"""The benchmark's method registry and the full-batch Rayleigh problems."""

from __future__ import annotations

import math

import pytest
import torch

import psiopt
from psiopt.bench import models
from psiopt.bench.methods import (
    ADAM_LR_UNIT,
    METHODS,
    BuildContext,
    MethodNotApplicable,
    zoo_scale_invariant_groupings,
    zoo_scale_invariant_layers,
)
from psiopt.bench.rayleigh import FULL_BATCH_METHODS, make_rayleigh, run_full_batch

ZOO = [
    ("mlp", lambda: models.mlp_bn(12, (16, 16)), (32, 12)),
    ("cnn", lambda: models.cnn_bn(1, 10, 4), (16, 1, 8, 8)),
    ("resnet", lambda: models.small_resnet(10, 1, 4), (16, 1, 8, 8)),
    ("vit", lambda: models.vit_ln(8, 2, 1, dim=8, depth=1), (16, 1, 8, 8)),
]


@pytest.mark.parametrize("name,build,shape", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_rule_matches_discovery(name, build, shape):
    torch.manual_seed(0)
    model = build()
    found = set(psiopt.find_scale_invariant(model, torch.randn(shape)).names())
    weights = {id(layer.weight) for layer in zoo_scale_invariant_layers(model)}
    by_name = {n for n, p in model.named_parameters() if id(p) in weights}
    assert by_name == found


@pytest.mark.parametrize("name,build,shape", ZOO, ids=[z[0] for z in ZOO])
@pytest.mark.parametrize(
    "method",
    ["sgd", "psisgd", "psiadasgd", "rsgd-sphere", "sgdp", "sgdg", "sbwn", "adam", "adamw", "adamp", "radam-sphere", "psiadam", "psiadam-1lr", "psiadamw"],
)
def test_building_keeps_the_function(name, build, shape, method):
    """Methods that keep the architecture must not change what the model computes
    (train mode; up to BN's eps), e.g. the sphere's row normalization of conv weights."""
    entry = METHODS[method]
    if entry.unavailable_reason() is not None:
        pytest.skip(entry.unavailable_reason())
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(shape, dtype=torch.float64)
    before = model(x).detach()
    try:
        setup = entry.build(model, BuildContext(lr=0.1, base_lr=0.1, example=x))
    except MethodNotApplicable:
        pytest.skip(f"{method} does not apply to {name}")
    after = setup.model(x).detach()
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)
    # and one step moves it
    loss = torch.nn.functional.cross_entropy(setup.model(x), torch.arange(shape[0]) % 10)
    loss.backward()
    setup.optimizer.step()
    if setup.after_step:
        setup.after_step()
    assert not torch.allclose(setup.model(x), after)


def test_sphere_rows_are_output_channels():
    torch.manual_seed(0)
    model = models.cnn_bn(1, 10, 4)
    METHODS["rsgd-sphere"].build(model, BuildContext(lr=0.1, base_lr=0.1, example=torch.randn(8, 1, 8, 8)))
    conv = zoo_scale_invariant_layers(model)[1]
    assert conv.weight.shape == (8, 4, 3, 3)
    norms = conv.weight.detach().reshape(8, -1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(8))


def test_zoo_groupings_match_discovery():
    torch.manual_seed(0)
    for _, build, shape in ZOO:
        model = build()
        found = {rec.name: rec.grouping for rec in psiopt.find_scale_invariant(model, torch.randn(shape))}
        names = {id(p): n for n, p in model.named_parameters()}
        declared = {names[id(layer.weight)]: psiopt.as_grouping(g) for layer, g in zoo_scale_invariant_groupings(model)}
        assert declared == found


def test_sphere_methods_normalize_whole_tensors_under_layernorm():
    torch.manual_seed(0)
    model = models.vit_ln(8, 2, 1, dim=8, depth=1)
    METHODS["radam-sphere"].build(model, BuildContext(lr=0.1, base_lr=None, example=torch.randn(8, 1, 8, 8)))
    for layer, _ in zoo_scale_invariant_groupings(model):
        torch.testing.assert_close(layer.weight.detach().norm(), torch.tensor(1.0))


def test_lr_units_scale_what_the_optimizer_gets():
    torch.manual_seed(0)
    ctx = BuildContext(lr=0.3, base_lr=2.0, example=torch.randn(8, 12))
    adam = METHODS["adam"].build(models.mlp_bn(12, (16, 16)), ctx).optimizer
    assert adam.param_groups[0]["lr"] == pytest.approx(0.3 * ADAM_LR_UNIT)
    psiadam = METHODS["psiadam"].build(models.mlp_bn(12, (16, 16)), ctx).optimizer
    # the angular lr in the method's unit, the rest at Adam's tuned lr in Adam's unit
    assert sorted(g["lr"] for g in psiadam.param_groups) == pytest.approx(sorted([0.3 * ADAM_LR_UNIT, 2.0 * ADAM_LR_UNIT]))
    psisgd = METHODS["psisgd"].build(models.mlp_bn(12, (16, 16)), ctx).optimizer
    assert sorted(g["lr"] for g in psisgd.param_groups) == [0.3, 2.0]


def test_own_lr_methods_split_the_groups():
    torch.manual_seed(0)
    model = models.mlp_bn(12, (16, 16))
    setup = METHODS["sgdg"].build(model, BuildContext(lr=0.05, base_lr=0.7, example=torch.randn(8, 12)))
    lrs = sorted(g["lr"] for g in setup.optimizer.param_groups)
    assert lrs == [0.05, 0.7]
    si = {id(layer.weight) for layer in zoo_scale_invariant_layers(model)}
    for group in setup.optimizer.param_groups:
        assert all((id(p) in si) == (group["lr"] == 0.05) for p in group["params"])


def test_rayleigh_optimum_and_predicted_rate():
    problem = make_rayleigh(groups=2, dim=8, condition_number=10.0, seed=0)
    assert problem.condition_number == 10.0
    assert math.isclose(problem.f_star, 2.0, rel_tol=1e-10)  # smallest eigenvalue 1, two groups
    # the loss at the eigenvectors of the smallest eigenvalue is f*
    vecs = torch.stack([torch.linalg.eigh(a)[1][:, 0] for a in problem.matrices])
    assert math.isclose(float(problem.loss(vecs)), problem.f_star, rel_tol=1e-12)
    eta = problem.optimal_step
    assert math.isclose(problem.contraction(eta), 9 / 11, rel_tol=1e-12)  # (kappa-1)/(kappa+1)
    w0 = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    record = run_full_batch(FULL_BATCH_METHODS["rsgd-sphere"], problem, w0, 1e-10, 400)
    assert record["iterations"] is not None
    # the measured tail rate is the predicted one: a wrong Hessian or step would miss it
    assert math.isclose(record["measured_rate"], record["predicted_rate"], rel_tol=2e-3)


@pytest.mark.parametrize("name", ["psigd", "psigd-ls", "rsgd-sphere", "gd"])
def test_full_batch_scale_dependence(name):
    method = FULL_BATCH_METHODS[name]
    if method.unavailable_reason() is not None:
        pytest.skip(method.unavailable_reason())
    problem = make_rayleigh(groups=2, dim=6, condition_number=5.0, seed=1)
    w0 = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    counts = [run_full_batch(method, problem, w0 * s, 1e-10, 300)["iterations"] for s in (1e-2, 1.0, 1e2)]
    if name == "gd":
        assert counts[1] is not None and counts[0] is None and counts[2] is None
    else:
        assert counts[0] is not None and len(set(counts)) == 1


@pytest.mark.parametrize("name", ["psigd", "psigd-ls", "rsgd-sphere", "gd"])
def test_full_batch_counts_forward_and_backward_passes(name):
    method = FULL_BATCH_METHODS[name]
    if method.unavailable_reason() is not None:
        pytest.skip(method.unavailable_reason())
    problem = make_rayleigh(groups=2, dim=6, condition_number=5.0, seed=1)
    w0 = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    record = run_full_batch(method, problem, w0, 1e-10, 300)
    steps = record["iterations"]
    assert steps is not None and steps > 5
    # one gradient per iteration; only the line search evaluates the loss more often
    assert record["backward_passes"] == steps
    if name == "psigd-ls":
        assert record["forward_passes"] > steps
    else:
        assert record["forward_passes"] == steps


def test_discovery_reports_are_shared_through_the_build_context_only(monkeypatch):
    calls = []
    find = psiopt.find_scale_invariant
    monkeypatch.setattr(psiopt, "find_scale_invariant", lambda *a, **k: calls.append(1) or find(*a, **k))
    x = torch.randn(8, 12)
    shared = BuildContext(lr=0.1, base_lr=0.1, example=x)
    for _ in range(2):  # the runs of one task: one discovery for the architecture
        METHODS["psisgd"].build(models.mlp_bn(12, hidden=(6,), num_classes=3), shared)
    assert len(calls) == 1 and len(shared.reports) == 1
    METHODS["psiadam"].build(models.mlp_bn(12, hidden=(6,), num_classes=3), shared)
    assert len(calls) == 1  # another method, same architecture: the same report
    METHODS["psisgd"].build(models.mlp_bn(12, hidden=(6,), num_classes=3), BuildContext(lr=0.1, base_lr=0.1, example=x))
    assert len(calls) == 2  # a fresh context knows no report: nothing is kept between runs of the bench
