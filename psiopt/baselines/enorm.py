r"""Equi-normalization, ENorm (Stock, Gribonval, Jégou, Joulin 2019).

Each hidden unit :math:`i` of a ReLU network can be multiplied by :math:`d_i > 0`
(its incoming weights and bias) while its outgoing weights are divided by
:math:`d_i`, without changing the network's function, because
:math:`\mathrm{relu}(d z) = d\,\mathrm{relu}(z)`. ENorm picks, among all these
equivalent networks, the one with the smallest total squared L2 norm of the weights,
by cycles of a Sinkhorn-Knopp-like balancing (see :class:`ENorm`).

The chain parsing here (which layers pair, what may sit between them, how optimizer
state transforms under a rescaling) is shared with :class:`psiopt.SBWN`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..discovery import is_scale_invariant
from ..layers import BATCH_NORMS, CHANNEL_FIRST_LAYERS, POSITIVELY_HOMOGENEOUS_MODULES, TRANSPOSED_CONVS
from .mean_only_bn import _MeanOnlyBatchNorm

__all__ = ["ENorm"]

# Optimizer state entries shaped like their parameter, and the power of the gradient
# they accumulate: a rescaling that multiplies a weight entry by a multiplies its
# gradient by 1/a, so these entries by a**(-power).
# Modules between two weight layers that a unit's scale passes through unchanged.
_PASS_THROUGH = POSITIVELY_HOMOGENEOUS_MODULES + (_MeanOnlyBatchNorm,)
_STATE_POWERS = {"momentum_buffer": 1, "exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}
_SUPPORTED_TEXT = (
    "Linear/Conv1d/2d/3d layers (groups=1) in an nn.Sequential, separated only by ReLU, LeakyReLU, PReLU, "
    "pooling, dropout, Identity, MeanOnlyBatchNorm and one Flatten between the last Conv and the first Linear"
)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    # modules between this layer and the next weight layer (or the end of the model)
    after: list[tuple[str, nn.Module]] = field(default_factory=list)
    # how many consecutive input columns of the next layer belong to one output unit
    columns_per_unit: int = 1

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    @property
    def units(self) -> int:
        return self.weight.shape[0]


def _flatten_sequential(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            out.extend(_flatten_sequential(child, full + "."))
        else:
            out.append((full, child))
    return out


def _contains_weight_layer(module: nn.Module) -> bool:
    return any(isinstance(m, CHANNEL_FIRST_LAYERS + TRANSPOSED_CONVS) for m in module.modules())


def _parse_chain(model: nn.Module, who: str, allow_batch_norm: bool) -> list[_Layer]:
    """Split an ``nn.Sequential`` into its weight layers and what lies between them."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"{who} needs an nn.Sequential (the order of its children is the forward order); got "
            f"{type(model).__name__}. Supported: {_SUPPORTED_TEXT}. Residual or branching models "
            "are not supported: their units cannot be rescaled layer by layer"
        )
    children = _flatten_sequential(model)
    layers: list[_Layer] = []
    pending: list[tuple[str, nn.Module]] = []
    for name, module in children:
        if isinstance(module, CHANNEL_FIRST_LAYERS) and parametrize.is_parametrized(module):
            raise TypeError(
                f"{who}: layer {name!r} has a parametrized weight (e.g. weight_norm); {who} rescales "
                "plain weights only: remove the parametrization (a weight-normed layer already fixes "
                "its scale through g)"
            )
        if isinstance(module, CHANNEL_FIRST_LAYERS) and type(module) in CHANNEL_FIRST_LAYERS:
            if not isinstance(module, nn.Linear) and module.groups != 1:
                raise TypeError(
                    f"{who}: layer {name!r} is a grouped/depthwise convolution (groups={module.groups}); "
                    f"its channels cannot be paired one to one. Supported: {_SUPPORTED_TEXT}"
                )
            for pname, p in (("weight", module.weight), ("bias", module.bias)):
                if p is not None and is_scale_invariant(p):
                    raise TypeError(
                        f"{who}: {name}.{pname} is marked scale invariant (a PSI ManifoldParameter); "
                        f"{who}'s rescalings move it across layers, which the PSI optimizers do not "
                        f"expect. Use {who} with plain parameters (torch.optim.SGD/Adam or PSISGD "
                        "without marked weights), or PSISGD alone"
                    )
            if layers:
                layers[-1].after = pending
            elif any(_contains_weight_layer(m) for _, m in pending):
                raise TypeError(_unpairable(who, pending))
            layers.append(_Layer(name, module))
            pending = []
        else:
            pending.append((name, module))
    if len(layers) < 2:
        raise ValueError(
            f"{who} needs at least two weight layers (a hidden unit between two layers); found "
            f"{len(layers)} in {type(model).__name__}. Supported: {_SUPPORTED_TEXT}"
        )
    layers[-1].after = pending
    if any(_contains_weight_layer(m) for _, m in pending):
        raise TypeError(_unpairable(who, pending))

    for k, (layer, nxt) in enumerate(zip(layers[:-1], layers[1:])):
        flattens = 0
        for name, module in layer.after:
            if isinstance(module, nn.Flatten):
                if module.start_dim != 1 or module.end_dim != -1:
                    raise TypeError(
                        f"{who}: {name!r} is Flatten(start_dim={module.start_dim}, end_dim={module.end_dim}); "
                        "only Flatten(1, -1) keeps each channel's entries consecutive"
                    )
                flattens += 1
            elif isinstance(module, BATCH_NORMS):
                if not allow_batch_norm:
                    raise TypeError(
                        f"{who}: {name!r} ({type(module).__name__}) sits between {layer.name!r} and "
                        f"{nxt.name!r}; batch norm undoes a unit's scale, so moving it into the next "
                        "layer would change the function. Use psiopt.SBWN or psiopt.PSISGD for BN networks"
                    )
            elif not isinstance(module, _PASS_THROUGH):
                raise TypeError(
                    f"{who}: {name!r} ({type(module).__name__}) sits between {layer.name!r} and "
                    f"{nxt.name!r}; it is not known to commute with a positive per-channel scaling "
                    f"(ReLU does; Tanh, GELU, Softmax do not). Supported: {_SUPPORTED_TEXT}"
                )
        layer.columns_per_unit = _columns_per_unit(who, layer, nxt, flattens)
    return layers


