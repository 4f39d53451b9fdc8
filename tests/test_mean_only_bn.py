"""Mean-only batch normalization against hand computations."""

import pytest
import torch
from torch import nn

from psiopt.nn import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d

DT = torch.float64


def test_1d_train_and_eval_match_hand_computation():
    torch.manual_seed(0)
    bn = MeanOnlyBatchNorm1d(3, momentum=0.2).to(DT)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x1 = torch.randn(10, 3, dtype=DT) * 4 + 3
    x2 = torch.randn(6, 3, dtype=DT) - 1
    y1 = bn(x1)
    torch.testing.assert_close(y1, x1 - x1.mean(0) + bn.bias)
    torch.testing.assert_close(bn.running_mean, 0.2 * x1.mean(0))
    bn(x2)
    expected_running = 0.8 * (0.2 * x1.mean(0)) + 0.2 * x2.mean(0)
    torch.testing.assert_close(bn.running_mean, expected_running)
    assert int(bn.num_batches_tracked) == 2
    # no division by the standard deviation: the spread is kept
    torch.testing.assert_close(y1.std(0), x1.std(0))
    bn.eval()
    x3 = torch.randn(4, 3, dtype=DT)
    torch.testing.assert_close(bn(x3), x3 - expected_running + bn.bias)
    torch.testing.assert_close(bn.running_mean, expected_running)  # eval does not update


def test_1d_sequence_input_averages_over_batch_and_length():
    torch.manual_seed(1)
    bn = MeanOnlyBatchNorm1d(4, bias=False).to(DT)
    x = torch.randn(5, 4, 7, dtype=DT) + 2
    y = bn(x)
    torch.testing.assert_close(y, x - x.mean(dim=(0, 2), keepdim=True))
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(dim=(0, 2)))


def test_2d_train_and_eval_match_hand_computation():
    torch.manual_seed(2)
    bn = MeanOnlyBatchNorm2d(3).to(DT)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(4, 3, 5, 6, dtype=DT) * 2 + 1
    mean = x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn(x), x - mean.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1))
    torch.testing.assert_close(bn.running_mean, 0.1 * mean)
    bn.eval()
    torch.testing.assert_close(bn(x), x - 0.1 * mean.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1))


def test_cumulative_average_when_momentum_is_none():
    bn = MeanOnlyBatchNorm1d(2, momentum=None).to(DT)
    batches = [torch.randn(8, 2, dtype=DT) + i for i in range(3)]
    for b in batches:
        bn(b)
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))


def test_gradient_flows_through_the_batch_mean():
    torch.manual_seed(3)
    bn = MeanOnlyBatchNorm1d(3).to(DT)
    x = torch.randn(6, 3, dtype=DT, requires_grad=True)
    c = torch.randn(6, 3, dtype=DT)
    (bn(x) * c).sum().backward()
    torch.testing.assert_close(x.grad, c - c.mean(0))
    torch.testing.assert_close(bn.bias.grad, c.sum(0))


def test_matches_batchnorm_mean_path():
    """With a unit-variance input rescaled away, mean-only BN equals BN without the division."""
    torch.manual_seed(4)
    x = torch.randn(16, 3, 4, 4, dtype=DT)
    mo = MeanOnlyBatchNorm2d(3, bias=False).to(DT)
    bn = nn.BatchNorm2d(3, affine=False, eps=1e-30).to(DT)
    std = x.std(dim=(0, 2, 3), correction=0).view(1, 3, 1, 1)
    torch.testing.assert_close(mo(x) / std, bn(x))
    torch.testing.assert_close(mo.running_mean, bn.running_mean)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="expects a"):
        MeanOnlyBatchNorm1d(3)(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="got 4 channels"):
        MeanOnlyBatchNorm2d(3)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="momentum"):
        MeanOnlyBatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="num_features"):
        MeanOnlyBatchNorm2d(0)


def test_reset_and_state_dict():
    bn = MeanOnlyBatchNorm1d(2)
    bn(torch.randn(4, 2) + 3)
    state = bn.state_dict()
    assert set(state) == {"bias", "running_mean", "num_batches_tracked"}
    other = MeanOnlyBatchNorm1d(2)
    other.load_state_dict(state)
    torch.testing.assert_close(other.running_mean, bn.running_mean)
    bn.reset_parameters()
    assert float(bn.running_mean.abs().sum()) == 0.0 and int(bn.num_batches_tracked) == 0


def test_docstring_examples_run():
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("psiopt.baselines.mean_only_bn"), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
