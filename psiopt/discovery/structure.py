"""Propose: which layer's output reaches which normalization, and so how its weight groups.

A weight is proposed when it is the weight of a Linear/ConvNd computation whose output
reaches a normalization *and nothing else*, through per-channel positively homogeneous
operations and layout changes (:mod:`psiopt.layers` has the tables); the normalization
and where the channels sit when they get there (:class:`psiopt.layers.ChannelDims`:
split into heads, say) decide the grouping (:func:`psiopt.layers.norm_grouping`). When the
channels do not get there one by one, a scale common to a bias-free layer's whole output
is followed too, through products with independent tensors, attention's values and
bias-free layers (``tensor`` grouping). A weight that another operation also reads (a
tied embedding) is rejected. The direction of
``weight_norm`` is proposed on its own. Everything else that could have been a candidate
is rejected with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..grouping import Grouping
from ..layers import (
    AFFINE_OPS,
    ATTENTION_OPS,
    CAST_OPS,
    CHANNEL_FIRST_LAYERS,
    HOMOGENEOUS_OPS,
    LAYER_OPS,
    LAYOUT_OPS,
    PRODUCT_OPS,
    RESHAPE_OPS,
    SELECT_OPS,
    TRANSPOSED_CONVS,
    ChannelDims,
    move_channels,
    norm_grouping,
)
from .graph import Graph, Op
from .report import RejectedCandidate

__all__ = ["Candidate", "propose"]


@dataclass
class Candidate:
    """A weight proposed by the structural pass (or given), before the proof."""

    name: str
    param: torch.Tensor
    grouping: Grouping
    norm_layers: tuple[str, ...] = ()  # modules whose normalization makes it invariant
    norm_type: str | None = None
    path: tuple[str, ...] = ()
    eps: float | None = None


@dataclass
class _Reached:
    """Where a layer's output meets its normalization."""

    norm: Op
    channels: ChannelDims | None  # None: only a scale common to all channels reaches it
    path: tuple[str, ...]


def _channel_dim(layer: Op, ndim: int) -> int:
    """The output-channel dim of a ``linear``/``convNd`` output of rank ``ndim``."""
    return ndim - 1 if layer.name == "linear" else ndim - 1 - int(layer.name[4])


def _follow(graph: Graph, layer: Op) -> _Reached | str:
    """Follow a layer's output to a normalization; the reason if it does not get there alone."""
    assert layer.out_ndim is not None and layer.weight is not None
    ndim = layer.out_ndim
    channels = ChannelDims.single(_channel_dim(layer, ndim), layer.weight.shape[0], ndim)
    path: list[str] = []
    affine_only = True
    handle = layer.output
    while True:
        uses = graph.uses(handle)
        if len(uses) != 1:
            if not uses:
                return "its output is not read by any operation psiopt can see"
            names = ", ".join("the model output" if u is None else u.label for u in uses)
            return (
                f"its output is used by {len(uses)} operations ({names}); it must reach a normalization "
                "layer and nothing else"
            )
        op = uses[0]
        if op is None:
            return "its output reaches the model output without passing a normalization layer"
        if op.first_input != handle or len(set(op.inputs)) > 1:
            return f"its output is combined with other tensors in {op.label}"
        if op.norm is not None:
            if layer.has_bias and not affine_only:
                return (
                    f"it has a bias and the path to {op.label} passes {', '.join(path)}: the bias does not "
                    "scale with the weight, so scaling the weight alone changes the output"
                )
            return _Reached(op, channels, tuple(path))
        if op.name in LAYOUT_OPS:
            if op.name in RESHAPE_OPS and (op.in_shape is None or op.shape is None):
                graph.ensure_shapes()
            moved = move_channels(op.name, op.args, op.kwargs, channels, op.in_shape, op.shape)
            if isinstance(moved, str):
                return f"its output reaches {op.label}: {moved}"
            channels = moved
        elif op.name in HOMOGENEOUS_OPS:
            affine_only = False
        elif op.name not in AFFINE_OPS:
            return (
                f"its output reaches {op.label} before any normalization layer; that operation is not "
                "positively homogeneous per channel (f(c*z) = c*f(z) for c > 0), so the scale is not removed"
            )
        if op.output is None:
            return f"{op.label} does not return a single tensor"
        path.append(op.path_label)
        handle = op.output


