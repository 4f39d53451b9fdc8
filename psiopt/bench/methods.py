r"""The benchmark's registry of *methods*: one optimizer or training system each.

A :class:`Method` knows how to turn a freshly built zoo model into what it trains (the
same model, a marked one, or a reparameterized variant), which optimizer drives it, and
what runs after every optimizer step (ENorm's and SBWN's rescalings). Adding a system to
the benchmark is one :func:`register` call.

**The swap.** psiopt's optimizers run as the one-line drop-in replacement a user makes:
``psiopt.PSISGD(psiopt.param_groups(model, x), lr=lr, momentum=0.9, weight_decay=5e-4)``
where ``torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)``
was, with ONE learning rate, tuned on the same grid as SGD's (no separate rate for the
scale-invariant groups, nothing borrowed from SGD's tuning); likewise PSIAdaSGD (the SGD
family), PSIAdam and PSIAdamW (the Adam family). The scale-invariant weights come from
discovery (:func:`psiopt.param_groups`).

**Learning rates.** Every method is tuned over the *same* grid of a task. The Adam
family (Adam, AdamW, AdamP, geoopt's RiemannianAdam on the sphere, PSIAdam, PSIAdamW)
works on a scale ten times smaller than SGD's: their ``lr_unit`` is
:data:`ADAM_LR_UNIT`, and the optimizer gets ``lr_unit`` times the grid value; the
recorded ``best_lr`` is the grid value. Two peers keep their published set-up of an
angular step of its own on the scale-invariant groups (``own_si_lr=True``): geoopt's
RiemannianSGD on the sphere and SGD-G take the grid value there, and SGD's tuned
learning rate on the task for every other parameter.

**Weight decay** is each method's :attr:`Method.weight_decay`, one value per method,
the same on every task (no per-task defaults): :data:`SGD_WEIGHT_DECAY` (5e-4, what SGD
users set) for SGD and every SGD-family method (PSISGD, PSIAdaSGD, SGDP, and on their
other parameters SGD-G and RiemannianSGD on the sphere, whose sphere rows have no
scale to decay; the SGD of weight normalization, ENorm and SBWN); 0 for Adam, PSIAdam
and RiemannianAdam; :data:`ADAMW_WEIGHT_DECAY` (1e-2, AdamW's default) for AdamW and
PSIAdamW, and for AdamP, whose README recommends it (decoupled, as AdamP applies it).
psiopt's optimizers apply it to the parameters that are not scale invariant only (on a
scale-invariant group it would move along the class, not on the quotient).
"""

from __future__ import annotations

import importlib
import warnings
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
    "SGD_WEIGHT_DECAY",
    "ADAMW_WEIGHT_DECAY",
    "SI_LR_BASE",
]

MOMENTUM = 0.9
"""Momentum of every SGD-family method (the prototype's setting)."""

ADAM_LR_UNIT = 0.1
"""The Adam family's learning rate per unit of the grid (grid 0.01 is Adam's default 1e-3)."""

SGD_WEIGHT_DECAY = 5e-4
"""The weight decay of SGD and every SGD-family method: the value SGD users set."""

ADAMW_WEIGHT_DECAY = 1e-2
"""The (decoupled) weight decay of AdamW, PSIAdamW and AdamP: AdamW's default, and the
value AdamP's README gives."""


SI_LR_BASE = "sgd"
"""The method whose tuned learning rate the ``own_si_lr`` methods give their parameters
that are not scale invariant (it runs before them in every task that has them)."""


class MethodNotApplicable(TypeError):
    """The method cannot train this model (e.g. ENorm on a residual network)."""