def _unpairable(who: str, modules: list[tuple[str, nn.Module]]) -> str:
    names = [n for n, m in modules if _contains_weight_layer(m)]
    return (
        f"{who}: module(s) {', '.join(map(repr, names))} contain weight layers it cannot pair "
        f"(a residual/branching block or a custom module?). Supported: {_SUPPORTED_TEXT}"
    )


def _columns_per_unit(who: str, layer: _Layer, nxt: _Layer, flattens: int) -> int:
    units = layer.units
    if isinstance(nxt.module, nn.Linear):
        fan_in = nxt.module.in_features
        if isinstance(layer.module, nn.Linear):
            if fan_in != units:
                raise ValueError(
                    f"{who}: {layer.name!r} has {units} outputs but {nxt.name!r} takes {fan_in} inputs"
                )
            return 1
        if flattens != 1:
            raise TypeError(
                f"{who}: a Conv ({layer.name!r}) followed by a Linear ({nxt.name!r}) needs exactly one "
                f"nn.Flatten() between them to pair channels with columns; found {flattens}"
            )
        if fan_in % units:
            raise ValueError(
                f"{who}: {nxt.name!r} takes {fan_in} inputs, not a multiple of the {units} channels of "
                f"{layer.name!r}, so channels cannot be paired with blocks of columns"
            )
        return fan_in // units
    if isinstance(layer.module, nn.Linear) or flattens:
        raise TypeError(
            f"{who}: {layer.name!r} ({type(layer.module).__name__}) feeds the Conv {nxt.name!r} through a "
            f"reshape it cannot see; cannot pair units with input channels. Supported: {_SUPPORTED_TEXT}"
        )
    if nxt.module.in_channels != units:
        raise ValueError(
            f"{who}: {layer.name!r} has {units} output channels but {nxt.name!r} takes "
            f"{nxt.module.in_channels}"
        )
    return 1


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    r""":math:`r_i = \|W[i, :]\|` (a unit's incoming weights, bias excluded)."""
    w = weight.detach().to(_acc_dtype(weight))
    return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)


def _column_norms(weight: torch.Tensor, units: int) -> torch.Tensor:
    r""":math:`s_i = \|W[:, i]\|` over the block of input columns that belongs to unit ``i``."""
    w = weight.detach().to(_acc_dtype(weight))
    return torch.linalg.vector_norm(w.reshape(w.shape[0], units, -1), dim=(0, 2))


def _scaled(t: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None) -> torch.Tensor:
    """``t`` (shaped like a weight, or a bias if 1-d) with rows times ``row`` and input units
    times ``col``."""
    out = t.to(_acc_dtype(t))
    if row is not None:
        out = out * row.reshape((-1,) + (1,) * (t.dim() - 1))
    if col is not None:
        out = (out.reshape(t.shape[0], col.numel(), -1) * col.reshape(1, -1, 1)).reshape(t.shape)
    return out.to(t.dtype)


