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

The Adam family (Adam, AdamW, AdamP, geoopt's RiemannianAdam on the sphere, PSIAdam,
PSIAdamW) works on a scale ten times smaller than SGD's: their ``lr_unit`` is
:data:`ADAM_LR_UNIT`, and the optimizer gets ``lr_unit`` times the grid value. Every
method thus runs the same grid of multiples of its own unit, and the recorded
``best_lr`` is the grid value. Adam, AdamW, AdamP and RiemannianAdam take one learning
rate for every parameter, as Adam is used; so does ``psiadam-1lr``. ``psiadam`` and
``psiadamw`` tune their angular step the way PSI-SGD does, with Adam's (AdamW's) tuned
learning rate on the other parameters.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
    "zoo_scale_invariant_groupings",
    "MOMENTUM",
    "ADAM_LR_UNIT",
    "PSIOPT_OPTIMIZERS",
    "PEER_OPTIMIZERS",
]

MOMENTUM = 0.9
"""Momentum of every stochastic method (the prototype's setting)."""

ADAM_LR_UNIT = 0.1
"""The Adam family's learning rate per unit of the grid (grid 0.01 is Adam's default 1e-3)."""


PSIOPT_OPTIMIZERS = ("psisgd", "psisgd-1lr", "psiadasgd", "psiadam", "psiadam-1lr", "psiadamw")
"""The methods that are psiopt's optimizers (the seed systems, weight normalization, ENorm
and SBWN, are reparameterizations trained with SGD)."""

PEER_OPTIMIZERS = ("sgd", "sgdp", "sgdg", "rsgd-sphere", "adam", "adamw", "adamp")
"""The optimizers psiopt's are measured against in the report's verdict (the list of the
issue that set the target): torch's SGD, Adam and AdamW, the published scale-aware ones
(SGDP and AdamP, SGD-G), and geoopt's Riemannian SGD on the sphere. geoopt's
RiemannianAdam on the sphere runs in the tables, not in the verdict."""


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
        The task's tuned learning rate of the method's ``base_method`` (SGD, or Adam for
        PSIAdam), for the non-scale-invariant parameters of ``own_si_lr`` methods;
        ``None`` where the method does not need it.
    example : torch.Tensor
        One training batch (scale-invariance discovery, data-dependent init).
    reports : dict
        Discovery reports by architecture, shared by the builds given the same dict (the
        runs of one task), so that discovery's proof runs once per architecture there.
    """

    lr: float
    base_lr: float | None
    example: torch.Tensor
    reports: dict = field(default_factory=dict)


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
        Scale-invariant groups take ``ctx.lr``, other parameters ``ctx.base_lr``: the
        learning rate tuning found best for ``base_method`` on the same task.
    base_method : str
        Whose tuned learning rate the other parameters of an ``own_si_lr`` method take
        (``"sgd"``; ``"adam"`` for the Adam family); it must run earlier in the task.
    kind : {"stochastic"}
        Minibatch training method (the full-batch ones live in :mod:`psiopt.bench.rayleigh`).
    lr_unit : float
        The learning rate per unit of the grid: ``build`` receives ``ctx.lr`` already
        multiplied by it, and ``ctx.base_lr`` multiplied by the unit of ``base_method``
        (the grid values themselves are what results record).
    """

    name: str
    label: str
    summary: str
    build: Callable[[nn.Module, BuildContext], Setup]
    requires: tuple[str, ...] = ()
    own_si_lr: bool = False
    kind: Literal["stochastic"] = "stochastic"
    notes: tuple[str, ...] = field(default_factory=tuple)
    lr_unit: float = 1.0
    base_method: str = "sgd"

    def __post_init__(self) -> None:
        build, unit, base_method = self.build, self.lr_unit, self.base_method

        def build_in_units(model: nn.Module, ctx: BuildContext) -> Setup:
            base_lr = None if ctx.base_lr is None else METHODS[base_method].lr_unit * ctx.base_lr
            return build(model, replace(ctx, lr=unit * ctx.lr, base_lr=base_lr))

        if unit != 1.0 or METHODS.get(base_method, self).lr_unit != 1.0:
            object.__setattr__(self, "build", build_in_units)

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


