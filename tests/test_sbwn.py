"""SBWN: the rescaling keeps the function, brings the conditioning proxy to 1, and makes
SGD on a BN network independent of the weights' scale."""

import pytest
import torch
from torch import nn

import psiopt
from psiopt.nn import MeanOnlyBatchNorm1d

DT = torch.float64
TINY_EPS = 1e-30  # BN's eps is the only thing that breaks invariance; tests of exactness remove it


def _spread_rows(model, seed):
    """Give every unit a random scale (log-normal, a factor ~e^2 either way)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                rows = torch.exp(2 * torch.randn(m.weight.shape[0], generator=gen, dtype=m.weight.dtype))
                m.weight.mul_(rows.reshape((-1,) + (1,) * (m.weight.dim() - 1)))
    return model


def _relu_mlp(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
    return _spread_rows(net, seed)


def _bn_mlp(seed=0, eps=TINY_EPS):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(5, 8),
        nn.BatchNorm1d(8, eps=eps),
        nn.ReLU(),
        nn.Linear(8, 6, bias=False),
        nn.ReLU(),  # BN after the ReLU: the scale passes the ReLU, then BN absorbs it
        nn.BatchNorm1d(6, eps=eps),
        nn.Linear(6, 3),
    ).to(DT)
    return _spread_rows(net, seed)


def _bn_cnn(seed=0, eps=TINY_EPS):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6, eps=eps),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 5),
        nn.ReLU(),
        nn.Linear(5, 2),
    ).to(DT)
    return _spread_rows(net, seed)


@pytest.mark.parametrize("make, shape", [(_relu_mlp, (20, 5)), (_bn_mlp, (20, 5)), (_bn_cnn, (8, 3, 8, 8))])
def test_step_keeps_the_function_in_train_and_eval(make, shape):
    net = make()
    x = torch.randn(*shape, dtype=DT)
    for _ in range(3):  # running statistics worth keeping consistent
        net(torch.randn(*shape, dtype=DT))
    sbwn = psiopt.SBWN(net)
    net.train()
    # (this train-mode pass updates the running statistics once more; the eval pass below uses them)
    train_before = net(x).detach()
    net.eval()
    eval_before = net(x).detach()
    assert sbwn.conditioning() > 10.0
    sbwn.step()
    torch.testing.assert_close(net(x).detach(), eval_before, rtol=1e-10, atol=1e-12)
    net.train()
    torch.testing.assert_close(net(x).detach(), train_before, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [_relu_mlp, _bn_mlp, _bn_cnn])
def test_conditioning_proxy_goes_to_one_and_step_is_a_projection(make):
    net = make(seed=2)
    sbwn = psiopt.SBWN(net)
    assert sbwn.conditioning() > 10.0
    sbwn.step()
    assert sbwn.conditioning() == pytest.approx(1.0, abs=1e-12)
    for layer in sbwn.rescalable():
        norms = layer.weight.detach().reshape(layer.units, -1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-12)
    state = [t.clone() for t in net.state_dict().values()]
    sbwn.step()
    for a, b in zip(net.state_dict().values(), state):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def test_output_layer_without_bn_keeps_its_scale_and_one_with_bn_is_normalized():
    net = _relu_mlp(seed=3)
    assert [layer.name for layer in psiopt.SBWN(net).rescalable()] == ["0", "2"]
    torch.manual_seed(3)
    with_bn = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    assert [layer.name for layer in psiopt.SBWN(with_bn).rescalable()] == ["0", "2"]
    ends_in_tanh_bn = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Tanh(), nn.BatchNorm1d(2))
    assert [layer.name for layer in psiopt.SBWN(ends_in_tanh_bn).rescalable()] == ["0"]


def test_mean_only_bn_between_layers():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 6), MeanOnlyBatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).to(DT)
    _spread_rows(net, 4)
    with torch.no_grad():
        net[1].bias.normal_()
    x = torch.randn(30, 4, dtype=DT)
    before = net(x).detach()
    net.eval()
    eval_before = net(x).detach()
    psiopt.SBWN(net).step()
    torch.testing.assert_close(net(x).detach(), eval_before, rtol=1e-10, atol=1e-12)
    net.train()
    torch.testing.assert_close(net(x).detach(), before, rtol=1e-10, atol=1e-12)


def _scale_invariant_copy(net, seed):
    """The same BN network with every BN-followed unit multiplied by a random positive factor:
    an equivalent network (in training mode)."""
    other = _bn_mlp(seed=0)
    other.load_state_dict(net.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for idx in (0, 3):
            a = torch.exp(2 * torch.randn(other[idx].weight.shape[0], generator=gen, dtype=DT))
            other[idx].weight.mul_(a[:, None])
            if other[idx].bias is not None:
                other[idx].bias.mul_(a)
    return other


def _train(net, batches, sbwn: bool):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    rescale = psiopt.SBWN(net, opt) if sbwn else None
    if rescale:
        rescale.step()
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if rescale:
            rescale.step()
    return net


def test_sgd_with_sbwn_gives_the_same_iterates_from_equivalent_starts():
    torch.manual_seed(5)
    batches = [(torch.randn(32, 5, dtype=DT), torch.randint(0, 3, (32,))) for _ in range(15)]
    net = _bn_mlp(seed=5)
    twin = _scale_invariant_copy(net, seed=6)
    x0 = batches[0][0]
    torch.testing.assert_close(twin(x0), net(x0), rtol=1e-9, atol=1e-9)  # equivalent start

    def directions(model):
        return [model[i].weight.detach() / model[i].weight.detach().norm(dim=1, keepdim=True) for i in (0, 3)]

    plain_a, plain_b = _train(_bn_mlp(seed=5), batches, False), _train(_scale_invariant_copy(_bn_mlp(seed=5), 6), batches, False)
    gap_plain = max(float((a - b).abs().max()) for a, b in zip(directions(plain_a), directions(plain_b)))
    assert gap_plain > 1e-3  # plain SGD depends on the arbitrary scale

    a, b = _train(net, batches, True), _train(twin, batches, True)
    for wa, wb in zip(directions(a), directions(b)):
        torch.testing.assert_close(wa, wb, rtol=0, atol=1e-8)
    torch.testing.assert_close(a[6].weight, b[6].weight, rtol=0, atol=1e-8)


def test_momentum_buffer_follows_the_gradient_with_bn():
    net = _bn_mlp(seed=7)
    x, y = torch.randn(24, 5, dtype=DT), torch.randn(24, 3, dtype=DT)
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)

    def loss():
        return ((net(x) - y) ** 2).mean()

    loss().backward()
    opt.step()  # lr 0: buffer = gradient
    psiopt.SBWN(net, opt).step()
    opt.zero_grad()
    loss().backward()
    for p in net.parameters():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], p.grad, rtol=1e-8, atol=1e-12)


def test_unsupported_models_are_refused():
    with pytest.raises(TypeError, match="GELU"):
        psiopt.SBWN(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)))
    with pytest.raises(TypeError, match="nn.Sequential"):
        psiopt.SBWN(nn.Linear(3, 4))


class _ResBlock(nn.Module):
    def __init__(self, c, eps):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c, eps=eps)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c, eps=eps)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def _resnet(seed=0, eps=TINY_EPS):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),  # GroupNorm mixes channels: no bias
        nn.GroupNorm(2, 4, eps=eps),
        nn.ReLU(),
        _ResBlock(4, eps),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).to(DT)
    return _spread_rows(net, seed)


def test_graph_models_need_example_inputs():
    with pytest.raises(TypeError, match="example_inputs"):
        psiopt.SBWN(_resnet())


def test_graph_model_with_example_inputs_keeps_function_and_normalizes_invariant_weights():
    net = _resnet(seed=8)
    x = torch.randn(6, 3, 6, 6, dtype=DT)
    for _ in range(2):
        net(torch.randn(6, 3, 6, 6, dtype=DT))
    sbwn = psiopt.SBWN(net, example_inputs=(x,))
    assert sorted(e.name for e in sbwn.normalized) == ["0.weight", "3.conv1.weight", "3.conv2.weight"]
    train_before = net(x).detach()
    net.eval()
    eval_before = net(x).detach()
    assert sbwn.conditioning() > 10.0
    sbwn.step()
    assert sbwn.conditioning() == pytest.approx(1.0, abs=1e-12)
    # the GroupNorm(2, 4) weight is normalized per block of 2 output channels
    blocks = net[0].weight.detach().reshape(2, -1).norm(dim=1)
    torch.testing.assert_close(blocks, torch.ones(2, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(net(x).detach(), eval_before, rtol=1e-10, atol=1e-12)
    net.train()
    torch.testing.assert_close(net(x).detach(), train_before, rtol=1e-10, atol=1e-12)


def test_graph_model_momentum_buffer_follows_the_gradient():
    net = _resnet(seed=9)
    x, y = torch.randn(6, 3, 6, 6, dtype=DT), torch.randn(6, 3, dtype=DT)
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)

    def loss():
        return ((net(x) - y) ** 2).mean()

    loss().backward()
    opt.step()
    psiopt.SBWN(net, opt, example_inputs=(x,)).step()
    opt.zero_grad()
    loss().backward()
    for p in net.parameters():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], p.grad, rtol=1e-8, atol=1e-12)


def test_weight_norm_directions_are_normalized_with_example_inputs():
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(10)
    net = nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.Tanh(), weight_norm(nn.Linear(5, 2))).to(DT)
    with torch.no_grad():
        net[0].parametrizations.weight.original1.mul_(7.0)
    x = torch.randn(8, 4, dtype=DT)
    before = net(x).detach()
    sbwn = psiopt.SBWN(net, example_inputs=(x,))
    sbwn.step()
    v = net[0].parametrizations.weight.original1.detach()
    torch.testing.assert_close(v.norm(dim=1), torch.ones(5, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(net(x).detach(), before, rtol=1e-12, atol=1e-12)


def test_example_inputs_without_invariant_weights_is_an_error():
    net = _relu_mlp()
    with pytest.raises(ValueError, match="no scale-invariant weight"):
        psiopt.SBWN(net, example_inputs=(torch.randn(8, 5, dtype=DT),))


def test_docstring_examples_run():
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("psiopt.baselines.sbwn"), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