_ONE_TENSOR_OPS = LAYOUT_OPS | AFFINE_OPS | HOMOGENEOUS_OPS | CAST_OPS | SELECT_OPS
_CATS = frozenset({"cat", "concat", "concatenate"})


def _follow_whole(graph: Graph, layer: Op) -> _Reached | None:
    """Follow a scale common to a bias-free layer's whole output to a normalization; ``None`` if
    it does not get there alone.

    Beside the operations :func:`_follow` allows, the path may multiply by tensors that do not
    depend on the layer (attention's weights times its values, a gate's product), pass
    another bias-free layer (the attention's ``o_proj``), or pick and repeat entries: each
    multiplies the whole output by the same factor, which the normalization removes, so the
    weight is invariant as one group (the post-norms of OLMo-2 and Gemma-3 make ``v_proj`` and
    ``up_proj`` so). Every value on the path has one reader, so what it is multiplied by cannot
    depend on the layer.
    """
    path: list[str] = []
    handle = layer.output
    while True:
        uses = graph.uses(handle)
        if len(uses) != 1 or uses[0] is None or uses[0].output is None:
            return None
        op = uses[0]
        if op.norm is not None:
            return _Reached(op, None, tuple(path)) if op.first_input == handle else None
        if not _passes_a_common_scale(op, handle):
            return None
        path.append(op.path_label)
        handle = op.output


def _passes_a_common_scale(op: Op, handle: object) -> bool:
    """Whether multiplying ``handle`` (read by ``op``) by :math:`c > 0` multiplies ``op``'s output by
    a positive power of :math:`c`, the other inputs being independent of it."""
    if op.name in _CATS:
        return op.inputs == (handle,)  # a cat with empty tensors only (a key/value cache's first step)
    if op.name in _ONE_TENSOR_OPS:
        return op.first_input == handle
    if op.name in PRODUCT_OPS:
        return op.name.startswith(("mul", "matmul", "bmm")) or op.first_input == handle  # a numerator
    if op.name in ATTENTION_OPS:
        return len(op.inputs) >= 3 and op.inputs[2] == handle and handle not in op.inputs[:2]
    if op.name in LAYER_OPS:
        return op.first_input == handle and op.weight is not None and not op.has_bias
    return False


def _verdict(layer: Op, name: str, reached: _Reached | str) -> Candidate | str:
    if isinstance(reached, str):
        return reached
    assert layer.weight is not None and reached.norm.norm is not None
    if reached.channels is None:
        grouping, reason, removes_bias = Grouping.whole(), "", False
    else:
        grouping, reason, removes_bias = norm_grouping(reached.norm.norm, reached.channels, layer.weight.shape[0])
    if grouping is None:
        return f"its output reaches {reached.norm.label}, but {reason}"
    if layer.has_bias and not (grouping.kind == "channel" and removes_bias):
        return (
            f"it has a bias and {reached.norm.label} does not remove a per-channel bias "
            f"({grouping.describe()} grouping), so scaling the weight alone changes the output"
        )
    return Candidate(
        name=name, param=layer.weight, grouping=grouping, norm_layers=(reached.norm.module_name,),
        norm_type=reached.norm.norm_type, path=reached.path, eps=reached.norm.norm.eps,
    )


