"""Mark: turn found weights into geoopt ManifoldParameters on a PSIManifold."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import geoopt
import torch
from torch import nn

from .._wrappers import wrapper_of
from ..grouping import as_grouping
from ..manifold import PSIManifold
from .find import find_scale_invariant
from .report import ScaleInvarianceReport

__all__ = ["mark_scale_invariant", "scale_invariant_parameters", "is_scale_invariant"]

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
