"""Finding and marking the scale-invariant weights of a model (psiopt.discovery)."""

from __future__ import annotations

import copy
import io
import random

import geoopt
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import psiopt
from psiopt import Grouping, PSIManifold, ZeroGroupError
from psiopt.bench import models

DT = torch.float64


def _img(n=2, c=3, hw=12, seed=0):
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _vec(n=6, f=5, seed=0):
    return torch.randn(n, f, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _build(fn, seed=0):
    torch.manual_seed(seed)
    return fn().to(DT)


def _weights(model, types):
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, types)}


# -- what is found ----------------------------------------------------------------------


def test_mlp_with_batchnorm1d():
    model = _build(lambda: models.mlp_bn(5, hidden=(16, 12), num_classes=3))
    report = psiopt.find_scale_invariant(model, _vec())
    assert report.method == "fx"
    assert report.names() == ("0.weight", "3.weight")
    assert [w.norm_layer for w in report] == ["1", "4"]
    assert all(w.grouping == Grouping.per_channel() and w.norm_type == "BatchNorm1d" for w in report)
    assert report.rejected_names() == ("6.weight",)
    assert report[0].shape == (16, 5) and report[0].num_groups == 16


def test_vgg_style_cnn():
    model = _build(lambda: models.cnn_bn(3, 5, width=4))
    report = psiopt.find_scale_invariant(model, _img(hw=8))
    assert set(report.names()) == _weights(model, nn.Conv2d)
    assert "10.weight" not in report.names() and report.rejected_names() == (
        next(n for n, p in model.named_parameters() if p.dim() == 2),
    )


def test_resnet18_every_conv_found_and_nothing_else():
    model = _build(lambda: models.resnet18(num_classes=4, width=8))
    report = psiopt.find_scale_invariant(model, _img(hw=16))
    convs = _weights(model, nn.Conv2d)
    assert len(convs) == 20 and set(report.names()) == convs
    assert {n for n in convs if "downsample" in n} <= set(report.names())
    assert all(report.get(f"layer{i}.0.downsample.0.weight").norm_layer == f"layer{i}.0.downsample.1" for i in (2, 3, 4))
    assert report.rejected_names() == ("fc.weight",)
    found = set(report.names())
    for name, _ in model.named_parameters():
        if name.startswith("fc.") or name.endswith(".bias") or ".bn" in name or "downsample.1" in name:
            assert name not in found


def test_eps_effects_are_told_apart_from_failures():
    # At the real eps (1e-5) shrinking a filter by 10 changes the output far beyond the
    # float64 tolerance, yet the proof (eps out of the way) accepts every conv weight.
    model = _build(lambda: models.small_resnet(width=4))
    report = psiopt.find_scale_invariant(model, _img(hw=8))
    assert len(report) == len(_weights(model, nn.Conv2d))
    for w in report:
        assert w.proof_deviation <= report.rtol
        low_change, high_change = w.eps_sensitivity
        assert low_change > 1e3 * report.rtol  # shrinking exposes eps
        assert high_change < low_change  # growing hides it
        assert w.eps == 1e-5 and w.eps_bound is not None and w.eps_bound > 0
    # The same weights with the real eps kept during the proof are (wrongly) rejected:
    strict = psiopt.find_scale_invariant(model, _img(hw=8), proof_eps=1e-5)
    assert len(strict) < len(report)
    assert all(r.stage == "numerical" for r in strict.rejected if r.name != "fc.weight")


def test_layernorm_whole_tensor_grouping():
    model = _build(lambda: nn.Sequential(nn.Linear(5, 8, bias=False), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)))
    report = psiopt.find_scale_invariant(model, _vec())
    assert report.names() == ("0.weight",)
    assert report[0].grouping == Grouping.whole() and report[0].norm_type == "LayerNorm"
    # The proof itself knows the grouping matters: per-row rescaling is not invariant.
    forced = psiopt.find_scale_invariant(model, _vec(), candidates={"0.weight": "channel"})
    assert len(forced) == 0 and forced.rejected[0].stage == "numerical"


def test_layernorm_over_spatial_dims_only_is_per_channel():
    model = _build(lambda: nn.Sequential(nn.Conv1d(3, 4, 3, bias=False), nn.LayerNorm(6), nn.Flatten(), nn.Linear(24, 2)))
    report = psiopt.find_scale_invariant(model, torch.randn(3, 3, 8, dtype=DT))
    assert report.names() == ("0.weight",) and report[0].grouping == Grouping.per_channel()


