"""The brute-force ground truth that discovery's tests compare with (no psiopt code in it).

A Linear/Conv weight is invariant with the finest grouping (per channel, blocks of every
size that divides its channels, then the whole tensor) whose groups, each scaled by its own
random factor, leave the model's output unchanged. It is computed in float64 on a copy of
the model with every normalization's eps set to (almost) 0 and every gain that can hide a
branch set to a healthy value (layer scales to 1, zero-initialized norm weights to random
positive values).

Test modules import this as ``from _ground_truth import ...`` (see ``_nets.py``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import psiopt
from psiopt import Grouping

__all__ = ["ground_truth"]

# The attributes holding a normalization's eps: torch's norm layers and models that pass
# self.eps to F.*_norm; transformers' RMSNorm modules (Llama, Qwen, OLMo) call it variance_epsilon.
_EPS_ATTRIBUTES = ("eps", "variance_epsilon")


def _run(model: nn.Module, inputs: tuple[Any, ...], output: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return output(model(*[t.clone() for t in inputs]))


def _depends_on(
    model: nn.Module, inputs: tuple[Any, ...], output: Callable[[Any], torch.Tensor], weight: nn.Parameter,
    ref: torch.Tensor, rtol: float,
) -> bool:
    """Whether the output changes when the weight is replaced by a random one (not a dead gate)."""
    original = weight.data
    try:
        weight.data = torch.randn(original.shape, generator=torch.Generator().manual_seed(2), dtype=original.dtype)
        return bool((_run(model, inputs, output) - ref).abs().max() > rtol * ref.abs().max())
    finally:
        weight.data = original


def _invariant(
    model: nn.Module, inputs: tuple[Any, ...], output: Callable[[Any], torch.Tensor], weight: nn.Parameter,
    grouping: Grouping, ref: torch.Tensor, rtol: float,
) -> bool:
    k = grouping.num_groups(weight.shape)
    gen = torch.Generator().manual_seed(2)
    # The random draws first: a grouping finer than the true one fails on them at once.
    log_range = (math.log(0.1), math.log(10.0))
    draws = [torch.empty(k, dtype=torch.float64).uniform_(*log_range, generator=gen).exp() for _ in range(2)]
    draws += [torch.full((k,), 0.1, dtype=torch.float64), torch.full((k,), 10.0, dtype=torch.float64)]
    original = weight.data
    try:
        for factors in draws:
            weight.data = (grouping.rows(original) * factors.unsqueeze(1)).reshape(original.shape)
            if (_run(model, inputs, output) - ref).abs().max() > rtol * ref.abs().max():
                return False
    finally:
        weight.data = original
    return True


def ground_truth(
    model: nn.Module, *inputs: Any, unit_gains: tuple[str, ...] = (),
    output: Callable[[Any], torch.Tensor] = lambda out: out, rtol: float = 1e-9,
) -> dict[str, Grouping]:
    """Every Linear/Conv weight of ``model`` that is invariant, with its finest invariant grouping.

    ``unit_gains``: endings of the names of parameters set to 1 (LayerScale gains);
    ``output``: the tensor compared, from what the model returns; ``rtol``: the largest
    change of the output, relative to its largest entry, that counts as none (float64
    rounding; a model that normalizes in float32, as transformers' RMSNorm modules do,
    needs about 1e-5).
    """
    m = copy.deepcopy(model).double().train()
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if unit_gains and pname.endswith(unit_gains):
                p.fill_(1.0)
            elif p.dim() == 1 and not pname.endswith("bias") and bool((p == 0).all()):
                p.uniform_(0.5, 1.5)
        for mod in m.modules():
            for attr in _EPS_ATTRIBUTES:
                if isinstance(getattr(mod, attr, None), float):
                    setattr(mod, attr, 1e-30)
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    ref = _run(m, inputs, output)
    truth = {}
    for name, mod in m.named_modules():
        if not isinstance(mod, psiopt.layers.CHANNEL_FIRST_LAYERS):
            continue
        # Invariance with any grouping implies it with the whole tensor (all factors equal):
        # weights that fail that test are not invariant at all.
        weight = mod.weight
        if not _depends_on(m, inputs, output, weight, ref, rtol):
            continue  # nothing to find
        if not _invariant(m, inputs, output, weight, Grouping.whole(), ref, rtol):
            continue
        channels = weight.shape[0]
        blocks = [Grouping.blocks(d) for d in range(2, channels) if channels % d == 0]
        finest_first = [Grouping.per_channel(), *blocks, Grouping.whole()]
        truth[f"{name}.weight"] = next(g for g in finest_first if _invariant(m, inputs, output, weight, g, ref, rtol))
    return truth
