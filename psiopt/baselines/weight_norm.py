r"""Data-dependent initialization for PyTorch's weight normalization.

Weight normalization (Salimans & Kingma 2016) writes each output unit's weight row as

.. math:: w = \frac{g}{\|v\|} v ,

so the scalar :math:`g` carries the length and :math:`v` only the direction. psiopt
uses PyTorch's own :func:`torch.nn.utils.parametrizations.weight_norm` for the
reparameterization (``module.parametrizations.weight.original0`` is :math:`g`,
``original1`` is :math:`v`) and adds what PyTorch lacks: the paper's data-dependent
initialization, :func:`data_dependent_init_`.

The gradients of the reparameterization are

.. math::

    \nabla_g L = \frac{\langle \nabla_w L, v\rangle}{\|v\|}, \qquad
    \nabla_v L = \frac{g}{\|v\|}\Bigl(I - \frac{w w^\top}{\|w\|^2}\Bigr)\nabla_w L ,

so :math:`\nabla_v L` is orthogonal to :math:`v`: the loss is invariant to rescaling
each row of :math:`v`. :func:`psiopt.find_scale_invariant` finds ``original1`` as a
scale-invariant weight (one group per row), :func:`psiopt.param_groups` puts it in a
``"channel"`` group, and the PSI optimizers then train it on the PSI manifold while
:math:`g` and the bias stay Euclidean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm

from ..grouping import CHANNEL_FIRST_LAYERS

__all__ = ["data_dependent_init_", "weight_normed_layers"]



def weight_normed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` whose ``weight`` is reparameterized by
    :func:`torch.nn.utils.parametrizations.weight_norm`, in registration order.

    Raises
    ------
    TypeError
        For a layer normalized with the deprecated ``torch.nn.utils.weight_norm``
        (``weight_g`` / ``weight_v``), or a weight-normed layer that is not a Linear or
        Conv1d/2d/3d, or one normalized over a dimension other than 0.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if hasattr(module, "weight_g") and hasattr(module, "weight_v"):
            raise TypeError(
                f"layer {name!r} uses the deprecated torch.nn.utils.weight_norm (weight_g/weight_v); "
                "remove it and apply torch.nn.utils.parametrizations.weight_norm instead"
            )
        if not parametrize.is_parametrized(module, "weight"):
            continue
        if not any(isinstance(p, _WeightNorm) for p in module.parametrizations.weight):
            continue
        if not isinstance(module, CHANNEL_FIRST_LAYERS) or len(module.parametrizations.weight) != 1:
            raise TypeError(
                f"layer {name!r} ({type(module).__name__}) is weight-normed but data_dependent_init_ "
                "handles only Linear and Conv1d/2d/3d layers whose only weight parametrization is "
                "weight_norm"
            )
        if module.parametrizations.weight[0].dim != 0:
            raise TypeError(
                f"layer {name!r} is weight-normed over dim={module.parametrizations.weight[0].dim}; "
                "the per-unit initialization needs one g per output unit: use weight_norm(layer, dim=0)"
            )
        found.append((name, module))
    return found


def _direction(v: torch.Tensor) -> torch.Tensor:
    """Each output unit's row of ``v`` divided by its norm."""
    norms = torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1)
    return v / norms.reshape((-1,) + (1,) * (v.dim() - 1))


