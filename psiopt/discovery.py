r"""Find and mark the scale-invariant weights of a model.

A weight is *scale invariant* when each of its groups (see :class:`psiopt.Grouping`)
can be multiplied by its own positive factor without changing the network's output
in training mode. :func:`find_scale_invariant` finds those weights in two passes,
and :func:`mark_scale_invariant` turns each into a :class:`geoopt.ManifoldParameter`
on a :class:`psiopt.PSIManifold`, which is what psiopt's and geoopt's optimizers read.

Structural pass
---------------
The model is traced with :func:`torch.fx.symbolic_trace`. When tracing fails (for
example, Python control flow that depends on the data), psiopt falls back to
recording one forward pass with forward hooks on the leaf modules, and says so in
:attr:`ScaleInvarianceReport.method` and :attr:`ScaleInvarianceReport.notes`. The
hook fallback only sees calls of modules: a functional op (``F.relu``, ``x + y``)
between a layer and its normalization hides the pattern, and a second use of a
layer's output by a functional op goes unseen (the numerical proof still catches it).

A weight is a candidate when it is the ``weight`` of an :class:`~torch.nn.Linear` or
:class:`~torch.nn.Conv1d`/``2d``/``3d`` whose output reaches a normalization layer,
*and nothing else*, through a chain of per-channel, positively homogeneous operations
(:math:`f(c z) = c f(z)` for :math:`c > 0`):

====================================  =====================================================
between the layer and the norm        allowed
====================================  =====================================================
nothing, ``Identity``, max pooling,   yes (also with a bias on the layer: these commute
adaptive pooling                      with a per-channel :math:`c z + b`)
ReLU, LeakyReLU, PReLU, average       yes when the layer has no bias (a bias does not
pooling, Dropout                      scale with the weight)
Tanh, Sigmoid, GELU, ReLU6, add,      no: not positively homogeneous, or mixes in other
flatten/reshape, anything else        tensors / moves the channel dim
====================================  =====================================================

==========================================  ===========================================
normalization layer                         grouping of the weight
==========================================  ===========================================
BatchNorm1d/2d/3d, SyncBatchNorm            ``channel``
InstanceNorm1d/2d/3d                        ``channel``
GroupNorm(G, C)                             ``block(C/G)`` (``channel`` if G = C,
                                            ``tensor`` if G = 1)
LayerNorm, RMSNorm over dims that include   ``tensor`` (one group: all output features
the layer's output channels                 are normalized together)
LayerNorm, RMSNorm over trailing spatial    ``channel``
dims only
==========================================  ===========================================

A bias before the norm: BatchNorm and InstanceNorm subtract a per-channel mean, which
removes the bias, so the *weight alone* stays invariant (scaling weight and bias
together is the symmetry of the design note; BatchNorm makes the bias's gradient
exactly 0, so psiopt leaves biases to the Euclidean optimizer). GroupNorm and LayerNorm
with ``tensor``/``block`` groupings mix channels with different biases, and RMSNorm
subtracts no mean, so there a biased layer is rejected.

Independently of any norm layer, the direction ``v`` of
:func:`torch.nn.utils.parametrizations.weight_norm` (parameter
``parametrizations.weight.original1``) is invariant to each row's scale, since the
layer uses :math:`g\, v/\|v\|`: it is found with the ``channel`` grouping (``tensor``
for ``dim=None``). Other parametrizations hide the weight and are rejected. The
transposed convolutions keep output channels in dim 1 of their weight, which no
grouping describes, so they are rejected too.

Numerical proof
---------------
Each candidate is then tested on the example inputs, with every submodule in
training mode (the mode a network is trained in; in ``eval()`` BatchNorm uses running
statistics and nothing is invariant): its groups are multiplied by random positive
factors, log-uniform in ``factors`` (by default :math:`[0.1, 10]`), with one group at
each end, then by the mirrored factors :math:`ab/a_j` so that every group sees both a
shrink and a growth; the output must stay within ``rtol`` (relative to the largest
output entry, per output tensor) of the unscaled output.

The normalization's ``eps`` breaks invariance slightly:
:math:`\mathrm{BN}(c z) = (z - \mu)/\sqrt{\sigma^2 + \epsilon/c^2}`, so shrinking a
channel whose variance is :math:`\sigma^2` by :math:`c` changes its normalized output by
about :math:`\epsilon (c^{-2} - 1)/(2\sigma^2)`. To tell that apart from a real failure
(a Tanh between layer and norm), the proof runs with every normalization layer's eps
set to ``proof_eps`` (default ``1e-30``: zero for all purposes, yet a channel that is
all zeros still normalizes to 0 instead of NaN). Each found weight then reports how
much the *real* eps breaks invariance: the relative output change when all its groups
are multiplied by the low and by the high factor at the model's own eps
(:attr:`ScaleInvariantWeight.eps_sensitivity`), and the first-order prediction at the
norm layer from the smallest measured group variance
(:attr:`ScaleInvariantWeight.eps_bound`).

The model comes back exactly as it was: parameters (never written: the scaled copies
are swapped in through ``.data``), buffers (BatchNorm running statistics and
``num_batches_tracked``), the train/eval flag of every submodule, the norm layers'
``eps``, and the global random state (Python, NumPy, torch CPU and CUDA); each forward
runs with a fixed seed so dropout draws the same masks in every run.

Marking
-------
:func:`mark_scale_invariant` turns each found parameter, in place, into a
``geoopt.ManifoldParameter`` on ``PSIManifold(grouping)`` (the object stays the same,
so nothing that holds it goes stale), for geoopt's optimizers. psiopt's optimizers
read scale invariance from their param groups: :func:`psiopt.param_groups`.
"""

from __future__ import annotations

import functools
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import geoopt
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves, tree_map

from ._wrappers import wrapper_of
from .grouping import CHANNEL_FIRST_LAYERS, Grouping, GroupingLike, as_grouping
from .manifold import PSIManifold

__all__ = [
    "ScaleInvariantWeight",
    "RejectedCandidate",
    "ScaleInvarianceReport",
    "find_scale_invariant",
    "mark_scale_invariant",
    "scale_invariant_parameters",
    "is_scale_invariant",
]

# -- what the structural pass recognizes --------------------------------------------

_RMSNorm = getattr(nn, "RMSNorm", None)
_NORMS: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
) + ((_RMSNorm,) if _RMSNorm is not None else ())

