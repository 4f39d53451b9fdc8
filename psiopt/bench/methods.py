r"""The benchmark's registry of *methods*: one optimizer or training system each.

A :class:`Method` knows how to turn a freshly built zoo model into what it trains (the
same model, a marked one, or a reparameterized variant), which optimizer drives it, and
what runs after every optimizer step (ENorm's and SBWN's rescalings). Adding a system to
the benchmark is one :func:`register` call.

**Learning rates.** Every method is tuned over the *same* grid of a task. The grid
value is the method's ``lr``. Methods whose step on a scale-invariant group is an
*angle* (PSI-SGD, geoopt's RiemannianSGD on the sphere, SGD-G) are not on the same scale
as SGD there: SGD turns a group by :math:`\eta/\|w_j\|^2`, which shrinks by itself as the
norms grow. Those methods (``own_si_lr=True``) therefore use the grid value for their
scale-invariant groups only, and give every other parameter (classifier head, BN's
affine parameters) the learning rate that tuning found best for ``sgd`` on the same task,
so that only the angular step is tuned. ``psisgd-1lr`` is the naive set-up, one learning
rate for all parameters, kept to show the difference.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import geoopt
import torch
from torch import nn
from torch.nn.utils import parametrize

from psiopt.layers import CHANNEL_FIRST_LAYERS

__all__ = [
    "BuildContext",
    "Setup",
    "Method",
    "MethodNotApplicable",
    "METHODS",
    "register",
    "get_method",
    "missing_requirement",
    "zoo_scale_invariant_layers",
    "MOMENTUM",
]

MOMENTUM = 0.9
"""Momentum of every stochastic method (the prototype's setting)."""


class MethodNotApplicable(TypeError):
    """The method cannot train this model (e.g. ENorm on a residual network)."""


@dataclass
class BuildContext:
    """What a method's builder gets besides the model.

    Attributes
    ----------
    lr : float
        The grid value being run (the angular step for ``own_si_lr`` methods).
    base_lr : float or None
        The task's tuned SGD learning rate, for the non-scale-invariant parameters of
        ``own_si_lr`` methods; ``None`` where the method does not need it.
    example : torch.Tensor
        One training batch (scale-invariance discovery, data-dependent init).
    """

    lr: float
    base_lr: float | None
    example: torch.Tensor


@dataclass
class Setup:
    """A model ready to train: the (possibly transformed) model, its optimizer, a hook."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    after_step: Callable[[], None] | None = None


@dataclass(frozen=True)
class Method:
    """One entry of the registry.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"psisgd"``.
    label : str
        Name in tables and plots.
    summary : str
        One line: what it is.
    build : callable
        ``build(model, ctx) -> Setup``.
    requires : tuple of str
        Dotted names (``"module:attr"``) that must import; otherwise the method is
        reported as unavailable, with the reason.
    own_si_lr : bool
        Scale-invariant groups take ``ctx.lr``, other parameters ``ctx.base_lr``.
    kind : {"stochastic"}
        Minibatch training method (the full-batch ones live in :mod:`psiopt.bench.rayleigh`).
    """

    name: str
    label: str
    summary: str
    build: Callable[[nn.Module, BuildContext], Setup]
    requires: tuple[str, ...] = ()
    own_si_lr: bool = False
    kind: Literal["stochastic"] = "stochastic"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def unavailable_reason(self) -> str | None:
        """``None`` if every requirement imports, else why not."""
        return missing_requirement(self.requires)


def missing_requirement(requires: tuple[str, ...]) -> str | None:
    """Why one of ``requires`` (``"module"`` or ``"module:attribute"``) is unavailable, or ``None``."""
    for req in requires:
        module_name, _, attr = req.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            return f"cannot import {module_name} ({exc})"
        if attr and not hasattr(module, attr):
            return f"{module_name}.{attr} does not exist in this version"
    return None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (its name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; raises ``KeyError`` listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(METHODS)}") from None


# -- which weights are scale invariant ----------------------------------------------------


def zoo_scale_invariant_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of a :mod:`psiopt.bench.models` model whose weight is scale invariant.

    The zoo's contract: every convolution / linear layer feeds a normalization layer,
    except the classifier head, which is the last ``nn.Linear`` registered. (The tests
    check this against :func:`psiopt.find_scale_invariant`.)
    """
    layers = [m for m in model.modules() if isinstance(m, CHANNEL_FIRST_LAYERS)]
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise ValueError("expected a zoo model whose last registered layer is the nn.Linear head")
    return layers[:-1]


def _split_params(model: nn.Module, si: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ids = {id(p) for p in si}
    return [p for p in model.parameters() if id(p) in ids], [p for p in model.parameters() if id(p) not in ids]


def _lr_groups(model: nn.Module, si: list[torch.Tensor], ctx: BuildContext, **si_options) -> list[dict]:
    if ctx.base_lr is None:
        raise ValueError("this method tunes its scale-invariant lr only: it needs the task's tuned SGD lr")
    si_params, rest = _split_params(model, si)
    groups = [{"params": si_params, "lr": ctx.lr, **si_options}]
    if rest:
        groups.append({"params": rest, "lr": ctx.base_lr})
    return groups


# -- builders --------------------------------------------------------------------------


def _build_sgd(model: nn.Module, ctx: BuildContext) -> Setup:
    return Setup(model, torch.optim.SGD(model.parameters(), lr=ctx.lr, momentum=MOMENTUM))


_REPORTS: dict[tuple, object] = {}
"""Architecture signature -> the report of its first discovery."""


def _signature(model: nn.Module) -> tuple:
    return tuple((n, type(m).__name__) for n, m in model.named_modules()) + tuple(
        (n, tuple(p.shape)) for n, p in model.named_parameters()
    )


def _psi_groups(model: nn.Module, ctx: BuildContext, **options) -> list[dict]:
    """:func:`psiopt.param_groups` of ``model``.

    Discovery's numerical proof costs dozens of forward passes, so it runs once per
    architecture; later models of the same architecture reuse its report (``report=``).
    """
    import psiopt

    key = _signature(model)
    if key not in _REPORTS:
        _REPORTS[key] = psiopt.find_scale_invariant(model, ctx.example)
    return psiopt.param_groups(model, report=_REPORTS[key], **options)


def _build_psisgd(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    if ctx.base_lr is None:
        raise ValueError("this method tunes its scale-invariant lr only: it needs the task's tuned SGD lr")
    groups = _psi_groups(model, ctx, scale_invariant={"lr": ctx.lr}, others={"lr": ctx.base_lr})
    return Setup(model, psiopt.PSISGD(groups, lr=ctx.lr, momentum=MOMENTUM))


def _build_psisgd_1lr(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    return Setup(model, psiopt.PSISGD(_psi_groups(model, ctx), lr=ctx.lr, momentum=MOMENTUM))


class _RowsAsWeight(nn.Module):
    """Parametrization: a ``(C, d)`` matrix of rows stored, the layer's weight shape used."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(self.shape)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)


def _to_sphere_rows(layer: nn.Module) -> torch.Tensor:
    """Store ``layer.weight`` as a ``(C, d)`` geoopt sphere parameter (unit rows).

    ``geoopt.Sphere`` normalizes the last dimension, so a conv weight ``(C, Cin, k, k)``
    is stored as its ``(C, Cin*k*k)`` matrix of output-filter rows and reshaped back in
    the forward pass. Normalizing each row keeps the function of a BN network.
    """
    parametrize.register_parametrization(layer, "weight", _RowsAsWeight(layer.weight.shape), unsafe=True)
    rows = layer.parametrizations.weight.original.detach()
    unit = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    param = geoopt.ManifoldParameter(unit, manifold=geoopt.Sphere())
    layer.parametrizations.weight.original = param
    return param


def _build_rsgd_sphere(model: nn.Module, ctx: BuildContext) -> Setup:
    si = [_to_sphere_rows(layer) for layer in zoo_scale_invariant_layers(model)]
    opt = geoopt.optim.RiemannianSGD(_lr_groups(model, si, ctx), lr=ctx.lr, momentum=MOMENTUM)
    return Setup(model, opt)


def _build_sgdp(model: nn.Module, ctx: BuildContext) -> Setup:
    from adamp import SGDP

    return Setup(model, SGDP(model.parameters(), lr=ctx.lr, momentum=MOMENTUM))


def _build_sgdg(model: nn.Module, ctx: BuildContext) -> Setup:
    from psiopt.baselines import SGDG

    si = [layer.weight for layer in zoo_scale_invariant_layers(model)]
    groups = _lr_groups(model, si, ctx, sphere=True)
    for group in groups[1:]:
        group["sphere"] = False
    return Setup(model, SGDG(groups, lr=ctx.lr, momentum=MOMENTUM))


def _replace_batch_norms(model: nn.Module) -> None:
    """Every BatchNorm1d/2d becomes a mean-only BN of the same width (in place)."""
    from psiopt.nn import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name, MeanOnlyBatchNorm2d(child.num_features))
            elif isinstance(child, nn.BatchNorm1d):
                setattr(module, child_name, MeanOnlyBatchNorm1d(child.num_features))


def _build_wn(model: nn.Module, ctx: BuildContext) -> Setup:
    from torch.nn.utils.parametrizations import weight_norm

    from psiopt.nn import data_dependent_init_

    for layer in zoo_scale_invariant_layers(model):
        weight_norm(layer)
    _replace_batch_norms(model)
    data_dependent_init_(model, ctx.example)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=ctx.lr, momentum=MOMENTUM))


def _build_enorm(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    _replace_batch_norms(model)
    opt = torch.optim.SGD(model.parameters(), lr=ctx.lr, momentum=MOMENTUM)
    try:
        enorm = psiopt.ENorm(model, opt, c=1.0)
    except TypeError as exc:
        raise MethodNotApplicable(str(exc)) from exc
    return Setup(model, opt, enorm.step)


def _build_sbwn(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    opt = torch.optim.SGD(model.parameters(), lr=ctx.lr, momentum=MOMENTUM)
    # chains (nn.Sequential) are read from their order; other models from a traced example
    example = None if isinstance(model, nn.Sequential) else (ctx.example,)
    try:
        sbwn = psiopt.SBWN(model, opt, example_inputs=example)
    except TypeError as exc:
        raise MethodNotApplicable(str(exc)) from exc
    sbwn.step()
    return Setup(model, opt, sbwn.step)


register(Method("sgd", "SGD", "torch.optim.SGD, momentum 0.9 (the Euclidean baseline)", _build_sgd))
register(
    Method(
        "psisgd",
        "PSI-SGD",
        "psiopt.PSISGD, momentum 0.9; own (angular) lr for scale-invariant groups, SGD's tuned lr elsewhere",
        _build_psisgd,
        requires=("psiopt:PSISGD", "psiopt:param_groups"),
        own_si_lr=True,
    )
)
register(
    Method(
        "psisgd-1lr",
        "PSI-SGD (1 lr)",
        "psiopt.PSISGD, momentum 0.9, one lr for every parameter (the naive prototype set-up)",
        _build_psisgd_1lr,
        requires=("psiopt:PSISGD", "psiopt:param_groups"),
    )
)
register(
    Method(
        "rsgd-sphere",
        "RSGD sphere",
        "geoopt.optim.RiemannianSGD, momentum 0.9, each output channel on geoopt.Sphere; own lr as PSI-SGD",
        _build_rsgd_sphere,
        own_si_lr=True,
    )
)
register(
    Method(
        "sgdp",
        "SGDP",
        "adamp.SGDP, momentum 0.9 (projects out the radial part of scale-invariant updates)",
        _build_sgdp,
        requires=("adamp:SGDP",),
    )
)
register(
    Method(
        "sgdg",
        "SGD-G",
        "psiopt.baselines.SGDG (Cho & Lee 2017), momentum 0.9, clipping 0.1; own lr as PSI-SGD",
        _build_sgdg,
        requires=("psiopt.baselines:SGDG",),
        own_si_lr=True,
    )
)
register(
    Method(
        "wn",
        "WN + mean-only BN",
        "weight normalization (torch weight_norm) with data-dependent init, BN -> mean-only BN, SGD",
        _build_wn,
        requires=("psiopt.nn:data_dependent_init_", "psiopt.nn:MeanOnlyBatchNorm2d"),
    )
)
register(
    Method(
        "enorm",
        "ENorm",
        "SGD + one ENorm cycle (c=1) after every step, BN -> mean-only BN (ENorm cannot cross BN)",
        _build_enorm,
        requires=("psiopt:ENorm", "psiopt.nn:MeanOnlyBatchNorm2d"),
    )
)
register(
    Method(
        "sbwn",
        "SBWN",
        "SGD + SBWN rescaling (unit-norm incoming weights, BN absorbs the scale) after every step",
        _build_sbwn,
        requires=("psiopt:SBWN",),
    )
)
