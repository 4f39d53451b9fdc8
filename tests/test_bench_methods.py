"""The benchmark's method registry and the full-batch Rayleigh problems."""

from __future__ import annotations

import math

import pytest
import torch

import psiopt
from psiopt.bench import models
from psiopt.bench.methods import (
    ADAM_LR_UNIT,
    ADAMW_WEIGHT_DECAY,
    METHODS,
    SGD_WEIGHT_DECAY,
    BuildContext,
    MethodNotApplicable,
    zoo_scale_invariant_groupings,
    zoo_scale_invariant_layers,
)
from psiopt.bench.rayleigh import FULL_BATCH_METHODS, make_rayleigh, run_full_batch
from psiopt.bench.suites import LANGUAGE_MODEL_METHODS


def _tokens(*shape: int) -> torch.Tensor:
    return torch.randint(0, 256, shape)


def _images(*shape: int):
    return lambda dtype=torch.float32: torch.randn(shape, dtype=dtype)


ZOO = [
    ("mlp", lambda: models.mlp_bn(12, (16, 16)), _images(32, 12)),
    ("cnn", lambda: models.cnn_bn(1, 10, 4), _images(16, 1, 8, 8)),
    ("resnet", lambda: models.small_resnet(10, 1, 4), _images(16, 1, 8, 8)),
    ("vit", lambda: models.vit_ln(8, 2, 1, dim=8, depth=1), _images(16, 1, 8, 8)),
]
LM = ("lm", lambda: models.qknorm_lm(context=8, dim=16, depth=2, heads=4), lambda dtype=None: _tokens(6, 8))
ZOO_AND_LM = [*ZOO, pytest.param(*LM, id="lm")]


@pytest.mark.parametrize("name,build,example", ZOO_AND_LM, ids=[z[0] for z in ZOO] + ["lm"])
def test_zoo_rule_matches_discovery(name, build, example):
    torch.manual_seed(0)
    model = build()
    found = set(psiopt.find_scale_invariant(model, example()).names())
    weights = {id(layer.weight) for layer in zoo_scale_invariant_layers(model)}
    by_name = {n for n, p in model.named_parameters() if id(p) in weights}
    assert by_name == found


