"""An RMS norm written out in elementary operations, recognized as one normalization.

transformers' RMSNorm modules (Llama, Qwen2/3, OLMo-2, Gemma-3...) and many hand-written
models do not call ``F.rms_norm``; they compute::

    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)

then cast back and multiply by a gain. :class:`WrittenNorms` follows a forward pass
operation by operation (the :class:`~psiopt.discovery.graph.Op` records of a torch.fx
graph or of a recorded pass) and, at the operation that completes such a computation,
returns it as one normalization: the tensor it normalizes, over how many trailing dims,
with which eps. Recognized, with the operands in either order and floating-point casts
(``.to(dtype)``, ``.float()``, ``.type_as(y)``...) anywhere:

* the square: ``x.pow(2)``, ``x ** 2``, ``torch.square(x)``, ``x * x``;
* its mean over trailing dims, kept: ``.mean(-1, keepdim=True)``,
  ``torch.mean(.., dim=(-2, -1), keepdim=True)``;
* a number added to that mean, the eps (``+ eps``, ``.add(eps)``), or none;
* ``x * rsqrt(..)`` or ``x / sqrt(..)``,

where every ``x`` is the same tensor, up to casts. The proof replaces the eps by its own
(:meth:`WrittenNorms.shifted`: the root of ``mean + eps`` is taken of ``mean + proof_eps``
instead), as it does for ``F.rms_norm``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from ..layers import CAST_OPS, NormSpec

if TYPE_CHECKING:
    from .graph import Op

__all__ = ["WRITTEN_OPS", "WrittenNorm", "WrittenNorms"]

_POW, _SQUARE, _MEAN, _ADD = {"pow", "pow_"}, {"square", "square_"}, {"mean"}, {"add", "add_"}
_RSQRT, _SQRT, _MUL, _DIV = {"rsqrt", "rsqrt_"}, {"sqrt", "sqrt_"}, {"mul", "mul_"}, {"div", "div_", "truediv"}

WRITTEN_OPS = frozenset(CAST_OPS | _POW | _SQUARE | _MEAN | _ADD | _RSQRT | _SQRT | _MUL | _DIV)
"""The operations an RMS norm is written with: the only ones :class:`WrittenNorms` reads."""

# How far a partial computation has got, for the tensor it produced.
_SQUARED, _MEAN_SQUARE, _SHIFTED, _INVERSE_RMS, _RMS = "squared", "mean square", "shifted", "inverse rms", "rms"


@dataclass(frozen=True)
class _Partial:
    stage: str
    root: Any  # handle of the tensor normalized, before any cast
    ops: tuple["Op", ...]  # the operations so far, casts of the root included
    source: Any = None  # the value squared (a recorded pass keeps it for the proof)
    normalized_ndim: int = 0
    eps: float | None = None
    mean_square: Any = None  # the value the eps was added to (a recorded pass: to add another)


@dataclass(frozen=True)
class WrittenNorm:
    """An RMS norm found in a forward pass.

    Attributes
    ----------
    spec : NormSpec
        ``rms_norm`` over the trailing ``normalized_ndim`` dims, with the eps added to the
        mean square (0.0 when none is).
    root : Any
        Handle of the tensor normalized (before any cast).
    source : Any
        The value that was squared (the root or a cast of it) in a recorded pass, else ``None``.
    ops : tuple of Op
        The operations it is made of, in forward order; the last one gives its output.
    """

    spec: NormSpec
    root: Any
    source: Any
    ops: tuple["Op", ...]


class WrittenNorms:
    """Follows a forward pass (one :meth:`see` per operation, in order) and finds RMS norms
    written out in elementary operations.

    In a recorded pass, handles are tensor identities: every tensor it tracks is kept
    alive (``keep`` of :meth:`see`), so that no later tensor can take its identity.
    """

    def __init__(self) -> None:
        self._partials: dict[Any, _Partial] = {}
        self._casts: dict[Any, tuple[Any, tuple[Op, ...]]] = {}  # handle -> (uncast handle, casts)
        self._kept: list[Any] = []

    def shifted(self, name: str, first: Any) -> tuple[Any, float] | None:
        """For a root about to be taken (``rsqrt``, ``sqrt``) of ``first`` (a handle): the mean
        square and the eps that ``first`` adds, when it is a tracked ``mean + eps`` whose mean
        square a recorded pass kept; the caller can then take the root of ``mean + its own eps``."""
        partial = self._partials.get(first)
        if (name not in _RSQRT and name not in _SQRT) or partial is None or partial.stage != _SHIFTED:
            return None
        if partial.mean_square is None or partial.eps is None:
            return None
        return partial.mean_square, partial.eps

    def see(self, op: "Op", keep: Any = None) -> WrittenNorm | None:
        """Read the next operation; the norm it completes, if it completes one. ``keep``: what
        to hold while this operation's result is tracked (the tensors it read and wrote)."""
        x = op.first_input
        if x is None:
            return None
        if op.name in CAST_OPS:
            if _is_float_cast(op):
                partial = self._partials.get(x)
                if partial is not None:
                    self._track(op.output, replace(partial, ops=partial.ops + (op,)), keep)
                else:
                    root, casts = self._uncast(x)
                    self._casts[op.output] = (root, casts + (op,))
                    self._kept.append(keep)
            return None
        if _is_square(op):
            root, casts = self._uncast(x)
            source = keep[0] if isinstance(keep, tuple) and keep else None
            self._track(op.output, _Partial(_SQUARED, root, casts + (op,), source), keep)
            return None
        if (op.name in _MUL or op.name in _DIV) and len(op.inputs) == 2:
            return self._complete(op)
        partial = self._partials.get(x)
        if partial is None:
            return None
        stage, found = partial.stage, None
        if stage == _SQUARED and op.name in _MEAN:
            ndim = _trailing_mean(op)
            if ndim:
                found = replace(partial, stage=_MEAN_SQUARE, normalized_ndim=ndim)
        elif stage == _MEAN_SQUARE and op.name in _ADD and len(op.inputs) == 1:
            eps = _added_number(op)
            if eps is not None:
                # the mean square itself, unless the add wrote into it (then it is mean + eps)
                kept = keep if isinstance(keep, tuple) and len(keep) == 2 and keep[0] is not keep[1] else None
                found = replace(partial, stage=_SHIFTED, eps=eps, mean_square=kept[0] if kept else None)
        elif stage in (_MEAN_SQUARE, _SHIFTED) and (op.name in _RSQRT or op.name in _SQRT):
            found = replace(partial, stage=_INVERSE_RMS if op.name in _RSQRT else _RMS)
        if found is not None:
            self._track(op.output, replace(found, ops=partial.ops + (op,)), keep)
        return None

    def _complete(self, op: "Op") -> WrittenNorm | None:
        """``x * rsqrt(..)``, ``rsqrt(..) * x`` or ``x / sqrt(..)`` of a tracked mean square of ``x``."""
        a, b = op.inputs
        if op.name in _MUL:
            pairs, wanted = ((a, b), (b, a)), _INVERSE_RMS
        else:
            pairs, wanted = ((a, b),), _RMS
        for x, factor in pairs:
            partial = self._partials.get(factor)
            if partial is None or partial.stage != wanted:
                continue
            root, casts = self._uncast(x)
            if root != partial.root:
                continue
            ops = tuple({id(o): o for o in partial.ops + casts + (op,)}.values())
            eps = partial.eps if partial.eps is not None else 0.0
            spec = NormSpec("rms_norm", normalized_ndim=partial.normalized_ndim, eps=eps)
            return WrittenNorm(spec, root, partial.source, ops)
        return None

    def _uncast(self, handle: Any) -> tuple[Any, tuple["Op", ...]]:
        return self._casts.get(handle, (handle, ()))

    def _track(self, handle: Any, partial: _Partial, keep: Any) -> None:
        self._partials[handle] = partial
        self._kept.append(keep)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _added_number(op: "Op") -> float | None:
    """The number an ``add`` adds to its tensor (``None`` if it adds something else)."""
    if len(op.args) == 1 and not op.kwargs:
        value = op.args[0]
    elif not op.args and set(op.kwargs) == {"other"}:
        value = op.kwargs["other"]
    else:
        return None
    return float(value) if _number(value) else None


