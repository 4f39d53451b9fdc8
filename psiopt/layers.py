r"""What psiopt knows about layers: the one home of that knowledge.

Discovery (:mod:`psiopt.discovery`), the rescaling systems (:class:`psiopt.ENorm`,
:class:`psiopt.SBWN`) and the benchmarks all ask the same questions of a module or of
a torch operation; they are answered here, once:

* which layers hold a weight with output channels in dim 0 (the layout every
  :class:`~psiopt.Grouping` assumes): :data:`CHANNEL_FIRST_LAYERS`;
* which modules and functions *normalize*, over which dims, and so how the weight of a
  layer before them groups: :class:`NormSpec`, :func:`norm_grouping` (an RMS norm written
  out in elementary operations, as transformers' modules write it, is recognized by
  :mod:`psiopt.discovery.written`);
* which modules and functions are *positively homogeneous* per channel,
  :math:`f(c z) = c f(z)` for :math:`c > 0` (a scale passes through them), and which of
  those are also *affine* per channel, :math:`f(c z + b) = c f(z) + b` (a layer's bias
  passes through them too);
* which operations only move dims around (``permute``, ``view``, ``flatten``...), and where
  a layer's output channels go through them, split into attention heads for instance:
  :class:`ChannelDims`, :func:`move_channels`.

Operations are named as torch names them (``"relu"``, ``"max_pool2d"``,
``"batch_norm"``), whether they come from a module call, a function or a tensor method,
so that a torch.fx graph and a recorded forward pass are read with the same tables.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .grouping import CHANNEL_FIRST_LAYERS, Grouping

__all__ = [
    "CHANNEL_FIRST_LAYERS",
    "TRANSPOSED_CONVS",
    "NORM_MODULES",
    "BATCH_NORMS",
    "AFFINE_MODULES",
    "HOMOGENEOUS_MODULES",
    "AFFINE_OPS",
    "HOMOGENEOUS_OPS",
    "LAYOUT_OPS",
    "RESHAPE_OPS",
    "LAYER_OPS",
    "CAST_OPS",
    "SELECT_OPS",
    "PRODUCT_OPS",
    "ATTENTION_OPS",
    "QUERY_OPS",
    "NORM_FUNCTIONS",
    "NormSpec",
    "op_name",
    "module_op",
    "POSITIVELY_HOMOGENEOUS_MODULES",
    "norm_spec_of_module",
    "norm_spec_of_call",
    "ChannelDims",
    "norm_grouping",
    "move_channels",
    "group_moments",
    "normalized",
    "norm_with_eps",
    "norm_input",
]

TRANSPOSED_CONVS: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

_RMSNorm = getattr(nn, "RMSNorm", None)
NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
) + ((_RMSNorm,) if _RMSNorm is not None else ())
"""Normalization modules (and their subclasses): the scale of their input is removed."""

BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
"""The batch norms over dim 1 (with SyncBatchNorm), for the rescaling systems."""

AFFINE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
"""Modules affine per channel: :math:`f(c z + b) = c f(z) + b` for :math:`c > 0` and a
per-channel :math:`b`."""

HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
)
"""Modules positively homogeneous per channel but not affine (a bias before them does not
come out unchanged: ReLU clips it, average pooling's zero padding dilutes it, dropout
masks it)."""

POSITIVELY_HOMOGENEOUS_MODULES = AFFINE_MODULES + HOMOGENEOUS_MODULES
"""Every module a positive per-channel scale passes through, :math:`f(c z) = c f(z)`."""

AFFINE_OPS = frozenset(
    {"identity", "contiguous", "clone"}
    | {f"{kind}{d}d" for kind in ("max_pool", "adaptive_max_pool", "adaptive_avg_pool") for d in (1, 2, 3)}
)
"""Operation names (see :func:`op_name`) of the affine modules' computations."""

HOMOGENEOUS_OPS = frozenset(
    {"relu", "relu_", "leaky_relu", "leaky_relu_", "prelu", "dropout", "dropout_", "feature_dropout"}
    | {f"dropout{d}d" for d in (1, 2, 3)}
    | {f"avg_pool{d}d" for d in (1, 2, 3)}
)
"""Operation names of the positively homogeneous (not affine) computations."""