def propose(
    model: nn.Module, graph: Graph, param_names: dict[int, str]
) -> tuple[list[Candidate], list[RejectedCandidate]]:
    """The candidates the graph shows, and the rejected weights with the reason."""
    verdicts: dict[int, list[Candidate | str]] = {}  # id(param) -> one verdict per call
    for layer in graph.layers():
        assert layer.weight is not None
        pid = id(layer.weight)
        if pid not in param_names:
            continue
        if layer.out_ndim is None:
            verdicts.setdefault(pid, []).append("its layer was called with outputs of different ranks")
            continue
        reached = _follow(graph, layer)
        if isinstance(reached, str) and not layer.has_bias:
            reached = _follow_whole(graph, layer) or reached
        verdicts.setdefault(pid, []).append(_verdict(layer, param_names[pid], reached))

    candidates: list[Candidate] = []
    rejected: list[RejectedCandidate] = []
    for pid, verdict in verdicts.items():
        reasons = [v for v in verdict if isinstance(v, str)]
        found = [v for v in verdict if isinstance(v, Candidate)]
        if reasons:
            rejected.append(RejectedCandidate(name=param_names[pid], reason=reasons[0], stage="structural"))
        elif len({c.grouping for c in found}) > 1:
            rejected.append(
                RejectedCandidate(
                    name=param_names[pid],
                    reason="its layer is called at several places with different groupings",
                    stage="structural",
                )
            )
        else:
            norms = tuple(dict.fromkeys(n for c in found for n in c.norm_layers))
            candidates.append(replace(found[0], norm_layers=norms))
    candidates, shared = _not_read_elsewhere(graph, candidates)
    rejected += shared
    more, unseen = _outside_the_graph(model, param_names, set(verdicts))
    candidates += more
    rejected += unseen

    order = {name: i for i, name in enumerate(param_names.values())}
    candidates.sort(key=lambda c: order.get(c.name, len(order)))
    rejected.sort(key=lambda r: order.get(r.name, len(order)))
    # A parameter both proposed (weight norm) and rejected at a call site keeps the proposal.
    proposed = {c.name for c in candidates}
    return candidates, [r for r in rejected if r.name not in proposed]


def _not_read_elsewhere(graph: Graph, candidates: list[Candidate]) -> tuple[list[Candidate], list[RejectedCandidate]]:
    """The candidates whose weight only their layers read, and the others rejected: a weight tied
    to an embedding (a language model's input and output embeddings) is also read there, where
    nothing normalizes it."""
    kept: list[Candidate] = []
    rejected: list[RejectedCandidate] = []
    for cand in candidates:
        readers = graph.weight_reads.get(id(cand.param))
        if not readers:
            kept.append(cand)
            continue
        reason = (
            f"it is also read outside its layer, by {', '.join(dict.fromkeys(readers))} (a tied weight?); scaling it "
            "changes what that computes"
        )
        rejected.append(RejectedCandidate(name=cand.name, reason=reason, stage="structural"))
    return kept, rejected


def _outside_the_graph(
    model: nn.Module, param_names: dict[int, str], seen: set[int]
) -> tuple[list[Candidate], list[RejectedCandidate]]:
    """Weight-norm directions, and the layer weights the graph does not decide: parametrized,
    transposed, or never called."""
    candidates: list[Candidate] = []
    rejected: list[RejectedCandidate] = []

    def reject(p: torch.Tensor, reason: str) -> None:
        if id(p) in param_names:
            rejected.append(RejectedCandidate(name=param_names[id(p)], reason=reason, stage="structural"))

    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():  # type: ignore[union-attr]
                if tensor_name == "weight" and len(plist) == 1 and type(plist[0]).__name__ == "_WeightNorm":
                    dim = plist[0].dim
                    v = plist.original1
                    if id(v) not in param_names:
                        continue
                    if dim in (0, -1):
                        prefix = f"{name}." if name else ""
                        candidates.append(
                            Candidate(
                                name=param_names[id(v)], param=v,
                                grouping=Grouping.per_channel() if dim == 0 else Grouping.whole(),
                                norm_layers=(f"{prefix}parametrizations.weight",), norm_type="weight_norm",
                            )
                        )
                    else:
                        reject(
                            v,
                            f"weight_norm over dim {dim} makes slices along dim {dim} invariant; psiopt's "
                            "groupings run along dim 0 (use weight_norm(module, dim=0))",
                        )
                elif isinstance(module, CHANNEL_FIRST_LAYERS):
                    kinds = ", ".join(type(p).__name__ for p in plist)
                    for p in plist.parameters():
                        reject(
                            p,
                            f"{tensor_name} is computed by the parametrization(s) {kinds}; psiopt only sees "
                            "through weight_norm (pass the parameter in candidates= to test it numerically)",
                        )
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        if isinstance(module, TRANSPOSED_CONVS):
            reject(
                weight,
                "a transposed convolution keeps its output channels in dim 1 of the weight; psiopt's groupings "
                "run along dim 0",
            )
        elif isinstance(module, CHANNEL_FIRST_LAYERS) and id(weight) not in seen:
            reject(weight, "its layer is not called in the forward pass")
    return candidates, rejected
