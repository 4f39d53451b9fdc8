"""See the model: which operation reads which tensor, from torch.fx or from a recorded forward pass.

Both views are lists of :class:`Op` in forward order, with operations named as
:mod:`psiopt.layers` names them, so that the structural pass reads them the same way:

* :func:`fx_graph` converts a :func:`torch.fx.symbolic_trace` graph: leaf modules
  (``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU``) become the operation they compute, and
  a module that torch.fx traces through (a subclass of a norm layer with its own
  ``forward``, like timm's ``BatchNormAct2d``) shows the functional calls it makes.
* :class:`Tap` records one real forward pass with a :class:`torch.overrides.TorchFunctionMode`
  (every torch function and tensor method called, tensors followed by identity) and
  forward hooks that tell which module made each call. It also captures the input of
  every normalization call, which the proof compares, and can replace those calls' eps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..layers import (
    CHANNEL_FIRST_LAYERS,
    LAYER_OPS,
    NORM_FUNCTIONS,
    NORM_MODULES,
    QUERY_OPS,
    NormSpec,
    module_op,
    norm_input,
    norm_spec_of_call,
    norm_spec_of_module,
    norm_with_eps,
    op_name,
)

__all__ = ["Op", "Graph", "NormCall", "Tap", "fx_graph"]


@dataclass
class Op:
    """One operation of the forward pass.

    ``inputs``, ``first_input`` and ``output`` are handles of the tensors it reads and
    writes (fx nodes, or recorded tensor identities); parameters and buffers are not
    among ``inputs``.
    """

    name: str
    label: str
    path_label: str
    module_name: str
    inputs: tuple[Any, ...]
    first_input: Any
    output: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    norm: NormSpec | None = None
    norm_type: str = ""
    weight: nn.Parameter | None = None
    has_bias: bool = False
    out_ndim: int | None = None


@dataclass
class Graph:
    """The operations of a forward pass and, for each tensor handle, the operations reading it."""

    method: str
    ops: list[Op]
    outputs: list[Any]
    users: dict[Any, list[Op]] = field(init=False)

    def __post_init__(self) -> None:
        self.users = {}
        for op in self.ops:
            for handle in dict.fromkeys(op.inputs):
                self.users.setdefault(handle, []).append(op)

    def layers(self) -> list[Op]:
        """The calls of Linear/ConvNd weights, in forward order."""
        return [op for op in self.ops if op.weight is not None]

    def uses(self, handle: Any) -> list[Op | None]:
        """The operations reading ``handle``; ``None`` stands for the model output."""
        found: list[Op | None] = list(self.users.get(handle, []))
        if any(handle == h for h in self.outputs):
            found.append(None)
        return found


def _label(name: str, module: nn.Module | None, module_name: str) -> tuple[str, str]:
    """(label for messages, short label for a path) of an operation made in ``module``."""
    if module is not None and module_name and next(module.children(), None) is None:
        return f"{type(module).__name__} {module_name!r}", type(module).__name__
    where = f" in {type(module).__name__} {module_name!r}" if module is not None and module_name else ""
    return f"{name}(){where}", name


def _norm_type(spec: NormSpec, module: nn.Module | None) -> str:
    return type(module).__name__ if isinstance(module, NORM_MODULES) else f"F.{spec.kind}"


# -- torch.fx -----------------------------------------------------------------------------


def fx_graph(gm: torch.fx.GraphModule, model: nn.Module, layer_ndims: dict[int, set[int]]) -> Graph:
    """The operations of a traced model; ``layer_ndims`` maps ``id(weight)`` to the ranks of
    that layer's outputs seen in a real forward pass."""
    params = dict(model.named_parameters())
    ops: list[Op] = []
    outputs: list[Any] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            outputs = [a for a in tree_leaves(node.args) if isinstance(a, torch.fx.Node)]
            continue
        inputs = tuple(a for a in tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node) and a.op != "get_attr")
        first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        stack = node.meta.get("nn_module_stack") or {}
        context = next(reversed(stack.values()))[0] if stack else ""
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            name = module_op(module)
            op = Op(name, *(_label(name, module, node.target)), node.target, inputs, first, node, node.args[1:], node.kwargs)
            if isinstance(module, CHANNEL_FIRST_LAYERS) and not parametrize.is_parametrized(module, "weight"):
                op.weight = module._parameters.get("weight")
                op.has_bias = module._parameters.get("bias") is not None
            elif isinstance(module, NORM_MODULES):
                op.norm = norm_spec_of_module(module)
                op.norm_type = type(module).__name__
            elif isinstance(module, nn.Flatten):
                op.args = (module.start_dim, module.end_dim)
            if op.weight is not None:
                op.out_ndim = _single(layer_ndims.get(id(op.weight)))
            ops.append(op)
            continue
        if node.op == "call_function" and node.target is getattr:
            if len(node.args) > 1 and node.args[1] in QUERY_OPS:
                continue
            name = f".{node.args[1]}" if len(node.args) > 1 else "getattr"
        else:
            name = op_name(node.target)
            if node.op == "call_method" and name in QUERY_OPS:
                continue
        context_module = model.get_submodule(context) if context else None
        label, path_label = _label(name, context_module, context)
        op = Op(name, label, path_label, context, inputs, first, node, tuple(node.args[1:]), dict(node.kwargs))
        if node.op == "call_function" and node.target in NORM_FUNCTIONS:
            op.norm = norm_spec_of_call(node.target, node.args, node.kwargs)
            if op.norm is not None:
                op.norm_type = _norm_type(op.norm, context_module)
        elif name in LAYER_OPS:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and weight.target in params:
                op.weight = params[weight.target]
                op.has_bias = bias is not None
                op.out_ndim = _single(layer_ndims.get(id(op.weight)))
        ops.append(op)
    return Graph("fx", ops, outputs)