RESHAPE_OPS = frozenset({"view", "reshape", "unflatten", "flatten", "unsqueeze", "squeeze"})
"""Operations that reshape a tensor in row-major order: following a layer's channels through
them needs the shapes of their input and output."""

LAYOUT_OPS = frozenset({"permute", "transpose", "swapaxes"}) | RESHAPE_OPS
"""Operations that only move, split or merge dims."""

CAST_OPS = frozenset({"to", "float", "double", "half", "bfloat16", "type_as"})
"""Conversions of a tensor's dtype or device (floating point to floating point, they are
positively homogeneous and affine up to rounding)."""

LAYER_OPS = frozenset({"linear", "conv1d", "conv2d", "conv3d"})
"""The computations of :data:`CHANNEL_FIRST_LAYERS`."""

SELECT_OPS = frozenset(
    {"__getitem__", "expand", "expand_as", "repeat", "repeat_interleave", "narrow", "select", "cat", "concat",
     "concatenate"}
)
"""Operations that pick, copy or repeat the entries of one tensor (a ``cat`` of it with empty
ones): a scale common to all its entries passes through them, not a per-channel one."""

PRODUCT_OPS = frozenset({"mul", "mul_", "matmul", "bmm", "div", "div_", "truediv"})
"""Products (and quotients by) other tensors: :math:`f(c z, y) = c f(z, y)` in ``z``, for
``y`` independent of ``z`` (the numerator only, for a quotient)."""

ATTENTION_OPS = frozenset({"scaled_dot_product_attention"})
"""Attention: its output is the attention-weighted sum of the values, so a common scale of the
values (its third argument) passes through it, with queries and keys independent of them."""

QUERY_OPS = frozenset(
    {"size", "dim", "ndimension", "numel", "ndim", "shape", "dtype", "device", "is_floating_point",
     "is_contiguous", "stride", "get_device"}
)
"""Reads of a tensor's metadata: not a use of its values."""

_RMS_NORM_FN = getattr(F, "rms_norm", None)
NORM_FUNCTIONS: dict[Callable[..., Any], str] = {
    F.batch_norm: "batch_norm",
    F.instance_norm: "instance_norm",
    F.group_norm: "group_norm",
    F.layer_norm: "layer_norm",
    **({_RMS_NORM_FN: "rms_norm"} if _RMS_NORM_FN is not None else {}),
}
"""The functional normalizations, by the name of what they compute."""

_NORM_SIGNATURES = {fn: inspect.signature(fn) for fn in NORM_FUNCTIONS}


def op_name(target: Any) -> str:
    """The name of a torch operation: a function, a tensor method, or a method's name."""
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def _snake(cls: type) -> str:
    """``MaxPool2d`` -> ``max_pool2d``, ``AdaptiveAvgPool1d`` -> ``adaptive_avg_pool1d``."""
    special = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu"}
    if cls in special:
        return special[cls]
    name = cls.__name__
    return "".join(
        ("_" if ch.isupper() and i and not name[i - 1].isdigit() else "") + ch.lower() for i, ch in enumerate(name)
    )


def module_op(module: nn.Module) -> str:
    """The operation a leaf module computes, named as :func:`op_name` names it
    (``nn.MaxPool2d`` -> ``"max_pool2d"``); other modules give their class name."""
    for cls in CHANNEL_FIRST_LAYERS + POSITIVELY_HOMOGENEOUS_MODULES + (nn.Flatten,):
        if isinstance(module, cls):
            return _snake(cls)
    return type(module).__name__


