"""A small zoo of batch-normalized models for the tests and the benchmarks.

torchvision has no CPU build on this project's machines, so the standard
architectures are written here. Every convolution or linear layer that feeds a
normalization layer has ``bias=False`` (BN's shift makes such a bias redundant), so
each model's scale-invariant weights are exactly its convolution / hidden linear
weights, and its classifier head is the only weight that is not scale invariant.

==================  ====================================================================
builder             architecture
==================  ====================================================================
:func:`mlp_bn`      ``Linear -> BatchNorm1d -> ReLU`` blocks, then a ``Linear`` head
:func:`cnn_bn`      VGG-style ``Conv -> BN -> ReLU`` stages with max pooling, linear head
:func:`resnet18`    CIFAR-style ResNet-18 (BasicBlocks, 1x1-conv + BN shortcuts)
:func:`resnet50`    ImageNet-style ResNet-50 (Bottleneck blocks; 25.6M parameters at width 64
                    and 1000 classes, the shapes of torchvision's ``resnet50``)
:func:`small_resnet`  a narrower, shallower ResNet of the same blocks, for CPU runs
:func:`vgg16_bn`    CIFAR-style VGG-16 with batch normalization
:func:`vit_ln`      a small Vision Transformer whose every projection feeds a LayerNorm
                    (QKV-norm and res-post-norm): scale invariant with one group per tensor
:func:`qknorm_lm`   a small causal byte-level Transformer language model with QK-norm
                    (Qwen3-style: RMSNorm over each head's queries and keys)
==================  ====================================================================

A model whose scale-invariant weights are not "every conv / linear weight but the head,
one group per output channel" (the BatchNorm models) says which they are with a
``scale_invariant_groupings()`` method: the benchmark's contract, checked against
:func:`psiopt.find_scale_invariant` by the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "build",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "mlp_bn",
    "cnn_bn",
    "resnet18",
    "resnet50",
    "small_resnet",
    "vgg16_bn",
    "PostNormViT",
    "vit_ln",
    "QKNormLM",
    "qknorm_lm",
]


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def mlp_bn(in_features: int, hidden: Sequence[int] = (256, 256), num_classes: int = 10) -> nn.Sequential:
    """A multilayer perceptron with batch normalization after every hidden layer.

    Parameters
    ----------
    in_features : int
        Size of one (flat) input sample; inputs of shape ``(N, in_features)``.
    hidden : sequence of int, default (256, 256)
        Width of each hidden ``Linear(bias=False) -> BatchNorm1d -> ReLU`` block.
    num_classes : int, default 10
        Output size of the final ``Linear`` head (which keeps its bias).

    Returns
    -------
    torch.nn.Sequential
        Maps ``(N, in_features)`` to logits ``(N, num_classes)``.
    """
    _check_positive("in_features", in_features)
    _check_positive("num_classes", num_classes)
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        _check_positive("each hidden width", h)
        layers += [nn.Linear(width, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


def _vgg(config: Sequence[int | str], in_channels: int, num_classes: int) -> nn.Sequential:
    """VGG body from a config of widths and ``"M"`` (2x2 max pooling), then a linear head.

    A global average pool before the head makes the model work for any input size
    that survives the pooling stages.
    """
    layers: list[nn.Module] = []
    channels = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(item, int)
            layers += _conv_bn_relu(channels, item)
            channels = item
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def cnn_bn(in_channels: int = 3, num_classes: int = 10, width: int = 32) -> nn.Sequential:
    """A small VGG-style CNN: three stages of ``Conv3x3 -> BN -> ReLU`` and max pooling.

    Parameters
    ----------
    in_channels : int, default 3
        Channels of the input images ``(N, in_channels, H, W)``; ``H, W >= 4``.
    num_classes : int, default 10
        Output size of the linear head.
    width : int, default 32
        Channels of the first stage; the stages have ``width, 2*width, 4*width``.

    Returns
    -------
    torch.nn.Sequential
        Maps ``(N, in_channels, H, W)`` to logits ``(N, num_classes)``.
    """
    _check_positive("in_channels", in_channels)
    _check_positive("num_classes", num_classes)
    _check_positive("width", width)
    config: list[int | str] = [width, "M", 2 * width, "M", 4 * width, 4 * width]
    return _vgg(config, in_channels, num_classes)


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_bn(num_classes: int = 10, width_multiplier: float = 1.0, in_channels: int = 3) -> nn.Sequential:
    """CIFAR-style VGG-16 with batch normalization (13 conv layers, 5 max pools, linear head).

    Parameters
    ----------
    num_classes : int, default 10
        Output size of the linear head.
    width_multiplier : float, default 1.0
        Scales every conv width (``64 .. 512`` at 1.0); each width stays at least 1.
    in_channels : int, default 3
        Channels of the input images; inputs must be at least 32x32 (five 2x2 pools).

    Returns
    -------
    torch.nn.Sequential
        Maps ``(N, in_channels, H, W)`` to logits ``(N, num_classes)``.
    """
    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    if not (isinstance(width_multiplier, (int, float)) and width_multiplier > 0):
        raise ValueError(f"width_multiplier must be a positive number, got {width_multiplier!r}")
    config = [c if c == "M" else max(1, round(int(c) * width_multiplier)) for c in _VGG16]
    return _vgg(config, in_channels, num_classes)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The ``Conv1x1(stride) -> BN`` shortcut of a block that changes resolution or width."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """The ResNet basic block: two ``Conv3x3 -> BN`` layers and a residual shortcut.

    When the block changes resolution or width, the shortcut is a
    ``Conv1x1(stride) -> BN`` *downsample* branch; otherwise it is the identity.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels in and out of the block (``out_channels = planes * expansion`` with
        ``expansion = 1``).
    stride : int, default 1
        Stride of the first convolution (and of the downsample branch).
    """

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """The ResNet-50 bottleneck block: ``Conv1x1 -> BN``, ``Conv3x3(stride) -> BN``,
    ``Conv1x1 -> BN`` (``expansion = 4`` times wider), and a residual shortcut.

    The stride sits on the 3x3 convolution, as in torchvision's ``resnet50`` (ResNet
    v1.5); the shortcut is a ``Conv1x1(stride) -> BN`` branch when the block changes
    resolution or width.

    Parameters
    ----------
    in_channels : int
        Channels into the block.
    planes : int
        Channels of the inner 1x1 and 3x3 convolutions; the block outputs
        ``planes * 4``.
    stride : int, default 1
        Stride of the 3x3 convolution (and of the downsample branch).
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet: a stem, stages of residual blocks, global average pooling, a linear head.

    Parameters
    ----------
    blocks_per_stage : sequence of int
        Number of blocks in each stage (``(2, 2, 2, 2)`` is ResNet-18). Stage ``i``
        has blocks of ``width * 2**i`` planes and every stage after the first halves
        the resolution.
    num_classes : int, default 10
        Output size of the ``fc`` head.
    in_channels : int, default 3
        Channels of the input images.
    width : int, default 64
        Channels of the stem and planes of the first stage.
    block : {BasicBlock, Bottleneck}, default BasicBlock
        The residual block; a stage outputs ``planes * block.expansion`` channels.
    stem : {"cifar", "imagenet"}, default "cifar"
        ``"cifar"``: one stride-1 ``Conv3x3 -> BN -> ReLU`` without pooling, for 32x32
        inputs. ``"imagenet"``: a stride-2 ``Conv7x7 -> BN -> ReLU`` and a stride-2
        3x3 max pool, as in the ImageNet ResNets.
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock,
        stem: str = "cifar",
    ):
        super().__init__()
        _check_positive("num_classes", num_classes)
        _check_positive("in_channels", in_channels)
        _check_positive("width", width)
        if len(blocks_per_stage) == 0:
            raise ValueError("blocks_per_stage must name at least one stage")
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        channels = width
        for i, n_blocks in enumerate(blocks_per_stage):
            _check_positive("each stage's block count", n_blocks)
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(n_blocks):
                blocks.append(block(channels, planes, stride if b == 0 else 1))
                channels = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(blocks_per_stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """CIFAR-style ResNet-18: four stages of two :class:`BasicBlock` each.

    Parameters
    ----------
    num_classes : int, default 10
        Output size of the ``fc`` head.
    in_channels : int, default 3
        Channels of the input images.
    width : int, default 64
        Channels of the first stage (the stages have ``width * (1, 2, 4, 8)``);
        a smaller width gives a cheap model with the same structure.

    Returns
    -------
    ResNet
        Maps ``(N, in_channels, H, W)`` to logits ``(N, num_classes)``; 20 conv
        weights (17 main-path convs and 3 downsample convs), all followed by BN.
    """
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=width)