@dataclass
class BuildContext:
    """What a method's builder gets besides the model.

    Attributes
    ----------
    lr : float
        The grid value being run (the angular step for ``own_si_lr`` methods); a
        method's ``build`` hands its builder this value times its ``lr_unit``.
    base_lr : float or None
        SGD's tuned learning rate on the task, for the parameters of ``own_si_lr``
        methods that are not scale invariant; ``None`` where the method does not need it.
    example : torch.Tensor
        One training batch (scale-invariance discovery, data-dependent init).
    reports : dict
        Discovery reports by architecture, shared by the builds given the same dict (the
        runs of one task), so that discovery's proof runs once per architecture there.
    weight_decay : float
        Set by the method's ``build`` to its :attr:`Method.weight_decay` (what the
        builder passes to the optimizer); a caller's value is replaced.
    """

    lr: float
    base_lr: float | None
    example: torch.Tensor
    reports: dict = field(default_factory=dict)
    weight_decay: float = 0.0


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
        One line: what it is (:meth:`describe` adds the weight decay).
    build : callable
        ``build(model, ctx) -> Setup``. The registered callable receives ``ctx.lr``
        multiplied by ``lr_unit`` and ``ctx.weight_decay`` set to ``weight_decay``.
    weight_decay : float
        The weight decay the builder gives the optimizer (recorded with the results).
    requires : tuple of str
        Dotted names (``"module:attr"``) that must import; otherwise the method is
        reported as unavailable, with the reason.
    own_si_lr : bool
        Scale-invariant groups take ``ctx.lr``, other parameters ``ctx.base_lr``: the
        learning rate tuning found best for :data:`SI_LR_BASE` on the same task.
    kind : {"stochastic"}
        Minibatch training method (the full-batch ones live in :mod:`psiopt.bench.rayleigh`).
    lr_unit : float
        The learning rate per unit of the grid (the grid values themselves are what
        results record).
    """

    name: str
    label: str
    summary: str
    build: Callable[[nn.Module, BuildContext], Setup]
    weight_decay: float
    requires: tuple[str, ...] = ()
    own_si_lr: bool = False
    kind: Literal["stochastic"] = "stochastic"
    notes: tuple[str, ...] = field(default_factory=tuple)
    lr_unit: float = 1.0

    def __post_init__(self) -> None:
        build, unit, weight_decay = self.build, self.lr_unit, self.weight_decay

        def build_in_units(model: nn.Module, ctx: BuildContext) -> Setup:
            return build(model, replace(ctx, lr=unit * ctx.lr, weight_decay=weight_decay))

        object.__setattr__(self, "build", build_in_units)

    def describe(self) -> str:
        """The summary line with the method's weight decay."""
        return f"{self.summary}; weight decay {self.weight_decay:g}"

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


def zoo_scale_invariant_groupings(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The layers of a :mod:`psiopt.bench.models` model whose weight is scale invariant,
    each with its grouping.

    The zoo's contract: a model that declares them (a ``scale_invariant_groupings()``
    method: the ViT, every weight but the head as one ``"tensor"`` group; the language
    model, its ``q_proj`` / ``k_proj`` as ``"block(head_dim)"`` groups) is taken at its
    word; in the BatchNorm models every convolution / linear layer feeds a normalization
    layer, one group per output channel, except the classifier head, the last
    ``nn.Linear`` registered. (The tests check this against
    :func:`psiopt.find_scale_invariant`.)
    """
    declared = getattr(model, "scale_invariant_groupings", None)
    if declared is not None:
        return declared()
    layers = [m for m in model.modules() if isinstance(m, CHANNEL_FIRST_LAYERS)]
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise ValueError("expected a zoo model whose last registered layer is the nn.Linear head")
    return [(layer, "channel") for layer in layers[:-1]]


def zoo_scale_invariant_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of :func:`zoo_scale_invariant_groupings`, without their groupings."""
    return [layer for layer, _ in zoo_scale_invariant_groupings(model)]