@dataclass(frozen=True)
class NormSpec:
    """What a normalization computes, as far as a layer's scale is concerned.

    Attributes
    ----------
    kind : {"batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"}
        Which statistic is removed, over which entries.
    channel_dim : int
        For batch, instance and group norm: the dim holding the channels (1).
    num_groups : int
        For group norm: the number of channel groups.
    normalized_ndim : int
        For layer and RMS norm: how many trailing dims are normalized together.
    eps : float or None
        The eps of the call (``None`` when unknown, e.g. RMS norm's default).
    """

    kind: str
    channel_dim: int = 1
    num_groups: int = 1
    normalized_ndim: int = 0
    eps: float | None = None

    @property
    def removes_mean(self) -> bool:
        """Whether the mean of each normalized group is subtracted (all but RMS norm)."""
        return self.kind != "rms_norm"


def norm_spec_of_module(module: nn.Module) -> NormSpec | None:
    """The :class:`NormSpec` of a call of a torch normalization module on a batch (``None``
    if it is not one)."""
    eps = getattr(module, "eps", None)
    eps = float(eps) if isinstance(eps, (int, float)) else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return NormSpec("batch_norm", eps=eps)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return NormSpec("instance_norm", eps=eps)
    if isinstance(module, nn.GroupNorm):
        return NormSpec("group_norm", num_groups=module.num_groups, eps=eps)
    if isinstance(module, nn.LayerNorm):
        return NormSpec("layer_norm", normalized_ndim=len(module.normalized_shape), eps=eps)
    if _RMSNorm is not None and isinstance(module, _RMSNorm):
        return NormSpec("rms_norm", normalized_ndim=len(module.normalized_shape), eps=eps)
    return None


def norm_spec_of_call(function: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> NormSpec | None:
    """The :class:`NormSpec` of a call of a functional normalization (``F.batch_norm``...),
    or ``None`` when it is none or does not normalize by the batch's own statistics
    (``F.batch_norm(..., training=False)`` uses running statistics: a fixed affine map)."""
    kind = NORM_FUNCTIONS.get(function)
    if kind is None:
        return None
    try:
        bound = _NORM_SIGNATURES[function].bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = bound.arguments
    eps = a.get("eps")
    eps = float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None
    if kind == "batch_norm":
        return NormSpec(kind, eps=eps) if a["training"] is True else None
    if kind == "instance_norm":
        return NormSpec(kind, eps=eps) if a["use_input_stats"] is True else None
    if kind == "group_norm":
        return NormSpec(kind, num_groups=a["num_groups"], eps=eps) if isinstance(a["num_groups"], int) else None
    shape = a["normalized_shape"]
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)):
        return None  # only the number of normalized dims matters (a traced graph may hold x.shape[-1] there)
    return NormSpec(kind, normalized_ndim=len(shape), eps=eps)


def norm_with_eps(function: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], eps: float):
    """``(args, kwargs)`` of a functional normalization call with its eps replaced."""
    bound = _NORM_SIGNATURES[function].bind(*args, **kwargs)
    bound.arguments["eps"] = eps
    return bound.args, bound.kwargs


