"""The benchmark model zoo builds, runs, and has the structure the tests rely on."""

import pytest
import torch
from torch import nn

from psiopt.bench import models


@pytest.mark.parametrize(
    "build, x, n_out",
    [
        (lambda: models.mlp_bn(12, hidden=(16, 8), num_classes=5), torch.randn(4, 12), 5),
        (lambda: models.cnn_bn(3, 7, width=4), torch.randn(2, 3, 16, 16), 7),
        (lambda: models.resnet18(num_classes=10, width=4), torch.randn(2, 3, 16, 16), 10),
        (lambda: models.small_resnet(num_classes=3, in_channels=1, width=4), torch.randn(2, 1, 12, 12), 3),
        (lambda: models.vgg16_bn(num_classes=4, width_multiplier=1 / 16), torch.randn(2, 3, 32, 32), 4),
        (lambda: models.vit_ln(image_size=8, patch_size=4, in_channels=3, dim=8, num_classes=6), torch.randn(2, 3, 8, 8), 6),
    ],
)
def test_model_builds_and_gives_logits(build, x, n_out):
    torch.manual_seed(0)
    model = build()
    assert model(x).shape == (x.shape[0], n_out)


def test_resnet18_structure():
    model = models.resnet18(width=4)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    assert sum("downsample" in n for n in convs) == 3
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model.fc.bias is not None


def test_vgg16_has_13_convs_and_widths_scale():
    model = models.vgg16_bn(width_multiplier=0.25)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert [c.out_channels for c in convs][:2] == [16, 16] and convs[-1].out_channels == 128


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_sizes_raise(bad):
    with pytest.raises(ValueError):
        models.mlp_bn(bad)
    with pytest.raises(ValueError):
        models.cnn_bn(width=bad)


def test_resnet50_has_torchvision_shapes():
    with torch.device("meta"):
        model = models.resnet50()
    # torchvision.models.resnet50() has 25,557,032 parameters
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53 and sum("downsample" in n for n, _ in convs) == 4
    assert convs[0][1].kernel_size == (7, 7) and convs[0][1].stride == (2, 2)
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # ResNet v1.5
    assert model.fc.in_features == 2048
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 53 and all(m.bias is None for _, m in convs)


def test_narrow_resnet50_runs():
    torch.manual_seed(0)
    model = models.resnet50(num_classes=6, width=2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 6)
    with pytest.raises(ValueError, match="stem must be"):
        models.ResNet((1,), stem="vgg")


def test_build_by_name():
    model = models.build("cnn_bn", {"in_channels": 1, "width": 2}, num_classes=4)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    with pytest.raises(ValueError, match="unknown model 'ResNet'; the zoo's builders are mlp_bn, cnn_bn"):
        models.build("ResNet", {})


def test_vit_ln_refuses_shapes_that_do_not_divide():
    with pytest.raises(ValueError, match="patch_size 3 must divide image_size 8"):
        models.vit_ln(image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="dim 10 must be a multiple of heads 4"):
        models.vit_ln(dim=10, heads=4)
    with pytest.raises(ValueError):
        models.vit_ln(depth=0)


def test_language_model_is_causal():
    torch.manual_seed(0)
    model = models.qknorm_lm(context=16, dim=16, depth=2, heads=4).double()
    tokens = torch.randint(0, 256, (3, 16))
    out = model(tokens)
    assert out.shape == (3, 16, 256)
    for t in (0, 7, 14):
        changed = tokens.clone()
        changed[:, t + 1 :] = torch.randint(0, 256, (3, 15 - t))
        again = model(changed)
        torch.testing.assert_close(again[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-12)  # the past is untouched
        assert not torch.allclose(again[:, t + 1 :], out[:, t + 1 :])  # and the future does move
    assert model(tokens[:, :5]).shape == (3, 5, 256)  # shorter sequences than the context


def test_language_model_q_and_k_head_blocks_are_scale_invariant():
    torch.manual_seed(0)
    model = models.qknorm_lm(context=8, dim=16, depth=2, heads=4).double()
    tokens = torch.randint(0, 256, (4, 8))
    before = model(tokens)
    attn = model.blocks[1].attn
    factors = torch.tensor([1e-3, 0.5, 7.0, 1e3], dtype=torch.float64)  # one per head
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, model.blocks[0].attn.q_proj):
            proj.weight.mul_(factors.repeat_interleave(attn.head_dim)[:, None])
    torch.testing.assert_close(model(tokens), before, rtol=1e-9, atol=1e-9)
    # a value projection is not: the same rescaling changes the output
    with torch.no_grad():
        attn.v_proj.weight.mul_(factors.repeat_interleave(attn.head_dim)[:, None])
    assert not torch.allclose(model(tokens), before, atol=1e-3)


def test_language_model_refuses_bad_sizes():
    with pytest.raises(ValueError, match="multiple of heads"):
        models.qknorm_lm(dim=10, heads=4)
    with pytest.raises(ValueError, match="context"):
        models.qknorm_lm(context=0)
    assert sum(p.numel() for p in models.build("qknorm_lm", {"dim": 8, "heads": 2}, 256).parameters()) > 0