def _single(values: set[int] | None) -> int | None:
    return next(iter(values)) if values and len(values) == 1 else None


# -- a recorded forward pass ---------------------------------------------------------------


@dataclass
class NormCall:
    """One call of a normalization in a forward pass, with the input it normalized."""

    spec: NormSpec
    input: torch.Tensor
    module_name: str
    norm_type: str


class Tap(TorchFunctionMode):
    """Watches a forward pass: captures every normalization call (replacing its eps by
    ``eps`` when given); ``record="ops"`` records every operation (the graph),
    ``record="layers"`` only the ranks of the Linear/ConvNd outputs (what a torch.fx graph
    needs from a real run).

    Use as ``with tap.watching(): model(x)``; the hooks it installs on the model's
    modules are removed on exit.
    """

    def __init__(self, model: nn.Module, eps: float | None, record: str | None):
        super().__init__()
        self.model, self.eps, self.record = model, eps, record
        self.norm_calls: list[NormCall] = []
        self.ops: list[Op] = []
        self.layer_ndims: dict[int, set[int]] = {}
        self._stack: list[tuple[str, nn.Module]] = [("", model)]
        self._fixed = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
        self._params = {id(p) for p in model.parameters()}
        self._version: dict[int, int] = {}
        # Keeps recorded tensors alive, so that their ids stay theirs (a recorded pass holds
        # every intermediate tensor until its graph is read).
        self._alive: list[Any] = []

    def watching(self) -> "_Watching":
        return _Watching(self, self.model)

    def graph(self, output: Any) -> Graph:
        """The recorded operations as a :class:`Graph` (after the forward pass)."""
        outs = [self._handle(t) for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
        return Graph("hooks", self.ops, outs)

    def _handle(self, t: torch.Tensor) -> tuple[int, int]:
        return id(t), self._version.get(id(t), 0)

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        spec = norm_spec_of_call(func, args, kwargs) if func in NORM_FUNCTIONS else None
        module_name, module = self._stack[-1]
        if spec is not None:
            x = norm_input(func, args, kwargs)
            self.norm_calls.append(NormCall(spec, x, module_name, _norm_type(spec, module)))
            if self.eps is not None:
                args, kwargs = norm_with_eps(func, args, kwargs, self.eps)
        out = func(*args, **kwargs)
        if self.record == "ops":
            self._record(func, args, kwargs, out, spec, module_name, module)
        elif self.record == "layers" and isinstance(out, torch.Tensor) and op_name(func) in LAYER_OPS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            self.layer_ndims.setdefault(id(weight), set()).add(out.dim())
        return out

    def _record(self, func, args, kwargs, out, spec, module_name: str, module: nn.Module) -> None:
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs:
            return  # a read of metadata (x.shape, x.dim()), not of values
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = tuple(self._handle(t) for t in tensors if id(t) not in self._fixed)
        first = self._handle(args[0]) if args and isinstance(args[0], torch.Tensor) else None
        name = op_name(func)
        self._alive.append((tensors, outs))
        if isinstance(out, torch.Tensor):
            if any(t is out for t in tensors):  # in place: later reads see this op's result
                self._version[id(out)] = self._version.get(id(out), 0) + 1
            output = self._handle(out)
        else:
            output = None
        label, path_label = _label(name, module, module_name)
        op = Op(name, label, path_label, module_name, inputs, first, output, tuple(args[1:]), dict(kwargs))
        if spec is not None:
            op.norm, op.norm_type = spec, _norm_type(spec, module)
        elif name in LAYER_OPS and isinstance(out, torch.Tensor):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(weight, nn.Parameter) and id(weight) in self._params:
                op.weight, op.has_bias, op.out_ndim = weight, bias is not None, out.dim()
                self.layer_ndims.setdefault(id(weight), set()).add(out.dim())
        self.ops.append(op)


class _Watching:
    """Context: the tap's mode on, and hooks that keep the stack of modules being called."""

    def __init__(self, tap: Tap, model: nn.Module):
        self.tap, self.model = tap, model
        self.handles: list[Any] = []

    def __enter__(self) -> Tap:
        stack = self.tap._stack

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            stack.pop()

        for name, module in self.model.named_modules():
            if name:
                self.handles.append(module.register_forward_pre_hook(_entering(stack, name)))
                self.handles.append(module.register_forward_hook(leave))
        self.tap.__enter__()
        return self.tap

    def __exit__(self, *exc: Any) -> None:
        try:
            self.tap.__exit__(*exc)
        finally:
            for h in self.handles:
                h.remove()
            del self.tap._stack[1:]


def _entering(stack: list[tuple[str, nn.Module]], name: str) -> Callable[[nn.Module, Any], None]:
    def enter(module: nn.Module, args: Any) -> None:
        stack.append((name, module))

    return enter