def norm_input(function: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The tensor a functional normalization call normalizes."""
    return args[0] if args else kwargs.get("input")


@dataclass(frozen=True)
class ChannelDims:
    """Where a layer's output channels are in a tensor computed from its output.

    A Linear/ConvNd output holds its channels in one dim. A view can split them, as
    attention splits a projection's output ``(B, T, C)`` into heads ``(B, T, H, D)``:
    channel :math:`c = h D + d` then runs over two dims, ``H`` the major one, and a
    transpose can move them apart. ``dims`` lists the dims holding the channel index,
    major to minor, and ``sizes`` their sizes (their product is the number of channels).

    Attributes
    ----------
    dims : tuple of int
        The dims of the tensor holding the channel index, major to minor.
    sizes : tuple of int
        Their sizes.
    ndim : int
        The tensor's rank.
    """

    dims: tuple[int, ...]
    sizes: tuple[int, ...]
    ndim: int

    @classmethod
    def single(cls, dim: int, channels: int, ndim: int) -> "ChannelDims":
        """The channels in one dim, as a layer outputs them."""
        return cls((dim,), (channels,), ndim)

    def describe(self) -> str:
        if len(self.dims) == 1:
            return f"dim {self.dims[0]}"
        return "dims " + ", ".join(f"{d} ({s})" for d, s in zip(self.dims, self.sizes))


def norm_grouping(
    spec: NormSpec, channels: ChannelDims, num_channels: int
) -> tuple[Grouping | None, str, bool]:
    """How a layer's weight groups when its output reaches this normalization.

    Parameters
    ----------
    spec : NormSpec
        The normalization.
    channels : ChannelDims
        Where the layer's output channels are in the normalization's input.
    num_channels : int
        The layer's number of output channels.

    Returns
    -------
    (Grouping or None, str, bool)
        The finest grouping into blocks of consecutive channels that the normalization
        makes invariant (``None`` if it does not remove the layer's scale), the reason
        when ``None``, and whether it also removes a per-channel bias of the layer.
    """
    kind = spec.kind
    if kind in ("batch_norm", "instance_norm", "group_norm"):
        # Each normalized group holds entries with one index (batch, instance norm) or a
        # run of indices (group norm) of dim 1, and every entry of the other dims.
        if not channels.dims or channels.dims[0] != spec.channel_dim:
            return None, (
                f"{kind} normalizes the channels of dim {spec.channel_dim}, but the layer's output channels are "
                f"in {channels.describe()} there"
            ), False
        units = spec.num_groups if kind == "group_norm" else channels.sizes[0]
        return _blocks(num_channels, num_channels // units), "", spec.removes_mean and units == num_channels
    # Layer and RMS norm: each normalized group is one index of the leading dims and all of
    # the trailing ones. Its channels lie within one block of consecutive channels, of the
    # size of every channel dim from the most major normalized one down to the minor end
    # (heads split as (H, D) and normalized over D: blocks of D; over H alone: everything).
    first = channels.ndim - spec.normalized_ndim
    inside = [i for i, d in enumerate(channels.dims) if d >= first]
    block = math.prod(channels.sizes[min(inside) :]) if inside else 1
    # A per-channel bias is constant over a normalized group only when the group holds one channel.
    return _blocks(num_channels, block), "", spec.removes_mean and block == 1


def _blocks(num_channels: int, per_group: int) -> Grouping:
    if per_group <= 1:
        return Grouping.per_channel()
    if per_group >= num_channels:
        return Grouping.whole()
    return Grouping.blocks(per_group)


def _dims(args: Sequence[Any], kwargs: dict[str, Any], key: str) -> list[Any]:
    if key in kwargs:
        value = kwargs[key]
        return list(value) if isinstance(value, (tuple, list)) else [value]
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return list(args[0])
    return list(args)


def _dim(d: Any, rank: int) -> int | None:
    if not isinstance(d, int) or isinstance(d, bool) or not -rank <= d < rank:
        return None
    return d % rank


def move_channels(
    name: str,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    channels: ChannelDims,
    in_shape: Sequence[int] | None,
    out_shape: Sequence[int] | None,
) -> ChannelDims | str:
    """Where the channels are after a layout operation (:data:`LAYOUT_OPS`).

    ``args`` are the operation's arguments after the tensor; ``in_shape`` and
    ``out_shape`` are the shapes of its input and output (a permute or transpose needs
    neither; the operations that reshape, :data:`RESHAPE_OPS`, need both). Returns the
    new :class:`ChannelDims` or, when the channels are merged with other dims,
    reordered or cannot be followed, the reason.
    """
    ndim = channels.ndim
    if name == "permute":
        dims = [_dim(d, ndim) for d in _dims(args, kwargs, "dims")]
        if None in dims or sorted(dims) != list(range(ndim)):  # type: ignore[type-var]
            return f"permute{tuple(_dims(args, kwargs, 'dims'))} cannot be followed"
        return replace(channels, dims=tuple(dims.index(d) for d in channels.dims))
    if name in ("transpose", "swapaxes"):
        vals = list(args[:2]) + [kwargs[k] for k in ("dim0", "dim1", "axis0", "axis1") if k in kwargs]
        if len(vals) != 2:
            return f"{name} with arguments {tuple(args)} cannot be followed"
        a, b = _dim(vals[0], ndim), _dim(vals[1], ndim)
        if a is None or b is None:
            return f"{name}{tuple(vals)} cannot be followed"
        return replace(channels, dims=tuple(b if d == a else a if d == b else d for d in channels.dims))
    if name not in RESHAPE_OPS:
        return f"{name} cannot be followed"
    if in_shape is None or out_shape is None:
        return f"{name} cannot be followed without the shapes of its input and output"
    if any(isinstance(a, torch.dtype) for a in (*args, *kwargs.values())):
        return f"{name} to another dtype reinterprets the bits"
    return _reshaped(name, channels, tuple(in_shape), tuple(out_shape))


def _reshaped(name: str, channels: ChannelDims, a: tuple[int, ...], b: tuple[int, ...]) -> ChannelDims | str:
    """The channels after a reshape from shape ``a`` to ``b`` (row-major, as view and reshape)."""
    if len(a) != channels.ndim or math.prod(a) != math.prod(b) or 0 in a:
        return f"{name} from {a} to {b} cannot be followed"
    # Split both shapes into blocks of dims with equal products: a reshape maps each block of
    # the input onto the matching block of the output, and nothing across blocks.
    block_of: dict[int, int] = {}
    outputs: list[list[int]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        ins, outs, p, q = [], [], 1, 1
        while (i < len(a) or j < len(b)) and (not ins and not outs or p != q):
            if j >= len(b) or (i < len(a) and p <= q):
                p, i = p * a[i], i + 1
                ins.append(i - 1)
            else:
                q, j = q * b[j], j + 1
                outs.append(j - 1)
        for d in ins:
            block_of[d] = len(outputs)
        outputs.append([d for d in outs if b[d] > 1])
    # Each block holding channels must hold only channels, a run of them major to minor.
    kept = [(d, s) for d, s in zip(channels.dims, channels.sizes) if s > 1]
    dims: list[int] = []
    k = 0
    while k < len(kept):
        block = block_of[kept[k][0]]
        run = [d for d in range(len(a)) if block_of[d] == block and a[d] > 1]
        if [d for d, _ in kept[k : k + len(run)]] != run:
            return f"{name} from {a} to {b} merges the layer's output channels with other dims, or reorders them"
        dims += outputs[block]
        k += len(run)
    return ChannelDims(tuple(dims), tuple(b[d] for d in dims), len(b))


def group_moments(spec: NormSpec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and the (biased) variance of each group the normalization normalizes,
    for the input ``x`` of a functional call (channels in dim 1), in float64."""
    if spec.kind == "batch_norm":
        # Torch's batch-norm kernel is far faster than a strided reduction over (N, H, W):
        # with momentum 1 it leaves the batch mean and unbiased variance in the buffers.
        channels, n = x.shape[1], x.numel() // x.shape[1]
        mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
        var = torch.ones(channels, dtype=x.dtype, device=x.device)
        F.batch_norm(x, mean, var, training=True, momentum=1.0)
        return mean.double(), var.double() * ((n - 1) / n if n > 1 else 0.0)
    if spec.kind == "instance_norm":
        rows = x.reshape(x.shape[0] * x.shape[1], -1)
    elif spec.kind == "group_norm":
        rows = x.reshape(x.shape[0] * spec.num_groups, -1)
    else:
        rows = x.reshape(-1, math.prod(x.shape[x.dim() - spec.normalized_ndim :]))
    var, mean = torch.var_mean(rows, dim=1, correction=0)
    return mean.double(), var.double()


def normalized(spec: NormSpec, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The normalization's output before its affine map, in ``x``'s shape and dtype, by
    torch's own kernel for it (the input of a functional call: channels in dim 1)."""
    if spec.kind == "batch_norm":
        return F.batch_norm(x, None, None, training=True, eps=eps)
    if spec.kind == "instance_norm":
        return F.instance_norm(x, eps=eps)
    if spec.kind == "group_norm":
        return F.group_norm(x, spec.num_groups, eps=eps)
    shape = x.shape[x.dim() - spec.normalized_ndim :]
    if spec.kind == "layer_norm":
        return F.layer_norm(x, shape, eps=eps)
    return F.rms_norm(x, shape, eps=eps)  # type: ignore[misc]