def _split_params(model: nn.Module, si: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ids = {id(p) for p in si}
    return [p for p in model.parameters() if id(p) in ids], [p for p in model.parameters() if id(p) not in ids]


def _own_lr_groups(model: nn.Module, si: list[torch.Tensor], ctx: BuildContext, **si_options) -> list[dict]:
    """The scale-invariant weights ``si`` at the tuned angular lr (no weight decay: a sphere
    row has no scale to decay), every other parameter at SGD's tuned lr and the method's
    weight decay."""
    if ctx.base_lr is None:
        raise ValueError("this method tunes its scale-invariant lr only: it needs SGD's tuned lr on the task")
    si_params, rest = _split_params(model, si)
    groups = [{"params": si_params, "lr": ctx.lr, "weight_decay": 0.0, **si_options}]
    if rest:
        groups.append({"params": rest, "lr": ctx.base_lr, "weight_decay": ctx.weight_decay})
    return groups


# -- builders --------------------------------------------------------------------------


def _build_sgd(model: nn.Module, ctx: BuildContext) -> Setup:
    opt = torch.optim.SGD(model.parameters(), lr=ctx.lr, momentum=MOMENTUM, weight_decay=ctx.weight_decay)
    return Setup(model, opt)


def _signature(model: nn.Module) -> tuple:
    return tuple((n, type(m).__name__) for n, m in model.named_modules()) + tuple(
        (n, tuple(p.shape)) for n, p in model.named_parameters()
    )


def _psi_groups(model: nn.Module, ctx: BuildContext) -> list[dict]:
    """:func:`psiopt.param_groups` of ``model``: what the user's swap passes.

    Discovery's numerical proof costs dozens of forward passes, so it runs once per
    architecture of ``ctx.reports``; later models of the same architecture reuse its
    report (``report=``), which gives the same groups.
    """
    import psiopt

    key = _signature(model)
    if key not in ctx.reports:
        ctx.reports[key] = psiopt.find_scale_invariant(model, ctx.example)
    return psiopt.param_groups(model, report=ctx.reports[key])


def _swap(optimizer: type, model: nn.Module, ctx: BuildContext, **options) -> Setup:
    """``optimizer(psiopt.param_groups(model, x), lr=lr, weight_decay=wd, **options)``: the swap.

    On a model in which discovery finds no scale-invariant weight, psiopt's optimizers
    warn that they step every parameter as torch's optimizer would; the bench records
    what discovery found with the task (``TaskResult.scale_invariant``) and says it in
    the report instead.
    """
    groups = _psi_groups(model, ctx)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".* received no scale-invariant parameter", category=UserWarning)
        return Setup(model, optimizer(groups, lr=ctx.lr, weight_decay=ctx.weight_decay, **options))


