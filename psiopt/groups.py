"""Param groups that carry scale invariance: how psiopt's optimizers learn which weights are on the PSI manifold."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ._wrappers import canonical_names, is_sharded, process_group_of, unsharded_replica, unwrap
from .discovery import find_scale_invariant
from .grouping import as_grouping

__all__ = ["param_groups"]

# Keys param_groups sets itself; a user dict may not override them.
_OWN_KEYS = ("params", "param_names", "grouping")


def param_groups(
    model: nn.Module,
    *example_inputs: Any,
    report: Any = None,
    scale_invariant: Mapping[str, Any] | None = None,
    others: Mapping[str, Any] | None = None,
    **find_options: Any,
) -> list[dict[str, Any]]:
    """The param groups of ``model`` for a psiopt optimizer, with scale invariance in them.

    One group per grouping found (``{"params", "param_names", "grouping"}``, the grouping
    as plain text: ``"channel"``, ``"tensor"``, ``"block(4)"``), then one group with every
    other parameter (``{"params", "param_names"}``). Each parameter appears exactly once,
    tied ones too, in ``model.named_parameters()`` order. Nothing of the model changes:
    the parameter objects are the model's own, so DDP's reducer, FSDP2 and any other
    holder of them stay in step with the optimizer.

    Parameters
    ----------
    model : torch.nn.Module
        A plain module, or one wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`,
        sharded with ``torch.distributed.fsdp.fully_shard`` (FSDP2), or compiled with
        :func:`torch.compile`. Names are matched without the wrappers' ``module.`` and
        ``_orig_mod.`` parts, and ``param_names`` holds them that way.
    *example_inputs
        A batch for :func:`psiopt.find_scale_invariant` (``model(*example_inputs)``),
        when no ``report`` is given.
    report : ScaleInvarianceReport, optional
        An earlier :func:`psiopt.find_scale_invariant` result (any sequence of records
        with ``.name`` and ``.grouping``), e.g. made on the model before wrapping or
        sharding it. With it no forward pass runs and no process communicates.
    scale_invariant, others : dict, optional
        Options merged into the scale-invariant groups and into the group of the
        others, e.g. ``scale_invariant={"lr": 0.05}`` (the step there is angular, see
        :class:`psiopt.PSISGD`) or ``others={"weight_decay": 5e-4}``.
    **find_options
        Passed to :func:`psiopt.find_scale_invariant` (``rtol``, ``structure``...).

    Returns
    -------
    list of dict
        Ready for ``psiopt.PSISGD(groups, lr=..., ...)`` or ``psiopt.PSIGD``.

    Notes
    -----
    Without ``report``, discovery runs on the wrapped module (``ddp.module``,
    ``compiled._orig_mod``). On a distributed model (DDP, or sharded parameters) every
    rank of its process group must call ``param_groups`` with ``example_inputs``: under
    FSDP2 discovery runs on an unsharded replica (one all-gather of every parameter,
    once; the model itself is not touched), and every rank's result is compared with
    the others' (one small ``all_gather_object``). Ranks that find different weights (a
    batch on which some normalization sees a constant group, say) all raise, so pass
    every rank a batch of varied samples, or make a report once and pass ``report=``
    on every rank.

    Raises
    ------
    ValueError
        The report names a parameter the model lacks, names one parameter twice with
        different groupings, or gives a grouping that does not fit a parameter's
        shape; an option dict sets ``params``, ``param_names`` or ``grouping``; both or
        neither of ``report`` and ``example_inputs`` are given.
    RuntimeError
        The ranks of a distributed model found different scale-invariant weights.

    Examples
    --------
    >>> import torch, psiopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.BatchNorm1d(8),
    ...                             torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> groups = psiopt.param_groups(model, torch.randn(16, 4), scale_invariant={"lr": 0.05})
    >>> [(g.get("grouping"), g["param_names"]) for g in groups]
    [('channel', ['0.weight']), (None, ['1.weight', '1.bias', '3.weight', '3.bias'])]
    >>> optimizer = psiopt.PSISGD(groups, lr=0.1, momentum=0.9)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if report is not None and (example_inputs or find_options):
        raise ValueError("give either report= (no forward pass) or example inputs (discovery runs now), not both")
    if report is None and not example_inputs:
        raise ValueError(
            "param_groups needs example inputs, param_groups(model, batch), to find the scale-invariant "
            "weights, or report=psiopt.find_scale_invariant(model, batch) made earlier"
        )
    extra = {"scale_invariant": dict(scale_invariant or {}), "others": dict(others or {})}
    for which, options in extra.items():
        clash = [k for k in _OWN_KEYS if k in options]
        if clash:
            raise ValueError(f"{which}= may not set {clash}; param_groups sets those keys itself")
    if report is None:
        report = _discover(model, example_inputs, find_options)

    names = canonical_names(model)
    grouping_of = _groupings(model, names, report)
    groups: dict[str | None, dict[str, Any]] = {}
    for full, p in model.named_parameters():  # each parameter once, under its first name
        text = grouping_of.get(id(p))
        if text not in groups:
            groups[text] = {"params": [], "param_names": []} | ({} if text is None else {"grouping": text})
        groups[text]["params"].append(p)
        groups[text]["param_names"].append(names[full])
    rest = groups.pop(None, {"params": [], "param_names": []})
    return [g | extra["scale_invariant"] for g in groups.values()] + [rest | extra["others"]]


def _groupings(model: nn.Module, names: dict[str, str], report: Any) -> dict[int, str]:
    """``id(parameter)`` -> grouping text for each parameter the report names, checked."""
    by_name: dict[str, Any] = {}  # every name of a parameter, with and without wrappers
    first_name: dict[int, str] = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        by_name.setdefault(full, p)
        by_name.setdefault(names[full], p)
        first_name.setdefault(id(p), names[full])
    grouping_of: dict[int, tuple[str, str]] = {}  # id -> (grouping text, the report's name)
    for record in report:
        param = by_name.get(record.name)
        if param is None:
            raise ValueError(
                f"the report names parameter {record.name!r}, which the model does not have; make the report "
                "on this model (or on the same model before wrapping it: names match without 'module.' and "
                "'_orig_mod.')"
            )
        grouping = as_grouping(record.grouping)
        try:
            grouping.num_groups(param.shape)
        except ValueError as err:
            raise ValueError(
                f"parameter {record.name!r}: the report's grouping {grouping.describe()!r} does not fit it: {err}"
            ) from None
        text = grouping.describe()
        seen = grouping_of.get(id(param))
        if seen is not None and seen[0] != text:
            raise ValueError(
                f"parameter {first_name[id(param)]!r} is in the report twice, as {seen[1]!r} with grouping "
                f"{seen[0]!r} and as {record.name!r} with grouping {text!r}; one parameter can have one grouping"
            )
        grouping_of[id(param)] = (text, record.name)
    return {key: text for key, (text, _) in grouping_of.items()}


def _discover(model: nn.Module, example_inputs: tuple[Any, ...], find_options: dict[str, Any]) -> Any:
    """``find_scale_invariant`` on what ``model`` wraps, agreed on by every rank when distributed."""
    group = process_group_of(model)
    target = unwrap(model)
    if any(is_sharded(p) for p in target.parameters()):
        target = unsharded_replica(target)
    report = find_scale_invariant(target, *example_inputs, **find_options)
    if group is not None:
        _check_ranks_agree(report, group)
    return report


def _check_ranks_agree(report: Any, group: Any) -> None:
    import torch.distributed as dist

    mine = [(w.name, w.grouping.describe()) for w in report]
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            only_mine = sorted(set(mine) - set(theirs))
            only_theirs = sorted(set(theirs) - set(mine))
            raise RuntimeError(
                f"the ranks found different scale-invariant weights: rank {dist.get_rank(group)} only "
                f"{only_mine}, rank {rank} only {only_theirs}. Pass every rank a batch of varied samples, or run "
                "report = psiopt.find_scale_invariant(model, batch) once and pass param_groups(model, report=report) "
                "on every rank"
            )
