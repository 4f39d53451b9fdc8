r"""The PSI manifold: the quotient of BN-invariant weights by positive rescaling.

A point is one weight tensor whose groups (see :class:`psiopt.Grouping`) can each be
multiplied by a positive factor without changing the network's function. The
manifold is the quotient :math:`\mathcal M = E / G` of
:math:`E = \prod_j (\mathbb R^{d_j}\setminus\{0\})` by :math:`G = (\mathbb R_{>0})^k`,
and a tensor ``w`` stands for its whole class :math:`[w]`.

Every formula lives here, once, written on the ``(k, d)`` matrix of groups
(:meth:`Grouping.rows`), so each operation is one batched kernel over all groups.
With :math:`w_j` the :math:`j`-th group:

* metric: :math:`\bar g_w(\xi, \eta) = \sum_j \langle \xi_j, \eta_j\rangle / \|w_j\|^2`
* horizontal projection: :math:`P_w(\xi)_j = \xi_j - \frac{\langle \xi_j, w_j\rangle}{\|w_j\|^2} w_j`
* Riemannian gradient (horizontal lift): :math:`\|w_j\|^2 P_w(\nabla_j f)`
* retraction: :math:`R_w(\xi) = w + \xi`
* exponential map: :math:`\theta_j = \|\xi_j\|/\|w_j\|`,
  :math:`\mathrm{Exp}_w(\xi)_j = \cos\theta_j\, w_j + \sin\theta_j \|w_j\| \xi_j/\|\xi_j\|`
* vector transport: :math:`T_{w\to w'}(\xi)_j = \frac{\|w'_j\|}{\|w_j\|} P_{w'}(\xi)_j`
* distance: :math:`d([w],[v])^2 = \sum_j \arccos^2 \frac{\langle w_j, v_j\rangle}{\|w_j\|\|v_j\|}`

Half-precision tensors (float16, bfloat16) have their group norms and inner products
computed in float32 and the results cast back to the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import geoopt
import torch

from .grouping import Grouping, GroupingLike, as_grouping

__all__ = [
    "PSIManifold",
    "ZeroGroupError",
    "group_sq_norms",
    "horizontal_projection_rows",
    "horizontal_lift_rows",
    "transport_rows",
    "metric_inner_rows",
    "expmap_rows",
    "parallel_transport_rows",
    "normalize_rows",
    "any_zero_groups",
    "step_row_sums",
    "one_pass_step_scalars",
    "one_pass_row_scalars",
    "grad_metric_sq_from_sums",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class ZeroGroupError(ValueError):
    """A group of a scale-invariant weight has zero (or underflowing) norm.

    A zero group has no direction, so it is no point of the PSI manifold.
    """


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype its reductions run in: float32 for half types, else its own."""
    return t.float() if t.dtype in _LOW_PRECISION else t


# -- the formulas, on (k, d) matrices of groups -------------------------------------
# Inputs may be float16/bfloat16; every function computes in _acc precision and returns
# the accumulation dtype, so that chains of operations round once, at the caller's copy.


def group_sq_norms(w: torch.Tensor) -> torch.Tensor:
    r""":math:`\|w_j\|^2` for each row of ``w`` (shape ``(k, 1)``), in accumulation dtype."""
    w = _acc(w)
    # vecdot reduces without a (k, d) temporary (on CPU, allocating one costs more than the math).
    return torch.linalg.vecdot(w, w, dim=1).unsqueeze(1)


