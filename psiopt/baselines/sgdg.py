r"""SGD-G (Cho & Lee 2017, "Riemannian approach to batch normalization"), a baseline.

Cho & Lee keep each scale-invariant weight row on the unit sphere (they view it as a
point of the Grassmann manifold :math:`G(1, n)`) and run momentum SGD with the
sphere's exponential map and parallel transport. psiopt's PSI optimizers work on the
same quotient with a different metric scaling and transport; this module implements
SGD-G as published, to compare with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import geoopt
import torch

from ..grouping import Grouping, as_grouping
from ..manifold import (
    PSIManifold,
    expmap_rows,
    group_sq_norms,
    horizontal_projection_rows,
    parallel_transport_rows,
)

__all__ = ["SGDG", "clip_rows"]


def clip_rows(h: torch.Tensor, max_norm: float) -> torch.Tensor:
    r"""Per-row norm clipping: :math:`\hat h_j = h_j \min(1, \nu/\|h_j\|)` for ``max_norm`` :math:`\nu`."""
    norms = torch.linalg.vector_norm(h, dim=1, keepdim=True)
    return h * torch.clamp(max_norm / norms.clamp_min(torch.finfo(norms.dtype).tiny), max=1.0)


class SGDG(torch.optim.Optimizer):
    r"""SGD-G: momentum SGD with scale-invariant rows kept on the unit sphere.

    **Sphere parameters** (a :class:`geoopt.ManifoldParameter` on a
    :class:`psiopt.PSIManifold`, whose grouping gives the rows; or any tensor in a
    param group with ``sphere=True``, one row per output channel). Each row
    :math:`y_j` is kept at :math:`\|y_j\| = 1`; one step (Cho & Lee 2017, Algorithm 1),
    with learning rate :math:`\eta`, momentum :math:`\gamma`, clipping threshold
    :math:`\nu`, and :math:`\tau_j` the momentum carried from the previous step (0 at
    the start):

    .. math::

        \begin{aligned}
        g_j &= \nabla_{y_j} f \qquad \text{(the gradient at the unit-norm representative)}\\
        h_j &= g_j - \langle g_j, y_j\rangle\, y_j \qquad\text{(tangent projection)}\\
        \hat h_j &= h_j \min\bigl(1, \nu/\|h_j\|\bigr) \qquad\text{(per-unit clipping)}\\
        d_j &= \gamma\, \tau_j - \eta\, \hat h_j\\
        y_j &\leftarrow \mathrm{Exp}_{y_j}(d_j) = \cos\|d_j\|\, y_j + \sin\|d_j\|\, d_j/\|d_j\|\\
        \tau_j &\leftarrow \mathrm{PT}_{y_j\to y_j'}(d_j)
            = \|d_j\| \bigl(\cos\|d_j\|\, d_j/\|d_j\| - \sin\|d_j\|\, y_j\bigr)
        \end{aligned}

    The step :math:`\|d_j\|` is the angle row :math:`j` turns by, so clipping
    :math:`\|h_j\| \le \nu` bounds the gradient's contribution to that angle by
    :math:`\eta\nu` (the authors' reference implementation clips :math:`h`, before the
    learning rate). The parallel transport keeps :math:`\tau_j` tangent at the new
    point, with the norm of :math:`d_j`. If a row is not unit norm when the optimizer
    first sees it, its gradient is taken at the unit representative
    (:math:`\nabla_{y} f = \|w\|\,\nabla_w f` for scale-invariant :math:`f`) and the row
    is written back with unit norm: the same class, so the same function.
    Formulas come from :mod:`psiopt.manifold` (``horizontal_projection_rows``,
    ``expmap_rows``, ``parallel_transport_rows``) with :math:`\|y_j\| = 1`.

    **Other parameters** get plain SGD with momentum, dampening, Nesterov and weight
    decay, as :class:`torch.optim.SGD`. Cho & Lee use a separate learning rate for them:
    put them in their own param group.

    Parameters
    ----------
    params : iterable
        Parameters or param-group dicts. A group may set ``sphere=True`` (treat every
        parameter as rows on the sphere), ``sphere=False`` (plain SGD even for marked
        parameters) or leave ``sphere=None`` (marked PSI parameters on the sphere).
    lr : float
        Learning rate :math:`\eta` (an angle per unit gradient on the sphere).
    momentum : float, default 0
        :math:`\gamma`.
    grad_clip : float or None, default 0.1
        :math:`\nu`, the per-row bound on :math:`\|h_j\|`; ``None`` disables clipping.
    dampening, weight_decay, nesterov
        For the Euclidean parameters only, as in :class:`torch.optim.SGD` (weight decay
        on a unit-norm row would only shrink it radially, which the sphere undoes).
    sphere : bool or None, default None
        The default for groups that do not set it.

    Raises
    ------
    ValueError
        Negative learning rate, momentum or ``grad_clip``; Nesterov without momentum.
    psiopt.ZeroGroupError
        A sphere row with zero norm (no direction).

    Notes
    -----
    Cho & Lee also propose an orthogonality regularizer and Adam-G; neither is part of
    this baseline.

    Examples
    --------
    Minimize the Rayleigh quotient :math:`y^\top A y` on the unit sphere:

    >>> import torch, geoopt, psiopt
    >>> _ = torch.manual_seed(0)
    >>> A = torch.diag(torch.tensor([3.0, 1.0, 2.0]))
    >>> w = geoopt.ManifoldParameter(torch.randn(1, 3), manifold=psiopt.PSIManifold("tensor"))
    >>> opt = psiopt.baselines.SGDG([w], lr=0.1, momentum=0.5, grad_clip=None)
    >>> for _ in range(200):
    ...     opt.zero_grad()
    ...     loss = (w @ A @ w.T).sum() / (w @ w.T).sum()
    ...     loss.backward()
    ...     opt.step()
    >>> round(loss.item(), 4), round(w.detach().norm().item(), 6)
    (1.0, 1.0)
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        grad_clip: float | None = 0.1,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        sphere: bool | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"SGDG: lr must be >= 0, got {lr!r}")
        if not momentum >= 0.0:
            raise ValueError(f"SGDG: momentum must be >= 0, got {momentum!r}")
        if grad_clip is not None and not grad_clip > 0.0:
            raise ValueError(f"SGDG: grad_clip (nu) must be > 0 or None, got {grad_clip!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"SGDG: weight_decay must be >= 0, got {weight_decay!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGDG: Nesterov momentum needs momentum > 0 and dampening = 0")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            grad_clip=grad_clip,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            sphere=sphere,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _sphere_grouping(p: torch.Tensor, flag: bool | None) -> Grouping | None:
        marked = isinstance(p, geoopt.ManifoldParameter) and isinstance(p.manifold, PSIManifold)
        if flag is False or (flag is None and not marked):
            return None
        return p.manifold.grouping if marked else as_grouping("channel")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SGDG does not support sparse gradients")
                grouping = self._sphere_grouping(p, group["sphere"])
                if grouping is None:
                    self._euclidean_step(p, group)
                else:
                    self._sphere_step(p, grouping, group)
        return loss

    def _sphere_step(self, p: torch.Tensor, grouping: Grouping, group: dict[str, Any]) -> None:
        manifold = p.manifold if isinstance(p, geoopt.ManifoldParameter) and isinstance(p.manifold, PSIManifold) else PSIManifold(grouping)
        manifold.check_nonzero_groups(p, "SGDG sphere parameter")
        rows = grouping.rows(p)
        norms = torch.sqrt(group_sq_norms(rows))
        y = rows.to(norms.dtype) / norms
        # gradient at the unit representative: grad f(y) = ||w|| grad f(w) for invariant f
        g = grouping.rows(p.grad).to(norms.dtype) * norms
        h = horizontal_projection_rows(y, g, torch.ones_like(norms))
        if group["grad_clip"] is not None:
            h = clip_rows(h, group["grad_clip"])
        state = self.state[p]
        momentum = group["momentum"]
        if momentum != 0 and "momentum_buffer" in state:
            tau = grouping.rows(state["momentum_buffer"]).to(norms.dtype)
            # keep it tangent at y against rounding drift
            d = momentum * horizontal_projection_rows(y, tau, torch.ones_like(norms)) - group["lr"] * h
        else:
            d = -group["lr"] * h
        ones = torch.ones_like(norms)
        y_new = expmap_rows(y, d, ones)
        # rounding in cos/sin leaves norms 1 +- eps; renormalize so rows stay exactly on the sphere
        y_new = y_new / torch.sqrt(group_sq_norms(y_new))
        if momentum != 0:
            state["momentum_buffer"] = parallel_transport_rows(y, d, d, ones).to(p.dtype).reshape(p.shape)
        p.copy_(y_new.to(p.dtype).reshape(p.shape))

    def _euclidean_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        d_p = p.grad
        if group["weight_decay"] != 0:
            d_p = d_p.add(p, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.clone(d_p).detach()
            else:
                buf.mul_(momentum).add_(d_p, alpha=1 - group["dampening"])
            d_p = d_p.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(d_p, alpha=-group["lr"])
