"""Property tests of PSIManifold, in geoopt's style, float64, over every weight shape and grouping."""

from __future__ import annotations

import copy
import pickle

import geoopt
import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import psiopt
from psiopt import Grouping, PSIManifold, ZeroGroupError

SHAPES = {
    "linear": (6, 5),
    "conv1d": (6, 3, 3),
    "conv2d": (8, 3, 3, 3),
    "conv3d": (4, 2, 2, 2, 2),
}
GROUPINGS = [Grouping.per_channel(), Grouping.whole(), Grouping.blocks(2)]

CASES = [
    pytest.param(shape, grouping, id=f"{name}-{grouping}")
    for name, shape in SHAPES.items()
    for grouping in GROUPINGS
]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _randn(shape, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _point_and_vectors(shape, grouping, gen):
    m = PSIManifold(grouping)
    x = _randn(shape, gen) * 3.0
    u = m.proju(x, _randn(shape, gen))
    v = m.proju(x, _randn(shape, gen))
    return m, x, u, v


def _group_factors(m, x, gen, low=1e-2, high=1e2):
    """Random positive factors, one per group, broadcast to x's shape (log-uniform in [low, high])."""
    k = m.num_groups(x)
    logs = torch.empty(k, dtype=torch.float64).uniform_(np.log(low), np.log(high), generator=gen)
    a = torch.exp(logs)
    return (a[:, None] * torch.ones_like(m.rows(x))).reshape(x.shape), a


def _dot_rows(m, x, u):
    return (m.rows(x) * m.rows(u)).sum(1)


@pytest.mark.parametrize("shape,grouping", CASES)
def test_proju_is_idempotent_and_horizontal(shape, grouping, gen):
    m = PSIManifold(grouping)
    x, g = _randn(shape, gen), _randn(shape, gen)
    p = m.proju(x, g)
    torch.testing.assert_close(m.proju(x, p), p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_dot_rows(m, x, p), torch.zeros(m.num_groups(x), dtype=x.dtype), atol=1e-12, rtol=0)
    # the removed part is vertical: g - P(g) is, group by group, a multiple of x
    vert = m.rows(g - p)
    w = m.rows(x)
    coef = (vert * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True)
    torch.testing.assert_close(vert, coef * w, rtol=1e-10, atol=1e-12)
    m.assert_check_vector_on_tangent(x, p)


@pytest.mark.parametrize("shape,grouping", CASES)
def test_projx_gives_the_unit_norm_representative_of_the_same_class(shape, grouping, gen):
    m = PSIManifold(grouping)
    x = _randn(shape, gen) * 7.0
    y = m.projx(x)
    torch.testing.assert_close(torch.linalg.vector_norm(m.rows(y), dim=1), torch.ones(m.num_groups(x), dtype=x.dtype))
    torch.testing.assert_close(m.projx(y), y, rtol=1e-14, atol=1e-14)
    assert float(m.dist(x, y)) < 1e-7
    m.assert_check_point_on_manifold(y)


@pytest.mark.parametrize("shape,grouping", CASES)
def test_retraction_at_zero_is_identity_and_its_velocity_is_xi(shape, grouping, gen):
    m, x, u, _ = _point_and_vectors(shape, grouping, gen)
    torch.testing.assert_close(m.retr(x, torch.zeros_like(u)), x, rtol=0, atol=0)
    h = 1e-6
    velocity = (m.retr(x, h * u) - m.retr(x, -h * u)) / (2 * h)
    torch.testing.assert_close(velocity, u, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("shape,grouping", CASES)
def test_retraction_is_well_defined_on_classes(shape, grouping, gen):
    """R_{a x}(a u) = a R_x(u): equivalent points and vectors retract to equivalent points."""
    m, x, u, _ = _point_and_vectors(shape, grouping, gen)
    a, _ = _group_factors(m, x, gen)
    torch.testing.assert_close(m.retr(a * x, a * u), a * m.retr(x, u), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape,grouping", CASES)
def test_expmap_stays_on_the_class_sphere_and_dist_equals_norm(shape, grouping, gen):
    m, x, u, _ = _point_and_vectors(shape, grouping, gen)
    u = u / m.norm(x, u) * 0.3  # a small tangent vector: every angle below pi
    y = m.expmap(x, u)
    m.assert_check_point_on_manifold(y)
    # each group keeps its norm (the geodesic of the quotient metric is a great circle)
    torch.testing.assert_close(
        torch.linalg.vector_norm(m.rows(y), dim=1), torch.linalg.vector_norm(m.rows(x), dim=1), rtol=1e-13, atol=0
    )
    torch.testing.assert_close(m.dist(x, y), m.norm(x, u), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.logmap(x, y), u, rtol=1e-9, atol=1e-10)
    # a geodesic: distance grows linearly along it
    for t in (0.25, 0.5, 2.0):
        torch.testing.assert_close(m.dist(x, m.expmap(x, t * u)), t * m.norm(x, u), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape,grouping", CASES)
def test_expmap_at_zero_and_its_velocity(shape, grouping, gen):
    m, x, u, _ = _point_and_vectors(shape, grouping, gen)
    torch.testing.assert_close(m.expmap(x, torch.zeros_like(u)), x, rtol=0, atol=1e-15)
    h = 1e-6
    velocity = (m.expmap(x, h * u) - m.expmap(x, -h * u)) / (2 * h)
    torch.testing.assert_close(velocity, u, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("shape,grouping", CASES)
def test_logmap_reaches_any_representative_of_the_target_class(shape, grouping, gen):
    m, x, _, _ = _point_and_vectors(shape, grouping, gen)
    y = _randn(shape, gen)
    a, _ = _group_factors(m, y, gen)
    log = m.logmap(x, y)
    torch.testing.assert_close(m.logmap(x, a * y), log, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.dist(y, m.expmap(x, log)), torch.zeros((), dtype=x.dtype), atol=1e-7, rtol=0)
    torch.testing.assert_close(m.norm(x, log), m.dist(x, y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape,grouping", CASES)
def test_transport_is_horizontal_and_equivariant(shape, grouping, gen):
    m, x, u, v = _point_and_vectors(shape, grouping, gen)
    y = m.retr(x, u)
    t = m.transp(x, y, v)
    k = m.num_groups(x)
    torch.testing.assert_close(_dot_rows(m, y, t), torch.zeros(k, dtype=x.dtype), atol=1e-10, rtol=0)
    # transport to the same point is the identity on horizontal vectors
    torch.testing.assert_close(m.transp(x, x, v), v, rtol=1e-12, atol=1e-12)
    # equivalent inputs give equivalent outputs: T_{ax -> by}(a v) = b T_{x -> y}(v)
    a, _ = _group_factors(m, x, gen)
    b, _ = _group_factors(m, x, gen)
    torch.testing.assert_close(m.transp(a * x, b * y, a * v), b * t, rtol=1e-11, atol=1e-11)
    y2, t2 = m.retr_transp(x, u, v)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(t2, t)


@pytest.mark.parametrize("shape,grouping", CASES)
def test_metric_is_invariant_under_rescaling(shape, grouping, gen):
    m, x, u, v = _point_and_vectors(shape, grouping, gen)
    a, _ = _group_factors(m, x, gen)
    torch.testing.assert_close(m.inner(a * x, a * u, a * v), m.inner(x, u, v), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m.norm(a * x, a * u), m.norm(x, u), rtol=1e-12, atol=1e-14)
    # and the distance between classes does not depend on representatives
    y = _randn(shape, gen)
    b, _ = _group_factors(m, y, gen)
    torch.testing.assert_close(m.dist(a * x, b * y), m.dist(x, y), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(m.dist(x, y), m.dist(y, x), rtol=1e-12, atol=1e-14)


def _rayleigh_problem(m, shape, gen):
    """f(w) = sum_j w_j^T A_j w_j / w_j^T w_j: invariant under per-group positive rescaling."""
    k, d = m.num_groups(torch.empty(shape)), int(np.prod(shape)) // m.num_groups(torch.empty(shape))
    b = torch.randn(k, d, d, generator=gen, dtype=torch.float64)
    mats = b + b.transpose(1, 2)

    def f(w: torch.Tensor) -> torch.Tensor:
        rows = m.rows(w)
        num = torch.einsum("kd,kde,ke->k", rows, mats, rows)
        return (num / (rows * rows).sum(1)).sum()

    return f, mats


def _egrad(f, x):
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x)
    return g


@pytest.mark.parametrize("shape,grouping", CASES)
def test_egrad2rgrad_is_the_riemannian_gradient(shape, grouping, gen):
    """<grad f, xi>_x = Df(x)[xi] for horizontal xi, checked against autograd and finite differences."""
    m = PSIManifold(grouping)
    f, _ = _rayleigh_problem(m, shape, gen)
    x = _randn(shape, gen) * 4.0
    rgrad = m.egrad2rgrad(x, _egrad(f, x))
    m.assert_check_vector_on_tangent(x, rgrad)
    xi = m.proju(x, _randn(shape, gen))
    h = 1e-6
    fd = (f(m.retr(x, h * xi)) - f(m.retr(x, -h * xi))) / (2 * h)
    torch.testing.assert_close(m.inner(x, rgrad, xi), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape,grouping", CASES)
def test_egrad2rgrad_gives_the_same_class_level_step_at_equivalent_points(shape, grouping, gen):
    m = PSIManifold(grouping)
    f, _ = _rayleigh_problem(m, shape, gen)
    x = _randn(shape, gen)
    a, _ = _group_factors(m, x, gen)
    r1 = m.egrad2rgrad(x, _egrad(f, x))
    r2 = m.egrad2rgrad(a * x, _egrad(f, a * x))
    torch.testing.assert_close(r2, a * r1, rtol=1e-10, atol=1e-12)  # the lift is equivariant
    step1, step2 = m.retr(x, -0.05 * r1), m.retr(a * x, -0.05 * r2)
    torch.testing.assert_close(m.dist(step1, step2), torch.zeros((), dtype=x.dtype), atol=1e-7, rtol=0)
    torch.testing.assert_close(m.norm(x, r1), m.norm(a * x, r2), rtol=1e-11, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-6.0, 6.0),
    grouping=st.sampled_from(GROUPINGS),
)
def test_horizontal_lift_equivariance_over_extreme_scales(seed, log_scale, grouping):
    """Hypothesis sweep: grad of f at 10^s x is 10^-s times grad at x, so the lift is 10^s times."""
    gen = torch.Generator().manual_seed(seed)
    m = PSIManifold(grouping)
    f, _ = _rayleigh_problem(m, (4, 3, 2), gen)
    x = _randn((4, 3, 2), gen)
    s = 10.0**log_scale
    r1 = m.egrad2rgrad(x, _egrad(f, x))
    r2 = m.egrad2rgrad(s * x, _egrad(f, s * x))
    torch.testing.assert_close(r2 / s, r1, rtol=1e-9, atol=1e-9 * float(r1.abs().max()))


def test_half_precision_reductions_run_in_float32():
    gen = torch.Generator().manual_seed(0)
    m = PSIManifold("channel")
    x = _randn((16, 300), gen)
    g = _randn((16, 300), gen)
    reference = m.egrad2rgrad(x, g)
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 3e-3)):
        out = m.egrad2rgrad(x.to(dtype), g.to(dtype))
        assert out.dtype == dtype
        err = (out.double() - reference).abs().max() / reference.abs().max()
        assert err < tol, (dtype, float(err))
    # float16 squared norms of these rows exceed float16's range (65504) unless accumulated in float32
    big = torch.full((2, 300), 20.0, dtype=torch.float16)
    assert torch.isfinite(m.norm(big, m.proju(big, g[:2].half()))).all()


@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
def test_riemannian_sgd_on_rayleigh_quotient_reaches_scipy_eigenvectors(grouping):
    """geoopt's own RiemannianSGD on a PSIManifold parameter finds each group's smallest eigenvector."""
    gen = torch.Generator().manual_seed(7)
    m = PSIManifold(grouping)
    shape = (4, 3, 2)
    f, mats = _rayleigh_problem(m, shape, gen)
    w = geoopt.ManifoldParameter(_randn(shape, gen) * 5.0, manifold=m)
    opt = geoopt.optim.RiemannianSGD([w], lr=0.05, momentum=0.5, stabilize=10)
    for _ in range(2000):
        opt.zero_grad()
        f(w).backward()
        opt.step()
    expected_values = []
    for j, a in enumerate(mats.numpy()):
        vals, vecs = scipy.linalg.eigh(a)
        expected_values.append(vals[0])
        got = m.rows(w.detach())[j].numpy()
        cos = abs(got @ vecs[:, 0]) / np.linalg.norm(got)
        assert cos == pytest.approx(1.0, abs=1e-8), (j, cos)
    assert float(f(w.detach())) == pytest.approx(sum(expected_values), rel=1e-9, abs=1e-9)


def test_repr_and_pickling_keep_the_grouping():
    m = PSIManifold("block", channels_per_group=4)
    assert repr(m) == "PSI(grouping=block(4)) manifold"
    assert pickle.loads(pickle.dumps(m)).grouping == m.grouping
    assert copy.deepcopy(m).grouping == Grouping.blocks(4)
    assert PSIManifold("block(4)").grouping == m.grouping
    p = geoopt.ManifoldParameter(torch.randn(8, 3), manifold=m)
    q = pickle.loads(pickle.dumps(p))
    assert isinstance(q.manifold, PSIManifold) and q.manifold.grouping == m.grouping


def test_random_and_origin_are_points():
    m = PSIManifold("channel")
    x = m.random(5, 4, dtype=torch.float64)
    assert isinstance(x, geoopt.ManifoldTensor) and x.shape == (5, 4)
    m.assert_check_point_on_manifold(x)
    o = m.origin((5, 4))
    m.assert_check_point_on_manifold(o)
    torch.testing.assert_close(m.projx(o), o.as_subclass(torch.Tensor))


# -- bad input -----------------------------------------------------------------------


def test_zero_group_is_reported_with_its_index():
    m = PSIManifold("channel")
    x = torch.randn(5, 4)
    x[3] = 0
    assert m.zero_groups(x) == [3]
    with pytest.raises(ZeroGroupError, match=r"conv1\.weight: group\(s\) 3 of 5"):
        m.check_nonzero_groups(x, "conv1.weight")
    with pytest.raises(ZeroGroupError, match="projx"):
        m.projx(x)
    ok, reason = m.check_point_on_manifold(x, explain=True)
    assert not ok and "[3]" in reason


def test_shape_and_grouping_errors_say_what_to_do():
    with pytest.raises(ValueError, match="not a multiple of channels_per_group=4"):
        PSIManifold("block", channels_per_group=4).assert_check_point(torch.randn(6, 2))
    with pytest.raises(ValueError, match="needs channels_per_group"):
        Grouping("block")
    with pytest.raises(ValueError, match="only to the 'block' grouping"):
        Grouping("channel", 3)
    with pytest.raises(ValueError, match="unknown grouping kind 'row'"):
        PSIManifold("row")
    with pytest.raises(TypeError, match="must be a psiopt.Grouping"):
        psiopt.as_grouping(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one dimension"):
        PSIManifold().num_groups(torch.tensor(1.0))
    ok, reason = PSIManifold().check_point_on_manifold(torch.ones(3, 2, dtype=torch.int64), explain=True)
    assert not ok and "floating-point" in reason


def test_tangent_check_rejects_a_radial_vector():
    m = PSIManifold("channel")
    x = torch.randn(3, 4, dtype=torch.float64)
    ok, reason = m.check_vector_on_tangent(x, x.clone(), explain=True)
    assert not ok and "not horizontal" in reason


@pytest.mark.parametrize("look_ahead", [False, True], ids=["plain", "look-ahead"])
def test_one_pass_row_scalars_give_the_retracted_rows_and_the_transported_moment(gen, look_ahead):
    """The one-pass scalars of a step with per-group coefficients, from the six row sums
    alone, against the step written out on the rows: m' = mu m + alpha r, the retraction
    w - c_m m' - c_r r rescaled to the norm of w, and m' projected onto the horizontal
    space of the new rows."""
    w, g, m = _randn((5, 7), gen), _randn((5, 7), gen), _randn((5, 7), gen)

    def per_group(scale):
        return scale * torch.rand(5, generator=gen, dtype=torch.float64)

    mu, alpha, c_m = per_group(1.0), per_group(1.0), per_group(0.5)
    c_r = per_group(0.5) if look_ahead else torch.zeros(5, dtype=torch.float64)
    a, b, gg, mg, mw, mm = psiopt.manifold.step_row_sums(w, g, m).unbind(1)
    sq = psiopt.manifold.grad_metric_sq_from_sums(a, b, gg)
    s2, q = psiopt.manifold.one_pass_row_scalars(a, b, sq, mg, mw, mm, mu, alpha, c_m, c_r)
    s, q = s2.sqrt().unsqueeze(1), q.unsqueeze(1)
    mu, alpha, c_m, c_r = (x.unsqueeze(1) for x in (mu, alpha, c_m, c_r))

    r = psiopt.manifold.horizontal_lift_rows(w, g)
    new_m = mu * m + alpha * r
    u = w - c_m * new_m - c_r * r
    w_new = psiopt.manifold.normalize_rows(u, psiopt.manifold.group_sq_norms(w))
    torch.testing.assert_close(s * u, w_new, rtol=1e-12, atol=0)
    torch.testing.assert_close(new_m - s * q * (s * u), psiopt.manifold.horizontal_projection_rows(w_new, new_m),
                               rtol=1e-10, atol=1e-12)