@pytest.mark.parametrize(
    "groups, expected",
    [(2, Grouping.blocks(4)), (8, Grouping.per_channel()), (1, Grouping.whole())],
)
def test_groupnorm_grouping(groups, expected):
    model = _build(
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, bias=False), nn.GroupNorm(groups, 8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)
        )
    )
    x = _img(hw=6)
    model(x)  # materialize the lazy head
    report = psiopt.find_scale_invariant(model, x)
    assert report.names() == ("0.weight",) and report[0].grouping == expected
    if groups == 2:  # channel-wise rescaling breaks a GroupNorm block
        forced = psiopt.find_scale_invariant(model, x, candidates={"0.weight": "channel"})
        assert len(forced) == 0


def test_instancenorm_and_bias_before_batchnorm():
    model = _build(
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, bias=False), nn.InstanceNorm2d(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 2),
        )
    )
    report = psiopt.find_scale_invariant(model, _img())
    assert report.names() == ("0.weight", "3.weight")
    assert report.get("3.weight").norm_type == "InstanceNorm2d"
    assert "0.bias" not in report.names()


def test_relu_before_bn_kept_tanh_before_bn_rejected_by_the_proof():
    def net(act):
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False), act, nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 10 * 10, 2)
        )

    relu_model = _build(lambda: net(nn.ReLU()))
    found = psiopt.find_scale_invariant(relu_model, _img())
    assert found.names() == ("0.weight",) and found[0].path == ("ReLU",)
    # The ReLU model also passes the proof alone, with no structural help.
    assert psiopt.find_scale_invariant(relu_model, _img(), candidates={"0.weight": "channel"}).names() == ("0.weight",)

    tanh_model = _build(lambda: net(nn.Tanh()))
    structural = psiopt.find_scale_invariant(tanh_model, _img())
    assert len(structural) == 0 and structural.rejected[0].stage == "structural"
    proof_only = psiopt.find_scale_invariant(tanh_model, _img(), candidates={"0.weight": "channel"})
    assert len(proof_only) == 0
    (rej,) = proof_only.rejected
    assert rej.name == "0.weight" and rej.stage == "numerical" and "output changed by" in rej.reason


def test_joint_proof_failure_falls_back_to_each_candidate():
    model = _build(
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 3, bias=False), nn.Tanh(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 2),
        )
    )
    report = psiopt.find_scale_invariant(model, _img(), candidates={"0.weight": "channel", "3.weight": "channel"})
    assert report.names() == ("0.weight",) and report.rejected_names() == ("3.weight",)
    assert report[0].proof_deviation <= report.rtol


def test_output_used_beside_the_norm_is_rejected():
    class Leaky(nn.Module):  # conv output feeds BN and also the residual sum
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = _build(Leaky)
    report = psiopt.find_scale_invariant(model, _img())
    assert len(report) == 0 and "used by 2 operations" in report.rejected[0].reason
    assert len(psiopt.find_scale_invariant(model, _img(), candidates={"conv.weight": "channel"})) == 0


def test_weight_norm_direction_found():
    model = _build(lambda: nn.Sequential(weight_norm(nn.Linear(5, 4)), nn.ReLU(), weight_norm(nn.Linear(4, 2), dim=None)))
    report = psiopt.find_scale_invariant(model, _vec())
    v0, v2 = "0.parametrizations.weight.original1", "2.parametrizations.weight.original1"
    assert report.names() == (v0, v2)
    assert report.get(v0).grouping == Grouping.per_channel() and report.get(v2).grouping == Grouping.whole()
    assert report.get(v0).norm_type == "weight_norm" and report.get(v0).norm_layer == "0.parametrizations.weight"
    assert all(max(w.eps_sensitivity) < 1e-12 for w in report)  # weight norm has no eps


def test_nothing_invariant_gives_an_empty_report():
    model = _build(lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)))
    report = psiopt.find_scale_invariant(model, _vec())
    assert len(report) == 0 and set(report.rejected_names()) == {"0.weight", "2.weight"}
    assert "0 scale-invariant" in str(report)


