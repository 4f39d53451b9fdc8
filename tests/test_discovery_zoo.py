"""Discovery on a model zoo written the way timm writes its modules (no timm needed).

For every model, the weights and groupings that discovery finds must equal a brute-force
ground truth, computed in float64 on a copy of the model with every normalization's eps
set to (almost) 0 and every gain that can hide a branch set to a healthy value (layer
scales to 1, zero-initialized norm weights to random positive values): a weight is
invariant with the finest grouping whose groups, each scaled by its own random factor,
leave the model's output unchanged (``_ground_truth.py``). Discovery runs on the real model (eps, LayerScale
1e-6, zero-initialized last BatchNorms) in float32, bfloat16 and float16, seeing it
with torch.fx ("auto") and with a recorded forward pass ("hooks").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _ground_truth import ground_truth
from torch import nn

import psiopt
from psiopt import Grouping

# -- timm-style modules ---------------------------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's fused BatchNorm + activation: a BatchNorm2d subclass calling F.batch_norm itself."""

    def __init__(self, num_features: int, act: bool = True, eps: float = 1e-5):
        super().__init__(num_features, eps=eps)
        self.drop = nn.Identity()
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


class GroupNorm(nn.GroupNorm):
    """timm's GroupNorm: torch's, with its own forward."""

    def __init__(self, num_channels: int, num_groups: int = 4, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GroupNorm1(nn.GroupNorm):
    """timm's GroupNorm1: one group over all channels."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(1, num_channels, eps=eps)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GroupNormAct(nn.GroupNorm):
    """timm's fused GroupNorm + activation."""

    def __init__(self, num_channels: int, num_groups: int = 2, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm over the channels of an NCHW map: permute, normalize, permute back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_expand(self.act1(self.conv_reduce(x_se)))
        return x * self.gate(x_se)


class InvertedResidual(nn.Module):
    """EfficientNet's MBConv: expand, depthwise, squeeze-excite, project, skip."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 2):
        super().__init__()
        mid = cin * expand
        self.has_skip = cin == cout and stride == 1
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, padding=1, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid)
        self.se = SqueezeExcite(mid, max(4, cin // 4))
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = BatchNormAct2d(cout, act=False)

    def forward(self, x):
        shortcut = x
        x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        x = self.bn3(self.conv_pwl(self.se(x)))
        return x + shortcut if self.has_skip else x


class EfficientNet(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1), InvertedResidual(8, 12, 2))
        self.conv_head = nn.Conv2d(12, 16, 1, bias=False)
        self.bn2 = BatchNormAct2d(16)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(x.mean((2, 3)))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, norm):
        super().__init__()
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = norm(cout)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        x += shortcut
        return self.act3(x)


class ResNet(nn.Module):
    """timm's ResNet layout with Bottleneck blocks; ``zero_init_residual`` zeroes each block's last norm weight."""

    def __init__(self, norm=nn.BatchNorm2d, zero_init_residual: bool = True, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, padding=1, bias=False)
        self.bn1 = norm(8)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = nn.Sequential(Bottleneck(8, 4, 1, norm), Bottleneck(16, 4, 1, norm))
        self.layer2 = nn.Sequential(Bottleneck(16, 8, 2, norm))
        self.fc = nn.Linear(32, num_classes)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean((2, 3)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    """timm's Mlp (Linear, or 1x1 conv for ``use_conv``)."""

    def __init__(self, dim: int, hidden: int, use_conv: bool = False):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if use_conv else nn.Linear
        self.fc1 = layer(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = layer(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, conv_mlp: bool, conv_bias: bool, ls_init_value: float = 1e-6):
        super().__init__()
        self.use_conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=conv_bias)
        self.norm = LayerNorm2d(dim) if conv_mlp else nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, use_conv=conv_mlp)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = x.permute(0, 2, 3, 1)
            x = self.mlp(self.norm(x))
            x = x.permute(0, 3, 1, 2)
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return x + shortcut


class ConvNeXt(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), LayerNorm2d(8))
        self.stage1 = ConvNeXtBlock(8, conv_mlp=False, conv_bias=False)
        self.downsample = nn.Sequential(LayerNorm2d(8), nn.Conv2d(8, 12, 2, stride=2))
        self.stage2 = ConvNeXtBlock(12, conv_mlp=True, conv_bias=True)
        self.stage3 = ConvNeXtBlock(12, conv_mlp=True, conv_bias=False)
        self.head_norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.downsample(self.stage1(self.stem(x)))))
        return self.head(self.head_norm(x.mean((2, 3))))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 2, qk_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class VitBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.ls1 = LayerScale(dim, 1e-5)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)
        self.ls2 = LayerScale(dim, 1e-5)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class VisionTransformer(nn.Module):
    def __init__(self, dim: int = 8, num_classes: int = 3):
        super().__init__()
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(VitBlock(dim), VitBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def _resnet_gn():
    return ResNet(norm=GroupNorm)


def _resnet_gn1_act():
    def norm(c):
        return GroupNormAct(c) if c % 2 == 0 and c < 16 else GroupNorm1(c)

    return ResNet(norm=norm)


ZOO = {
    "efficientnet": EfficientNet,
    "resnet_zero_init": ResNet,
    "resnet_groupnorm": _resnet_gn,
    "resnet_groupnorm1_act": _resnet_gn1_act,
    "convnext": ConvNeXt,
    "vit": VisionTransformer,
}
_SMALL_GAINS = ("gamma",)  # LayerScale parameters


def _build(name: str) -> nn.Module:
    """A zoo model as training leaves it: biases and norm affine parameters away from their
    init (a zero bias would make a biased layer look invariant), zero-init and LayerScale
    gains kept."""
    torch.manual_seed(0)
    model = ZOO[name]()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.uniform_(-0.5, 0.5)
            elif p.dim() == 1 and not pname.endswith(_SMALL_GAINS) and bool((p != 0).all()):
                p.uniform_(0.5, 1.5)
    return model


def _inputs() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def truths() -> dict[str, dict[str, Grouping]]:
    return {name: ground_truth(_build(name), _inputs(), unit_gains=_SMALL_GAINS) for name in ZOO}


def test_the_ground_truth_sees_what_timm_models_hold(truths):
    # The zoo is worth testing: fused norms, depthwise convs, LayerNorm over channels,
    # GroupNorm blocks and a ViT patch embedding are invariant; SE, biased and attention layers not.
    eff, convnext, vit = truths["efficientnet"], truths["convnext"], truths["vit"]
    assert len(eff) == 8 and not any(".se." in n for n in eff)
    assert eff["blocks.1.conv_dw.weight"] == Grouping.per_channel()
    assert convnext == {"stage1.conv_dw.weight": Grouping.whole(), "stage3.conv_dw.weight": Grouping.whole()}
    assert vit == {"patch_embed.proj.weight": Grouping.whole()}
    assert truths["resnet_groupnorm"]["layer1.0.conv3.weight"] == Grouping.blocks(4)
    assert truths["resnet_groupnorm1_act"]["layer2.0.conv3.weight"] == Grouping.whole()
    assert len(truths["resnet_zero_init"]) == 12


@pytest.mark.parametrize("structure", ["auto", "hooks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(ZOO))
def test_discovery_matches_the_ground_truth(truths, name, dtype, structure):
    model = _build(name).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = psiopt.find_scale_invariant(model, _inputs().to(dtype), structure=structure)
    found = {w.name: w.grouping for w in report}
    assert found == truths[name], str(report)
    if structure == "auto":
        assert report.method == "fx"
    assert all(torch.equal(v, before[k]) and v.dtype == dtype for k, v in model.state_dict().items() if v.is_floating_point())
    if dtype != torch.float32:
        assert report.dtype == torch.float32 and "float32 copy" in " ".join(report.notes)


def test_fused_norms_are_named_by_their_module():
    report = psiopt.find_scale_invariant(_build("efficientnet"), _inputs())
    rec = report.get("blocks.0.conv_dw.weight")
    assert rec.norm_layer == "blocks.0.bn2" and rec.norm_type == "BatchNormAct2d" and rec.eps == 1e-5
    assert rec.eps_sensitivity is not None and rec.eps_sensitivity[0] > rec.eps_sensitivity[1]
    convnext = psiopt.find_scale_invariant(_build("convnext"), _inputs())
    assert convnext.get("stage3.conv_dw.weight").norm_type == "LayerNorm2d"
    assert convnext.get("stage1.conv_dw.weight").path == ("permute",)


def test_a_small_gain_after_the_norm_hides_nothing_from_the_proof():
    # LayerScale 1e-6 after the branch: the model's output barely moves whatever conv_dw does,
    # but the LayerNorm's own output shows that per-channel scaling is not invariant.
    model = _build("convnext")
    per_channel = psiopt.find_scale_invariant(model, _inputs(), candidates={"stage3.conv_dw.weight": "channel"})
    assert len(per_channel) == 0 and "LayerNorm2d 'stage3.norm'" in per_channel.rejected[0].reason
    whole = psiopt.find_scale_invariant(model, _inputs(), candidates={"stage3.conv_dw.weight": "tensor"})
    assert whole.names() == ("stage3.conv_dw.weight",)
    # The biased conv_dw is rejected in both groupings.
    biased = psiopt.find_scale_invariant(model, _inputs(), candidates={"stage2.conv_dw.weight": "tensor"})
    assert len(biased) == 0


def test_a_zero_initialized_norm_hides_nothing_from_the_proof():
    # conv3 -> Tanh -> bn3 with bn3.weight = 0: the block's branch is exactly 0 at the output,
    # yet rescaling conv3 changes what bn3 normalizes, and the proof sees it there.
    model = _build("resnet_zero_init")
    block = model.layer1[0]
    conv3 = block.conv3
    block.conv3 = nn.Sequential(conv3, nn.Tanh())
    name = "layer1.0.conv3.0.weight"
    report = psiopt.find_scale_invariant(model, _inputs(), candidates={name: "channel"})
    assert len(report) == 0 and "BatchNorm2d 'layer1.0.bn3'" in report.rejected[0].reason
    found = psiopt.find_scale_invariant(model, _inputs())
    assert name in found.rejected_names() and "Tanh" in dict(zip(found.rejected_names(), [r.reason for r in found.rejected]))[name]


def test_rounding_deep_in_a_float32_network_does_not_fake_a_failure():
    # 48 conv+BN layers: rescaling the first conv by arbitrary factors would change the last
    # BN's float32 rounding by more than the tolerance; powers of two change nothing.
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
    for _ in range(47):
        layers += [nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 16 * 16, 2))
    report = psiopt.find_scale_invariant(model, _inputs())
    assert len(report) == 48 and report.rejected_names() == ("145.weight",)
    assert max(w.proof_deviation for w in report) == 0.0


def test_factors_are_powers_of_two_covering_the_range():
    from psiopt.discovery.proof import group_factors

    factors = group_factors(50, 0.1, 10.0, torch.Generator().manual_seed(0))
    exponents = torch.log2(factors)
    assert torch.equal(exponents, exponents.round()) and exponents.min() == -4 and exponents.max() == 4


def test_thread_count_is_put_back():
    threads = torch.get_num_threads()
    psiopt.find_scale_invariant(_build("efficientnet"), _inputs())
    assert torch.get_num_threads() == threads


class _FunctionalNorms(nn.Module):
    """Normalizations called in the model's own forward, not through a norm module."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.conv2 = nn.Conv2d(8, 6, 3, bias=False)
        self.head = nn.Linear(6, 2)
        self.eps = 1e-6

    def forward(self, x):
        x = F.relu(F.group_norm(self.conv1(x), 4, eps=self.eps))
        x = self.conv2(x).permute(0, 2, 3, 1)
        x = F.layer_norm(x, (6,), eps=self.eps)
        return self.head(x.mean((1, 2)))


@pytest.mark.parametrize("structure", ["auto", "hooks"])
def test_functional_norms_in_the_models_forward(structure):
    model = _FunctionalNorms()
    report = psiopt.find_scale_invariant(model, _inputs(), structure=structure)
    assert {w.name: w.grouping for w in report} == ground_truth(model, _inputs(), unit_gains=_SMALL_GAINS)
    assert report.get("conv1.weight").grouping == Grouping.blocks(2)
    assert report.get("conv2.weight").grouping == Grouping.whole()
    assert report.get("conv2.weight").norm_type == "F.layer_norm" and report.get("conv2.weight").eps == 1e-6
