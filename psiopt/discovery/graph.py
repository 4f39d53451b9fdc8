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

In both, an RMS norm written out in elementary operations
(:mod:`psiopt.discovery.written`) becomes one ``rms_norm`` operation in place of the
operations it is made of, and the Tap captures it and replaces its eps like a call of
``F.rms_norm``.
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
    CAST_OPS,
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
from .written import WRITTEN_OPS, WrittenNorm, WrittenNorms

__all__ = ["Op", "Graph", "NormCall", "Tap", "fx_graph"]


@dataclass
class Op:
    """One operation of the forward pass.

    ``inputs``, ``first_input`` and ``output`` are handles of the tensors it reads and
    writes (fx nodes, or recorded tensor identities); parameters and buffers are not
    among ``inputs``. ``in_shape`` and ``shape`` are the shapes of its first input and
    of its output, when known (a recorded pass knows them; a torch.fx graph once
    :meth:`Graph.ensure_shapes` has run).
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
    in_shape: tuple[int, ...] | None = None
    shape: tuple[int, ...] | None = None


@dataclass
class Graph:
    """The operations of a forward pass and, for each tensor handle, the operations reading it.

    ``written`` pairs each written-out norm's operation with the operations it is made of:
    those go, unless something outside the norm reads their result (then they stay, and
    show that use). ``shapes``, when given, fills in the operations' missing shapes, once,
    on the first :meth:`ensure_shapes`. ``weight_reads`` maps ``id(parameter)`` to the
    labels of the operations that read a parameter other than as a layer's weight (an
    embedding reading a tied weight).
    """

    method: str
    ops: list[Op]
    outputs: list[Any]
    written: list[tuple[Op, tuple[Op, ...]]] = field(default_factory=list)
    shapes: Callable[[list[Op]], None] | None = None
    weight_reads: dict[int, list[str]] = field(default_factory=dict)
    users: dict[Any, list[Op]] = field(init=False)

    def __post_init__(self) -> None:
        self.ops = _absorb(self.ops, self.written, self.outputs)
        self.users = {}
        for op in _live(self.ops, self.outputs):
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

    def ensure_shapes(self) -> None:
        """Fill in the shapes of the operations (a torch.fx graph runs a shape propagation once)."""
        if self.shapes is not None:
            fill, self.shapes = self.shapes, None
            fill(self.ops)


def _live(ops: list[Op], outputs: list[Any]) -> list[Op]:
    """The operations whose result the model's output depends on. The others read a value
    without consequence for this forward pass (a key/value cache keeping a slice for the next
    call): they are no use of it."""
    needed = set(outputs)
    live: list[Op] = []
    for op in reversed(ops):
        if op.output is None or op.output in needed:  # a tuple result is kept, to be safe
            live.append(op)
            needed.update(op.inputs)
    return live[::-1]


def _absorb(ops: list[Op], written: list[tuple[Op, tuple[Op, ...]]], outputs: list[Any]) -> list[Op]:
    """``ops`` without the operations that written-out norms are made of and that nothing else reads."""
    readers: dict[Any, set[int]] = {}
    for op in ops:
        for handle in op.inputs:
            readers.setdefault(handle, set()).add(id(op))
    gone: set[int] = set()
    for _, members in written:
        inside = {id(m) for m in members}
        for m in members:
            if m is members[-1] or (readers.get(m.output, set()) <= inside and all(m.output != h for h in outputs)):
                gone.add(id(m))
    return [op for op in ops if id(op) not in gone]


def _label(name: str, module: nn.Module | None, module_name: str) -> tuple[str, str]:
    """(label for messages, short label for a path) of an operation made in ``module``."""
    if module is not None and module_name and next(module.children(), None) is None:
        return f"{type(module).__name__} {module_name!r}", type(module).__name__
    where = f" in {type(module).__name__} {module_name!r}" if module is not None and module_name else ""
    return f"{name}(){where}", name


_CATS = frozenset({"cat", "concat", "concatenate"})


def _values_read(name: str, inputs: tuple[Any, ...], first: Any) -> tuple[Any, ...]:
    """The inputs whose values an operation reads: a cast reads only its first
    (``x.type_as(y)`` and ``x.to(y)`` read ``y``'s dtype and device)."""
    if name in CAST_OPS:
        return tuple(h for h in inputs if h == first)[:1]
    return inputs


def _norm_type(spec: NormSpec, module: nn.Module | None) -> str:
    return type(module).__name__ if isinstance(module, NORM_MODULES) else f"F.{spec.kind}"


def _written_type(module: nn.Module | None, module_name: str) -> str:
    """The kind of a written-out norm: the class of the leaf module computing it
    (``Qwen3RMSNorm``), else ``rms_norm (written out)``."""
    if module is not None and module_name and next(module.children(), None) is None:
        return type(module).__name__
    return "rms_norm (written out)"


def _written_op(found: WrittenNorm, module: nn.Module | None, module_name: str) -> Op:
    """The one operation standing for a written-out norm."""
    last = found.ops[-1]
    label, path_label = _label("rms_norm", module, module_name)
    return Op(
        "rms_norm", label, path_label, module_name, (found.root,), found.root, last.output,
        norm=found.spec, norm_type=_written_type(module, module_name), in_shape=found.ops[0].in_shape,
        shape=last.shape,
    )


# -- torch.fx -----------------------------------------------------------------------------


def fx_graph(
    gm: torch.fx.GraphModule, model: nn.Module, layer_ndims: dict[int, set[int]], propagate: Callable[[], None]
) -> Graph:
    """The operations of a traced model; ``layer_ndims`` maps ``id(weight)`` to the ranks of
    that layer's outputs seen in a real forward pass; ``propagate`` runs a
    :class:`torch.fx.passes.shape_prop.ShapeProp` on ``gm``, which is done only if some
    shape is needed (a view between a layer and a norm, say)."""
    params = dict(model.named_parameters())
    shapes = _FxShapes(propagate)
    written = WrittenNorms()
    ops: list[Op] = []
    fused: list[tuple[Op, tuple[Op, ...]]] = []
    outputs: list[Any] = []
    reads: dict[int, list[str]] = {}
    sizes: set[torch.fx.Node] = set()  # values computed from shapes only (x.shape[0] * 2), not from tensors
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            outputs = [a for a in tree_leaves(node.args) if isinstance(a, torch.fx.Node)]
            continue
        nodes = [a for a in tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)]
        if _reads_shape(node) or (_is_arithmetic(node) and nodes and all(a in sizes for a in nodes)):
            sizes.add(node)
            continue
        inputs = tuple(a for a in nodes if a.op != "get_attr" and a not in sizes)
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
            for p in module.parameters():
                if p is not op.weight:
                    reads.setdefault(id(p), []).append(op.label)
            ops.append(op)
            continue
        if node.op == "call_function" and node.target is getattr:
            name = f".{node.args[1]}" if len(node.args) > 1 else "getattr"
        else:
            name = op_name(node.target)
        args = tuple(node.args)
        if name in ("add", "mul") and len(args) == 2 and first is None and isinstance(args[1], torch.fx.Node):
            first, args = args[1], (args[1], args[0])  # 1e-6 + x: recorded passes see x.add(1e-6)
        context_module = model.get_submodule(context) if context else None
        label, path_label = _label(name, context_module, context)
        reads_values = _values_read(name, inputs, first)
        op = Op(name, label, path_label, context, reads_values, first, node, args[1:], dict(node.kwargs))
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
        for a in nodes:
            p = params.get(a.target) if a.op == "get_attr" else None  # type: ignore[arg-type]
            if p is not None and p is not op.weight:
                reads.setdefault(id(p), []).append(op.label)
        ops.append(op)
        if name in WRITTEN_OPS:
            if name == "mean" and _counts_from_the_front(op):
                op.in_shape = shapes.of(first)
            found = written.see(op)
            if found is not None:
                norm = _written_op(found, context_module, context)
                ops.append(norm)
                fused.append((norm, found.ops))
    return Graph("fx", ops, outputs, fused, shapes.fill, reads)