class _Rescaler:
    """Applies unit rescalings to parameters and the optimizer state that follows them."""

    def __init__(self, optimizer: torch.optim.Optimizer | None, who: str) -> None:
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{who}: optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.who = who

    def check_state(self, params: list[torch.Tensor]) -> None:
        """Refuse optimizer state it does not know how to rescale (before touching anything)."""
        if self.optimizer is None:
            return
        ids = {id(p) for p in params}
        for group in self.optimizer.param_groups:
            if group.get("grouping") is not None and any(id(p) in ids for p in group["params"]):
                raise TypeError(
                    f"{self.who}: a param group of {type(self.optimizer).__name__} sets grouping="
                    f"{group['grouping']!r}, so its weights are optimized on the PSI manifold; "
                    f"{self.who}'s rescalings are for Euclidean parameters: drop the grouping, or "
                    f"use {type(self.optimizer).__name__} without {self.who}"
                )
        for p in params:
            for key, value in self.optimizer.state.get(p, {}).items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.shape == p.shape
                    and value.dim() > 0
                    and key not in _STATE_POWERS
                ):
                    raise TypeError(
                        f"{self.who}: optimizer {type(self.optimizer).__name__} keeps a per-entry state "
                        f"{key!r} it does not know how to rescale (known: {', '.join(_STATE_POWERS)}); "
                        "use torch.optim.SGD, Adam/AdamW or psiopt.PSISGD, or pass optimizer=None and "
                        "reset that state yourself"
                    )

    def scale(self, p: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None = None) -> None:
        """Multiply parameter ``p``'s rows by ``row`` and input units by ``col``; its gradient
        statistics in the optimizer get the inverse powers."""
        p.copy_(_scaled(p.detach(), row, col))
        if self.optimizer is None:
            return
        state = self.optimizer.state.get(p, {})
        for key, power in _STATE_POWERS.items():
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                value.copy_(
                    _scaled(
                        value,
                        None if row is None else row.pow(-power),
                        None if col is None else col.pow(-power),
                    )
                )

    def scale_mean_only_bn(self, module: _MeanOnlyBatchNorm, factor: torch.Tensor) -> None:
        """A mean-only BN commutes with a channel scaling once its bias and running mean scale too."""
        module.running_mean.mul_(factor.to(module.running_mean.dtype))
        if module.bias is not None:
            self.scale(module.bias, factor)


