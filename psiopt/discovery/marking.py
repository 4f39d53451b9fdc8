"""Mark: turn found weights into geoopt ManifoldParameters on a PSIManifold."""

from __future__ import annotations

from typing import Any

import geoopt
import torch
from torch import nn

from ..manifold import PSIManifold
from .find import find_scale_invariant
from .report import ScaleInvarianceReport

__all__ = ["mark_scale_invariant", "scale_invariant_parameters", "is_scale_invariant"]

# -- marking ---------------------------------------------------------------------------

# An optimizer created before marking holds the replaced parameter objects; marking tags
# each of them with this attribute (the name it had), and a global step pre-hook looks for it.
_REPLACED_TAG = "_psiopt_replaced_name"
_HOOK_INSTALLED = False


def _stale_optimizer_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = getattr(p, _REPLACED_TAG, None)
            if name is not None:
                raise RuntimeError(
                    f"{type(optimizer).__name__} holds parameter {name!r}, which "
                    "psiopt.mark_scale_invariant replaced by a geoopt.ManifoldParameter; this optimizer was "
                    "created before marking and would take plain Euclidean steps. Create the optimizer after "
                    "mark_scale_invariant(model, ...)"
                )


def _install_hook() -> None:
    global _HOOK_INSTALLED
    if not _HOOK_INSTALLED:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(_stale_optimizer_hook)
        _HOOK_INSTALLED = True


def is_scale_invariant(param: torch.Tensor) -> bool:
    """Whether ``param`` is marked: a :class:`geoopt.ManifoldParameter` on a :class:`PSIManifold`."""
    return isinstance(param, geoopt.ManifoldParameter) and isinstance(param.manifold, PSIManifold)


def scale_invariant_parameters(model: nn.Module) -> list[tuple[str, geoopt.ManifoldParameter]]:
    """The marked parameters of ``model`` as ``(name, parameter)`` pairs; ``parameter.manifold``
    is its :class:`PSIManifold`."""
    return [(n, p) for n, p in model.named_parameters() if is_scale_invariant(p)]


def mark_scale_invariant(model: nn.Module, *example_inputs: Any, **options: Any) -> ScaleInvarianceReport:
    """Find the scale-invariant weights (see :func:`find_scale_invariant`) and mark them.

    Each found parameter is replaced, in every module that holds it, by a
    ``geoopt.ManifoldParameter(data, manifold=PSIManifold(grouping))`` sharing its
    storage and ``requires_grad``. The mark survives ``copy.deepcopy``,
    ``torch.save``/``torch.load`` of the whole model, ``model.to(...)`` and
    ``load_state_dict``. Marking an already marked weight with the same grouping
    changes nothing.

    Create the optimizer **after** marking: one made before holds the replaced
    parameters; stepping it raises a ``RuntimeError``.

    Parameters
    ----------
    model : torch.nn.Module
        The model to mark (in place).
    *example_inputs, **options
        As for :func:`find_scale_invariant`.

    Returns
    -------
    ScaleInvarianceReport
        The same records :func:`find_scale_invariant` returns.

    Raises
    ------
    ValueError
        A found weight is already a ManifoldParameter on another manifold.
    """
    report = find_scale_invariant(model, *example_inputs, **options)
    owners: dict[str, list[tuple[nn.Module, str]]] = {}
    by_id: dict[int, str] = {id(p): n for n, p in model.named_parameters()}
    for full_name, p in model.named_parameters(remove_duplicate=False):
        canonical = by_id[id(p)]
        module_name, _, attr = full_name.rpartition(".")
        owners.setdefault(canonical, []).append((model.get_submodule(module_name), attr))
    plan = []
    for rec in report:
        module, attr = owners[rec.name][0]
        old = getattr(module, attr)
        if isinstance(old, geoopt.ManifoldParameter) and not isinstance(old.manifold, PSIManifold):
            raise ValueError(
                f"{rec.name} is already a geoopt.ManifoldParameter on {old.manifold}; psiopt does not replace "
                "another manifold. Unwrap it (torch.nn.Parameter(p.data)) first if the PSI manifold is wanted"
            )
        if is_scale_invariant(old) and old.manifold.grouping == rec.grouping:
            continue
        plan.append((rec, old))
    for rec, old in plan:
        new = geoopt.ManifoldParameter(old.data, manifold=PSIManifold(rec.grouping), requires_grad=old.requires_grad)
        new.grad = old.grad
        for module, attr in owners[rec.name]:
            setattr(module, attr, new)
        setattr(old, _REPLACED_TAG, rec.name)
    if plan:
        _install_hook()
    return report

