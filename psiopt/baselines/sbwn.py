r"""Scaling-based weight normalization, SBWN (after the IEEE Access 2019 paper of that name).

The seed describes SBWN only as node-wise rescalings that keep the network's function,
move the weights out of ill-conditioned regions, interleave with any optimizer and work
with batch norm. The concrete rule is psiopt's choice; :class:`SBWN` states it and why.
"""

from __future__ import annotations

import torch
from torch import nn

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..discovery import find_scale_invariant, is_scale_invariant
from ..grouping import Grouping
from ..layers import BATCH_NORMS
from ..manifold import group_sq_norms
from .enorm import _PASS_THROUGH, _Layer, _MeanOnlyBatchNorm, _parse_chain, _Rescaler, _row_norms

__all__ = ["SBWN"]


class SBWN:
    r"""Scaling-based weight normalization: rescale every unit to unit-norm incoming weights.

    **The rule.** Going through the weight layers in forward order, each output unit
    :math:`i` of layer :math:`k` gets the factor :math:`a_i = 1/\|W_k[i,:]\|` (its
    incoming weights; the bias is scaled with them but does not count in the norm):

    .. math:: W_k[i,:] \leftarrow a_i W_k[i,:], \qquad b_k[i] \leftarrow a_i b_k[i],

    and the inverse factor goes where it keeps the function unchanged:

    * if a BatchNorm follows the unit (possibly after ReLU/pooling), the BN absorbs it
      (training-mode BN is invariant to the scale; its running statistics are rescaled,
      :math:`\hat\mu_i \leftarrow a_i\hat\mu_i`, :math:`\hat\sigma^2_i \leftarrow a_i^2\hat\sigma^2_i`,
      so evaluation mode agrees too);
    * otherwise the unit's outgoing weights are divided by it,
      :math:`W_{k+1}[:,i] \leftarrow W_{k+1}[:,i]/a_i` (ReLU is positively homogeneous),
      and layer :math:`k+1` is normalized next, with those columns already updated;
    * the output layer, if no BN follows it, keeps its scale (it absorbs what the
      layers before it gave up).

    After one :meth:`step` every unit that can be rescaled has
    :math:`\|W_k[i,:]\| = 1`; a second step changes nothing (the rule is a projection).

    **Why this rule.** The rescalings form the group :math:`G = (\mathbb R_{>0})^{\text{units}}`
    and the network's function only depends on the class of the weights under
    :math:`G` (the quotient that the PSI manifold formalizes for BN layers). Gradient
    methods, however, see a particular representative, and the representative sets the
    conditioning: the gradient of a unit's incoming weights scales like
    :math:`1/\|W_k[i,:]\|` and the curvature like :math:`1/\|W_k[i,:]\|^2`, so a
    BN-normalized unit effectively trains with learning rate
    :math:`\eta/\|W_k[i,:]\|^2`. Units whose norms differ by a factor :math:`10` train at
    effective rates differing by :math:`100`, and plain SGD makes every norm grow
    (:math:`\|w - \eta g\|^2 = \|w\|^2 + \eta^2\|g\|^2` for a scale-invariant unit), so
    the effective rates drift apart during training. SBWN measures this with the
    **conditioning proxy**

    .. math:: \kappa = \frac{\max_i \|W_k[i,:]\|^2}{\min_i \|W_k[i,:]\|^2}
        \quad \text{over all rescalable units } i \text{ of all layers},

    the spread of the per-unit effective learning rates, and moves the weights to the
    representative with :math:`\kappa = 1`: the unit-norm section of the quotient, the
    point weight normalization's :math:`w = g\,v/\|v\|` keeps by reparameterization and
    the PSI optimizers keep by geometry, reached here with plain rescalings that any
    optimizer can be interleaved with (call :meth:`step` after ``optimizer.step()``).
    A consequence (tested): with BN, SGD interleaved with SBWN gives the same iterates
    from any of the equivalent starting points :math:`a\cdot w_0`.

    **How it differs from ENorm.** :class:`psiopt.ENorm` balances each unit's incoming
    and outgoing norms to minimize the total :math:`\sum_k\|W_k\|_F^2`, and cannot work
    across a BN (the BN undoes the unit's scale). SBWN fixes the incoming norms instead
    (so :math:`\kappa = 1`), lets the output layer carry the remaining scale, and uses
    BN layers as the place where the scale disappears.

    Parameters
    ----------
    model : nn.Sequential
        As for :class:`psiopt.ENorm` (Linear/Conv layers separated by ReLU, pooling,
        dropout, Flatten, mean-only BN), and BatchNorm1d/2d/3d layers may also sit
        between (or after) weight layers.
    optimizer : torch.optim.Optimizer, optional
        Whose state to rescale with the weights, as in :class:`psiopt.ENorm`: a
        rescaling by :math:`a` divides ``momentum_buffer`` / ``exp_avg`` by :math:`a`
        and ``exp_avg_sq`` by :math:`a^2`.
    example_inputs : tuple, optional
        For models that are not such a chain (ResNets, any graph): a batch
        ``model(*example_inputs)`` on which :func:`psiopt.find_scale_invariant` finds
        the weights that a normalization layer (BN, GroupNorm, LayerNorm,
        InstanceNorm, weight norm) makes scale invariant. SBWN then normalizes only
        those, each group to unit norm (the layer's bias and the BN's running
        statistics follow), since only there a normalization absorbs the factor and
        nothing downstream has to change. Given, it is used even for a chain.

    Raises
    ------
    TypeError, ValueError
        For models it cannot handle, as :class:`psiopt.ENorm` (BatchNorm aside);
        with ``example_inputs``, when no scale-invariant weight is found. Weights
        marked as PSI manifold parameters are refused (the PSI optimizers already
        work on the quotient; SBWN is for the other optimizers).

    Notes
    -----
    With BN the function is unchanged up to BN's ``eps``, exactly like scale
    invariance itself: :math:`\mathrm{BN}(a z)` uses :math:`\sqrt{a^2\sigma^2 + \epsilon}`.
    A unit whose incoming weights are all zero is left alone.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import psiopt
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> sbwn = psiopt.SBWN(net)
    >>> x = torch.randn(16, 4)
    >>> before = net(x)
    >>> sbwn.conditioning() > 1.0
    True
    >>> sbwn.step()
    >>> torch.allclose(net(x), before, atol=1e-5)
    True
    >>> round(sbwn.conditioning(), 4)
    1.0
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        example_inputs: Sequence[Any] | None = None,
    ) -> None:
        self.model = model
        self._rescaler = _Rescaler(optimizer, "SBWN")
        self.layers: list[_Layer] = []
        self.normalized: list[_NormalizedWeight] = []
        if example_inputs is None:
            try:
                self.layers = _parse_chain(model, "SBWN", allow_batch_norm=True)
            except (TypeError, ValueError) as err:
                raise type(err)(
                    f"{err}. For a BN network that is not such a chain (e.g. a ResNet), pass "
                    "example_inputs=(batch,) to normalize the weights its norm layers make scale invariant"
                ) from None
        else:
            self.normalized = _find_normalized(model, example_inputs)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._rescaler.optimizer

    def _absorber(self, layer: _Layer) -> nn.Module | None:
        """The BatchNorm that undoes this layer's unit scales before the next weight layer."""
        for _, module in layer.after:
            if isinstance(module, BATCH_NORMS):
                return module
            if not isinstance(module, _PASS_THROUGH + (nn.Flatten,)):
                return None
        return None

    def rescalable(self) -> list[_Layer]:
        """The chain layers whose units SBWN normalizes: all but an output layer with no BN
        after it (empty with ``example_inputs``: see :attr:`normalized`)."""
        if not self.layers:
            return []
        last = self.layers[-1]
        keep_last = self._absorber(last) is not None
        return self.layers[:-1] + ([last] if keep_last else [])

    def _params(self) -> list[torch.Tensor]:
        params = [p for entry in self.normalized for p in (entry.weight, entry.bias) if p is not None]
        for layer in self.layers:
            params += [p for p in (layer.weight, layer.bias) if p is not None]
            params += [m.bias for _, m in layer.after if isinstance(m, _MeanOnlyBatchNorm) and m.bias is not None]
        return params

    @torch.no_grad()
    def step(self) -> None:
        """Rescale every rescalable unit to unit-norm incoming weights (one forward pass)."""
        self._rescaler.check_state(self._params())
        for entry in self.normalized:
            self._normalize_found(entry)
        rescalable = self.rescalable()
        for k, layer in enumerate(rescalable):
            r = _row_norms(layer.weight)
            a = torch.where(r > 0, 1.0 / r, torch.ones_like(r))
            self._rescaler.scale(layer.weight, a)
            if layer.bias is not None:
                self._rescaler.scale(layer.bias, a)
            absorbed = False
            for _, module in layer.after:
                if isinstance(module, _MeanOnlyBatchNorm):
                    self._rescaler.scale_mean_only_bn(module, a)
                elif isinstance(module, BATCH_NORMS):
                    if module.running_mean is not None:
                        module.running_mean.mul_(a.to(module.running_mean.dtype))
                        module.running_var.mul_(a.pow(2).to(module.running_var.dtype))
                    absorbed = True
                    break
            if not absorbed:
                nxt = self.layers[k + 1]
                self._rescaler.scale(nxt.weight, None, 1.0 / a)

    @torch.no_grad()
    def conditioning(self) -> float:
        r"""The proxy :math:`\kappa = \max_i\|W_k[i,:]\|^2/\min_i\|W_k[i,:]\|^2` over all
        rescalable units, or over the groups of the normalized weights (all-zero ones
        excluded); 1 after :meth:`step`."""
        sq = torch.cat(
            [_row_norms(layer.weight).pow(2).to(torch.float64) for layer in self.rescalable()]
            + [_group_sq_norms(entry).to(torch.float64) for entry in self.normalized]
        )
        sq = sq[sq > 0]
        return float(sq.max() / sq.min())

    def _normalize_found(self, entry: "_NormalizedWeight") -> None:
        sq = _group_sq_norms(entry)
        a = torch.where(sq > 0, sq.rsqrt(), torch.ones_like(sq))
        per_channel = a.repeat_interleave(entry.weight.shape[0] // a.numel())
        self._rescaler.scale(entry.weight, per_channel)
        if entry.bias is not None:
            self._rescaler.scale(entry.bias, per_channel)
        norm = entry.norm
        if norm is not None and getattr(norm, "running_mean", None) is not None:
            norm.running_mean.mul_(per_channel.to(norm.running_mean.dtype))
            norm.running_var.mul_(per_channel.pow(2).to(norm.running_var.dtype))


@dataclass
class _NormalizedWeight:
    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    grouping: Grouping
    norm: nn.Module | None  # the normalization layer whose running statistics follow the scale


def _group_sq_norms(entry: _NormalizedWeight) -> torch.Tensor:
    return group_sq_norms(entry.grouping.rows(entry.weight.detach())).squeeze(1)


def _find_normalized(model: nn.Module, example_inputs: Sequence[Any]) -> list[_NormalizedWeight]:
    if isinstance(example_inputs, torch.Tensor):
        raise TypeError("SBWN: example_inputs is a tuple of the model's arguments: write example_inputs=(batch,)")
    report = find_scale_invariant(model, *example_inputs)
    if len(report) == 0:
        raise ValueError(
            "SBWN: find_scale_invariant found no scale-invariant weight in this model, so there is "
            "nothing a normalization layer absorbs; for a plain ReLU chain leave example_inputs out"
        )
    params = dict(model.named_parameters())
    found = []
    for record in report:
        weight = params[record.name]
        owner_name, _, leaf = record.name.rpartition(".")
        owner = model.get_submodule(owner_name)
        bias = getattr(owner, "bias", None) if leaf == "weight" else None
        for pname, p in ((record.name, weight), (f"{owner_name}.bias", bias)):
            if p is not None and is_scale_invariant(p):
                raise TypeError(
                    f"SBWN: {pname} is marked scale invariant (a PSI ManifoldParameter); the PSI "
                    "optimizers already work on its class, SBWN is for the other optimizers: use an "
                    "unmarked model"
                )
        norm = None
        if record.norm_type != "weight_norm" and record.norm_layer is not None and record.grouping.kind == "channel":
            norm = model.get_submodule(record.norm_layer)
        found.append(_NormalizedWeight(record.name, weight, bias, record.grouping, norm))
    return found