# Ops that commute with a per-channel affine map c*z + b (c > 0): a layer's bias passes.
_AFFINE_MODULES = (
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
# Ops that are positively homogeneous per channel, f(c z) = c f(z), but not affine-
# equivariant (a bias before them does not factor out).
_HOMOGENEOUS_MODULES = (
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
_AFFINE_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    torch.max_pool1d,
    torch.max_pool2d,
    torch.max_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
)
_HOMOGENEOUS_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.leaky_relu,
    F.leaky_relu_,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    torch.dropout,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
)
_HOMOGENEOUS_METHODS = ("relu", "relu_")

_DEFAULT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


# -- the records ----------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleInvariantWeight:
    """One weight found scale invariant.

    Attributes
    ----------
    name : str
        Qualified parameter name, as in ``model.named_parameters()``.
    shape : tuple of int
        The parameter's shape.
    grouping : Grouping
        How the weight splits into independently rescalable groups.
    norm_layer : str or None
        Qualified name of the module that makes the weight invariant (a normalization
        layer, or ``<module>.parametrizations.weight`` for weight norm); ``None`` for a
        weight given through ``candidates=``.
    norm_type : str or None
        That module's kind: ``"BatchNorm2d"``, ``"GroupNorm"``, ``"weight_norm"``...
    path : tuple of str
        The operations between the layer and the normalization layer (``("ReLU",)``).
    proof_deviation : float
        Worst relative output change measured by the proof that accepted the weight
        (the joint test of all candidates, or its own test if the joint one failed),
        with normalization eps set to the proof eps; at most the proof's ``rtol``.
    eps : float or None
        The normalization layer's real ``eps`` (``None`` for weight norm and given
        candidates).
    eps_sensitivity : (float, float) or None
        Relative output change at the model's real eps when *all* groups are
        multiplied by the low and by the high factor (default 0.1 and 10): how much
        eps breaks invariance on these inputs (``None`` with ``measure_eps=False``).
    eps_bound : float or None
        First-order prediction of the relative change of the most eps-sensitive
        normalized group when shrunk by the low factor :math:`c`:
        :math:`\\epsilon (c^{-2} - 1) / (2 \\sigma^2_{\\min})`, with
        :math:`\\sigma^2_{\\min}` the smallest nonzero group variance measured at the
        norm layer's input.
    """

    name: str
    shape: tuple[int, ...]
    grouping: Grouping
    norm_layer: str | None
    norm_type: str | None
    path: tuple[str, ...] = ()
    proof_deviation: float = 0.0
    eps: float | None = None
    eps_sensitivity: tuple[float, float] | None = None
    eps_bound: float | None = None

    @property
    def num_groups(self) -> int:
        """Number of scale-invariant groups of the weight."""
        return self.grouping.num_groups(self.shape)

    @property
    def cause(self) -> str:
        """``<norm_type> '<norm_layer>'``, the layer that makes the weight invariant."""
        if self.norm_layer is None:
            return "given"
        return f"{self.norm_type} '{self.norm_layer}'"


@dataclass(frozen=True)
class RejectedCandidate:
    """A weight considered and not found scale invariant, with the reason.

    Attributes
    ----------
    name : str
        Qualified parameter name.
    reason : str
        Why it is not scale invariant.
    stage : {"structural", "numerical"}
        Which pass rejected it.
    """

    name: str
    reason: str
    stage: str