def resnet50(num_classes: int = 1000, in_channels: int = 3, width: int = 64) -> ResNet:
    """ImageNet-style ResNet-50: a 7x7 stem and four stages of 3, 4, 6, 3 :class:`Bottleneck` blocks.

    At ``width=64`` and ``num_classes=1000`` it has torchvision's ``resnet50``
    parameter shapes (25,557,032 parameters); batch normalization follows every
    convolution.

    Parameters
    ----------
    num_classes : int, default 1000
        Output size of the ``fc`` head.
    in_channels : int, default 3
        Channels of the input images; inputs must be at least 32x32 (the stem and
        the stages divide the resolution by 32).
    width : int, default 64
        Channels of the stem and planes of the first stage (the stages output
        ``4 * width * (1, 2, 4, 8)`` channels); a smaller width gives a cheap model
        with the same structure.

    Returns
    -------
    ResNet
        Maps ``(N, in_channels, H, W)`` to logits ``(N, num_classes)``; 53 conv
        weights (49 main-path convs and 4 downsample convs), all followed by BN.
    """
    return ResNet(
        (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, width=width, block=Bottleneck, stem="imagenet"
    )


def small_resnet(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 16,
    blocks_per_stage: Sequence[int] = (1, 1, 1),
) -> ResNet:
    """A small ResNet of the same blocks as :func:`resnet18`, fast enough for CPU runs.

    Parameters
    ----------
    num_classes : int, default 10
        Output size of the ``fc`` head.
    in_channels : int, default 3
        Channels of the input images.
    width : int, default 16
        Channels of the first stage.
    blocks_per_stage : sequence of int, default (1, 1, 1)
        Blocks in each stage; the default has three stages (widths 16, 32, 64),
        two of them with a downsample shortcut.

    Returns
    -------
    ResNet
        Maps ``(N, in_channels, H, W)`` to logits ``(N, num_classes)``.
    """
    return ResNet(blocks_per_stage, num_classes=num_classes, in_channels=in_channels, width=width)


def build(name: str, kwargs: dict, num_classes: int = 10) -> nn.Module:
    """The zoo model ``name`` (one of this module's builder functions) built with
    ``kwargs`` and ``num_classes``: a suite's model spec.

    Raises
    ------
    ValueError
        If ``name`` is not a builder of this module.
    """
    builders = [n for n in __all__ if n != "build" and not isinstance(globals()[n], type)]
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; the zoo's builders are {', '.join(builders)}")
    return globals()[name](num_classes=num_classes, **kwargs)


class _PostNormBlock(nn.Module):
    """One Transformer block in which every projection feeds a LayerNorm.

    Attention with normalized queries, keys and values (``q = LN(W_q x)``, and so on:
    QK-norm, extended to the values) and a normalized branch output
    (``x + LN(W_o attn)``, Swin-V2's res-post-norm); the MLP is
    ``x + LN(W_2 GELU(LN(W_1 x)))``. Scaling any one of the seven weights by ``a > 0``
    scales the input of a LayerNorm over that projection's outputs, which the
    LayerNorm undoes: each weight is scale invariant as a whole tensor.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(dim)
        self.k = nn.Linear(dim, dim, bias=False)
        self.k_norm = nn.LayerNorm(dim)
        self.v = nn.Linear(dim, dim, bias=False)
        self.v_norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim, bias=False)
        self.attn_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim, bias=False)
        self.fc1_norm = nn.LayerNorm(mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim, bias=False)
        self.mlp_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, dim = x.shape

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(n, t, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = split(self.q_norm(self.q(x))), split(self.k_norm(self.k(x))), split(self.v_norm(self.v(x)))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, dim)
        x = x + self.attn_norm(self.out(attn))
        return x + self.mlp_norm(self.fc2(F.gelu(self.fc1_norm(self.fc1(x)))))


class PostNormViT(nn.Module):
    """A small Vision Transformer whose weights, but for the head, feed LayerNorms.

    See :func:`vit_ln`. Each scale-invariant weight is one group (LayerNorm normalizes
    over all of a projection's outputs), where the BN models of the zoo have one group
    per channel: :meth:`scale_invariant_groupings` says so.
    """

    def __init__(
        self, image_size: int, patch_size: int, in_channels: int, dim: int, depth: int, heads: int, mlp_ratio: int,
        num_classes: int,
    ):
        super().__init__()
        self.patch_size = patch_size
        tokens = (image_size // patch_size) ** 2
        self.embed = nn.Linear(in_channels * patch_size * patch_size, dim, bias=False)
        self.embed_norm = nn.LayerNorm(dim)
        self.position = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.Sequential(*(_PostNormBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.final_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)  # registered last: the zoo's head rule

    def scale_invariant_groupings(self) -> list[tuple[nn.Module, str]]:
        """Every ``nn.Linear`` but the head, each one group (``"tensor"``)."""
        return [(m, "tensor") for m in self.modules() if isinstance(m, nn.Linear) and m is not self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(x, self.patch_size, stride=self.patch_size).transpose(1, 2)
        tokens = self.embed_norm(self.embed(patches)) + self.position
        return self.head(self.final_norm(self.blocks(tokens).mean(dim=1)))


def vit_ln(
    image_size: int = 8,
    patch_size: int = 2,
    in_channels: int = 1,
    dim: int = 32,
    depth: int = 2,
    heads: int = 2,
    mlp_ratio: int = 2,
    num_classes: int = 10,
) -> PostNormViT:
    """A small Vision Transformer in which every projection feeds a LayerNorm.

    Non-overlapping ``patch_size`` patches are embedded by ``Linear -> LayerNorm``
    (plus a learned position embedding), go through ``depth`` post-norm blocks
    (:class:`_PostNormBlock`: QKV-norm attention, res-post-norm, a normalized MLP), are
    averaged over tokens and classified by a ``LayerNorm -> Linear`` head. Every
    ``nn.Linear`` but the head is scale invariant with one group per tensor; this is
    where the Adam family is normally used.

    Parameters
    ----------
    image_size : int, default 8
        Height and width of the square input images ``(N, in_channels, H, W)``.
    patch_size : int, default 2
        Side of a patch; must divide ``image_size``.
    in_channels : int, default 1
        Input channels.
    dim : int, default 32
        Token width; must be a multiple of ``heads``.
    depth, heads, mlp_ratio : int
        Number of blocks, attention heads, and MLP width / ``dim``.
    num_classes : int, default 10
        Output size of the head.

    Returns
    -------
    PostNormViT
        Maps ``(N, in_channels, image_size, image_size)`` to logits ``(N, num_classes)``.
    """
    for name, value in (("image_size", image_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("dim", dim), ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio),
                        ("num_classes", num_classes)):
        _check_positive(name, value)
    if image_size % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide image_size {image_size}")
    if dim % heads:
        raise ValueError(f"dim {dim} must be a multiple of heads {heads}")
    return PostNormViT(image_size, patch_size, in_channels, dim, depth, heads, mlp_ratio, num_classes)


class _QKNormAttention(nn.Module):
    """Causal multi-head self-attention with QK-norm, as in Qwen3.

    ``q = RMSNorm(q_proj(x).view(B, T, heads, head_dim))`` and the same for ``k``: one
    RMSNorm over ``head_dim``, its gain shared by the heads, applied to each head's
    query and key. Scaling the ``head_dim`` rows of ``q_proj`` (or ``k_proj``) that make
    one head by ``a > 0`` scales that head's query, which its RMSNorm undoes: each head's
    block of rows is scale invariant (grouping ``block(head_dim)``). ``v_proj`` and
    ``o_proj`` feed no normalization.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim)
        self.k_norm = nn.RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, dim = x.shape
        shape = (n, t, self.heads, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(shape)).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(n, t, dim))