def _reads_shape(node: torch.fx.Node) -> bool:
    """Whether a node reads a tensor's metadata (``x.shape``, ``x.size(1)``, ``x.dim()``)."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in QUERY_OPS
    return node.op == "call_method" and op_name(node.target) in QUERY_OPS


def _is_arithmetic(node: torch.fx.Node) -> bool:
    """Whether a node is Python's ``[]``, ``*``, ``//``... (on sizes, when its inputs are sizes)."""
    return node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator"


class _FxShapes:
    """The shapes of a traced graph's values, from one shape propagation, run on first need."""

    def __init__(self, propagate: Callable[[], None]):
        self._propagate: Callable[[], None] | None = propagate

    def of(self, node: Any) -> tuple[int, ...] | None:
        if self._propagate is not None:
            run, self._propagate = self._propagate, None
            run()
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        shape = getattr(meta, "shape", None)
        return tuple(shape) if shape is not None else None

    def fill(self, ops: list[Op]) -> None:
        for op in ops:
            op.in_shape, op.shape = self.of(op.first_input), self.of(op.output)


def _counts_from_the_front(op: Op) -> bool:
    """Whether a reduction names a dim by a non-negative index (finding its place needs the rank)."""
    dims = op.args[0] if op.args else op.kwargs.get("dim")
    dims = dims if isinstance(dims, (tuple, list)) else [dims]
    return any(isinstance(d, int) and d >= 0 for d in dims)


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
    """Watches a forward pass: captures every normalization call, written-out RMS norms
    included (replacing its eps by ``eps`` when given); ``record="ops"`` records every
    operation (the graph), ``record="layers"`` only the ranks of the Linear/ConvNd outputs
    (what a torch.fx graph needs from a real run).

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
        self.written = WrittenNorms()
        self.weight_reads: dict[int, list[str]] = {}
        self._written: list[tuple[Op, tuple[Op, ...]]] = []

    def watching(self) -> "_Watching":
        return _Watching(self, self.model)

    def graph(self, output: Any) -> Graph:
        """The recorded operations as a :class:`Graph` (after the forward pass)."""
        outs = [self._handle(t) for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
        return Graph("hooks", self.ops, outs, self._written, weight_reads=self.weight_reads)

    def _handle(self, t: torch.Tensor) -> tuple[int, int]:
        return id(t), self._version.get(id(t), 0)

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        name = op_name(func)
        spec = norm_spec_of_call(func, args, kwargs) if func in NORM_FUNCTIONS else None
        module_name, module = self._stack[-1]
        run_args, run_kwargs = args, kwargs
        if spec is not None:
            x = norm_input(func, args, kwargs)
            self.norm_calls.append(NormCall(spec, x, module_name, _norm_type(spec, module)))
            if self.eps is not None:
                run_args, run_kwargs = norm_with_eps(func, args, kwargs, self.eps)
        elif self.eps is not None and name in WRITTEN_OPS and args and isinstance(args[0], torch.Tensor):
            shifted = self.written.shifted(name, self._handle(args[0]))
            if shifted is not None:  # the root of a written-out norm's mean + eps: take it at our eps
                run_args = (shifted[0] + self.eps, *args[1:])
        out = func(*run_args, **run_kwargs)
        if self.record == "ops" or name in WRITTEN_OPS:
            op = self._op(name, args, kwargs, out, spec, module_name, module)
            if op is not None and self.record == "ops":
                self.ops.append(op)
            if op is not None and name in WRITTEN_OPS:
                found = self.written.see(op, keep=(args[0], out))
                if found is not None:
                    self._found(found, module_name, module)
        elif isinstance(out, torch.Tensor):
            if args and out is args[0]:  # in place: later reads see this op's result
                self._version[id(out)] = self._version.get(id(out), 0) + 1
            if self.record == "layers" and name in LAYER_OPS:
                weight = args[1] if len(args) > 1 else kwargs.get("weight")
                self.layer_ndims.setdefault(id(weight), set()).add(out.dim())
        return out

    def _op(self, name: str, args, kwargs, out, spec, module_name: str, module: nn.Module) -> Op | None:
        """The record of one call (``None`` for a read of metadata); ``args`` and ``kwargs`` as
        the model gave them."""
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs:
            return None  # a read of metadata (x.shape, x.dim()), not of values
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        # an empty tensor concatenated (a key/value cache's first step) contributes nothing
        read = [t for t in tensors if not (name in _CATS and t.numel() == 0)]
        inputs = tuple(self._handle(t) for t in read if id(t) not in self._fixed)
        first = self._handle(args[0]) if args and isinstance(args[0], torch.Tensor) else None
        if self.record == "ops":
            self._alive.append((tensors, outs))
        if isinstance(out, torch.Tensor):
            if any(t is out for t in tensors):  # in place: later reads see this op's result
                self._version[id(out)] = self._version.get(id(out), 0) + 1
            output = self._handle(out)
        else:
            output = None
        label, path_label = _label(name, module, module_name)
        op = Op(
            name, label, path_label, module_name, _values_read(name, inputs, first), first, output, tuple(args[1:]),
            dict(kwargs), in_shape=tuple(args[0].shape) if first is not None else None,
            shape=tuple(out.shape) if isinstance(out, torch.Tensor) else None,
        )
        if spec is not None:
            op.norm, op.norm_type = spec, _norm_type(spec, module)
        elif name in LAYER_OPS and isinstance(out, torch.Tensor):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(weight, nn.Parameter) and id(weight) in self._params:
                op.weight, op.has_bias, op.out_ndim = weight, bias is not None, out.dim()
                self.layer_ndims.setdefault(id(weight), set()).add(out.dim())
        for t in tensors:
            if id(t) in self._params and t is not op.weight:
                self.weight_reads.setdefault(id(t), []).append(label)
        return op

    def _found(self, found: WrittenNorm, module_name: str, module: nn.Module) -> None:
        """A written-out norm completed: capture it like a call of ``F.rms_norm``."""
        if isinstance(found.source, torch.Tensor) and found.source.is_floating_point():
            self.norm_calls.append(NormCall(found.spec, found.source, module_name, _written_type(module, module_name)))
        if self.record == "ops":
            norm = _written_op(found, module, module_name)
            self.ops.append(norm)
            self._written.append((norm, found.ops))


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
