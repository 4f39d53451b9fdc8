r"""Prove: rescale the candidates' groups and check that nothing changes, where it would.

Each test multiplies every candidate's groups by random powers of two covering
``[low, high]`` (one group at each end; then the mirrored factors, so every group is
both shrunk and grown; powers of two because multiplying by them is exact, see
:func:`group_factors`) and runs the model with every
normalization's eps replaced by the proof eps. It compares, against the unscaled run:

* the output of **every normalization call, before its affine map**, relative to that
  output's own scale: a small gain after the normalization (LayerScale at 1e-6, a
  residual branch whose last BatchNorm starts at zero) can neither hide a change nor
  fake invariance there;
* the **model's output**, relative to its largest entry: this catches a use of a
  weight's output that the structural pass did not see.

All candidates are tested at once first; if something changes, the first
normalization (in forward order) that changed points at its own candidates, which are
then tested one by one (all pending candidates if it points at none), until every
candidate is accepted or rejected by a test of its own.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from ..grouping import Grouping
from ..layers import group_moments, normalized
from .graph import NormCall, Tap
from .structure import Candidate

__all__ = ["SavedState", "Reference", "Proof", "NormStats", "norm_stats", "eps_sensitivity"]


# -- state that the proof must give back -----------------------------------------------


class SavedState:
    """Everything the proof may touch, to be put back exactly."""

    def __init__(self, model: nn.Module):
        self.modes = [(m, m.training) for m in model.modules()]
        buffers = _unique(t for _, t in model.named_buffers(remove_duplicate=False))
        self.buffers = [(b, b.detach().clone()) for b in buffers]
        self.params = [(p, p.data) for p in _unique(model.parameters())]
        self.py_rng = random.getstate()
        self.np_rng = _numpy_rng_state()
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def reset_buffers(self) -> None:
        with torch.no_grad():
            for buf, saved in self.buffers:
                buf.copy_(saved)

    def restore(self) -> None:
        for p, data in self.params:
            p.data = data  # the storage itself was never written, only swapped
        self.reset_buffers()
        for m, training in self.modes:
            m.training = training
        random.setstate(self.py_rng)
        if self.np_rng is not None:
            import numpy as np

            np.random.set_state(self.np_rng)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _numpy_rng_state() -> Any:
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but the state is only saved if present
        return None
    return np.random.get_state()


def _unique(tensors) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


# -- forward passes ----------------------------------------------------------------------


def forward(model: nn.Module, inputs: tuple[Any, ...], seed: int, saved: SavedState, tap: Tap) -> Any:
    """One forward pass under ``tap``, with a fixed seed (dropout draws the same masks), no
    gradient, fresh copies of the inputs (the model may modify them in place), and the
    buffers (BatchNorm running statistics) put back afterwards."""
    torch.manual_seed(seed)
    fresh = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)
    try:
        with torch.no_grad(), tap.watching():
            return model(*fresh)
    finally:
        saved.reset_buffers()


def float_leaves(output: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def power_of_two_range(low: float, high: float) -> tuple[int, int]:
    """The exponents of the powers of two that cover ``[low, high]``."""
    return math.floor(math.log2(low)), math.ceil(math.log2(high))


def group_factors(k: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """``k`` random powers of two covering ``[low, high]``, with one group at each end (float64).

    Powers of two, because multiplying by them is exact in floating point: the layer's
    output, the normalization's statistics and so its output change by exactly nothing
    for an invariant weight, so rounding noise cannot fake a failure, even deep in a
    float32 network.
    """
    lo, hi = power_of_two_range(low, high)
    exponents = torch.randint(lo, hi + 1, (k,), generator=gen)
    perm = torch.randperm(k, generator=gen)
    exponents[perm[0]] = lo
    if k > 1:
        exponents[perm[1]] = hi
    return torch.pow(2.0, exponents.double())


def scaled(param: torch.Tensor, grouping: Grouping, factors: torch.Tensor) -> torch.Tensor:
    rows = grouping.rows(param.data)
    return (rows * factors.to(device=rows.device, dtype=rows.dtype).unsqueeze(1)).reshape(param.shape)


# -- statistics at the normalizations ----------------------------------------------------


@dataclass
class NormStats:
    """Statistics of the groups one normalization call normalized."""

    min_var: float  # smallest nonzero group variance (mean square for RMS norm)
    worst_ratio: float  # smallest variance / mean square over the non-zero groups
    var: torch.Tensor  # per group (float64; mean square for RMS norm)


def norm_stats(call: NormCall) -> NormStats:
    mean, var = group_moments(call.spec, call.input.detach())
    mean_sq = var + mean.pow(2)
    if not call.spec.removes_mean:
        var = mean_sq
    live = mean_sq > 0
    ratio = var[live] / mean_sq[live]
    nonzero = var[var > 0]
    return NormStats(
        min_var=float(nonzero.min()) if nonzero.numel() else math.inf,
        worst_ratio=float(ratio.min()) if ratio.numel() else math.inf,
        var=nonzero,
    )


def eps_sensitivity(stats: NormStats, eps: float, factor: float) -> float:
    r"""Largest relative change of a normalized group at ``eps`` when the normalization's whole
    input is multiplied by ``factor``: a group of variance :math:`\sigma^2` is multiplied by
    :math:`\sigma/\sqrt{\sigma^2 + \epsilon/c^2}` instead of :math:`\sigma/\sqrt{\sigma^2 + \epsilon}`."""
    if not stats.var.numel():
        return 0.0
    v = stats.var
    scaled_gain = torch.sqrt(v / (v + eps / factor**2))
    gain = torch.sqrt(v / (v + eps))
    return float(((scaled_gain - gain) / gain).abs().max())


# -- the proof ----------------------------------------------------------------------------


@dataclass
class _Check:
    """One thing a test compares: a normalization call's output, or one model output."""

    where: str
    module_name: str | None  # the normalization's module; None for the model output
    deviation: float
    ok: bool