def _unit_preactivations(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    r""":math:`t = v\cdot x / \|v\|` for every unit (the layer's output with g = 1, b = 0)."""
    direction = _direction(module.parametrizations.weight.original1)
    if isinstance(module, nn.Linear):
        return nn.functional.linear(x, direction)
    return module._conv_forward(x, direction, None)


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return model(*batch)
    raise TypeError(
        "batch must be a tensor, a tuple/list of positional inputs, or a dict of keyword inputs; "
        f"got {type(batch).__name__}"
    )


@torch.no_grad()
def data_dependent_init_(model: nn.Module, batch: Any) -> nn.Module:
    r"""Initialize every weight-normed layer from one batch (Salimans & Kingma 2016, §3).

    For each weight-normed Linear/Conv layer, in the order the forward pass reaches
    them, compute the unit pre-activations :math:`t = v\cdot x/\|v\|` on ``batch``
    (with every earlier layer already initialized), then set per output unit

    .. math:: g \leftarrow \frac{1}{\sigma[t]}, \qquad b \leftarrow -\frac{\mu[t]}{\sigma[t]},

    so that the layer's output :math:`g\, v\cdot x/\|v\| + b = (t - \mu[t])/\sigma[t]` has
    mean 0 and standard deviation 1 per unit on that batch. Statistics run over every
    dimension except the unit's (batch and sequence dims for Linear, batch and spatial
    dims for Conv); :math:`\sigma` is the population standard deviation.

    Parameters
    ----------
    model : nn.Module
        Contains layers reparameterized with
        :func:`torch.nn.utils.parametrizations.weight_norm` (``dim=0``, the default).
    batch : Tensor, tuple/list or dict
        One batch of inputs: ``model(batch)``, ``model(*batch)`` or ``model(**batch)``.

    Returns
    -------
    nn.Module
        ``model``, initialized in place.

    Raises
    ------
    ValueError
        If ``model`` has no weight-normed layer, a weight-normed layer is not reached by
        the forward pass, or a unit's pre-activation has zero variance on the batch (a
        constant input, a dead unit, a batch of one sample). Nothing is modified then.
    TypeError
        For weight-normed layers it cannot initialize (see :func:`weight_normed_layers`).

    Notes
    -----
    * A layer **without bias** gets only :math:`g = 1/\sigma[t]`: its outputs have unit
      standard deviation but keep their mean :math:`\mu[t]/\sigma[t]` (a mean-only BN
      after it, :class:`psiopt.nn.MeanOnlyBatchNorm1d`, removes that mean anyway).
    * The forward pass runs under :func:`torch.no_grad` in training mode, so dropout
      and batch norms behave as they do in training; each module's train/eval flag and
      every buffer (e.g. BN running statistics) are restored afterwards.
    * A layer called twice in one forward pass (shared weights) is initialized at its
      first call.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from torch.nn.utils.parametrizations import weight_norm
    >>> import psiopt
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(weight_norm(nn.Linear(5, 8)), nn.ReLU(), weight_norm(nn.Linear(8, 3)))
    >>> x = torch.randn(256, 5)
    >>> _ = psiopt.nn.data_dependent_init_(net, x)
    >>> out = net(x)
    >>> torch.allclose(out.mean(0), torch.zeros(3), atol=1e-5)
    True
    >>> torch.allclose(out.std(0, unbiased=False), torch.ones(3), atol=1e-5)
    True
    """
    layers = weight_normed_layers(model)
    if not layers:
        raise ValueError(
            "model has no weight-normed layer: apply torch.nn.utils.parametrizations.weight_norm "
            "to its Linear/Conv layers first"
        )
    saved_params = {
        name: (
            module.parametrizations.weight.original0.detach().clone(),
            None if module.bias is None else module.bias.detach().clone(),
        )
        for name, module in layers
    }
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    saved_modes = [(m, m.training) for m in model.modules()]
    done: set[str] = set()

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            if name in done:
                return None
            t = _unit_preactivations(module, inputs[0])
            unit_dim = t.dim() - 1 if isinstance(module, nn.Linear) else 1
            other = [d for d in range(t.dim()) if d != unit_dim]
            mean = t.mean(dim=other)
            std = t.std(dim=other, correction=0)
            eps = torch.finfo(t.dtype).eps
            flat = ~(std > 16 * eps * mean.abs()) | (std == 0)
            if bool(flat.any()):
                units = flat.nonzero().flatten().tolist()
                shown = ", ".join(map(str, units[:10])) + (" ..." if len(units) > 10 else "")
                raise ValueError(
                    f"layer {name!r}: unit(s) {shown} have zero variance on this batch "
                    f"(batch of {t.shape[0]}), so g = 1/std is undefined; use a larger, more varied "
                    "batch or re-initialize those units' weights"
                )
            g = module.parametrizations.weight.original0
            g.copy_((1.0 / std).reshape(g.shape))
            shape = [1] * t.dim()
            shape[unit_dim] = -1
            if module.bias is not None:
                module.bias.copy_(-mean / std)
                new_output = (t - mean.reshape(shape)) / std.reshape(shape)
            else:
                new_output = t / std.reshape(shape)
            done.add(name)
            # Later layers must see this layer's initialized output.
            return new_output.to(output.dtype)

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in layers]
    succeeded = False
    try:
        model.train()
        _call(model, batch)
        missing = [name for name, _ in layers if name not in done]
        if missing:
            raise ValueError(
                f"weight-normed layer(s) {', '.join(map(repr, missing))} were not called by the "
                "forward pass on this batch, so they cannot be initialized from it; nothing was changed"
            )
        succeeded = True
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in saved_modes:
            module.training = mode
        for buffer, value in saved_buffers:
            buffer.copy_(value)
        if not succeeded:
            for name, module in layers:
                g, b = saved_params[name]
                module.parametrizations.weight.original0.copy_(g)
                if b is not None:
                    module.bias.copy_(b)
    return model