def zoo_scale_invariant_groupings(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Each of :func:`zoo_scale_invariant_layers` with its grouping: ``"channel"`` for
    the BatchNorm models, the model's ``norm_grouping`` where it declares one (``"tensor"``
    for :class:`psiopt.bench.models.PostNormViT`, whose weights feed LayerNorms)."""
    grouping = getattr(model, "norm_grouping", "channel")
    return [(layer, grouping) for layer in zoo_scale_invariant_layers(model)]


def _split_params(model: nn.Module, si: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ids = {id(p) for p in si}
    return [p for p in model.parameters() if id(p) in ids], [p for p in model.parameters() if id(p) not in ids]


def _lr_groups(model: nn.Module, si: list[torch.Tensor], ctx: BuildContext, **si_options) -> list[dict]:
    if ctx.base_lr is None:
        raise ValueError("this method tunes its scale-invariant lr only: it needs its base method's tuned lr")
    si_params, rest = _split_params(model, si)
    groups = [{"params": si_params, "lr": ctx.lr, **si_options}]
    if rest:
        groups.append({"params": rest, "lr": ctx.base_lr})
    return groups


# -- builders --------------------------------------------------------------------------


def _build_sgd(model: nn.Module, ctx: BuildContext) -> Setup:
    return Setup(model, torch.optim.SGD(model.parameters(), lr=ctx.lr, momentum=MOMENTUM))


def _signature(model: nn.Module) -> tuple:
    return tuple((n, type(m).__name__) for n, m in model.named_modules()) + tuple(
        (n, tuple(p.shape)) for n, p in model.named_parameters()
    )


def _psi_groups(model: nn.Module, ctx: BuildContext, **options) -> list[dict]:
    """:func:`psiopt.param_groups` of ``model``.

    Discovery's numerical proof costs dozens of forward passes, so it runs once per
    architecture of ``ctx.reports``; later models of the same architecture reuse its
    report (``report=``).
    """
    import psiopt

    key = _signature(model)
    if key not in ctx.reports:
        ctx.reports[key] = psiopt.find_scale_invariant(model, ctx.example)
    return psiopt.param_groups(model, report=ctx.reports[key], **options)


def _own_lr_psi_groups(model: nn.Module, ctx: BuildContext) -> list[dict]:
    """:func:`_psi_groups` with the tuned lr on the scale-invariant groups and the base
    method's tuned lr on every other parameter."""
    if ctx.base_lr is None:
        raise ValueError("this method tunes its scale-invariant lr only: it needs its base method's tuned lr")
    return _psi_groups(model, ctx, scale_invariant={"lr": ctx.lr}, others={"lr": ctx.base_lr})