class ENorm:
    r"""Equi-normalization: balance a ReLU network's layers to the minimum-L2 rescaling.

    For each hidden unit :math:`i` between weight layers :math:`k` and :math:`k+1`, with
    :math:`r_i = \|W_k[i,:]\|` (its incoming weights) and
    :math:`s_i = \|W_{k+1}[:,i]\|` (its outgoing weights), one cycle computes

    .. math:: d_i = \sqrt{\frac{s_i}{c\, r_i}}

    for **all** hidden units from the weights at the cycle's start, then applies them
    at once: :math:`W_k \leftarrow D_k W_k D_{k-1}^{-1}`, so a middle layer gets its
    rows multiplied by its own units' :math:`d` and its columns divided by the previous
    layer's. Conv layers pair output filter :math:`i` with input channel :math:`i` of
    the next conv; through a ``Flatten``, channel :math:`i` pairs with the block of
    :math:`H W` consecutive input columns of the next Linear.

    **Biases** do not enter :math:`r_i` ("biases are not balanced"), but the bias of
    layer :math:`k` is multiplied by :math:`d_i` with its row, which is what keeps the
    function unchanged: :math:`\mathrm{relu}(d_i(W_k[i]x + b_i)) = d_i\,\mathrm{relu}(W_k[i]x + b_i)`.
    (The authors' reference code leaves biases untouched, which changes the function;
    here a cycle never does.)

    With :math:`c = 1` a cycle never increases :math:`\sum_k \|W_k\|_F^2`: each new entry
    is :math:`W_k[i,j]^2 d_i^2/d'_j{}^2 \le W_k[i,j]^2 (d_i^4 + d'_j{}^{-4})/2`, and with
    :math:`d_i^2 = s_i/r_i` these halves sum, over the layers, to at most the old total
    (the first and last layers give :math:`\sum_i s_i r_i \le \sum_i (s_i^2 + r_i^2)/2`).
    The cycles converge to the unique minimum over all rescalings, characterized by
    :math:`s_i = r_i` for every hidden unit. For :math:`c \ne 1`
    the fixed point is :math:`s_i = c\, r_i`, the minimum of
    :math:`\sum_k c^{-2(k-1)}\|W_k\|_F^2` (the paper uses :math:`c` = 1.1-1.2 on CIFAR-10,
    letting deeper layers grow).

    **Momentum.** A rescaling multiplies a weight entry by :math:`a` and its gradient by
    :math:`1/a`, so an optimizer's gradient statistics follow the gradient:
    ``momentum_buffer`` (torch.optim.SGD, psiopt.PSISGD's Euclidean parameters) and
    Adam's ``exp_avg`` rows are divided by :math:`d_i` and columns multiplied by it;
    ``exp_avg_sq`` with :math:`d_i^2`. The buffer then equals the one the same gradient
    history would have produced in the rescaled coordinates.

    Parameters
    ----------
    model : nn.Sequential
        Linear/Conv1d/2d/3d layers (``groups=1``, no parametrization) separated only by
        ReLU, LeakyReLU, pooling, dropout, Identity, :class:`psiopt.nn.MeanOnlyBatchNorm1d`
        / ``2d`` (its bias and running mean are scaled with the unit) and one
        ``Flatten()`` between the last conv and the first Linear. Anything may come
        before the first or after the last weight layer (it is not rescaled). Nested
        ``nn.Sequential`` containers are flattened.
    optimizer : torch.optim.Optimizer, optional
        Whose state to rescale with the weights (SGD, Adam, AdamW, PSISGD).
    c : float, default 1.0
        Asymmetric scaling factor (:math:`c > 0`).

    Raises
    ------
    TypeError
        For models it cannot handle: not an ``nn.Sequential``; BatchNorm between
        layers (a BN network's units are scale invariant, moving the scale to the next
        layer would change the function: use :class:`psiopt.SBWN` or
        :class:`psiopt.PSISGD`); residual/branching blocks; grouped convs; a Linear
        feeding a Conv; activations that are not positively homogeneous (Tanh, GELU);
        weight-normed layers; weights marked as PSI manifold parameters.
    ValueError
        Fewer than two weight layers, mismatched shapes, or ``c <= 0``.

    Notes
    -----
    A unit whose incoming or outgoing weights are all zero has no defined
    :math:`d_i`; it is left as is (:math:`d_i = 1`).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import psiopt
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.mul_(10.0)      # an unbalanced, equivalent network
    ...     _ = net[2].weight.div_(10.0)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> enorm = psiopt.ENorm(net, opt)
    >>> x = torch.randn(16, 4)
    >>> before, norm_before = net(x), enorm.total_sq_norm()
    >>> for _ in range(20):
    ...     enorm.step()                   # in training: once after every opt.step()
    >>> torch.allclose(net(x), before, atol=1e-5)
    True
    >>> enorm.total_sq_norm() < norm_before
    True
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, c: float = 1.0) -> None:
        if not (isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c > 0):
            raise ValueError(f"ENorm: c must be a positive finite number, got {c!r}")
        self.model = model
        self.c = float(c)
        self.layers = _parse_chain(model, "ENorm", allow_batch_norm=False)
        self._rescaler = _Rescaler(optimizer, "ENorm")

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._rescaler.optimizer

    def _params(self) -> list[torch.Tensor]:
        params = []
        for layer in self.layers:
            params += [p for p in (layer.weight, layer.bias) if p is not None]
            params += [m.bias for _, m in layer.after if isinstance(m, _MeanOnlyBatchNorm) and m.bias is not None]
        return params

    @torch.no_grad()
    def factors(self) -> list[torch.Tensor]:
        r"""The :math:`d` of each hidden layer that the next :meth:`step` would apply."""
        out = []
        for layer, nxt in zip(self.layers[:-1], self.layers[1:]):
            r = _row_norms(layer.weight)
            s = _column_norms(nxt.weight, layer.units)
            d = torch.sqrt(s / (self.c * r))
            defined = (r > 0) & (s > 0) & torch.isfinite(d) & (d > 0)
            out.append(torch.where(defined, d, torch.ones_like(d)))
        return out

    @torch.no_grad()
    def step(self) -> None:
        """One balancing cycle over all hidden units (all factors from the current weights)."""
        self._rescaler.check_state(self._params())
        d = self.factors()
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            row = d[k] if k < last else None
            col = 1.0 / d[k - 1] if k > 0 else None
            self._rescaler.scale(layer.weight, row, col)
            if layer.bias is not None and row is not None:
                self._rescaler.scale(layer.bias, row)
            if row is not None:
                for _, module in layer.after:
                    if isinstance(module, _MeanOnlyBatchNorm):
                        self._rescaler.scale_mean_only_bn(module, row)

    @torch.no_grad()
    def total_sq_norm(self) -> float:
        r""":math:`\sum_k \|W_k\|_F^2` over the balanced weight layers (biases excluded)."""
        return float(sum(_row_norms(layer.weight).pow(2).sum() for layer in self.layers))