@dataclass(frozen=True)
class ScaleInvarianceReport(Sequence[ScaleInvariantWeight]):
    """What :func:`find_scale_invariant` found: a sequence of :class:`ScaleInvariantWeight`.

    Printing it gives a table of the found weights and the rejected candidates.

    Attributes
    ----------
    weights : tuple of ScaleInvariantWeight
        The scale-invariant weights, in ``named_parameters()`` order.
    rejected : tuple of RejectedCandidate
        Weights of Linear/Conv layers (and given candidates) that are not, and why.
    method : {"fx", "hooks", "given"}
        How the structural pass saw the model (``"given"``: ``candidates=`` was used).
    notes : tuple of str
        Remarks on the run, e.g. why torch.fx tracing failed.
    dtype : torch.dtype
        The precision the tolerance was chosen for.
    rtol, atol : float
        The proof's tolerance: ``max|y' - y| <= atol + rtol * max|y|`` per output tensor.
    factors : tuple of float
        The range of the random positive factors.
    proof_eps : float
        The eps of every normalization layer during the proof.
    """

    weights: tuple[ScaleInvariantWeight, ...]
    rejected: tuple[RejectedCandidate, ...]
    method: str
    notes: tuple[str, ...] = ()
    dtype: torch.dtype = torch.float32
    rtol: float = 0.0
    atol: float = 0.0
    factors: tuple[float, float] = (0.1, 10.0)
    proof_eps: float = 1e-30

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[ScaleInvariantWeight]:
        return iter(self.weights)

    def __getitem__(self, index):  # type: ignore[override]
        return self.weights[index]

    def names(self) -> tuple[str, ...]:
        """The qualified names of the scale-invariant weights."""
        return tuple(w.name for w in self.weights)

    def get(self, name: str) -> ScaleInvariantWeight | None:
        """The record of parameter ``name``, or ``None`` if it was not found invariant."""
        for w in self.weights:
            if w.name == name:
                return w
        return None

    def rejected_names(self) -> tuple[str, ...]:
        """The qualified names of the rejected candidates."""
        return tuple(r.name for r in self.rejected)

    def __str__(self) -> str:
        low, high = self.factors
        head = (
            f"{len(self.weights)} scale-invariant weight(s) (structure: {self.method}; proof: "
            f"factors {low:g}..{high:g}, norm eps -> {self.proof_eps:g}, {_dtype_name(self.dtype)} "
            f"rtol {self.rtol:g})"
        )
        lines = [head]
        if self.weights:
            rows = [
                (
                    w.name,
                    "x".join(map(str, w.shape)),
                    w.grouping.describe(),
                    str(w.num_groups),
                    w.cause,
                    "-" if w.eps_sensitivity is None else "{:.1e} / {:.1e}".format(*w.eps_sensitivity),
                )
                for w in self.weights
            ]
            titles = ("name", "shape", "grouping", "groups", "made invariant by", f"eps effect x{low:g} / x{high:g}")
            lines += _table(titles, rows)
        if self.rejected:
            lines.append(f"{len(self.rejected)} rejected:")
            lines += [f"  {r.name}: {r.reason}" for r in self.rejected]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _table(titles: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(t), *(len(r[i]) for r in rows)) for i, t in enumerate(titles)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["  " + fmt.format(*titles).rstrip(), "  " + "  ".join("-" * w for w in widths)] + [
        "  " + fmt.format(*r).rstrip() for r in rows
    ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- the structural pass --------------------------------------------------------------


@dataclass
class _Candidate:
    """A weight proposed by the structural pass (or given), before the proof."""

    name: str
    param: torch.Tensor
    grouping: Grouping
    norm_layer: str | None
    norm_type: str | None
    path: tuple[str, ...] = ()
    eps: float | None = None


@dataclass
class _Consumer:
    """One use of a tensor: a module call, a function or method call, or the model output."""

    kind: str  # "module" | "function" | "method" | "output" | "unseen"
    label: str
    module: nn.Module | None = None
    name: str = ""  # qualified module name, for module calls
    target: Any = None
    first_arg_only: bool = True  # the tensor is the first argument and no other tensor is
    returns_tensor: bool = True


@dataclass
class _Site:
    """One call of a layer module, with a way to follow its output's uses."""

    layer_name: str
    module: nn.Module
    out_ndim: int | None


class _Graph(ABC):
    """Uses of tensors, by torch.fx nodes or by a hook-recorded call log."""

    @abstractmethod
    def sites(self) -> list[tuple[_Site, Any]]:
        """Every call of a module, with a handle to follow the uses of its output."""

    @abstractmethod
    def users(self, handle: Any) -> list[tuple[_Consumer, Any]]:
        """The uses of the tensor behind ``handle``, each with a handle to its output."""


class _FxGraph(_Graph):
    def __init__(self, gm: torch.fx.GraphModule, model: nn.Module, out_ndims: dict[str, set[int]]):
        self.gm, self.model, self.out_ndims = gm, model, out_ndims

    def sites(self) -> list[tuple[_Site, Any]]:
        found = []
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                module = self.model.get_submodule(node.target)
                found.append((_Site(node.target, module, _single(self.out_ndims.get(node.target))), node))
        return found

    def users(self, node: torch.fx.Node) -> list[tuple[_Consumer, Any]]:
        out = []
        for user in node.users:
            others = [a for a in tree_leaves((user.args[1:], user.kwargs)) if isinstance(a, torch.fx.Node)]
            first = bool(user.args) and user.args[0] is node and not others
            if user.op == "call_module":
                module = self.model.get_submodule(user.target)
                out.append(
                    (
                        _Consumer(
                            "module", _module_label(user.target, module), module, user.target, first_arg_only=first
                        ),
                        user,
                    )
                )
            elif user.op == "call_function":
                label = getattr(user.target, "__name__", str(user.target))
                out.append((_Consumer("function", label, target=user.target, first_arg_only=first), user))
            elif user.op == "call_method":
                out.append((_Consumer("method", f".{user.target}()", target=user.target, first_arg_only=first), user))
            elif user.op == "output":
                out.append((_Consumer("output", "the model output"), user))
            else:
                out.append((_Consumer("unseen", f"{user.op} {user.target}"), user))
        return out


@dataclass
class _Event:
    name: str
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    output: Any


class _HookGraph(_Graph):
    """Uses of tensors found by object identity in a log of leaf-module calls."""

    def __init__(self, events: list[_Event], outputs: list[torch.Tensor]):
        self.events, self.outputs = events, outputs

    def sites(self) -> list[tuple[_Site, Any]]:
        found = []
        for i, ev in enumerate(self.events):
            if isinstance(ev.output, torch.Tensor):
                found.append((_Site(ev.name, ev.module, ev.output.dim()), (ev.output, i)))
        return found

    def users(self, handle: tuple[torch.Tensor, int]) -> list[tuple[_Consumer, Any]]:
        tensor, after = handle
        out: list[tuple[_Consumer, Any]] = []
        for j in range(after + 1, len(self.events)):
            ev = self.events[j]
            if not any(t is tensor for t in ev.inputs):
                continue
            first = ev.inputs[0] is tensor and len(ev.inputs) == 1
            single = isinstance(ev.output, torch.Tensor)
            out.append(
                (
                    _Consumer(
                        "module", _module_label(ev.name, ev.module), ev.module, ev.name,
                        first_arg_only=first, returns_tensor=single,
                    ),
                    (ev.output, j) if single else None,
                )
            )
            # An in-place op (output is its input) takes over the tensor: later uses are its.
            if ev.output is tensor:
                break
        if any(t is tensor for t in self.outputs):
            out.append((_Consumer("output", "the model output"), None))
        if not out:
            unseen = "an operation that is not a module call (not visible without torch.fx)"
            out.append((_Consumer("unseen", unseen), None))
        return out


def _module_label(name: str, module: nn.Module) -> str:
    return f"{type(module).__name__} {name!r}"


def _single(values: set[int] | None) -> int | None:
    if not values or len(values) != 1:
        return None
    return next(iter(values))


def _channel_dim(module: nn.Module, ndim: int) -> int:
    """The output-channel dim of a Linear/ConvNd output with ``ndim`` dims."""
    if isinstance(module, nn.Linear):
        return ndim - 1
    return ndim - 1 - len(module.kernel_size)  # type: ignore[arg-type]


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels  # type: ignore[return-value]


def _norm_grouping(norm: nn.Module, layer: nn.Module, ndim: int) -> tuple[Grouping | None, str, bool]:
    """(grouping, reason if None, whether the norm removes a per-channel bias)."""
    channels = _out_channels(layer)
    lc = _channel_dim(layer, ndim)
    kind = type(norm).__name__
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        if lc != 1 or norm.num_features != channels:
            return None, (
                f"{kind} normalizes dim 1 with {norm.num_features} features, not the layer's "
                f"{channels} output channels (dim {lc})"
            ), False
        return Grouping.per_channel(), "", True
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm):
        nc = ndim - norm._get_no_batch_dim()
        if lc != nc or norm.num_features != channels:
            return None, (
                f"{kind} normalizes channels in dim {nc} ({norm.num_features}), not the layer's "
                f"{channels} output channels (dim {lc})"
            ), False
        return Grouping.per_channel(), "", True
    if isinstance(norm, nn.GroupNorm):
        if lc != 1 or norm.num_channels != channels:
            return None, (
                f"GroupNorm has {norm.num_channels} channels in dim 1, not the layer's "
                f"{channels} output channels (dim {lc})"
            ), False
        cpg = channels // norm.num_groups
        if norm.num_groups == 1:
            return Grouping.whole(), "", False
        if cpg == 1:
            return Grouping.per_channel(), "", True
        return Grouping.blocks(cpg), "", False
    # LayerNorm / RMSNorm: normalized over the trailing len(normalized_shape) dims.
    first = ndim - len(norm.normalized_shape)  # type: ignore[arg-type]
    removes_mean = isinstance(norm, nn.LayerNorm)
    if lc >= first:
        return Grouping.whole(), "", False
    return Grouping.per_channel(), "", removes_mean