def _build_psisgd(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    return Setup(model, psiopt.PSISGD(_own_lr_psi_groups(model, ctx), lr=ctx.lr, momentum=MOMENTUM))


def _build_psisgd_1lr(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    return Setup(model, psiopt.PSISGD(_psi_groups(model, ctx), lr=ctx.lr, momentum=MOMENTUM))


class _RowsAsWeight(nn.Module):
    """Parametrization: a ``(rows, d)`` matrix stored, the layer's weight shape used."""

    def __init__(self, shape: torch.Size, rows: int):
        super().__init__()
        self.shape = tuple(shape)
        self.rows = rows

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(self.shape)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.rows, -1)


def _to_sphere_rows(layer: nn.Module, grouping: str) -> torch.Tensor:
    """Store ``layer.weight`` as a geoopt sphere parameter, one unit row per group.

    ``geoopt.Sphere`` normalizes the last dimension, so a conv weight ``(C, Cin, k, k)``
    with ``"channel"`` grouping is stored as its ``(C, Cin*k*k)`` matrix of output-filter
    rows, with ``"tensor"`` grouping as one ``(1, C*Cin*k*k)`` row, and reshaped back in
    the forward pass. Normalizing each group keeps the function of the network.
    """
    rows = layer.weight.shape[0] if grouping == "channel" else 1
    parametrize.register_parametrization(layer, "weight", _RowsAsWeight(layer.weight.shape, rows), unsafe=True)
    rows = layer.parametrizations.weight.original.detach()
    unit = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    param = geoopt.ManifoldParameter(unit, manifold=geoopt.Sphere())
    layer.parametrizations.weight.original = param
    return param


def _build_rsgd_sphere(model: nn.Module, ctx: BuildContext) -> Setup:
    si = [_to_sphere_rows(layer, grouping) for layer, grouping in zoo_scale_invariant_groupings(model)]
    opt = geoopt.optim.RiemannianSGD(_lr_groups(model, si, ctx), lr=ctx.lr, momentum=MOMENTUM)
    return Setup(model, opt)


def _build_sgdp(model: nn.Module, ctx: BuildContext) -> Setup:
    from adamp import SGDP

    return Setup(model, SGDP(model.parameters(), lr=ctx.lr, momentum=MOMENTUM))


def _mark_zoo(model: nn.Module) -> list[torch.Tensor]:
    """Mark the zoo's scale-invariant weights with their grouping (no discovery needed)."""
    import psiopt

    marked = []
    for layer, grouping in zoo_scale_invariant_groupings(model):
        layer.weight = geoopt.ManifoldParameter(layer.weight.data, manifold=psiopt.PSIManifold(grouping))
        marked.append(layer.weight)
    return marked


def _build_sgdg(model: nn.Module, ctx: BuildContext) -> Setup:
    from psiopt.baselines import SGDG

    # sphere=None: the marked weights go on the sphere group by group, with their grouping
    groups = _lr_groups(model, _mark_zoo(model), ctx, sphere=None)
    for group in groups[1:]:
        group["sphere"] = False
    return Setup(model, SGDG(groups, lr=ctx.lr, momentum=MOMENTUM))


def _build_psiadasgd(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    return Setup(model, psiopt.PSIAdaSGD(_own_lr_psi_groups(model, ctx), lr=ctx.lr, momentum=MOMENTUM))


def _build_adam(model: nn.Module, ctx: BuildContext) -> Setup:
    return Setup(model, torch.optim.Adam(model.parameters(), lr=ctx.lr))


def _build_adamw(model: nn.Module, ctx: BuildContext) -> Setup:
    return Setup(model, torch.optim.AdamW(model.parameters(), lr=ctx.lr))


def _build_adamp(model: nn.Module, ctx: BuildContext) -> Setup:
    from adamp import AdamP

    return Setup(model, AdamP(model.parameters(), lr=ctx.lr))


def _build_radam_sphere(model: nn.Module, ctx: BuildContext) -> Setup:
    for layer, grouping in zoo_scale_invariant_groupings(model):
        _to_sphere_rows(layer, grouping)
    return Setup(model, geoopt.optim.RiemannianAdam(model.parameters(), lr=ctx.lr))


def _build_psiadam(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    return Setup(model, psiopt.PSIAdam(_own_lr_psi_groups(model, ctx), lr=ctx.lr))


def _build_psiadam_1lr(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    return Setup(model, psiopt.PSIAdam(_psi_groups(model, ctx), lr=ctx.lr))


def _build_psiadamw(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    return Setup(model, psiopt.PSIAdamW(_own_lr_psi_groups(model, ctx), lr=ctx.lr))


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
register(
    Method(
        "psiadasgd",
        "PSI-AdaSGD",
        "psiopt.PSIAdaSGD (AdaGrad-norm angular steps), momentum 0.9; own (angular) lr as PSI-SGD",
        _build_psiadasgd,
        requires=("psiopt:PSIAdaSGD", "psiopt:param_groups"),
        own_si_lr=True,
    )
)
register(
    Method(
        "adam",
        "Adam",
        "torch.optim.Adam, default betas; lr = grid value x 0.1",
        _build_adam,
        lr_unit=ADAM_LR_UNIT,
    )
)
register(
    Method(
        "adamw",
        "AdamW",
        "torch.optim.AdamW, weight decay 1e-2 (its default); lr = grid value x 0.1",
        _build_adamw,
        lr_unit=ADAM_LR_UNIT,
    )
)
register(
    Method(
        "adamp",
        "AdamP",
        "adamp.AdamP (projects out the radial part of scale-invariant updates); lr = grid value x 0.1",
        _build_adamp,
        requires=("adamp:AdamP",),
        lr_unit=ADAM_LR_UNIT,
    )
)
register(
    Method(
        "radam-sphere",
        "RAdam sphere",
        "geoopt.optim.RiemannianAdam, each scale-invariant group on geoopt.Sphere; lr = grid value x 0.1",
        _build_radam_sphere,
        lr_unit=ADAM_LR_UNIT,
    )
)
register(
    Method(
        "psiadam",
        "PSI-Adam",
        "psiopt.PSIAdam, default betas and Nesterov look-ahead; own (angular) lr = grid value x 0.1, "
        "Adam's tuned lr elsewhere",
        _build_psiadam,
        requires=("psiopt:PSIAdam", "psiopt:param_groups"),
        own_si_lr=True,
        lr_unit=ADAM_LR_UNIT,
        base_method="adam",
    )
)
register(
    Method(
        "psiadam-1lr",
        "PSI-Adam (1 lr)",
        "psiopt.PSIAdam, default betas and Nesterov look-ahead, one lr for every parameter (the drop-in set-up); "
        "lr = grid value x 0.1",
        _build_psiadam_1lr,
        requires=("psiopt:PSIAdam", "psiopt:param_groups"),
        lr_unit=ADAM_LR_UNIT,
    )
)
register(
    Method(
        "psiadamw",
        "PSI-AdamW",
        "psiopt.PSIAdamW, Nesterov look-ahead, weight decay 1e-2 on the other parameters; "
        "own (angular) lr = grid value x 0.1, AdamW's tuned lr elsewhere",
        _build_psiadamw,
        requires=("psiopt:PSIAdamW", "psiopt:param_groups"),
        own_si_lr=True,
        lr_unit=ADAM_LR_UNIT,
        base_method="adamw",
    )
)
