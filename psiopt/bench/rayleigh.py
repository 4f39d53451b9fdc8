r"""Full-batch problems with a known optimum: sums of Rayleigh quotients.

The loss of ``k`` groups :math:`w_j \in \mathbb R^d`

.. math:: f(w) = \sum_{j=1}^k \frac{w_j^\top A_j w_j}{w_j^\top w_j}

is scale invariant in each group, so it lives on the product of ``k`` spheres (the PSI
manifold with the ``"channel"`` grouping of the ``(k, d)`` matrix ``w``). Its minimum is
:math:`f^* = \sum_j \lambda_1(A_j)`, computed with :func:`scipy.linalg.eigh`.

**The predicted rate.** Every :math:`A_j` has the same spectrum
:math:`\lambda_1 < \lambda_2 \le \dots \le \lambda_d` (random eigenvectors), with
condition number :math:`\kappa = (\lambda_d - \lambda_1)/(\lambda_2 - \lambda_1)`. At the
minimizer the Riemannian Hessian of one term on the unit sphere is
:math:`2(A - \lambda_1 I)` on the tangent space, with eigenvalues
:math:`2(\lambda_i - \lambda_1)`, :math:`i \ge 2`. Riemannian gradient descent with a
fixed angular step :math:`\eta` (PSI-GD's learning rate: it moves :math:`w_j/\|w_j\|` by
:math:`\eta` times the sphere gradient, whatever :math:`\|w_j\|`) therefore contracts the
distance to the optimum by

.. math:: \rho(\eta) = \max_{i \ge 2} |1 - 2\eta(\lambda_i - \lambda_1)|

per iteration, and the optimality gap :math:`f - f^*` (quadratic in the distance) by
:math:`\rho^2`. The step :math:`\eta^* = 1/(\lambda_2 + \lambda_d - 2\lambda_1)` gives
the best rate :math:`\rho^* = (\kappa - 1)/(\kappa + 1)`; the benchmark uses it, and
predicts :math:`\lceil \log((f_0 - f^*)/\varepsilon) / \log(1/\rho^2) \rceil`
iterations to a gap :math:`\varepsilon` (asymptotic: it ignores the first, non-linear
phase). It also fits the measured rate on the tail of each run.

Euclidean GD takes the step :math:`\alpha = \eta^* \,\mathbb E\|w_j\|^2 = \eta^* d` (the
same angular step as PSI-GD at unit initial scale), *fixed* across initial scales: its
angular step is :math:`\alpha/\|w_j\|^2`, which depends on the scale and shrinks as the
norms grow (:math:`\|w - \alpha g\|^2 = \|w\|^2 + \alpha^2\|g\|^2`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import geoopt
import numpy as np
import scipy.linalg
import torch

from .methods import missing_requirement

__all__ = [
    "RayleighProblem",
    "make_rayleigh",
    "FullBatchMethod",
    "FULL_BATCH_METHODS",
    "run_full_batch",
]


@dataclass
class RayleighProblem:
    """A sum of ``k`` Rayleigh quotients of ``d x d`` symmetric matrices (float64)."""

    matrices: torch.Tensor
    spectrum: np.ndarray
    f_star: float
    condition_number: float

    @property
    def groups(self) -> int:
        return int(self.matrices.shape[0])

    @property
    def dim(self) -> int:
        return int(self.matrices.shape[1])

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        """:math:`\\sum_j w_j^\\top A_j w_j / w_j^\\top w_j` for ``w`` of shape ``(k, d)``."""
        aw = torch.einsum("kij,kj->ki", self.matrices, w)
        return ((aw * w).sum(dim=1) / (w * w).sum(dim=1)).sum()

    @property
    def optimal_step(self) -> float:
        """:math:`\\eta^* = 1/(\\lambda_2 + \\lambda_d - 2\\lambda_1)`."""
        lam = self.spectrum
        return float(1.0 / (lam[1] + lam[-1] - 2 * lam[0]))

    def contraction(self, step: float) -> float:
        """:math:`\\rho(\\eta) = \\max_{i\\ge2} |1 - 2\\eta(\\lambda_i - \\lambda_1)|` (distance, per iteration)."""
        lam = self.spectrum
        return float(np.max(np.abs(1.0 - 2.0 * step * (lam[1:] - lam[0]))))

    def predicted_iterations(self, step: float, initial_gap: float, tol: float) -> int | None:
        """Iterations for the gap to fall from ``initial_gap`` to ``tol`` at rate :math:`\\rho^2`."""
        rho = self.contraction(step)
        if rho >= 1.0:
            return None
        if initial_gap <= tol:
            return 0
        return int(math.ceil(math.log(initial_gap / tol) / (-2.0 * math.log(rho))))


def make_rayleigh(groups: int, dim: int, condition_number: float, seed: int) -> RayleighProblem:
    """A random problem with spectrum :math:`1, 2, \\dots, 1 + \\kappa` (interior evenly spaced).

    The eigenvalues are :math:`\\lambda_1 = 1`, :math:`\\lambda_2 = 2`,
    :math:`\\lambda_d = 1 + \\kappa` and the rest evenly spaced between, so that
    :math:`(\\lambda_d - \\lambda_1)/(\\lambda_2 - \\lambda_1) = \\kappa`; each group gets
    its own random orthonormal eigenvectors. :math:`f^*` is the sum of the smallest
    eigenvalues that :func:`scipy.linalg.eigh` finds for the assembled matrices.
    """
    if dim < 3:
        raise ValueError(f"dim must be at least 3 (an eigengap and a spread), got {dim}")
    if not condition_number > 1:
        raise ValueError(f"condition_number must be > 1, got {condition_number}")
    rng = np.random.default_rng(seed)
    spectrum = np.concatenate([[1.0], np.linspace(2.0, 1.0 + condition_number, dim - 1)])
    mats, lowest = [], []
    for _ in range(groups):
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        a = (q * spectrum) @ q.T
        a = (a + a.T) / 2
        mats.append(a)
        lowest.append(scipy.linalg.eigh(a, eigvals_only=True)[0])
    return RayleighProblem(
        torch.from_numpy(np.stack(mats)), spectrum, float(np.sum(lowest)), float(condition_number)
    )


@dataclass(frozen=True)
class FullBatchMethod:
    """A full-batch method: ``make(w0, problem) -> (param, optimizer, needs_closure)``."""

    name: str
    label: str
    summary: str
    make: Callable[[torch.Tensor, RayleighProblem], tuple[torch.Tensor, torch.optim.Optimizer, bool]]
    requires: tuple[str, ...] = ()
    uses_optimal_step: bool = True

    def unavailable_reason(self) -> str | None:
        """``None`` if every requirement imports, else why not."""
        return missing_requirement(self.requires)


def _gd(w0: torch.Tensor, problem: RayleighProblem):
    w = torch.nn.Parameter(w0.clone())
    return w, torch.optim.SGD([w], lr=problem.optimal_step * problem.dim), False


def _psi_param(w0: torch.Tensor) -> torch.Tensor:
    from psiopt import PSIManifold

    return geoopt.ManifoldParameter(w0.clone(), manifold=PSIManifold("channel"))


def _psigd(w0: torch.Tensor, problem: RayleighProblem):
    import psiopt

    w = _psi_param(w0)
    return w, psiopt.PSIGD([w], lr=problem.optimal_step), True


def _psigd_ls(w0: torch.Tensor, problem: RayleighProblem):
    import psiopt

    w = _psi_param(w0)
    return w, psiopt.PSIGD([w], lr=1.0, line_search=True), True


def _rsgd_sphere(w0: torch.Tensor, problem: RayleighProblem):
    w = geoopt.ManifoldParameter(w0 / torch.linalg.vector_norm(w0, dim=1, keepdim=True), manifold=geoopt.Sphere())
    return w, geoopt.optim.RiemannianSGD([w], lr=problem.optimal_step), False


FULL_BATCH_METHODS: dict[str, FullBatchMethod] = {
    m.name: m
    for m in (
        FullBatchMethod(
            "gd", "GD", "torch.optim.SGD without momentum, step eta* x d fixed across scales", _gd
        ),
        FullBatchMethod(
            "psigd", "PSI-GD", "psiopt.PSIGD, fixed angular step eta*", _psigd, requires=("psiopt:PSIGD",)
        ),
        FullBatchMethod(
            "psigd-ls",
            "PSI-GD + line search",
            "psiopt.PSIGD with Armijo backtracking (initial step 1)",
            _psigd_ls,
            requires=("psiopt:PSIGD",),
            uses_optimal_step=False,
        ),
        FullBatchMethod(
            "rsgd-sphere", "RSGD sphere", "geoopt RiemannianSGD on geoopt.Sphere rows, step eta*", _rsgd_sphere
        ),
    )
}


def run_full_batch(
    method: FullBatchMethod,
    problem: RayleighProblem,
    w0: torch.Tensor,
    tol: float,
    max_iters: int,
) -> dict[str, object]:
    """Iterate until :math:`f - f^* \\le` ``tol`` or ``max_iters``; return the record.

    The record holds ``iterations`` (``None`` if the tolerance was not reached),
    ``forward_passes`` and ``backward_passes`` (the loss evaluations and gradients the
    method asked for over the run; the gap measured after each iteration is not
    counted; a closure that takes ``backward`` lets PSIGD's line search skip the
    gradient at its trials), ``final_gap``, ``initial_gap``, ``seconds``, the ``gap`` curve (log-spaced
    iterations), ``measured_rate`` (the per-iteration gap ratio fitted on the tail,
    between gaps ``1e-4`` and ``tol``) and, for fixed-step methods, ``predicted_rate``
    :math:`\\rho^2` and ``predicted_iterations``.
    """
    param, opt, needs_closure = method.make(w0, problem)

    passes = {"forward": 0, "backward": 0}

    def closure(backward: bool = True) -> torch.Tensor:
        passes["forward"] += 1
        if not backward:
            return problem.loss(param)
        passes["backward"] += 1
        opt.zero_grad()
        loss = problem.loss(param)
        loss.backward()
        return loss.detach()

    gaps: list[float] = []
    with torch.no_grad():
        gap = float(problem.loss(param)) - problem.f_star
    gaps.append(gap)
    initial_gap = gap
    reached: int | None = 0 if gap <= tol else None
    start = time.perf_counter()
    it = 0
    while reached is None and it < max_iters:
        if needs_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()
        it += 1
        with torch.no_grad():
            gap = float(problem.loss(param)) - problem.f_star
        gaps.append(gap)
        if not math.isfinite(gap):
            break
        if gap <= tol:
            reached = it
    seconds = time.perf_counter() - start
    arr = np.asarray(gaps)
    tail = np.nonzero((arr <= 1e-4) & (arr > 0))[0]
    measured = None
    if len(tail) >= 3 and tail[-1] > tail[0]:
        a, b = int(tail[0]), int(tail[-1])
        measured = float((arr[b] / arr[a]) ** (1.0 / (b - a)))
    keep = np.unique(np.concatenate([[0], np.geomspace(1, len(gaps) - 1, 60).astype(int)])) if len(gaps) > 1 else [0]
    record: dict[str, object] = {
        "method": method.name,
        "iterations": reached,
        "forward_passes": passes["forward"],
        "backward_passes": passes["backward"],
        "max_iters": max_iters,
        "initial_gap": initial_gap,
        "final_gap": gaps[-1] if math.isfinite(gaps[-1]) else None,
        "seconds": seconds,
        "measured_rate": measured,
        "curve_iters": [int(i) for i in keep],
        "curve_gap": [max(float(gaps[i]), 0.0) if math.isfinite(gaps[i]) else None for i in keep],
    }
    if method.uses_optimal_step and method.name != "gd":
        step = problem.optimal_step
        record["predicted_rate"] = problem.contraction(step) ** 2
        record["predicted_iterations"] = problem.predicted_iterations(step, initial_gap, tol)
    else:
        record["predicted_rate"] = None
        record["predicted_iterations"] = None
    return record