def _follow(graph: _Graph, site: _Site, handle: Any, has_bias: bool):
    """Follow a layer's output to a norm layer. Returns (norm consumer, path) or a reason."""
    path: list[str] = []
    affine_only = True
    cur = handle
    while True:
        users = graph.users(cur)
        if len(users) != 1:
            names = ", ".join(c.label for c, _ in users)
            return (
                f"its output is used by {len(users)} operations ({names}); it must reach a normalization "
                "layer and nothing else"
            )
        consumer, nxt = users[0]
        if consumer.kind == "output":
            return "its output reaches the model output without passing a normalization layer"
        if consumer.kind == "unseen":
            return f"its output goes to {consumer.label}"
        if not consumer.first_arg_only:
            return f"its output is combined with other tensors in {consumer.label}"
        mod = consumer.module
        if mod is not None and isinstance(mod, _NORMS):
            if has_bias and not affine_only:
                return (
                    f"it has a bias and the path to {consumer.label} passes {', '.join(path)}: the bias does not "
                    "scale with the weight, so scaling the weight alone changes the output"
                )
            return consumer, tuple(path)
        if mod is not None:
            affine = isinstance(mod, _AFFINE_MODULES)
            homogeneous = affine or isinstance(mod, _HOMOGENEOUS_MODULES)
        elif consumer.kind == "function":
            affine = consumer.target in _AFFINE_FUNCTIONS
            homogeneous = affine or consumer.target in _HOMOGENEOUS_FUNCTIONS
        else:
            affine = False
            homogeneous = consumer.target in _HOMOGENEOUS_METHODS
        if not homogeneous:
            return (
                f"its output reaches {consumer.label} before any normalization layer; that operation is not "
                "positively homogeneous per channel (f(c*z) = c*f(z) for c > 0), so the scale is not removed"
            )
        if not consumer.returns_tensor or nxt is None:
            return f"{consumer.label} does not return a single tensor"
        affine_only = affine_only and affine
        path.append(type(mod).__name__ if mod is not None else consumer.label)
        cur = nxt


def _structural_pass(
    model: nn.Module, graph: _Graph, param_names: dict[int, str]
) -> tuple[list[_Candidate], list[RejectedCandidate]]:
    verdicts: dict[int, list[Any]] = {}  # id(param) -> per call site: _Candidate or reason
    for site, handle in graph.sites():
        module = site.module
        if not isinstance(module, CHANNEL_FIRST_LAYERS) or parametrize.is_parametrized(module, "weight"):
            continue
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        pid = id(weight)
        if site.out_ndim is None:
            verdicts.setdefault(pid, []).append("its layer was called with outputs of different ranks")
            continue
        result = _follow(graph, site, handle, module.bias is not None)
        if isinstance(result, str):
            verdicts.setdefault(pid, []).append(result)
            continue
        consumer, path = result
        norm = consumer.module
        assert norm is not None
        grouping, reason, removes_bias = _norm_grouping(norm, module, site.out_ndim)
        if grouping is None:
            verdicts.setdefault(pid, []).append(reason)
            continue
        if module.bias is not None and not (grouping.kind == "channel" and removes_bias):
            verdicts.setdefault(pid, []).append(
                f"it has a bias and {consumer.label} does not remove a per-channel bias "
                f"({grouping.describe()} grouping), so scaling the weight alone changes the output"
            )
            continue
        norm_name = consumer.name
        verdicts.setdefault(pid, []).append(
            _Candidate(param_names[pid], weight, grouping, norm_name, type(norm).__name__, path, _eps_of(norm))
        )

    candidates: list[_Candidate] = []
    rejected: list[RejectedCandidate] = []
    for pid, verdict in verdicts.items():
        reasons = [v for v in verdict if isinstance(v, str)]
        found = [v for v in verdict if isinstance(v, _Candidate)]
        if reasons:
            rejected.append(RejectedCandidate(param_names[pid], reasons[0], "structural"))
        elif len({c.grouping for c in found}) > 1:
            rejected.append(
                RejectedCandidate(
                    param_names[pid], "its layer is called at several places with different groupings", "structural"
                )
            )
        else:
            first = found[0]
            if len(found) > 1:
                first.norm_layer = ", ".join(dict.fromkeys(c.norm_layer for c in found if c.norm_layer))
            candidates.append(first)

    # Layers never seen, transposed convs, and parametrized weights.
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():  # type: ignore[union-attr]
                if tensor_name == "weight" and len(plist) == 1 and type(plist[0]).__name__ == "_WeightNorm":
                    dim = plist[0].dim
                    v = plist.original1
                    v_name = param_names.get(id(v))
                    if v_name is None:
                        continue
                    if dim in (0, -1):
                        grouping = Grouping.per_channel() if dim == 0 else Grouping.whole()
                        prefix = f"{name}." if name else ""
                        candidates.append(
                            _Candidate(v_name, v, grouping, f"{prefix}parametrizations.weight", "weight_norm")
                        )
                    else:
                        rejected.append(
                            RejectedCandidate(
                                v_name,
                                f"weight_norm over dim {dim} makes slices along dim {dim} invariant; psiopt's "
                                "groupings run along dim 0 (use weight_norm(module, dim=0))",
                                "structural",
                            )
                        )
                elif isinstance(module, CHANNEL_FIRST_LAYERS):
                    kinds = ", ".join(type(p).__name__ for p in plist)
                    for pname, p in plist.named_parameters():
                        if id(p) in param_names:
                            rejected.append(
                                RejectedCandidate(
                                    param_names[id(p)],
                                    f"{tensor_name} is computed by the parametrization(s) {kinds}; psiopt only sees "
                                    "through weight_norm (pass the parameter in candidates= to test it numerically)",
                                    "structural",
                                )
                            )
        if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            w = module._parameters.get("weight")
            if w is not None and id(w) in param_names:
                rejected.append(
                    RejectedCandidate(
                        param_names[id(w)],
                        "a transposed convolution keeps its output channels in dim 1 of the weight; psiopt's groupings "
                        "run along dim 0",
                        "structural",
                    )
                )
        elif isinstance(module, CHANNEL_FIRST_LAYERS) and not parametrize.is_parametrized(module, "weight"):
            w = module._parameters.get("weight")
            if w is not None and id(w) not in verdicts and id(w) in param_names:
                rejected.append(
                    RejectedCandidate(param_names[id(w)], "its layer is not called in the forward pass", "structural")
                )
    order = {name: i for i, name in enumerate(param_names.values())}
    candidates.sort(key=lambda c: order.get(c.name, len(order)))
    rejected.sort(key=lambda r: order.get(r.name, len(order)))
    # A parameter both proposed (weight norm) and rejected at a call site keeps the proposal.
    proposed = {c.name for c in candidates}
    return candidates, [r for r in rejected if r.name not in proposed]


