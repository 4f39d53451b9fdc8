"""Weight normalization: psiopt.nn.data_dependent_init_ and the reparameterization's gradients."""

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import psiopt
from psiopt.nn import data_dependent_init_

DT = torch.float64


def _wn_layers(model):
    return [m for m in model.modules() if hasattr(m, "parametrizations")]


def _layer_outputs(model, x):
    """Each weight-normed layer's output on ``x`` (a fresh forward pass, no init hooks)."""
    outs = []
    handles = [m.register_forward_hook(lambda m, i, o: outs.append(o.detach())) for m in _wn_layers(model)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs


def _mlp(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(
        weight_norm(nn.Linear(6, 10, bias=bias)),
        nn.ReLU(),
        weight_norm(nn.Linear(10, 8, bias=bias)),
        nn.ReLU(),
        weight_norm(nn.Linear(8, 3, bias=bias)),
    ).to(DT)


def test_linear_preactivations_are_standardized_layer_by_layer():
    model = _mlp()
    x = torch.randn(300, 6, dtype=DT) * 3 + 1
    # before: far from standardized (so the test below is not vacuous)
    first = _layer_outputs(model, x)
    assert max(float((o.std(0, correction=0) - 1).abs().max()) for o in first) > 0.1
    data_dependent_init_(model, x)
    for out in _layer_outputs(model, x):
        torch.testing.assert_close(out.mean(0), torch.zeros(out.shape[1], dtype=DT), atol=1e-10, rtol=0)
        torch.testing.assert_close(out.std(0, correction=0), torch.ones(out.shape[1], dtype=DT), atol=1e-10, rtol=0)


def test_conv_preactivations_are_standardized_per_channel():
    torch.manual_seed(1)
    model = nn.Sequential(
        weight_norm(nn.Conv2d(3, 5, 3, padding=1)),
        nn.ReLU(),
        nn.MaxPool2d(2),
        weight_norm(nn.Conv2d(5, 4, 3)),
        nn.ReLU(),
        nn.Flatten(),
        weight_norm(nn.Linear(4 * 2 * 2, 3)),
    ).to(DT)
    x = torch.randn(40, 3, 8, 8, dtype=DT) + 0.5
    data_dependent_init_(model, x)
    outs = _layer_outputs(model, x)
    for out in outs[:2]:
        dims = (0, 2, 3)
        torch.testing.assert_close(out.mean(dims), torch.zeros(out.shape[1], dtype=DT), atol=1e-10, rtol=0)
        torch.testing.assert_close(out.std(dims, correction=0), torch.ones(out.shape[1], dtype=DT), atol=1e-10, rtol=0)
    torch.testing.assert_close(outs[2].std(0, correction=0), torch.ones(3, dtype=DT), atol=1e-10, rtol=0)


def test_linear_on_sequence_input_uses_all_leading_dims():
    torch.manual_seed(2)
    layer = weight_norm(nn.Linear(4, 5)).to(DT)
    x = torch.randn(7, 9, 4, dtype=DT)
    data_dependent_init_(layer, x)
    with torch.no_grad():
        out = layer(x).reshape(-1, 5)
    torch.testing.assert_close(out.mean(0), torch.zeros(5, dtype=DT), atol=1e-10, rtol=0)
    torch.testing.assert_close(out.std(0, correction=0), torch.ones(5, dtype=DT), atol=1e-10, rtol=0)


def test_layer_without_bias_gets_only_g():
    model = _mlp(bias=False)
    x = torch.randn(200, 6, dtype=DT) + 2.0
    data_dependent_init_(model, x)
    first = _layer_outputs(model, x)[0]
    torch.testing.assert_close(first.std(0, correction=0), torch.ones(10, dtype=DT), atol=1e-10, rtol=0)
    # the mean is kept (mu/sigma), not removed: there is no bias to remove it
    with torch.no_grad():
        v = model[0].parametrizations.weight.original1
        t = x @ (v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(first.mean(0), t.mean(0) / t.std(0, correction=0), atol=1e-10, rtol=0)


def test_g_and_b_follow_the_paper_formula():
    torch.manual_seed(3)
    layer = weight_norm(nn.Linear(3, 4)).to(DT)
    x = torch.randn(50, 3, dtype=DT)
    with torch.no_grad():
        v = layer.parametrizations.weight.original1.clone()
        t = x @ (v / v.norm(dim=1, keepdim=True)).T
    data_dependent_init_(layer, x)
    mu, sigma = t.mean(0), t.std(0, correction=0)
    torch.testing.assert_close(layer.parametrizations.weight.original0.detach().squeeze(1), 1 / sigma)
    torch.testing.assert_close(layer.bias.detach(), -mu / sigma)
    # v itself is untouched
    torch.testing.assert_close(layer.parametrizations.weight.original1.detach(), v)


def test_modes_and_buffers_are_restored():
    torch.manual_seed(4)
    model = nn.Sequential(weight_norm(nn.Linear(4, 6)), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), weight_norm(nn.Linear(6, 2)))
    model.eval()
    model[3].train()  # a mixed state must come back as it was
    stats = (model[1].running_mean.clone(), model[1].running_var.clone())
    data_dependent_init_(model, torch.randn(64, 4))
    assert [m.training for m in model] == [False, False, False, True, False]
    torch.testing.assert_close(model[1].running_mean, stats[0])
    torch.testing.assert_close(model[1].running_var, stats[1])


def test_no_weight_normed_layer_is_an_error():
    with pytest.raises(ValueError, match="no weight-normed layer"):
        data_dependent_init_(nn.Sequential(nn.Linear(3, 2)), torch.randn(8, 3))


def test_zero_variance_unit_is_an_error_and_changes_nothing():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    constant_batch = torch.ones(16, 6, dtype=DT)
    with pytest.raises(ValueError, match=r"layer '0'.*zero variance"):
        data_dependent_init_(model, constant_batch)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_zero_variance_in_a_later_layer_restores_earlier_layers():
    torch.manual_seed(7)
    plain = nn.Linear(10, 10)
    model = nn.Sequential(weight_norm(nn.Linear(6, 10)), nn.ReLU(), plain, weight_norm(nn.Linear(10, 3))).to(DT)
    with torch.no_grad():
        plain.weight[0].zero_()  # the plain layer's output 0 is the constant 0 ...
        plain.bias[0] = 0.0
        model[3].parametrizations.weight.original1[1].zero_()
        model[3].parametrizations.weight.original1[1, 0] = 0.5  # ... and unit 1 reads only it
    g0, b0 = model[0].parametrizations.weight.original0.clone(), model[0].bias.clone()
    with pytest.raises(ValueError, match=r"layer '3': unit\(s\) 1 have zero variance"):
        data_dependent_init_(model, torch.randn(64, 6, dtype=DT))
    # layer 0 had been initialized before the error: it is rolled back
    torch.testing.assert_close(model[0].parametrizations.weight.original0, g0)
    torch.testing.assert_close(model[0].bias, b0)


def test_layer_not_reached_is_an_error():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = weight_norm(nn.Linear(3, 2))
            self.unused = weight_norm(nn.Linear(3, 2))

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="'unused' were not called"):
        data_dependent_init_(TwoHeads(), torch.randn(8, 3))


def test_weight_norm_over_other_dim_is_refused():
    layer = weight_norm(nn.Linear(3, 4), dim=1)
    with pytest.raises(TypeError, match="dim=0"):
        data_dependent_init_(layer, torch.randn(8, 3))


@pytest.mark.parametrize("conv", [False, True])
def test_gradients_of_g_and_v_match_the_paper(conv):
    r"""grad_g L = <grad_w L, v>/||v||, grad_v L = g/||v|| (I - w w^T/||w||^2) grad_w L, row by row."""
    torch.manual_seed(5)
    if conv:
        layer = weight_norm(nn.Conv2d(3, 4, 3)).to(DT)
        x = torch.randn(5, 3, 6, 6, dtype=DT)
    else:
        layer = weight_norm(nn.Linear(5, 4)).to(DT)
        x = torch.randn(7, 5, dtype=DT)
    target = torch.randn_like(layer(x))

    def loss_of(out):
        return ((torch.tanh(out) - target) ** 2).sum()

    loss_of(layer(x)).backward()
    g = layer.parametrizations.weight.original0
    v = layer.parametrizations.weight.original1

    # grad_w L at the same w, through the plain (un-parametrized) layer
    w = layer.weight.detach().clone().requires_grad_(True)
    out = nn.functional.linear(x, w, layer.bias) if not conv else layer._conv_forward(x, w, layer.bias)
    (grad_w,) = torch.autograd.grad(loss_of(out), w)

    k = v.shape[0]
    v_rows, w_rows, gw_rows = v.detach().reshape(k, -1), w.detach().reshape(k, -1), grad_w.reshape(k, -1)
    v_norm = v_rows.norm(dim=1, keepdim=True)
    expected_g = (gw_rows * v_rows).sum(1, keepdim=True) / v_norm
    w_sq = (w_rows * w_rows).sum(1, keepdim=True)
    projected = gw_rows - (gw_rows * w_rows).sum(1, keepdim=True) / w_sq * w_rows
    expected_v = g.detach().reshape(k, 1) / v_norm * projected
    torch.testing.assert_close(g.grad.reshape(k, 1), expected_g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v.grad.reshape(k, -1), expected_v, rtol=1e-10, atol=1e-12)
    # hence v's gradient is orthogonal to v: the loss is invariant to each row's scale
    torch.testing.assert_close((v.grad.reshape(k, -1) * v_rows).sum(1), torch.zeros(k, dtype=DT), atol=1e-12, rtol=0)


def test_batch_as_tuple_and_dict():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = weight_norm(nn.Linear(3, 2))

        def forward(self, a, b):
            return self.lin(a + b)

    torch.manual_seed(6)
    a, b = torch.randn(32, 3), torch.randn(32, 3)
    for batch in [(a, b), {"a": a, "b": b}]:
        model = Pair()
        data_dependent_init_(model, batch)
        with torch.no_grad():
            out = model(a, b)
        torch.testing.assert_close(out.std(0, correction=0), torch.ones(2), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="batch must be"):
        data_dependent_init_(Pair(), 3.0)


def test_exported():
    assert psiopt.nn.data_dependent_init_ is data_dependent_init_


def test_find_scale_invariant_finds_each_direction_v_per_row():
    model = _mlp()
    x = torch.randn(32, 6, dtype=DT)
    report = psiopt.find_scale_invariant(model, x)
    names = [f"{i}.parametrizations.weight.original1" for i in (0, 2, 4)]
    assert set(report.names()) == set(names)
    for name in names:
        assert report.get(name).grouping == psiopt.Grouping("channel")
    # g and the biases are not scale invariant
    assert not any("original0" in n or n.endswith("bias") for n in report.names())


def test_psisgd_trains_v_on_the_psi_manifold():
    model = _mlp()
    x = torch.randn(128, 6, dtype=DT)
    y = torch.randint(0, 3, (128,))
    psiopt.mark_scale_invariant(model, x)
    data_dependent_init_(model, x)  # works on the marked model: it sets g and b, not v
    directions = [p for _, p in psiopt.scale_invariant_parameters(model)]
    assert len(directions) == 3
    row_norms = [v.detach().norm(dim=1).clone() for v in directions]
    opt = psiopt.PSISGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for v, before in zip(directions, row_norms):
        torch.testing.assert_close(v.detach().norm(dim=1), before, rtol=1e-12, atol=0)
    assert losses[-1] < 0.75 * losses[0]


def test_docstring_examples_run():
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("psiopt.baselines.weight_norm"), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