class _DataDependent(nn.Module):
    """Python control flow on the data defeats torch.fx; forward hooks still see it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        if x.mean() > 0:
            x = x * 2
        return self.head(x.mean(dim=(2, 3)))


def test_hook_fallback_when_fx_fails():
    model = _build(_DataDependent)
    report = psiopt.find_scale_invariant(model, _img())
    assert report.method == "hooks" and "torch.fx" in report.notes[0]
    assert report.names() == ("conv.weight",) and report.rejected_names() == ("head.weight",)
    with pytest.raises(torch.fx.proxy.TraceError):
        psiopt.find_scale_invariant(model, _img(), structure="fx")


def test_hooks_agree_with_fx_on_resnet():
    model = _build(lambda: models.small_resnet(width=4))
    fx = psiopt.find_scale_invariant(model, _img(hw=8))
    hooks = psiopt.find_scale_invariant(model, _img(hw=8), structure="hooks")
    assert hooks.method == "hooks" and hooks.names() == fx.names()
    assert [w.grouping for w in hooks] == [w.grouping for w in fx]


def test_report_prints_a_table():
    model = _build(
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False), nn.Tanh(), nn.BatchNorm2d(4),
            nn.Conv2d(4, 6, 3, bias=False), nn.GroupNorm(3, 6), nn.Flatten(), nn.LazyLinear(2),
        )
    )
    model(_img())
    text = str(psiopt.find_scale_invariant(model, _img()))
    assert "name" in text and "grouping" in text and "eps effect" in text
    assert "3.weight" in text and "6x4x3x3" in text and "block(2)" in text and "GroupNorm '4'" in text
    assert "rejected" in text and "0.weight: " in text and "Tanh" in text


# -- the model comes back as it was --------------------------------------------------------


def _messy_model():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.ReLU(inplace=True),  # modifies its input in place
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
        nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.Linear(4 * 8 * 8, 2),
    ).to(DT)
    for _ in range(2):  # nontrivial running statistics
        model(_img(seed=7))
    model[6].eval()  # mixed modes
    model[4].eval()
    return model


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        [m.training for m in model.modules()],
        [(id(p), p.data.data_ptr(), p.data.dtype) for p in model.parameters()],
        [m.eps for m in model.modules() if hasattr(m, "eps")],
    )


def _assert_same(model, snap):
    sd, modes, params, eps = snap
    now = model.state_dict(keep_vars=True)
    assert now.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(now[k], v) and now[k].dtype == v.dtype, k
    assert [m.training for m in model.modules()] == modes
    assert [(id(p), p.data.data_ptr(), p.data.dtype) for p in model.parameters()] == params
    assert [m.eps for m in model.modules() if hasattr(m, "eps")] == eps


def test_model_state_and_rng_come_back_exactly():
    model = _messy_model()
    x = _img()
    x_before = x.clone()
    snap = _snapshot(model)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    report = psiopt.find_scale_invariant(model, x)
    assert report.names() == ("1.weight", "5.weight")
    _assert_same(model, snap)
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    assert torch.equal(x, x_before)  # the inplace ReLU never touched the caller's tensor
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_comes_back():
    model = _messy_model().cuda()
    state = torch.cuda.get_rng_state_all()
    psiopt.find_scale_invariant(model, _img().cuda())
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), state))


# -- bad input ---------------------------------------------------------------------------


def test_inputs_that_do_not_fit_raise_the_models_error_and_change_nothing():
    model = _messy_model()
    snap = _snapshot(model)
    wrong = torch.randn(2, 5, 12, 12, dtype=DT)  # 5 channels for a 3-channel conv
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError) as err:
        psiopt.find_scale_invariant(model, wrong)
    assert "channels" in str(err.value)
    _assert_same(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(RuntimeError):
        psiopt.mark_scale_invariant(model, wrong)
    _assert_same(model, snap)
    assert psiopt.scale_invariant_parameters(model) == []


def test_zero_group_names_parameter_and_group():
    model = _build(lambda: models.cnn_bn(3, 2, width=4))
    with torch.no_grad():
        model[4].weight[5].zero_()
    snap = _snapshot(model)
    with pytest.raises(ZeroGroupError, match=r"4\.weight: group\(s\) 5 of 8"):
        psiopt.mark_scale_invariant(model, _img(hw=8))
    _assert_same(model, snap)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex128])
def test_integer_or_complex_weight_is_an_error(dtype):
    model = _build(lambda: models.mlp_bn(5, hidden=(4,), num_classes=2))
    model[0].weight = nn.Parameter(torch.ones(4, 5, dtype=dtype), requires_grad=False)
    with pytest.raises(TypeError, match=r"0\.weight has dtype torch\.(int64|complex128)"):
        psiopt.find_scale_invariant(model, _vec())


def test_constant_inputs_are_refused():
    model = _build(lambda: models.mlp_bn(5, hidden=(4,), num_classes=2))
    with pytest.raises(ValueError, match="nearly\\) constant"):
        psiopt.find_scale_invariant(model, torch.ones(4, 5, dtype=DT))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"factors": (0.5, 2.0)}, "span at least"),
        ({"rtol": -1.0}, "rtol"),
        ({"proof_eps": float("nan")}, "proof_eps"),
        ({"candidates": {"nope": "channel"}}, "no parameter"),
        ({"structure": "magic"}, "structure"),
    ],
)
def test_bad_options(kwargs, match):
    model = _build(lambda: models.mlp_bn(5, hidden=(4,), num_classes=2))
    with pytest.raises(ValueError, match=match):
        psiopt.find_scale_invariant(model, _vec(), **kwargs)


# -- marking ----------------------------------------------------------------------------------


def _marked(seed=0):
    model = _build(lambda: models.small_resnet(num_classes=3, width=4, blocks_per_stage=(1, 1)), seed)
    report = psiopt.mark_scale_invariant(model, _img(hw=8))
    return model, report


def _assert_marked(model, report):
    named = dict(psiopt.scale_invariant_parameters(model))
    assert tuple(named) == report.names()
    for rec in report:
        p = named[rec.name]
        assert isinstance(p, geoopt.ManifoldParameter) and isinstance(p.manifold, PSIManifold)
        assert p.manifold.grouping == rec.grouping and psiopt.is_scale_invariant(p)
    assert not psiopt.is_scale_invariant(model.fc.weight)


def test_mark_replaces_found_weights_and_is_idempotent():
    model, report = _marked()
    _assert_marked(model, report)
    before = {n: p for n, p in model.named_parameters()}
    again = psiopt.mark_scale_invariant(model, _img(hw=8))
    assert again.names() == report.names()
    assert all(p is before[n] for n, p in model.named_parameters())
    assert not isinstance(model.conv1.weight.data, geoopt.ManifoldParameter)


def test_mark_survives_deepcopy_save_load_and_to():
    model, report = _marked()
    _assert_marked(copy.deepcopy(model), report)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _assert_marked(loaded, report)
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)
    model.to(torch.float32)
    _assert_marked(model, report)
    assert model.conv1.weight.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mark_survives_to_cuda():
    model, report = _marked()
    model.cuda()
    _assert_marked(model, report)
    assert model.conv1.weight.is_cuda


def test_mark_survives_state_dict_round_trips():
    model, report = _marked(seed=0)
    state = copy.deepcopy(model.state_dict())
    fresh, _ = _marked(seed=1)
    fresh.load_state_dict(state)
    _assert_marked(fresh, report)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), state.values()))
    ids = [id(p) for p in model.parameters()]
    model.load_state_dict(state)
    _assert_marked(model, report)
    assert [id(p) for p in model.parameters()] == ids
    plain = _build(lambda: models.small_resnet(num_classes=3, width=4, blocks_per_stage=(1, 1)), 2)
    plain.load_state_dict(model.state_dict())  # a marked state dict is an ordinary one
    assert torch.equal(plain.conv1.weight, model.conv1.weight)


def test_geoopt_riemannian_sgd_takes_horizontal_steps():
    model, report = _marked()
    before = {n: p.detach().clone() for n, p in psiopt.scale_invariant_parameters(model)}
    opt = geoopt.optim.RiemannianSGD(model.parameters(), lr=0.1)
    model(_img(hw=8)).square().sum().backward()
    opt.step()
    for name, p in psiopt.scale_invariant_parameters(model):
        rows_old, rows_new = p.manifold.rows(before[name]), p.manifold.rows(p.detach())
        step = rows_new - rows_old
        assert step.abs().max() > 0, name
        cos = (step * rows_old).sum(1) / (step.norm(dim=1) * rows_old.norm(dim=1)).clamp_min(1e-300)
        assert cos.abs().max() < 1e-8, name


def test_optimizer_created_before_marking_holds_the_marked_objects():
    """Marking keeps each parameter object, so an optimizer made before it steps the
    marked weight on the manifold, exactly as one made after."""
    model = _build(lambda: models.mlp_bn(5, hidden=(4,), num_classes=2))
    twin = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="no scale-invariant parameter"):
        early = psiopt.PSISGD(model.parameters(), lr=0.1, momentum=0.9)
    psiopt.mark_scale_invariant(model, _vec())
    psiopt.mark_scale_invariant(twin, _vec())
    late = psiopt.PSISGD(twin.parameters(), lr=0.1, momentum=0.9)
    assert psiopt.is_scale_invariant(early.param_groups[0]["params"][0])
    for _ in range(2):
        for net, opt in ((model, early), (twin, late)):
            opt.zero_grad()
            net(_vec()).square().sum().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_mark_refuses_another_manifold():
    model = _build(lambda: models.mlp_bn(5, hidden=(4,), num_classes=2))
    model[0].weight = geoopt.ManifoldParameter(model[0].weight.data, manifold=geoopt.Sphere())
    with pytest.raises(ValueError, match="another manifold"):
        psiopt.mark_scale_invariant(model, _vec())
    assert isinstance(model[0].weight.manifold, geoopt.Sphere)


def test_mark_weight_norm_direction_on_its_parametrization():
    model = _build(lambda: nn.Sequential(weight_norm(nn.Linear(5, 4)), nn.ReLU(), nn.Linear(4, 2)))
    report = psiopt.mark_scale_invariant(model, _vec())
    v = model[0].parametrizations.weight.original1
    assert psiopt.is_scale_invariant(v) and report.names() == ("0.parametrizations.weight.original1",)
    y = model(_vec())  # the parametrization still computes the weight from the marked v
    assert y.shape == (6, 2)