def metric_inner_rows(w_sq: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    r"""The metric group by group, :math:`\langle u_j, v_j\rangle / \|w_j\|^2` (shape ``(k, 1)``),
    given :math:`\|w_j\|^2`; ``v=None`` gives the squared norms :math:`\|u_j\|_w^2`."""
    u = _acc(u)
    v = u if v is None else _acc(v)
    return torch.linalg.vecdot(u, v, dim=1).unsqueeze(1) / w_sq


def horizontal_projection_rows(
    w: torch.Tensor, u: torch.Tensor, w_sq: torch.Tensor | None = None
) -> torch.Tensor:
    r""":math:`P_w(u)_j = u_j - \langle u_j, w_j\rangle w_j / \|w_j\|^2`, row by row."""
    w, u = _acc(w), _acc(u)
    if w_sq is None:
        w_sq = group_sq_norms(w)
    coef = torch.linalg.vecdot(u, w, dim=1).unsqueeze(1) / w_sq
    return torch.addcmul(u, coef, w, value=-1)


def horizontal_lift_rows(
    w: torch.Tensor, egrad: torch.Tensor, w_sq: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Riemannian gradient :math:`\|w_j\|^2 P_w(\nabla_j f)` from the Euclidean one."""
    if w_sq is None:
        w_sq = group_sq_norms(w)
    # The projection is a fresh tensor: scaled in place.
    return horizontal_projection_rows(w, egrad, w_sq).mul_(w_sq)


def transport_rows(
    w_new: torch.Tensor,
    v: torch.Tensor,
    w_old_sq: torch.Tensor,
    w_new_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    r""":math:`T_{w\to w'}(v)_j = (\|w'_j\|/\|w_j\|) P_{w'}(v)_j` given :math:`\|w_j\|^2`."""
    if w_new_sq is None:
        w_new_sq = group_sq_norms(w_new)
    return horizontal_projection_rows(w_new, v, w_new_sq).mul_(torch.sqrt(w_new_sq / w_old_sq))


def expmap_rows(w: torch.Tensor, xi: torch.Tensor, w_sq: torch.Tensor | None = None) -> torch.Tensor:
    r"""Great-circle step :math:`\cos\theta_j w_j + \sin\theta_j \|w_j\| \xi_j/\|\xi_j\|`."""
    w, xi = _acc(w), _acc(xi)
    if w_sq is None:
        w_sq = group_sq_norms(w)
    w_norm = torch.sqrt(w_sq)
    xi_norm = torch.linalg.vector_norm(xi, dim=1, keepdim=True)
    theta = xi_norm / w_norm
    # sin(θ)/θ is smooth at 0; torch.sinc(x) = sin(πx)/(πx) gives it without a branch.
    sin_over_theta = torch.sinc(theta / torch.pi)
    return torch.cos(theta) * w + sin_over_theta * xi


def parallel_transport_rows(
    w: torch.Tensor, xi: torch.Tensor, v: torch.Tensor, w_sq: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Parallel transport of ``v`` along the great circle :math:`t \mapsto \mathrm{Exp}_w(t\xi)`, to ``expmap_rows(w, xi)``.

    With :math:`\theta_j = \|\xi_j\|/\|w_j\|`, :math:`u_j = \xi_j/\|\xi_j\|`,
    :math:`\hat w_j = w_j/\|w_j\|` (all rows horizontal: :math:`\langle \xi_j, w_j\rangle =
    \langle v_j, w_j\rangle = 0`):
    :math:`v_j - \langle u_j, v_j\rangle\,(\sin\theta_j\,\hat w_j + (1-\cos\theta_j)\,u_j)`.
    The component along :math:`u_j` turns with the geodesic, the rest is unchanged, so
    norms and inner products are kept. This is the sphere's Levi-Civita transport (each
    factor of the quotient is a sphere), exact where :func:`transport_rows` is a
    projection; rows with :math:`\xi_j = 0` are returned unchanged.
    """
    w, xi, v = _acc(w), _acc(xi), _acc(v)
    if w_sq is None:
        w_sq = group_sq_norms(w)
    w_norm = torch.sqrt(w_sq)
    xi_norm = torch.linalg.vector_norm(xi, dim=1, keepdim=True)
    moving = xi_norm > 0
    u = torch.where(moving, xi / torch.where(moving, xi_norm, torch.ones_like(xi_norm)), torch.zeros_like(xi))
    theta = xi_norm / w_norm
    along = (u * v).sum(dim=1, keepdim=True)
    return v - along * (torch.sin(theta) * (w / w_norm) + (1.0 - torch.cos(theta)) * u)


def normalize_rows(w: torch.Tensor, target_sq: torch.Tensor) -> torch.Tensor:
    r"""Rescale each row to the squared norm ``target_sq`` (the norm-keeping representative)."""
    w = _acc(w)
    return w * torch.sqrt(target_sq / group_sq_norms(w))


def step_row_sums(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    r"""The six inner products a PSI step needs, row by row, shape ``(k, 6)``.

    Columns: :math:`a = w_j\cdot w_j`, :math:`b = g_j\cdot w_j`, :math:`g_j\cdot g_j`,
    :math:`m_j\cdot g_j`, :math:`m_j\cdot w_j`, :math:`m_j\cdot m_j` (the last three zero
    when ``m`` is ``None``), in accumulation dtype. :func:`one_pass_step_scalars` turns
    them into the whole step. The squared norms are computed as squared 2-norms (one read,
    no temporary); the cross products with :func:`torch.linalg.vecdot`.
    """
    w, g = _acc(w), _acc(g)
    cols = [torch.linalg.vector_norm(w, dim=1).square(), torch.linalg.vecdot(g, w, dim=1)]
    cols.append(torch.linalg.vector_norm(g, dim=1).square())
    if m is None:
        zero = torch.zeros_like(cols[0])
        cols += [zero, zero, zero]
    else:
        m = _acc(m)
        cols += [
            torch.linalg.vecdot(m, g, dim=1),
            torch.linalg.vecdot(m, w, dim=1),
            torch.linalg.vector_norm(m, dim=1).square(),
        ]
    return torch.stack(cols, dim=1)


def one_pass_step_scalars(a, b, gg, mg, mw, mm, lr, momentum, dampening, nesterov, first):
    r"""The per-group scalars of one PSI-SGD step, from the six sums of :func:`step_row_sums`.

    With :math:`r = a\,g - b\,w` (the Riemannian gradient, horizontal lift), the momentum
    :math:`m' = \mu m + (1-\tau) r` (:math:`m' = r` on the ``first`` step, no
    :math:`m'` when ``momentum == 0``), the direction :math:`d = m'` or, with Nesterov,
    :math:`d = r + \mu m'` (:math:`d = r` without momentum), the new weights and momentum
    are

    .. math::

        w' = s\,(w - \eta d), \qquad m_{\text{new}} = m' - s\,q\,w',

    that is the retraction rescaled to the norm :math:`\sqrt a` the group started
    from, and the transport (projection) of :math:`m'` to :math:`w'`. This returns
    :math:`(s^2, q)`; every inner product comes from the sums because :math:`w, g, m`
    span all the vectors involved:

    .. math::

        r\cdot w &= 0, \quad r\cdot r = a(a\,gg - b^2), \quad r\cdot m = a\,mg - b\,mw\\
        m'\cdot w &= \mu\,mw, \quad m'\cdot m' = \mu^2 mm + 2\mu(1-\tau)\,r\cdot m
            + (1-\tau)^2 r\cdot r, \quad m'\cdot r = \mu\,r\cdot m + (1-\tau)\,r\cdot r\\
        u\cdot u &= a - 2\eta\,d\cdot w + \eta^2 d\cdot d, \qquad s^2 = a / u\cdot u,
            \qquad q = (m'\cdot w - \eta\,m'\cdot d) / a .

    (:math:`m\cdot w` is kept, not assumed 0, so rounding drift does not build up.) Pure
    arithmetic on its arguments, so the same function serves tensors of per-group sums and
    the scalars of a compiled row kernel; the square root is the caller's. With
    ``maximize``, pass :math:`-g`'s sums (:math:`b` and :math:`mg` negated).
    """
    # a times grad_metric_sq_from_sums, written out: the compiled row kernels compile this
    # function by itself, and it can call no other.
    rr = a * (a * gg - b * b)
    if momentum == 0:
        dw = 0.0 * a
        dd = rr
        md = 0.0 * a
        mpw = 0.0 * a
    else:
        if first:
            mpw = 0.0 * a
            mpmp = rr
            mpr = rr
        else:
            rm = a * mg - b * mw
            mpw = momentum * mw
            mpmp = momentum * momentum * mm + 2.0 * momentum * (1.0 - dampening) * rm + (1.0 - dampening) * (1.0 - dampening) * rr
            mpr = momentum * rm + (1.0 - dampening) * rr
        if nesterov:
            dw = momentum * mpw
            dd = rr + 2.0 * momentum * mpr + momentum * momentum * mpmp
            md = mpr + momentum * mpmp
        else:
            dw = mpw
            dd = mpmp
            md = mpmp
    uu = a - 2.0 * lr * dw + lr * lr * dd
    return a / uu, (mpw - lr * md) / a


def one_pass_row_scalars(a, b, gg, mg, mw, mm, mu, alpha, c_m, c_r):
    r"""The per-group scalars of a PSI step with per-group coefficients, from the six sums
    of :func:`step_row_sums`: the one-pass form of the adaptive steps
    (:class:`psiopt.PSIAdam`, :class:`psiopt.PSIAdaSGD`).

    With the Riemannian gradient :math:`r = a\,g - b\,w` and the group's coefficients
    :math:`\mu, \alpha, c_m, c_r` (each optimizer's rule gives them from the group's
    invariant squared gradient norm and its state), the step is

    .. math::

        m' = \mu\, m + \alpha\, r, \qquad u = w - c_m m' - c_r r, \qquad
        w' = s\,u, \qquad m_{\text{new}} = m' - s\,q\,w',

    the retraction rescaled to the norm :math:`\sqrt a` the group started from, and the
    transport (projection) of :math:`m'` to :math:`w'`. This returns :math:`(s^2, q)`:

    .. math::

        r\cdot r &= a(a\,gg - b^2), \quad r\cdot m = a\,mg - b\,mw, \quad r\cdot w = 0\\
        m'\cdot w &= \mu\,mw, \quad m'\cdot m' = \mu^2 mm + 2\mu\alpha\,r\cdot m + \alpha^2 r\cdot r,
            \quad m'\cdot r = \mu\,r\cdot m + \alpha\,r\cdot r\\
        u\cdot u &= a - 2c_m\,m'\cdot w + c_m^2\,m'\cdot m' + 2c_m c_r\,m'\cdot r + c_r^2\,r\cdot r,
            \qquad s^2 = a / u\cdot u\\
        q &= (m'\cdot w - c_m\,m'\cdot m' - c_r\,m'\cdot r) / a .

    Without a first moment (:math:`m = 0`, :math:`\mu = \alpha = c_m = 0`) it is the step
    :math:`w' = s(w - c_r r)`. :func:`one_pass_step_scalars` (PSI-SGD) is the case
    :math:`\mu` = momentum, :math:`\alpha = 1 - \tau`, and :math:`c_m = \eta, c_r = 0`
    (:math:`c_m = \eta\mu, c_r = \eta` with Nesterov). Pure arithmetic, like it: the
    compiled kernels compile it by itself; the square root is the caller's; with
    ``maximize``, pass :math:`-g`'s sums.
    """
    rr = a * (a * gg - b * b)
    rm = a * mg - b * mw
    mpw = mu * mw
    mpmp = mu * mu * mm + 2.0 * mu * alpha * rm + alpha * alpha * rr
    mpr = mu * rm + alpha * rr
    uu = a - 2.0 * c_m * mpw + c_m * c_m * mpmp + 2.0 * c_m * c_r * mpr + c_r * c_r * rr
    return a / uu, (mpw - c_m * mpmp - c_r * mpr) / a


def grad_metric_sq_from_sums(a, b, gg):
    r"""The squared PSI-metric norm of a group's Riemannian gradient, from three of the sums
    of :func:`step_row_sums`: with :math:`a = \|w_j\|^2`, :math:`b = \langle g_j, w_j\rangle`,
    :math:`gg = \|g_j\|^2` and the lift :math:`r_j = a\,g_j - b\,w_j`,

    .. math::

        \|r_j\|_w^2 = \frac{\|r_j\|^2}{a} = a\,gg - b^2 .

    Pure arithmetic, like :func:`one_pass_step_scalars`: sums completed across shards give
    the norm of a group split between processes without touching its entries again.
    """
    return a * gg - b * b


def _bad_group_mask(w: torch.Tensor) -> torch.Tensor:
    """``(k,)`` boolean: rows whose squared norm is zero, underflows or is not finite."""
    sq = group_sq_norms(w).squeeze(1)
    return ~(sq > torch.finfo(sq.dtype).tiny) | ~torch.isfinite(sq)


def _zero_group_indices(w: torch.Tensor) -> list[int]:
    return _bad_group_mask(w).nonzero().flatten().tolist()


def any_zero_groups(row_matrices: Sequence[torch.Tensor]) -> bool:
    """Whether any row of any ``(k, d)`` matrix has zero, underflowing or non-finite norm.

    The batched form of :meth:`PSIManifold.zero_groups` for many tensors at once, with one
    device synchronization (optimizers check every weight before they modify any).
    """
    if not row_matrices:
        return False
    flags = [_bad_group_mask(w).any() for w in row_matrices]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).any())


class PSIManifold(geoopt.manifolds.Manifold):
    r"""The PSI manifold of one scale-invariant weight tensor.

    A point is a tensor whose groups (rows of :meth:`Grouping.rows`) are nonzero; it
    stands for its class :math:`[w] = \{a\cdot w : a_j > 0\}`. Tangent vectors are
    represented by their *horizontal lift*: tensors of the same shape whose groups are
    orthogonal to the point's groups, :math:`\langle \xi_j, w_j\rangle = 0`.

    Parameters
    ----------
    grouping : Grouping or str, default "channel"
        How the tensor splits into groups: ``"channel"`` (one group per output
        channel, for Linear/Conv -> BatchNorm), ``"tensor"`` (LayerNorm), or
        ``"block"`` with ``channels_per_group`` (GroupNorm).
    channels_per_group : int, optional
        For ``"block"``: the ``C / G`` of the ``GroupNorm(G, C)``.

    Notes
    -----
    Choices that are ours, not the paper's:

    * :meth:`projx` returns the **unit-norm representative** :math:`w_j/\|w_j\|` of the
      class: the canonical section of the quotient (each factor
      :math:`(\mathbb R^d\setminus 0)/\mathbb R_{>0}` is the sphere :math:`S^{d-1}`).
      Any nonzero tensor is already a valid representative, so :meth:`projx` is only
      needed to pick a canonical one.
    * :meth:`retr` is :math:`w + \xi` (the norm grows by :math:`\|\xi_j\|^2` per
      group, the class is what matters); :meth:`expmap` keeps each group's norm.
    * The metric is :math:`\sum_j \langle\xi_j,\eta_j\rangle/\|w_j\|^2`, invariant under
      :math:`(w, \xi) \mapsto (a\cdot w, a\cdot\xi)`, so every quantity here is the same
      for every member of a class.

    Examples
    --------
    >>> import torch, psiopt
    >>> m = psiopt.PSIManifold("channel")
    >>> w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    >>> m.projx(w)
    tensor([[0.6000, 0.8000],
            [0.0000, 1.0000]])
    >>> m.egrad2rgrad(w, torch.tensor([[3.0, 4.0], [1.0, 1.0]]))  # radial parts removed
    tensor([[0., 0.],
            [4., 0.]])
    """

    name = "PSI"
    ndim = 0
    reversible = False

    def __init__(self, grouping: GroupingLike = "channel", channels_per_group: int | None = None):
        super().__init__()
        self.grouping: Grouping = as_grouping(grouping, channels_per_group)

    def extra_repr(self) -> str:
        return f"grouping={self.grouping.describe()}"

    # -- helpers ---------------------------------------------------------------------
    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the ``(k, d)`` matrix of its groups."""
        return self.grouping.rows(x)

    def num_groups(self, x: torch.Tensor) -> int:
        """How many scale-invariant groups the tensor ``x`` has."""
        return self.grouping.num_groups(x.shape)

    def zero_groups(self, x: torch.Tensor) -> list[int]:
        """Indices of the groups of ``x`` whose norm is zero, underflows, or is not finite."""
        return _zero_group_indices(self.rows(x))

    def check_nonzero_groups(self, x: torch.Tensor, name: str = "weight") -> None:
        """Raise :class:`ZeroGroupError` naming ``name`` and the first bad groups."""
        bad = self.zero_groups(x)
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            raise ZeroGroupError(
                f"{name}: group(s) {shown} of {self.num_groups(x)} ({self.grouping.describe()} "
                f"grouping, shape {tuple(x.shape)}) have zero, underflowing or non-finite norm, "
                "so they have no direction on the PSI manifold; re-initialize those groups "
                "(e.g. with nn.init.kaiming_normal_) or do not mark this weight as scale invariant"
            )

    def _out(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows.to(like.dtype).reshape(like.shape)

    # -- geoopt checks ---------------------------------------------------------------
    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        try:
            self.grouping.num_groups(shape)
        except ValueError as err:
            return False, f"`{name}`: {err}"
        return True, None

    def _check_point_on_manifold(self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5):
        if x.dtype.is_complex or not x.dtype.is_floating_point:
            return False, f"a point must be a real floating-point tensor, not {x.dtype}"
        bad = self.zero_groups(x)
        if bad:
            return False, f"groups {bad[:10]} have zero or non-finite norm"
        return True, None

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ):
        w, v = _acc(self.rows(x)), _acc(self.rows(u))
        cos = (w * v).sum(1) / (
            torch.linalg.vector_norm(w, dim=1) * torch.linalg.vector_norm(v, dim=1).clamp_min(1e-300)
        )
        if not torch.allclose(cos, torch.zeros_like(cos), atol=atol, rtol=rtol):
            return False, f"`<u_j, x_j> != 0` (not horizontal) with atol={atol}, rtol={rtol}"
        return True, None

    # -- the geometry ----------------------------------------------------------------
    def projx(self, x: torch.Tensor) -> torch.Tensor:
        r"""The unit-norm representative :math:`w_j/\|w_j\|` of the class of ``x``."""
        self.check_nonzero_groups(x, "projx")
        w = self.rows(x)
        return self._out(normalize_rows(w, torch.ones_like(group_sq_norms(w))), x)

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Horizontal projection :math:`P_x(u)`: removes each group's radial part."""
        return self._out(horizontal_projection_rows(self.rows(x), self.rows(u)), u)

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Horizontal lift of the Riemannian gradient, :math:`\|x_j\|^2 P_x(u)_j`."""
        return self._out(horizontal_lift_rows(self.rows(x), self.rows(u)), u)

    def inner(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None, *, keepdim: bool = False
    ) -> torch.Tensor:
        r""":math:`\sum_j \langle u_j, v_j\rangle / \|x_j\|^2` (a scalar; ``keepdim`` keeps ``x.dim()`` dims)."""
        value = metric_inner_rows(
            group_sq_norms(self.rows(x)), self.rows(u), None if v is None else self.rows(v)
        ).sum()
        if keepdim:
            value = value.reshape((1,) * x.dim())
        return value.to(u.dtype)

    def group_inner(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        r"""The metric group by group, :math:`\langle u_j, v_j\rangle / \|x_j\|^2`, shape ``(k,)``."""
        value = metric_inner_rows(group_sq_norms(self.rows(x)), self.rows(u), None if v is None else self.rows(v))
        return value.squeeze(1).to(u.dtype)

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        r""":math:`\|u\|_x = (\sum_j \|u_j\|^2/\|x_j\|^2)^{1/2}`."""
        return self.inner(x, u, keepdim=keepdim).sqrt()

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Retraction :math:`R_x(u) = x + u`, well defined on classes since :math:`R_{a x}(a u) = a R_x(u)`."""
        return x + u

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Exponential map: each group moves along the great circle through :math:`x_j` and :math:`u_j`.

        ``u`` must be horizontal (use :meth:`proju`); each group keeps its norm.
        """
        return self._out(expmap_rows(self.rows(x), self.rows(u)), x)

    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""The horizontal vector ``u`` at ``x`` with :math:`[\mathrm{Exp}_x(u)] = [y]`.

        Group by group: the angle :math:`\theta_j` between :math:`x_j` and :math:`y_j`
        times :math:`\|x_j\|`, along the horizontal part of :math:`y_j`. Defined for
        :math:`\theta_j < \pi` (antipodal groups have no unique geodesic).
        """
        w, z = _acc(self.rows(x)), _acc(self.rows(y))
        w_sq = group_sq_norms(w)
        w_norm = torch.sqrt(w_sq)
        z_unit = z / torch.sqrt(group_sq_norms(z))
        direction = horizontal_projection_rows(w, z_unit, w_sq)
        dir_norm = torch.linalg.vector_norm(direction, dim=1, keepdim=True)
        cos = ((w / w_norm) * z_unit).sum(1, keepdim=True).clamp(-1.0, 1.0)
        theta = torch.atan2(dir_norm, cos)
        # direction = sin(θ)·unit, so θ·unit = direction·θ/sin(θ), smooth at θ = 0.
        return self._out(direction * w_norm / torch.sinc(theta / torch.pi), x)

    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        r""":math:`d([x],[y]) = (\sum_j \theta_j^2)^{1/2}`, :math:`\theta_j` the angle between :math:`x_j, y_j`."""
        theta = self.group_angles(x, y)
        value = torch.sqrt((theta * theta).sum())
        if keepdim:
            value = value.reshape((1,) * x.dim())
        return value.to(x.dtype)

    def group_angles(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Angle between each pair of groups, in ``[0, pi]``, shape ``(k,)`` (accumulation dtype)."""
        w, z = _acc(self.rows(x)), _acc(self.rows(y))
        w_unit = w / torch.sqrt(group_sq_norms(w))
        z_unit = z / torch.sqrt(group_sq_norms(z))
        # atan2 of the sine and cosine is accurate at small angles, where arccos is not.
        sin = torch.linalg.vector_norm(z_unit - (w_unit * z_unit).sum(1, keepdim=True) * w_unit, dim=1)
        cos = (w_unit * z_unit).sum(1)
        return torch.atan2(sin, cos)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""Vector transport :math:`T_{x\to y}(v)_j = (\|y_j\|/\|x_j\|) P_y(v)_j`."""
        return self._out(
            transport_rows(self.rows(y), self.rows(v), group_sq_norms(self.rows(x))), v
        )

    def retr_transp(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
        """Retraction, then transport of ``v`` to the new point: ``(retr(x, u), transp(x, y, v))``."""
        y = self.retr(x, u)
        return y, self.transp(x, y, v)

    def expmap_transp(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
        """Exponential map, then transport of ``v`` to the new point."""
        y = self.expmap(x, u)
        return y, self.transp(x, y, v)

    def transp_follow_retr(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Transport of ``v`` along the retraction by ``u``."""
        return self.transp(x, self.retr(x, u), v)

    def transp_follow_expmap(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Transport of ``v`` along the exponential map by ``u``."""
        return self.transp(x, self.expmap(x, u), v)

    def random(self, *size: Any, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        """A random point: i.i.d. standard normal entries (nonzero groups almost surely),
        as a :class:`geoopt.ManifoldTensor` on this manifold."""
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        self._assert_check_shape(tuple(size), "x")
        x = torch.randn(*size, dtype=dtype, device=device)
        return geoopt.ManifoldTensor(x, manifold=self)

    def origin(self, *size: Any, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
        """A fixed point: every group the unit vector along its first coordinate."""
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        self._assert_check_shape(tuple(size), "x")
        x = torch.zeros(*size, dtype=dtype, device=device)
        self.rows(x)[:, 0] = 1.0
        return geoopt.ManifoldTensor(x, manifold=self)