def _is_float_cast(op: "Op") -> bool:
    """A cast to a floating-point dtype (or a move to a device): no dtype argument that is not one."""
    values = (*op.args, *op.kwargs.values())
    return all(v.is_floating_point for v in values if isinstance(v, torch.dtype))


def _is_square(op: "Op") -> bool:
    if op.name in _POW:
        return len(op.inputs) <= 1 and len(op.args) == 1 and _number(op.args[0]) and op.args[0] == 2
    if op.name in _SQUARE:
        return True
    return op.name in _MUL and len(op.inputs) == 2 and op.inputs[0] == op.inputs[1]


def _trailing_mean(op: "Op") -> int:
    """How many trailing dims a ``mean(dims, keepdim=True)`` reduces (0 if it is not such a mean)."""
    args, kwargs = op.args, op.kwargs
    dims = args[0] if args else kwargs.get("dim")
    keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
    if keepdim is not True or dims is None:
        return 0
    dims = list(dims) if isinstance(dims, (tuple, list)) else [dims]
    if not dims or not all(_number(d) and isinstance(d, int) for d in dims):
        return 0
    if any(d >= 0 for d in dims):
        if op.in_shape is None:
            return 0
        dims = [d - len(op.in_shape) if d >= 0 else d for d in dims]
    k = len(dims)
    return k if sorted(dims) == list(range(-k, 0)) else 0
