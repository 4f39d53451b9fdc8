r"""PSIAdaSGD: PSI-SGD with AdaGrad-norm angular steps on the scale-invariant groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ..manifold import PSIManifold
from ._adaptive import _psiadasgd_rows, _rows_update, psiadasgd_coefficients
from ._functional import _local
from ._params import _check_finite
from ._sharded_adaptive import GroupRule
from .psisgd import PSISGD

__all__ = ["PSIAdaSGD"]


def _validate_adaptive_options(eps: Any, initial_accumulator_value: Any) -> None:
    # torch.optim.Adagrad's messages for the two options it shares
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    _check_finite("epsilon value", eps)
    if not 0.0 <= initial_accumulator_value:
        raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
    _check_finite("initial_accumulator_value value", initial_accumulator_value)


class PSIAdaSGD(PSISGD):
    r"""PSI-SGD with an adaptive angular step: AdaGrad-norm per scale-invariant group.

    Plain SGD on a scale-invariant group adapts its step by itself: the gradient is
    orthogonal to :math:`w_j`, so every step grows the norm,
    :math:`\|w_j\|^2 \leftarrow \|w_j\|^2 + \eta^2\|g_j\|^2`, and the angular step
    :math:`\eta\|\nabla f(u_j)\|/\|w_j\|^2` (:math:`u_j = w_j/\|w_j\|`) shrinks with the
    gradient accumulated by that group, an implicit AdaGrad-norm (Arora, Li & Lyu 2019,
    *Theoretical analysis of auto rate-tuning by batch normalization*). Written out,
    :math:`\|w_j\|^4` grows by about :math:`2\eta^2\|\nabla f(u_j)\|^2` per step, so SGD's
    angular step is :math:`\|\nabla f(u_j)\| / \sqrt{\|w_{j,0}\|^4/\eta^2 + 2\sum_t
    \|\nabla f(u_{j,t})\|^2}`: it depends on the arbitrary initial norm. :class:`psiopt.PSISGD`
    keeps norms fixed and so loses the adaptation. PSIAdaSGD puts it back explicitly, in
    invariant quantities only:

    .. math::

        r_j &= \|w_j\|^2 P_w(g)_j, \qquad
        S_j \leftarrow S_j + \|\nabla f(u_j)\|^2 = S_j + \|r_j\|^2/\|w_j\|^2\\
        a_j &= \frac{r_j}{\sqrt{S_j} + \epsilon}
            \qquad\text{(the adaptive angular step, at most } \|w_j\|\text{ in size)}\\
        m &\leftarrow \mu\, m + (1 - \tau)\, a \quad (m = a \text{ on the first step}),
            \qquad d = a + \mu m \text{ (Nesterov) or } m\\
        w'_j &= \|w_j\|\, \frac{w_j - \eta\, d_j}{\|w_j - \eta\, d_j\|}, \qquad
        m_j \leftarrow P_{w'}(m)_j .

    Everything is a function of the unit rows and of the gradient at them, so runs
    started from :math:`w` and :math:`a\cdot w` stay equivalent. The first step turns
    each group by exactly :math:`\eta` radians (without momentum); later steps by
    :math:`\eta\|\nabla f(u_j)\|/\sqrt{S_j}`. Every parameter that is not scale
    invariant gets :class:`torch.optim.SGD`'s update bit for bit, as in
    :class:`psiopt.PSISGD` (whose parameters, param groups, checks and conventions this
    class shares).

    State: ``"momentum_buffer"`` (as :class:`psiopt.PSISGD`) and ``"sum"`` (the
    accumulator :math:`S_j`, one entry per group, shape ``(k,)``; torch's
    :class:`~torch.optim.Adagrad` key).

    Parameters
    ----------
    params, lr, momentum, dampening, weight_decay, nesterov, maximize
        As in :class:`psiopt.PSISGD`; ``lr`` on a scale-invariant group is the angle of
        the first step.
    foreach, fused : bool, optional
        As in torch, and as in :class:`psiopt.PSIAdam`: on the scale-invariant groups
        ``foreach=False`` is the reference loop, ``foreach=True`` multi-tensor torch
        operations, ``fused=True`` the one-pass compiled kernels, and the default the
        kernels where they exist; the other parameters get
        :func:`torch.optim.sgd.sgd` with the same options (by default torch's fused step
        where it has one).
    eps : float, default 1e-10
        Added to :math:`\sqrt{S_j}` (invariant units, as :class:`torch.optim.Adagrad`'s).
    initial_accumulator_value : float, default 0
        :math:`S_j` before the first step. A value :math:`S_0` caps the early angular
        steps at :math:`\eta\|\nabla f(u_j)\|/\sqrt{S_0}`; SGD's implicit version is
        :math:`S_0 = \|w_{j,0}\|^4/(2\eta_{\mathrm{SGD}}^2)` with :math:`\eta = 1/\sqrt2`.

    Examples
    --------
    >>> import torch, psiopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.BatchNorm1d(8),
    ...                             torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> groups = psiopt.param_groups(model, x, scale_invariant={"lr": 0.05})
    >>> opt = psiopt.PSIAdaSGD(groups, lr=0.1, momentum=0.9)
    >>> torch.nn.functional.cross_entropy(model(x), y).backward()
    >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        eps: float = 1e-10,
        initial_accumulator_value: float = 0.0,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        _validate_adaptive_options(eps, initial_accumulator_value)
        # read by add_param_group, which the base constructor calls for every group
        self._adaptive_defaults = {"eps": eps, "initial_accumulator_value": initial_accumulator_value}
        # PSISGD's angular rates are not this step's (its scale-invariant step is its own).
        super().__init__(
            params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize, foreach=foreach, fused=fused,
            angular_rate="constant",
        )
        self._step_supports_amp_scaling = False  # a GradScaler unscales the gradients itself
        self.defaults.update(self._adaptive_defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault(
            "_adaptive_defaults",
            {key: self.defaults[key] for key in ("eps", "initial_accumulator_value")},
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as :meth:`torch.optim.Optimizer.add_param_group` (a
        ``"grouping"`` key makes its tensors scale invariant), with the adaptive options
        ``eps`` and ``initial_accumulator_value``."""
        for key, value in self._adaptive_defaults.items():
            param_group.setdefault(key, value)
        _validate_adaptive_options(param_group["eps"], param_group["initial_accumulator_value"])
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (``closure``, optional, re-evaluates the model and
        returns the loss). Every gradient and group is checked before any weight changes;
        the other parameters take :class:`torch.optim.SGD`'s step, the scale-invariant
        groups the AdaGrad-norm angular step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._adaptive_step()
        return loss

    # -- the hooks of the adaptive step (psiopt.optim._adaptive_step) ----------------------
    _RULE = "adasgd"

    def _euclidean_update(self, group: dict[str, Any], params: list[Tensor], torch_fused: bool) -> None:
        self._euclidean_step(group, params, None, None, torch_fused)

    def _new_state(self, group: dict[str, Any], p: Tensor, manifold: PSIManifold) -> None:
        state = self.state[p]
        if "sum" not in state:
            # a DTensor's sums replicated on every rank, as a plain tensor (_sharded_adaptive)
            state["sum"] = _local(p).new_full((manifold.num_groups(p),), group["initial_accumulator_value"])
        if group["momentum"] != 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _first_moment_key(self, group: dict[str, Any]) -> str | None:
        return "momentum_buffer" if group["momentum"] != 0 else None

    def _counter_key(self, group: dict[str, Any]) -> str | None:
        return None  # the caller gives each tensor's scalars (_tensor_scalars)

    def _rate(self, group: dict[str, Any]) -> tuple[float, float, float] | None:
        return None

    def _group_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("sum",)

    def _tensor_scalars(self, group: dict[str, Any], params: list[Tensor], first: list[bool]) -> list[tuple]:
        return [(float(f), 0.0, 0.0) for f in first]

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        return (group["lr"], group["momentum"], group["dampening"], group["nesterov"], group["eps"])

    def _sharded_rule(self, group: dict[str, Any], p: Tensor, first: bool) -> GroupRule:
        lr, momentum, dampening, nesterov, eps = self._hyper(group)

        def adasgd(sq: Tensor, states: list[Tensor]) -> tuple:
            mu, alpha, c_m, c_r, total = psiadasgd_coefficients(
                sq, states[0], first, float(lr), momentum, dampening, nesterov, eps
            )
            return mu, alpha, c_m, c_r, [total]

        return adasgd

    def _reference_update(self, group: dict[str, Any], psi: list[tuple[Tensor, str, PSIManifold]]) -> None:
        params = [p for p, _, _ in psi]
        momentum = group["momentum"]
        for p, _, manifold in psi:
            state = self.state[p]
            if "sum" not in state:
                state["sum"] = p.new_full((manifold.num_groups(p),), group["initial_accumulator_value"])
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        _rows_update(group["foreach"], params)(
            _psiadasgd_rows,
            params,
            [p.grad for p in params],
            [m.rows for _, _, m in psi],
            [buffers],
            [[self.state[p]["sum"] for p in params]],
            [{} for _ in params],
            lr=float(group["lr"]),
            momentum=momentum,
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            eps=group["eps"],
            maximize=group["maximize"],
        )
        if momentum != 0:
            for p, buf in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buf