class Reference:
    """The unscaled run the tests compare with: normalized outputs and model outputs."""

    def __init__(self, calls: list[NormCall], outputs: list[torch.Tensor], skip: set[int], proof_eps: float):
        self.calls = calls
        self.skip = skip  # calls on nearly constant groups: rounding noise, not comparable
        self.proof_eps = proof_eps
        self.normalized = [None if i in skip else normalized(c.spec, c.input, proof_eps) for i, c in enumerate(calls)]
        self.scales = [0.0 if r is None else float(r.abs().max()) if r.numel() else 0.0 for r in self.normalized]
        self.outputs = [t.detach() for t in outputs]


def _deviation(ref: torch.Tensor, new: torch.Tensor, scale: float) -> tuple[float, float]:
    """(max |new - ref|, that relative to ``scale``)."""
    if ref.shape != new.shape:
        return math.inf, math.inf
    if not ref.numel():
        return 0.0, 0.0
    diff = float((new.double() - ref.double()).abs().max()) if ref.dtype != new.dtype else float((new - ref).abs().max())
    if not math.isfinite(diff):
        return math.inf, math.inf
    return diff, (diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))


class Proof:
    """Tests candidates against a :class:`Reference` (see the module documentation)."""

    def __init__(
        self, model: nn.Module, inputs: tuple[Any, ...], seed: int, saved: SavedState, reference: Reference,
        factors: tuple[float, float], rtol: float, atol: float, trials: int,
    ):
        self.model, self.inputs, self.seed, self.saved, self.ref = model, inputs, seed, saved, reference
        self.low, self.high = factors
        lo, hi = power_of_two_range(*factors)
        self.mirror = 2.0 ** (lo + hi)  # d -> mirror / d swaps the ends of the range, exactly
        self.rtol, self.atol, self.trials = rtol, atol, trials
        self.gen = torch.Generator().manual_seed(seed)

    def run(self, proposed: list[Candidate]) -> tuple[list[tuple[Candidate, float]], list[tuple[Candidate, str]]]:
        """The accepted candidates with their worst deviation, and the rejected with the reason."""
        accepted: list[tuple[Candidate, float]] = []
        rejected: list[tuple[Candidate, str]] = []
        pending = list(proposed)
        while pending:
            checks = self._test(pending)
            failed = next((c for c in checks if not c.ok), None)
            if failed is None:
                worst = max((c.deviation for c in checks), default=0.0)
                accepted += [(cand, worst) for cand in pending]
                break
            if len(pending) == 1:
                rejected.append((pending[0], self._reason(failed)))
                break
            suspects = [c for c in pending if failed.module_name in c.norm_layers] or pending
            for cand in suspects:
                own = self._test([cand])
                own_failure = next((c for c in own if not c.ok), None)
                if own_failure is None:
                    accepted.append((cand, max((c.deviation for c in own), default=0.0)))
                else:
                    rejected.append((cand, self._reason(own_failure)))
            pending = [c for c in pending if all(c is not s for s in suspects)]
        return accepted, rejected

    def _reason(self, check: _Check) -> str:
        return (
            f"{check.where} changed by {check.deviation:.3g} (relative) when its groups were rescaled by powers of "
            f"two covering [{self.low:g}, {self.high:g}] with norm eps set to {self.ref.proof_eps:g} (tolerance {self.rtol:g})"
        )

    def _test(self, group: list[Candidate]) -> list[_Check]:
        worst: list[_Check] | None = None
        for _ in range(self.trials):
            draws = [group_factors(c.grouping.num_groups(c.param.shape), self.low, self.high, self.gen) for c in group]
            for mirrored in (False, True):
                scaling = [(c, self.mirror / d if mirrored else d) for c, d in zip(group, draws)]
                checks = self._compare(*self._scaled_run(scaling))
                worst = checks if worst is None else [a if a.deviation >= b.deviation else b for a, b in zip(worst, checks)]
        assert worst is not None
        return worst

    def _scaled_run(self, scaling: list[tuple[Candidate, torch.Tensor]]) -> tuple[list[NormCall], list[torch.Tensor]]:
        """The normalization calls and outputs with each candidate's groups multiplied by its
        factors; the scaled copies are swapped in through ``.data``, so the original storage
        is never written."""
        originals = [(c.param, c.param.data) for c, _ in scaling]
        tap = Tap(self.model, self.ref.proof_eps, record=None)
        try:
            for c, factors in scaling:
                c.param.data = scaled(c.param, c.grouping, factors)
            out = float_leaves(forward(self.model, self.inputs, self.seed, self.saved, tap))
        finally:
            for param, data in originals:
                param.data = data
        return tap.norm_calls, out

    def _compare(self, calls: list[NormCall], outputs: list[torch.Tensor]) -> list[_Check]:
        ref = self.ref
        if len(calls) != len(ref.calls) or len(outputs) != len(ref.outputs):
            return [_Check("the sequence of operations", None, math.inf, False)]
        checks = []
        for i, (call, ref_rows) in enumerate(zip(calls, ref.normalized)):
            if ref_rows is None:
                continue
            new_rows = normalized(call.spec, call.input, ref.proof_eps)
            _, rel = _deviation(ref_rows, new_rows, ref.scales[i])
            where = f"at {call.norm_type} {call.module_name!r}, the normalized output"
            checks.append(_Check(where, call.module_name, rel, rel <= self.rtol))
        for k, (r, o) in enumerate(zip(ref.outputs, outputs)):
            scale = float(r.abs().max()) if r.numel() else 0.0
            diff, rel = _deviation(r, o.detach(), scale)
            where = "the model's output" + (f" {k}" if len(ref.outputs) > 1 else "")
            checks.append(_Check(where, None, rel, diff <= self.atol + self.rtol * scale))
        return checks
