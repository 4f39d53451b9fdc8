"""What the training stack wraps a model in: DDP, FSDP2 (``fully_shard``), ``torch.compile``.

psiopt needs three things from a wrapped model: which wrapper it is (marking refuses
them), the model's parameter names without the wrappers' own name parts (``module.``
of DDP, ``_orig_mod.`` of a compiled module), so that a report made on the plain model
names the same parameters, and, for discovery on a sharded model, an unsharded replica.

The wrapper classes are looked up in ``sys.modules`` instead of imported: a model can
only hold a DTensor or a compiled module once torch has loaded those modules, so a
plain model never pays for importing them.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
from torch import nn

__all__ = ["wrapper_of", "unwrap", "canonical_names", "is_sharded", "process_group_of", "unsharded_replica"]


def _loaded(module: str, name: str) -> type | None:
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _ddp_type() -> type | None:
    return _loaded("torch.nn.parallel.distributed", "DistributedDataParallel")


def _compiled_type() -> type | None:
    return _loaded("torch._dynamo.eval_frame", "OptimizedModule")


def _fsdp_module_type() -> type | None:
    return _loaded("torch.distributed.fsdp._fully_shard._fully_shard", "FSDPModule")


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter sharded by ``fully_shard``)."""
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(tensor, dtensor)


def wrapper_of(model: nn.Module) -> str | None:
    """The first distributed or compiled wrapper found in ``model``, described, or ``None``."""
    ddp, compiled, fsdp = _ddp_type(), _compiled_type(), _fsdp_module_type()
    for name, module in model.named_modules():
        where = f" (at {name!r})" if name else ""
        if ddp is not None and isinstance(module, ddp):
            return f"DistributedDataParallel{where}"
        if compiled is not None and isinstance(module, compiled):
            return f"a torch.compile'd module{where}"
        if fsdp is not None and isinstance(module, fsdp):
            return f"fully_shard (FSDP2){where}"
    if any(is_sharded(p) for p in model.parameters()):
        return "sharded (DTensor) parameters"
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The module that DDP and ``torch.compile`` wrap (FSDP2 wraps nothing: it is the module)."""
    ddp, compiled = _ddp_type(), _compiled_type()
    while True:
        if ddp is not None and isinstance(model, ddp):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Each name of ``model.named_parameters(remove_duplicate=False)`` mapped to that name
    without the parts the wrappers add (``module`` under DDP, ``_orig_mod`` under a
    compiled module), at any depth."""
    ddp, compiled = _ddp_type(), _compiled_type()
    skipped: set[str] = set()  # qualified names of the wrappers' inner-module attributes
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if ddp is not None and isinstance(module, ddp):
            skipped.add(prefix + "module")
        elif compiled is not None and isinstance(module, compiled):
            skipped.add(prefix + "_orig_mod")
    names = {}
    for full, _ in model.named_parameters(remove_duplicate=False):
        parts = full.split(".")
        kept = [part for i, part in enumerate(parts) if ".".join(parts[: i + 1]) not in skipped]
        names[full] = ".".join(kept)
    return names


def process_group_of(model: nn.Module):
    """The process group the model's ranks form (DDP's, or the shard mesh's), or ``None``
    when the model is not distributed."""
    ddp = _ddp_type()
    for module in model.modules():
        if ddp is not None and isinstance(module, ddp):
            return module.process_group
    for p in model.parameters():
        if is_sharded(p):
            mesh = p.device_mesh
            return mesh.get_group() if mesh.ndim == 1 else torch.distributed.group.WORLD
    return None


def unsharded_replica(model: nn.Module) -> nn.Module:
    """A plain copy of an FSDP2-sharded ``model``: its own module classes (without FSDP's),
    full (all-gathered) parameters, copies of the buffers, and the user's forward hooks
    without FSDP's.

    The replica shares no tensor with ``model``, so running it changes nothing there.
    Gathering is collective: every rank of the shard group must call this. Ties (one
    parameter or module reached twice) are kept.
    """
    fsdp = _fsdp_module_type()
    memo: dict[int, object] = {}

    def full(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            data = t.detach().full_tensor() if is_sharded(t) else t.detach().clone()
            memo[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
        return memo[id(t)]  # type: ignore[return-value]

    def copy_module(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]  # type: ignore[return-value]
        cls = type(module)
        if fsdp is not None and isinstance(module, fsdp):
            # fully_shard made the class FSDP<cls> with bases (FSDPModule, cls).
            cls = next(base for base in cls.__bases__ if not issubclass(base, fsdp))
        replica = object.__new__(cls)
        replica.__dict__.update(module.__dict__)
        memo[id(module)] = replica
        replica._parameters = {n: None if p is None else full(p) for n, p in module._parameters.items()}
        replica._buffers = {n: None if b is None else full(b) for n, b in module._buffers.items()}
        replica._modules = {n: None if c is None else copy_module(c) for n, c in module._modules.items()}
        for hooks in ("_forward_pre_hooks", "_forward_hooks"):
            replica.__dict__[hooks] = OrderedDict(
                (k, h) for k, h in module.__dict__[hooks].items() if not _is_fsdp_hook(h)
            )
        return replica

    return copy_module(model)


def _is_fsdp_hook(hook: object) -> bool:
    return str(getattr(hook, "__module__", "")).startswith("torch.distributed.fsdp")