class _PreNormBlock(nn.Module):
    """``x + attn(RMSNorm(x))``, then ``x + W_2 GELU(W_1 RMSNorm(x))``; no biases."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = _QKNormAttention(dim, heads)
        self.mlp_norm = nn.RMSNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim, bias=False)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x))))


class QKNormLM(nn.Module):
    """A small causal Transformer language model with QK-norm. See :func:`qknorm_lm`."""

    def __init__(self, vocab: int, context: int, dim: int, depth: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.02 * torch.randn(context, dim))
        self.blocks = nn.Sequential(*(_PreNormBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.final_norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)  # untied from the embedding

    def scale_invariant_groupings(self) -> list[tuple[nn.Module, str]]:
        """Each block's ``q_proj`` and ``k_proj``, one group per head (``block(head_dim)``)."""
        out = []
        for block in self.blocks:
            grouping = f"block({block.attn.head_dim})"
            out += [(block.attn.q_proj, grouping), (block.attn.k_proj, grouping)]
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # no Python check of the length: it would stop torch.fx from tracing the model
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.final_norm(self.blocks(x)))


def qknorm_lm(
    num_classes: int = 256,
    context: int = 64,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    mlp_ratio: int = 4,
) -> QKNormLM:
    """A small causal Transformer language model with QK-norm (Qwen3-style).

    A token embedding plus a learned position embedding, ``depth`` pre-norm blocks
    (RMSNorm, then causal attention whose per-head queries and keys go through an
    RMSNorm over ``head_dim``; RMSNorm, then a GELU MLP), a final RMSNorm and an
    untied linear head. No biases anywhere. Untied, so that the embedding and the head
    are two ordinary (not scale-invariant) weights; tying them would make one weight
    both the input and the output layer.

    Parameters
    ----------
    num_classes : int, default 256
        The vocabulary (256 for bytes): the embedding's rows and the head's outputs.
    context : int, default 64
        Longest sequence (the position embedding's length).
    dim : int, default 64
        Model width; a multiple of ``heads``.
    depth, heads, mlp_ratio : int
        Number of blocks, attention heads, and MLP width / ``dim``.

    Returns
    -------
    QKNormLM
        Maps int64 tokens ``(N, T)``, ``T <= context``, to logits ``(N, T, num_classes)``;
        the output at position ``t`` depends only on the tokens up to ``t``. Its
        scale-invariant weights are the blocks' ``q_proj`` and ``k_proj``, one group
        per head.
    """
    for name, value in (("num_classes", num_classes), ("context", context), ("dim", dim), ("depth", depth),
                        ("heads", heads), ("mlp_ratio", mlp_ratio)):
        _check_positive(name, value)
    if dim % heads:
        raise ValueError(f"dim {dim} must be a multiple of heads {heads}")
    return QKNormLM(num_classes, context, dim, depth, heads, mlp_ratio)