def _build_psisgd(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    return _swap(psiopt.PSISGD, model, ctx, momentum=MOMENTUM)


def _build_psisgd_constant(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    return _swap(psiopt.PSISGD, model, ctx, momentum=MOMENTUM, angular_rate="constant")


def _build_sgd_nesterov(model: nn.Module, ctx: BuildContext) -> Setup:
    return Setup(
        model, torch.optim.SGD(model.parameters(), lr=ctx.lr, momentum=MOMENTUM, nesterov=True, weight_decay=ctx.weight_decay)
    )


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

    ``geoopt.Sphere`` normalizes the last dimension, so a weight is stored as the matrix
    of its groups, one row each (groups are consecutive output channels): a conv weight
    ``(C, Cin, k, k)`` with ``"channel"`` grouping as its ``(C, Cin*k*k)`` filter rows,
    with ``"tensor"`` grouping as one ``(1, C*Cin*k*k)`` row, a ``(heads*head_dim, d)``
    projection with ``"block(head_dim)"`` as ``(heads, head_dim*d)``; it is reshaped
    back in the forward pass. Normalizing each group keeps the function of the network.
    """
    import psiopt

    rows = psiopt.as_grouping(grouping).num_groups(layer.weight.shape)
    parametrize.register_parametrization(layer, "weight", _RowsAsWeight(layer.weight.shape, rows), unsafe=True)
    rows = layer.parametrizations.weight.original.detach()
    unit = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    param = geoopt.ManifoldParameter(unit, manifold=geoopt.Sphere())
    layer.parametrizations.weight.original = param
    return param


def _build_rsgd_sphere(model: nn.Module, ctx: BuildContext) -> Setup:
    si = [_to_sphere_rows(layer, grouping) for layer, grouping in zoo_scale_invariant_groupings(model)]
    opt = geoopt.optim.RiemannianSGD(_own_lr_groups(model, si, ctx), lr=ctx.lr, momentum=MOMENTUM)
    return Setup(model, opt)


def _build_sgdp(model: nn.Module, ctx: BuildContext) -> Setup:
    from adamp import SGDP

    return Setup(model, SGDP(model.parameters(), lr=ctx.lr, momentum=MOMENTUM, weight_decay=ctx.weight_decay))


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
    groups = _own_lr_groups(model, _mark_zoo(model), ctx, sphere=None)
    for group in groups[1:]:
        group["sphere"] = False
    return Setup(model, SGDG(groups, lr=ctx.lr, momentum=MOMENTUM))


def _build_psiadasgd(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    return _swap(psiopt.PSIAdaSGD, model, ctx, momentum=MOMENTUM)


def _build_adam(model: nn.Module, ctx: BuildContext) -> Setup:
    return Setup(model, torch.optim.Adam(model.parameters(), lr=ctx.lr, weight_decay=ctx.weight_decay))


def _build_adamw(model: nn.Module, ctx: BuildContext) -> Setup:
    return Setup(model, torch.optim.AdamW(model.parameters(), lr=ctx.lr, weight_decay=ctx.weight_decay))


def _build_adamp(model: nn.Module, ctx: BuildContext) -> Setup:
    from adamp import AdamP

    return Setup(model, AdamP(model.parameters(), lr=ctx.lr, weight_decay=ctx.weight_decay))


def _build_radam_sphere(model: nn.Module, ctx: BuildContext) -> Setup:
    for layer, grouping in zoo_scale_invariant_groupings(model):
        _to_sphere_rows(layer, grouping)
    opt = geoopt.optim.RiemannianAdam(model.parameters(), lr=ctx.lr, weight_decay=ctx.weight_decay)
    return Setup(model, opt)


def _build_psiadam(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    return _swap(psiopt.PSIAdam, model, ctx)


def _build_psiadamw(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    return _swap(psiopt.PSIAdamW, model, ctx)


def _replace_batch_norms(model: nn.Module) -> None:
    """Every BatchNorm1d/2d becomes a mean-only BN of the same width (in place)."""
    from psiopt.nn import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name, MeanOnlyBatchNorm2d(child.num_features))
            elif isinstance(child, nn.BatchNorm1d):
                setattr(module, child_name, MeanOnlyBatchNorm1d(child.num_features))


def _sgd(model: nn.Module, ctx: BuildContext) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=ctx.lr, momentum=MOMENTUM, weight_decay=ctx.weight_decay)


def _build_wn(model: nn.Module, ctx: BuildContext) -> Setup:
    from torch.nn.utils.parametrizations import weight_norm

    from psiopt.nn import data_dependent_init_

    for layer in zoo_scale_invariant_layers(model):
        weight_norm(layer)
    _replace_batch_norms(model)
    data_dependent_init_(model, ctx.example)
    return Setup(model, _sgd(model, ctx))


def _build_enorm(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    _replace_batch_norms(model)
    opt = _sgd(model, ctx)
    try:
        enorm = psiopt.ENorm(model, opt, c=1.0)
    except TypeError as exc:
        raise MethodNotApplicable(str(exc)) from exc
    return Setup(model, opt, enorm.step)


def _build_sbwn(model: nn.Module, ctx: BuildContext) -> Setup:
    import psiopt

    opt = _sgd(model, ctx)
    # chains (nn.Sequential) are read from their order; other models from a traced example
    example = None if isinstance(model, nn.Sequential) else (ctx.example,)
    try:
        sbwn = psiopt.SBWN(model, opt, example_inputs=example)
    except TypeError as exc:
        raise MethodNotApplicable(str(exc)) from exc
    sbwn.step()
    return Setup(model, opt, sbwn.step)


_PSI = ("psiopt:param_groups",)
register(Method("sgd", "SGD", "torch.optim.SGD, momentum 0.9 (the Euclidean baseline)", _build_sgd, SGD_WEIGHT_DECAY))
register(
    Method(
        "sgd-nesterov",
        "SGD (Nesterov)",
        "torch.optim.SGD, momentum 0.9, nesterov=True: a reference, not a peer of the verdicts (PSI-SGD's 'sgd' rate "
        "takes a look-ahead step on scale-invariant groups: this row shows what the look-ahead alone gives SGD)",
        _build_sgd_nesterov,
        SGD_WEIGHT_DECAY,
    )
)
register(
    Method(
        "psisgd",
        "PSI-SGD",
        "psiopt.PSISGD(psiopt.param_groups(model, x), lr, momentum=0.9): the drop-in swap, one lr on SGD's grid",
        _build_psisgd,
        SGD_WEIGHT_DECAY,
        requires=("psiopt:PSISGD", *_PSI),
    )
)
register(
    Method(
        "psisgd-constant",
        "PSI-SGD (constant angle)",
        "psiopt.PSISGD(angular_rate='constant'): the previous step, a constant angle per unit gradient, "
        "torch's momentum; as psisgd otherwise (the ablation of the 'sgd' rate)",
        _build_psisgd_constant,
        SGD_WEIGHT_DECAY,
        requires=("psiopt:PSISGD", *_PSI),
    )
)
register(
    Method(
        "rsgd-sphere",
        "RSGD sphere",
        "geoopt.optim.RiemannianSGD, momentum 0.9, each scale-invariant group on geoopt.Sphere; own angular lr "
        "there, SGD's tuned lr elsewhere",
        _build_rsgd_sphere,
        SGD_WEIGHT_DECAY,
        own_si_lr=True,
    )
)
register(
    Method(
        "sgdp",
        "SGDP",
        "adamp.SGDP, momentum 0.9 (projects out the radial part of scale-invariant updates; decoupled decay "
        "divided by 1 - momentum, x0.1 on scale-invariant weights)",
        _build_sgdp,
        SGD_WEIGHT_DECAY,
        requires=("adamp:SGDP",),
    )
)
register(
    Method(
        "sgdg",
        "SGD-G",
        "psiopt.baselines.SGDG (Cho & Lee 2017), momentum 0.9, clipping 0.1; own angular lr on the sphere, "
        "SGD's tuned lr elsewhere",
        _build_sgdg,
        SGD_WEIGHT_DECAY,
        requires=("psiopt.baselines:SGDG",),
        own_si_lr=True,
    )
)
register(
    Method(
        "wn",
        "WN + mean-only BN",
        "weight normalization (torch weight_norm) with data-dependent init, BN -> mean-only BN, SGD momentum 0.9",
        _build_wn,
        SGD_WEIGHT_DECAY,
        requires=("psiopt.nn:data_dependent_init_", "psiopt.nn:MeanOnlyBatchNorm2d"),
    )
)
register(
    Method(
        "enorm",
        "ENorm",
        "SGD momentum 0.9 + one ENorm cycle (c=1) after every step, BN -> mean-only BN (ENorm cannot cross BN)",
        _build_enorm,
        SGD_WEIGHT_DECAY,
        requires=("psiopt:ENorm", "psiopt.nn:MeanOnlyBatchNorm2d"),
    )
)
register(
    Method(
        "sbwn",
        "SBWN",
        "SGD momentum 0.9 + SBWN rescaling (unit-norm incoming weights, BN absorbs the scale) after every step",
        _build_sbwn,
        SGD_WEIGHT_DECAY,
        requires=("psiopt:SBWN",),
    )
)
register(
    Method(
        "psiadasgd",
        "PSI-AdaSGD",
        "psiopt.PSIAdaSGD (AdaGrad-norm angular steps), momentum 0.9, one lr on SGD's grid",
        _build_psiadasgd,
        SGD_WEIGHT_DECAY,
        requires=("psiopt:PSIAdaSGD", *_PSI),
    )
)
register(
    Method(
        "adam", "Adam", "torch.optim.Adam, default betas; lr = grid value x 0.1", _build_adam, 0.0,
        lr_unit=ADAM_LR_UNIT,
    )
)
register(
    Method(
        "adamw",
        "AdamW",
        "torch.optim.AdamW, default betas (decoupled decay, its default); lr = grid value x 0.1",
        _build_adamw,
        ADAMW_WEIGHT_DECAY,
        lr_unit=ADAM_LR_UNIT,
    )
)
register(
    Method(
        "adamp",
        "AdamP",
        "adamp.AdamP (projects out the radial part of scale-invariant updates; decoupled decay as its README "
        "recommends, x0.1 on scale-invariant weights); lr = grid value x 0.1",
        _build_adamp,
        ADAMW_WEIGHT_DECAY,
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
        0.0,
        lr_unit=ADAM_LR_UNIT,
    )
)
register(
    Method(
        "psiadam",
        "PSI-Adam",
        "psiopt.PSIAdam(psiopt.param_groups(model, x), lr), default betas and Nesterov look-ahead: the drop-in "
        "swap for Adam; lr = grid value x 0.1",
        _build_psiadam,
        0.0,
        requires=("psiopt:PSIAdam", *_PSI),
        lr_unit=ADAM_LR_UNIT,
    )
)
register(
    Method(
        "psiadamw",
        "PSI-AdamW",
        "psiopt.PSIAdamW(psiopt.param_groups(model, x), lr), Nesterov look-ahead: the drop-in swap for AdamW; "
        "lr = grid value x 0.1",
        _build_psiadamw,
        ADAMW_WEIGHT_DECAY,
        requires=("psiopt:PSIAdamW", *_PSI),
        lr_unit=ADAM_LR_UNIT,
    )
)