def _eps_of(norm: nn.Module) -> float | None:
    eps = getattr(norm, "eps", None)
    return float(eps) if eps is not None else None


# -- statistics at the normalization layers (eps sensitivity, degenerate inputs) ------


def _group_rows(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``norm`` as a matrix whose rows are the groups it normalizes."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm):
        k = norm._get_no_batch_dim() - 1
        return x.reshape(-1, math.prod(x.shape[-k:]))
    if isinstance(norm, nn.GroupNorm):
        return x.reshape(x.shape[0] * norm.num_groups, -1)
    return x.reshape(-1, math.prod(norm.normalized_shape))  # type: ignore[arg-type]


@dataclass
class _NormStats:
    min_var: float = math.inf  # smallest nonzero group variance seen
    worst_ratio: float = math.inf  # smallest var / mean square over non-zero groups

    def update(self, norm: nn.Module, x: torch.Tensor) -> None:
        rows = _group_rows(norm, x.detach()).double()
        var = rows.var(dim=1, unbiased=False)
        mean_sq = (rows * rows).mean(dim=1)
        live = mean_sq > 0
        if live.any():
            self.min_var = min(self.min_var, float(var[live].min()))
            self.worst_ratio = min(self.worst_ratio, float((var[live] / mean_sq[live]).min()))


# -- state that the proof must give back -----------------------------------------------


class _SavedState:
    """Everything the proof may touch, to be put back exactly."""

    def __init__(self, model: nn.Module):
        self.modes = [(m, m.training) for m in model.modules()]
        buffers = _unique(t for _, t in model.named_buffers(remove_duplicate=False))
        self.buffers = [(b, b.detach().clone()) for b in buffers]
        self.params = [(p, p.data) for p in _unique(model.parameters())]
        self.eps = [(m, m.eps) for m in model.modules() if isinstance(m, _NORMS)]
        self.py_rng = random.getstate()
        self.np_rng = _numpy_rng_state()
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def reset_buffers(self) -> None:
        with torch.no_grad():
            for buf, saved in self.buffers:
                buf.copy_(saved)

    def restore(self) -> None:
        for p, data in self.params:
            p.data = data  # the storage itself was never written, only swapped
        self.reset_buffers()
        for m, eps in self.eps:
            m.eps = eps
        for m, training in self.modes:
            m.training = training
        random.setstate(self.py_rng)
        if self.np_rng is not None:
            import numpy as np

            np.random.set_state(self.np_rng)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _numpy_rng_state() -> Any:
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but the state is only saved if present
        return None
    return np.random.get_state()


def _unique(tensors) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


# -- the numerical proof ---------------------------------------------------------------


def _float_leaves(output: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _relative_change(ref: list[torch.Tensor], out: list[torch.Tensor], atol: float, rtol: float) -> tuple[float, bool]:
    """Worst ``max|out - ref| / max|ref|`` over output tensors, and whether all are within tolerance."""
    worst, ok = 0.0, True
    for r, o in zip(ref, out):
        r64, o64 = r.detach().double(), o.detach().double()
        diff = float((o64 - r64).abs().max()) if r.numel() else 0.0
        scale = float(r64.abs().max()) if r.numel() else 0.0
        if not math.isfinite(diff):
            return math.inf, False
        ok = ok and diff <= atol + rtol * scale
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return worst, ok


def _group_factors(k: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """``k`` log-uniform factors in ``[low, high]``, with one group at each end (float64)."""
    logs = torch.empty(k, dtype=torch.float64).uniform_(math.log(low), math.log(high), generator=gen)
    perm = torch.randperm(k, generator=gen)
    logs[perm[0]] = math.log(low)
    if k > 1:
        logs[perm[1]] = math.log(high)
    return logs.exp()


def _scaled(param: torch.Tensor, grouping: Grouping, factors: torch.Tensor) -> torch.Tensor:
    rows = grouping.rows(param.data)
    return (rows * factors.to(device=rows.device, dtype=rows.dtype).unsqueeze(1)).reshape(param.shape)


def _check_options(
    factors: Sequence[float], rtol: float | None, atol: float, proof_eps: float, trials: int
) -> tuple[float, float]:
    try:
        low, high = (float(f) for f in factors)
    except (TypeError, ValueError):
        raise ValueError(f"factors must be a pair (low, high) of positive numbers, got {factors!r}") from None
    if not (0 < low <= 0.1 and high >= 10.0 and math.isfinite(high)):
        raise ValueError(
            f"factors must span at least 0.1..10 (0 < low <= 0.1, finite high >= 10) so that the proof tests "
            f"real rescalings; got {factors!r}"
        )
    if rtol is not None and not (rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol must be a positive finite number, got {rtol!r}")
    if not (atol >= 0 and math.isfinite(atol)):
        raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
    if not (proof_eps >= 0 and math.isfinite(proof_eps)):
        raise ValueError(f"proof_eps must be a finite number >= 0, got {proof_eps!r}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    return low, high


def _check_dtype(name: str, param: torch.Tensor) -> None:
    if param.dtype.is_complex or not param.dtype.is_floating_point:
        raise TypeError(
            f"{name} has dtype {param.dtype}; scale invariance and the PSI manifold need a real floating-point "
            "weight (float64, float32, float16 or bfloat16): convert the model, e.g. model.float()"
        )


def _check_layer_dtypes(model: nn.Module, param_names: dict[int, str]) -> None:
    """Before any forward: every weight the structural pass may propose must be real floating point."""
    for module in model.modules():
        if isinstance(module, CHANNEL_FIRST_LAYERS) or parametrize.is_parametrized(module):
            for p in module.parameters():
                if id(p) in param_names:
                    _check_dtype(param_names[id(p)], p)


def _least_precise(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def find_scale_invariant(
    model: nn.Module,
    *example_inputs: Any,
    factors: Sequence[float] = (0.1, 10.0),
    rtol: float | None = None,
    atol: float = 0.0,
    proof_eps: float = 1e-30,
    trials: int = 1,
    seed: int = 0,
    candidates: Mapping[str, GroupingLike] | None = None,
    structure: str = "auto",
    measure_eps: bool = True,
) -> ScaleInvarianceReport:
    """Find the weights of ``model`` whose groups can be rescaled without changing its output.

    See the module documentation for the patterns recognized and how the proof works.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it comes back unchanged (parameters, buffers, modes, eps, RNG state).
    *example_inputs
        Arguments for ``model(*example_inputs)``: a real batch (at least 2 varied
        samples, so that every normalized group has a nonzero variance).
    factors : (float, float), default (0.1, 10.0)
        Range of the random positive factors; must contain ``[0.1, 10]``.
    rtol : float, optional
        Relative tolerance of the proof. Default by precision: 1e-9 (float64), 1e-4
        (float32), 1e-2 (float16), 3e-2 (bfloat16), for the least precise of the
        candidates' and outputs' dtypes.
    atol : float, default 0.0
        Absolute slack added to ``rtol * max|output|``.
    proof_eps : float, default 1e-30
        The eps every normalization layer gets during the proof.
    trials : int, default 1
        Number of random factor draws (each draw is tested with the factors and with
        their mirror images :math:`ab/a_j`, so every group is both shrunk and grown and
        both ends of the range are hit).
    seed : int, default 0
        Seed of the factors and of the forward passes (dropout masks); the global
        random state is not used nor changed.
    candidates : mapping of str to grouping, optional
        Skip the structural pass and test exactly these parameters (name -> grouping,
        e.g. ``{"0.weight": "channel"}``) with the numerical proof.
    structure : {"auto", "fx", "hooks"}, default "auto"
        How to see the model: torch.fx with a fallback to forward hooks (``"auto"``),
        or only one of them (``"fx"`` raises if tracing fails).
    measure_eps : bool, default True
        Measure each found weight's :attr:`~ScaleInvariantWeight.eps_sensitivity`
        (two forward passes per weight); ``False`` leaves it ``None``.

    Notes
    -----
    Cost: two forward passes (real and proof eps), two for the joint proof of all
    candidates (one per trial and mirror image), two more per candidate only if the
    joint proof fails, and two per found weight with ``measure_eps``; all under
    ``torch.no_grad()``. A small batch (a few samples) is enough.

    Returns
    -------
    ScaleInvarianceReport
        The weights found, and the rejected candidates with the reason.

    Raises
    ------
    psiopt.ZeroGroupError
        A candidate weight has an all-zero group.
    TypeError
        A candidate weight is not a real floating-point tensor.
    ValueError
        Bad options, or example inputs that make a normalization layer see a
        (nearly) constant group, so that the proof cannot tell anything.
    Exception
        Whatever the model raises on ``example_inputs``; the model is left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if structure not in ("auto", "fx", "hooks"):
        raise ValueError(f"structure must be 'auto', 'fx' or 'hooks', got {structure!r}")
    low, high = _check_options(factors, rtol, atol, proof_eps, trials)
    param_names = {id(p): n for n, p in model.named_parameters()}
    by_name = dict(model.named_parameters())
    _check_layer_dtypes(model, param_names)
    notes: list[str] = []

    gm: torch.fx.GraphModule | None = None
    method = "given"
    if candidates is None:
        method = "hooks"
        if structure in ("auto", "fx"):
            try:
                gm = torch.fx.symbolic_trace(model)
                method = "fx"
            except Exception as err:  # fx raises many types; the fallback is recorded
                if structure == "fx":
                    raise
                notes.append(f"torch.fx could not trace the model ({type(err).__name__}: {err}); used forward hooks")
    else:
        unknown = [n for n in candidates if n not in by_name]
        if unknown:
            raise ValueError(f"candidates name no parameter of the model: {unknown}; see model.named_parameters()")
        for n in candidates:
            _check_dtype(n, by_name[n])

    saved = _SavedState(model)
    try:
        # Flags set directly: a model's own train() override (freezing BN, say) must not run.
        for m, _ in saved.modes:
            m.training = True
        out_ndims: dict[str, set[int]] = {}
        stats: dict[int, _NormStats] = {}
        events: list[_Event] = []
        handles = []
        record_events = method == "hooks"
        for name, module in model.named_modules():
            if isinstance(module, CHANNEL_FIRST_LAYERS):
                handles.append(module.register_forward_hook(_ndim_hook(name, out_ndims)))
            if isinstance(module, _NORMS):
                handles.append(module.register_forward_pre_hook(_stats_hook(stats.setdefault(id(module), _NormStats()))))
            if record_events and _is_leaf(name, module):
                handles.append(module.register_forward_hook(_event_hook(name, events)))
        try:
            ref_real = _forward(model, example_inputs, seed, saved)
        finally:
            for h in handles:
                h.remove()
        ref_real_leaves = _float_leaves(ref_real)
        if not ref_real_leaves:
            raise ValueError("the model's output holds no floating-point tensor, so there is nothing to compare")

        # -- candidates --
        if candidates is not None:
            proposed = [
                _Candidate(n, by_name[n], as_grouping(g), None, None) for n, g in candidates.items()
            ]
            rejected: list[RejectedCandidate] = []
        else:
            graph: _Graph = (
                _FxGraph(gm, model, out_ndims) if gm is not None else _HookGraph(events, _float_leaves(ref_real))
            )
            proposed, rejected = _structural_pass(model, graph, param_names)
        events.clear()
        for cand in proposed:
            _check_dtype(cand.name, cand.param)
            try:
                cand.grouping.num_groups(cand.param.shape)
            except ValueError as err:
                raise ValueError(f"{cand.name}: {err}") from None
            PSIManifold(cand.grouping).check_nonzero_groups(cand.param.data, cand.name)

        dtype = _least_precise([c.param.dtype for c in proposed] + [t.dtype for t in ref_real_leaves])
        tol = rtol if rtol is not None else _DEFAULT_RTOL.get(dtype, 1e-4)
        norm_by_name = {n: m for n, m in model.named_modules() if isinstance(m, _NORMS)}
        _check_conditioning(proposed, norm_by_name, stats, dtype, tol)

        # -- the proof, with eps out of the way --
        for m, _ in saved.eps:
            m.eps = proof_eps
        ref_proof = _float_leaves(_forward(model, example_inputs, seed, saved))
        bad = [i for i, t in enumerate(ref_proof) if not torch.isfinite(t).all()]
        if bad:
            raise ValueError(
                f"with the normalization layers' eps set to proof_eps={proof_eps:g}, the model's output is not finite; "
                "some normalized group has zero variance on these inputs. Use a larger, varied batch of example "
                "inputs, or a larger proof_eps"
            )
        gen = torch.Generator().manual_seed(seed)

        def prove(group: list[_Candidate]) -> tuple[float, bool]:
            worst, ok = 0.0, True
            for _ in range(trials):
                draws = [_group_factors(c.grouping.num_groups(c.param.shape), low, high, gen) for c in group]
                for mirrored in (False, True):
                    scaling = [(c, low * high / d if mirrored else d) for c, d in zip(group, draws)]
                    out = _forward_with(model, example_inputs, seed, saved, scaling)
                    dev, within = _relative_change(ref_proof, out, atol, tol)
                    worst, ok = max(worst, dev), ok and within
            return worst, ok

        # All candidates at once first (independent random factors: one weight's failure
        # cannot be cancelled by another's); only if that fails, each on its own.
        accepted: list[tuple[_Candidate, float]] = []
        joint_worst, joint_ok = prove(proposed) if len(proposed) > 1 else (0.0, False)
        for cand in proposed:
            worst, ok = (joint_worst, True) if joint_ok else prove([cand])
            if ok:
                accepted.append((cand, worst))
            else:
                rejected.append(
                    RejectedCandidate(
                        cand.name,
                        f"output changed by {worst:.3g} (relative) when its groups were rescaled by factors in "
                        f"[{low:g}, {high:g}] with norm eps set to {proof_eps:g} (tolerance {tol:g})",
                        "numerical",
                    )
                )
        for m, eps in saved.eps:
            m.eps = eps

        # -- how much the real eps breaks it --
        found = []
        for cand, worst in accepted:
            k = cand.grouping.num_groups(cand.param.shape)
            sensitivity = None
            if measure_eps:
                changes = []
                for c in (low, high):
                    uniform = torch.full((k,), c, dtype=torch.float64)
                    out = _forward_with(model, example_inputs, seed, saved, [(cand, uniform)])
                    changes.append(_relative_change(ref_real_leaves, out, 0.0, 0.0)[0])
                sensitivity = (changes[0], changes[1])
            bound = None
            norm = norm_by_name.get(cand.norm_layer or "")
            if norm is not None and cand.eps is not None:
                st = stats.get(id(norm))
                if st is not None and math.isfinite(st.min_var) and st.min_var > 0:
                    bound = cand.eps * (low**-2 - 1.0) / (2.0 * st.min_var)
            found.append(
                ScaleInvariantWeight(
                    cand.name,
                    tuple(cand.param.shape),
                    cand.grouping,
                    cand.norm_layer,
                    cand.norm_type,
                    cand.path,
                    worst,
                    cand.eps,
                    sensitivity,
                    bound,
                )
            )
    finally:
        saved.restore()

    order = {n: i for i, n in enumerate(by_name)}
    rejected.sort(key=lambda r: order.get(r.name, len(order)))
    return ScaleInvarianceReport(
        tuple(found), tuple(rejected), method, tuple(notes), dtype, tol, atol, (low, high), proof_eps
    )


def _is_leaf(name: str, module: nn.Module) -> bool:
    if ".parametrizations." in f".{name}.":
        return False
    children = [n for n, _ in module.named_children() if n != "parametrizations"]
    return not children


def _ndim_hook(name: str, out_ndims: dict[str, set[int]]):
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            out_ndims.setdefault(name, set()).add(output.dim())

    return hook


def _stats_hook(stats: _NormStats):
    def hook(module: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            stats.update(module, args[0])

    return hook


def _event_hook(name: str, events: list[_Event]):
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        inputs = tuple(t for t in tree_leaves(args) if isinstance(t, torch.Tensor))
        events.append(_Event(name, module, inputs, output))

    return hook


def _check_conditioning(
    proposed: list[_Candidate], norms: dict[str, nn.Module], stats: dict[int, _NormStats], dtype: torch.dtype, tol: float
) -> None:
    """Refuse inputs on which a norm layer's groups are (nearly) constant: rounding noise
    divided by a tiny standard deviation would decide the proof, not the model."""
    # Rounding leaves (z - mean) a relative error of about eps_machine * RMS/std; require it
    # below tol/10 after normalization.
    limit = (10.0 * torch.finfo(dtype).eps / tol) ** 2
    for cand in proposed:
        for norm_name in (cand.norm_layer or "").split(", "):
            norm = norms.get(norm_name)
            st = stats.get(id(norm)) if norm is not None else None
            if st is not None and st.worst_ratio < limit:
                raise ValueError(
                    f"on the example inputs, {type(norm).__name__} {norm_name!r} (after {cand.name}) sees a group "
                    f"that is (nearly) constant (variance / mean square = {st.worst_ratio:.2g}), so the proof would "
                    "measure rounding noise; pass a batch of varied samples (e.g. at least 2 random ones)"
                )


def _clone_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    # The model may modify its inputs in place (ReLU(inplace=True) first): each forward
    # gets a fresh copy and the caller's tensors are never touched.
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)


def _forward(model: nn.Module, inputs: tuple[Any, ...], seed: int, saved: _SavedState) -> Any:
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            return model(*_clone_inputs(inputs))
    finally:
        saved.reset_buffers()


def _forward_with(
    model: nn.Module,
    inputs: tuple[Any, ...],
    seed: int,
    saved: _SavedState,
    scaling: list[tuple[_Candidate, torch.Tensor]],
) -> list[torch.Tensor]:
    """The output with each candidate's groups multiplied by its factors.

    The scaled copies are swapped in through ``.data``, so the original storage is
    never written; ``saved.restore`` would put it back even if this were interrupted.
    """
    originals = [(c.param, c.param.data) for c, _ in scaling]
    try:
        for c, factors in scaling:
            c.param.data = _scaled(c.param, c.grouping, factors)
        return _float_leaves(_forward(model, inputs, seed, saved))
    finally:
        for param, data in originals:
            param.data = data


# -- marking ---------------------------------------------------------------------------


def is_scale_invariant(param: torch.Tensor) -> bool:
    """Whether ``param`` is marked: a :class:`geoopt.ManifoldParameter` on a :class:`PSIManifold`."""
    return isinstance(param, geoopt.ManifoldParameter) and isinstance(param.manifold, PSIManifold)


def scale_invariant_parameters(model: nn.Module) -> list[tuple[str, geoopt.ManifoldParameter]]:
    """The marked parameters of ``model`` as ``(name, parameter)`` pairs; ``parameter.manifold``
    is its :class:`PSIManifold`."""
    return [(n, p) for n, p in model.named_parameters() if is_scale_invariant(p)]


def mark_scale_invariant(model: nn.Module, *example_inputs: Any, **options: Any) -> ScaleInvarianceReport:
    """Find the scale-invariant weights (see :func:`find_scale_invariant`) and mark them.

    For geoopt's optimizers, which read a parameter's manifold from the parameter.
    psiopt's optimizers read it from their param groups instead: prefer
    ``psiopt.PSISGD(psiopt.param_groups(model, batch), ...)``, which works on any model,
    wrapped or not. Marking keeps working with ``PSISGD(model.parameters())`` on a
    plain, single-process model.

    Each found parameter becomes a :class:`geoopt.ManifoldParameter` on a
    ``PSIManifold(grouping)`` **in place**: the object stays the same (its class
    changes and it gains a ``manifold``), so every module that shares it, and any
    optimizer or hook that already holds it, sees the mark; nothing is replaced and
    nothing is left stale. The mark survives ``copy.deepcopy``, pickling the whole
    model (``torch.save(model)``; loading it needs ``weights_only=False``, as any
    pickled module), ``model.to(...)`` and ``model.load_state_dict(sd)``. With
    ``load_state_dict(sd, assign=True)`` torch puts new parameter objects in the
    modules; a hook that marking registers on each module owning a marked parameter
    (on this model only) marks the new objects again. An optimizer created before such
    a load holds the old objects, as with any torch optimizer: create it after. A
    ``state_dict`` holds plain tensors, so it loads with ``weights_only=True``.
    Marking an already marked weight again changes nothing.

    Parameters
    ----------
    model : torch.nn.Module
        The model to mark (in place): a plain module, not wrapped in DDP, sharded
        with ``fully_shard`` or compiled (mark before wrapping, or use
        :func:`psiopt.param_groups`, which handles all of them).
    *example_inputs, **options
        As for :func:`find_scale_invariant`.

    Returns
    -------
    ScaleInvarianceReport
        The same records :func:`find_scale_invariant` returns.

    Raises
    ------
    TypeError
        ``model`` is wrapped in DDP, sharded, or compiled; or a found weight is a
        parameter subclass other than ``nn.Parameter`` and ``ManifoldParameter``.
    ValueError
        A found weight is already a ManifoldParameter on another manifold.
    """
    wrapper = wrapper_of(model)
    if wrapper is not None:
        raise TypeError(
            f"mark_scale_invariant cannot mark a model wrapped in {wrapper}: the wrapper holds or replaces the "
            "parameters. Build the optimizer's param groups instead, which works on wrapped models: "
            "psiopt.PSISGD(psiopt.param_groups(model, batch), lr=...)"
        )
    report = find_scale_invariant(model, *example_inputs, **options)
    params = dict(model.named_parameters())
    for rec in report:
        p = params[rec.name]
        if isinstance(p, geoopt.ManifoldParameter) and not isinstance(p.manifold, PSIManifold):
            raise ValueError(
                f"{rec.name} is already a geoopt.ManifoldParameter on {p.manifold}; psiopt does not replace "
                "another manifold. Unwrap it (torch.nn.Parameter(p.data)) first if the PSI manifold is wanted"
            )
        if type(p) not in (nn.Parameter, geoopt.ManifoldParameter):
            raise TypeError(
                f"{rec.name} is a {type(p).__name__}, which marking cannot turn into a geoopt.ManifoldParameter "
                "in place; use psiopt.param_groups(model, batch) for psiopt's optimizers"
            )
    marks = {rec.name: rec.grouping.describe() for rec in report}
    for name, grouping in marks.items():
        _mark(params[name], grouping)
    _remark_after_assign(model, marks)
    return report


def _mark(param: torch.Tensor, grouping: str) -> None:
    """Make ``param`` a ManifoldParameter on ``PSIManifold(grouping)``, keeping the object."""
    if is_scale_invariant(param) and param.manifold.grouping == as_grouping(grouping):
        return
    param.__class__ = geoopt.ManifoldParameter
    param.manifold = PSIManifold(grouping)


def _remark_after_assign(model: nn.Module, marks: Mapping[str, str]) -> None:
    """Register, on each module that owns a marked parameter, a load_state_dict post-hook
    that marks the parameter again: ``load_state_dict(assign=True)`` puts a new object in
    its place. One hook per module, updated when the module is marked again."""
    grouping_of = {id(model.get_parameter(name)): grouping for name, grouping in marks.items()}
    owned: dict[nn.Module, dict[str, str]] = {}
    for full_name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in grouping_of:
            module_name, _, attr = full_name.rpartition(".")
            owned.setdefault(model.get_submodule(module_name), {})[attr] = grouping_of[id(p)]
    for module, attrs in owned.items():
        hook = next(
            (h for h in module._load_state_dict_post_hooks.values() if getattr(h, "func", None) is _remark_loaded),
            None,
        )
        if hook is None:
            module.register_load_state_dict_post_hook(functools.partial(_remark_loaded, dict(attrs)))
        else:
            hook.args[0].update(attrs)


def _remark_loaded(attrs: dict[str, str], module: nn.Module, incompatible_keys: Any) -> None:
    for attr, grouping in attrs.items():
        param = module._parameters.get(attr)
        if param is not None:
            _mark(param, grouping)