def _loss(out: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against fixed labels, for logits ``(N, C)`` and ``(N, T, V)`` alike."""
    labels = torch.arange(out[..., 0].numel()) % out.shape[-1]
    return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), labels)


BUILT = ["sgd", "psisgd", "psisgd-constant", "psiadasgd", "rsgd-sphere", "sgdp", "sgdg", "sbwn", "adam", "adamw",
         "adamp", "radam-sphere", "psiadam", "psiadamw"]  # fmt: skip
CASES = [(*z, m) for z in ZOO for m in BUILT] + [(*LM, m) for m in LANGUAGE_MODEL_METHODS]


@pytest.mark.parametrize("name,build,example,method", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_building_keeps_the_function(name, build, example, method):
    """Methods that keep the architecture must not change what the model computes
    (train mode; up to BN's eps), e.g. the sphere's row normalization of conv weights."""
    entry = METHODS[method]
    if entry.unavailable_reason() is not None:
        pytest.skip(entry.unavailable_reason())
    torch.manual_seed(0)
    model = build().double()
    x = example(dtype=torch.float64)
    before = model(x).detach()
    try:
        setup = entry.build(model, BuildContext(lr=0.1, base_lr=0.1, example=x))
    except MethodNotApplicable:
        pytest.skip(f"{method} does not apply to {name}")
    after = setup.model(x).detach()
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)
    # and one step moves it
    loss = _loss(setup.model(x))
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


@pytest.mark.parametrize("name,build,example", ZOO_AND_LM, ids=[z[0] for z in ZOO] + ["lm"])
def test_zoo_groupings_match_discovery(name, build, example):
    torch.manual_seed(0)
    model = build()
    found = {rec.name: rec.grouping for rec in psiopt.find_scale_invariant(model, example())}
    names = {id(p): n for n, p in model.named_parameters()}
    declared = {names[id(layer.weight)]: psiopt.as_grouping(g) for layer, g in zoo_scale_invariant_groupings(model)}
    assert declared == found


def test_the_language_models_contract_is_qk_norm_blocks():
    model = LM[1]()
    declared = {n: g for layer, g in zoo_scale_invariant_groupings(model) for n, p in model.named_parameters()
                if p is layer.weight}  # fmt: skip
    assert declared == {f"blocks.{i}.attn.{proj}.weight": "block(4)" for i in (0, 1) for proj in ("q_proj", "k_proj")}


def test_sphere_rows_of_the_language_model_are_heads():
    torch.manual_seed(0)
    model = LM[1]()
    METHODS["radam-sphere"].build(model, BuildContext(lr=0.1, base_lr=None, example=_tokens(2, 8)))
    q = model.blocks[0].attn.q_proj.weight.detach()  # (heads * head_dim, dim), through the parametrization
    torch.testing.assert_close(q.reshape(4, -1).norm(dim=1), torch.ones(4))


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
    # the swap: one lr for every group, in the method's unit; SGD's tuned lr (base_lr) is not used
    psiadam = METHODS["psiadam"].build(models.mlp_bn(12, (16, 16)), ctx).optimizer
    assert [g["lr"] for g in psiadam.param_groups] == pytest.approx([0.3 * ADAM_LR_UNIT] * 2)
    assert [g.get("grouping") for g in psiadam.param_groups] == ["channel", None]
    psisgd = METHODS["psisgd"].build(models.mlp_bn(12, (16, 16)), ctx).optimizer
    assert [g["lr"] for g in psisgd.param_groups] == [0.3, 0.3]


def test_own_lr_methods_split_the_groups():
    torch.manual_seed(0)
    model = models.mlp_bn(12, (16, 16))
    setup = METHODS["sgdg"].build(model, BuildContext(lr=0.05, base_lr=0.7, example=torch.randn(8, 12)))
    lrs = sorted(g["lr"] for g in setup.optimizer.param_groups)
    assert lrs == [0.05, 0.7]
    si = {id(layer.weight) for layer in zoo_scale_invariant_layers(model)}
    for group in setup.optimizer.param_groups:
        assert all((id(p) in si) == (group["lr"] == 0.05) for p in group["params"])
        # the sphere rows have no scale to decay; the other parameters get SGD's 5e-4
        assert group["weight_decay"] == (0.0 if group["lr"] == 0.05 else SGD_WEIGHT_DECAY)


def test_the_recorded_weight_decay_is_what_the_optimizer_applies():
    expected = {"sgd": SGD_WEIGHT_DECAY, "psisgd": SGD_WEIGHT_DECAY, "psiadasgd": SGD_WEIGHT_DECAY,
                "sgdp": SGD_WEIGHT_DECAY, "sgdg": SGD_WEIGHT_DECAY, "rsgd-sphere": SGD_WEIGHT_DECAY,
                "wn": SGD_WEIGHT_DECAY, "enorm": SGD_WEIGHT_DECAY, "sbwn": SGD_WEIGHT_DECAY,
                "adam": 0.0, "psiadam": 0.0, "radam-sphere": 0.0,
                "adamw": ADAMW_WEIGHT_DECAY, "psiadamw": ADAMW_WEIGHT_DECAY, "adamp": ADAMW_WEIGHT_DECAY}  # fmt: skip
    for name, decay in expected.items():
        method = METHODS[name]
        assert method.weight_decay == decay and f"weight decay {decay:g}" in method.describe(), name
        torch.manual_seed(0)
        model = models.mlp_bn(12, (16, 16))
        head = model[-1].weight
        setup = method.build(model, BuildContext(lr=0.1, base_lr=0.1, example=torch.randn(8, 12)))
        (group,) = [g for g in setup.optimizer.param_groups if any(p is head for p in g["params"])]
        assert group["weight_decay"] == decay, name  # the classifier head is decayed by the method's value
    assert METHODS["psiadamw"].build(models.mlp_bn(12, (4,)), BuildContext(0.1, None, torch.randn(8, 12))) \
        .optimizer.defaults["decoupled_weight_decay"]


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
