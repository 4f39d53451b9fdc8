"""Find the scale-invariant weights of a model: see, propose, prove, measure."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves, tree_map

from ..grouping import GroupingLike, as_grouping
from ..layers import CHANNEL_FIRST_LAYERS
from ..manifold import PSIManifold
from .graph import Graph, NormCall, Tap, fx_graph
from .proof import NormStats, Proof, Reference, SavedState, eps_sensitivity, float_leaves, forward, norm_stats
from .report import RejectedCandidate, ScaleInvarianceReport, ScaleInvariantWeight
from .structure import Candidate, propose

__all__ = ["find_scale_invariant"]

_DEFAULT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
_HALF = (torch.float16, torch.bfloat16)


def find_scale_invariant(
    model: nn.Module,
    *example_inputs: Any,
    factors: Sequence[float] = (0.1, 10.0),
    rtol: float | None = None,
    atol: float = 0.0,
    proof_eps: float = 1e-30,
    trials: int = 1,
    seed: int = 0,
    candidates: Mapping[str, GroupingLike] | None = None,
    structure: str = "auto",
    measure_eps: bool = True,
) -> ScaleInvarianceReport:
    """Find the weights of ``model`` whose groups can be rescaled without changing its output.

    See the module documentation for the patterns recognized and how the proof works.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it comes back unchanged (parameters, buffers, modes, eps, RNG state).
    *example_inputs
        Arguments for ``model(*example_inputs)``: a real batch (at least 2 varied
        samples, so that every normalized group has a nonzero variance).
    factors : (float, float), default (0.1, 10.0)
        Range the random factors must cover; must contain ``[0.1, 10]``. The factors
        are powers of two (exact in floating point), from the largest power at most
        ``low`` to the smallest at least ``high``.
    rtol : float, optional
        Relative tolerance of the proof, for each normalization's output and for the
        model's output. Default by the precision the proof runs in: 1e-9 (float64),
        1e-4 (float32). A model holding float16 or bfloat16 tensors is proved on a
        float32 copy (the result is the float32 model's, and the model is not touched).
    atol : float, default 0.0
        Absolute slack added to ``rtol * max|output|``.
    proof_eps : float, default 1e-30
        The eps every normalization layer gets during the proof.
    trials : int, default 1
        Number of random factor draws (each draw is tested with the factors and with
        their mirror images :math:`2^{a+b}/2^{e_j}`, so every group is both shrunk and grown and
        both ends of the range are hit).
    seed : int, default 0
        Seed of the factors and of the forward passes (dropout masks); the global
        random state is not used nor changed.
    candidates : mapping of str to grouping, optional
        Skip the structural pass and test exactly these parameters (name -> grouping,
        e.g. ``{"0.weight": "channel"}``) with the numerical proof.
    structure : {"auto", "fx", "hooks"}, default "auto"
        How to see the model: torch.fx with a fallback to forward hooks (``"auto"``),
        or only one of them (``"fx"`` raises if tracing fails).
    measure_eps : bool, default True
        Compute each found weight's :attr:`~ScaleInvariantWeight.eps_sensitivity` (from
        the inputs its normalization saw: no extra forward pass); ``False`` leaves it
        ``None``.

    Notes
    -----
    Cost: one forward pass that records the model (and a torch.fx trace), two for the
    joint proof of all candidates (one per trial and mirror image), and two more per
    suspect only if the joint proof fails; all under ``torch.no_grad()``, on one CPU
    thread (the thread count is put back afterwards: a small batch does not gain from
    more, and a busy machine loses a lot to oversubscription). A small batch (a few
    samples) is enough.

    Returns
    -------
    ScaleInvarianceReport
        The weights found, and the rejected candidates with the reason.

    Raises
    ------
    psiopt.ZeroGroupError
        A candidate weight has an all-zero group.
    TypeError
        A candidate weight is not a real floating-point tensor.
    ValueError
        Bad options, or example inputs that make a normalization layer see a
        (nearly) constant group, so that the proof cannot tell anything.
    Exception
        Whatever the model raises on ``example_inputs``; the model is left unchanged.
    """
    low, high = _check_arguments(model, factors, rtol, atol, proof_eps, trials, structure)
    names = {id(p): n for n, p in model.named_parameters()}
    _check_layer_dtypes(model, names)
    if candidates is not None:
        _check_given(model, candidates)
    notes: list[str] = []
    with _one_thread():
        work, inputs = _full_precision(model, example_inputs, notes)
        params = dict(work.named_parameters())
        order = {n: i for i, n in enumerate(params)}
        saved = SavedState(work)
        try:
            # Flags set directly: a model's own train() override (freezing BN, say) must not run.
            for module, _ in saved.modes:
                module.training = True
            seen = _see(work, inputs, seed, saved, proof_eps, structure, candidates is None, notes)
            proposed, rejected = _propose(work, params, seen.graph, candidates)
            dtype = _least_precise([c.param.dtype for c in proposed] + [t.dtype for t in seen.outputs])
            tol = rtol if rtol is not None else _DEFAULT_RTOL.get(dtype, 1e-4)
            stats = [norm_stats(call) for call in seen.norm_calls]
            skip = _ill_conditioned(proposed, seen.norm_calls, stats, dtype, tol)
            reference = Reference(seen.norm_calls, seen.outputs, skip, proof_eps)
            proof = Proof(work, inputs, seed, saved, reference, (low, high), tol, atol, trials)
            accepted, refused = proof.run(proposed)
            rejected += [RejectedCandidate(name=c.name, reason=why, stage="numerical") for c, why in refused]
            found = [
                _record(c, worst, seen.norm_calls, stats, (low, high), measure_eps)
                for c, worst in sorted(accepted, key=lambda a: order[a[0].name])
            ]
        finally:
            saved.restore()
    rejected.sort(key=lambda r: order.get(r.name, len(order)))
    return ScaleInvarianceReport(
        weights=tuple(found), rejected=tuple(rejected), method=seen.method, notes=tuple(notes), dtype=dtype,
        rtol=tol, atol=atol, factors=(low, high), proof_eps=proof_eps,
    )


# -- see ------------------------------------------------------------------------------------


@dataclass
class _Seen:
    """What one recorded forward pass (and torch.fx) showed of the model."""

    method: str
    graph: Graph | None
    norm_calls: list[NormCall]
    outputs: list[torch.Tensor]


def _see(
    model: nn.Module, inputs: tuple[Any, ...], seed: int, saved: SavedState, proof_eps: float, structure: str,
    want_graph: bool, notes: list[str],
) -> _Seen:
    """Trace with torch.fx (when asked) and record one forward pass with the proof eps: the
    reference the proof compares with, and the graph when torch.fx cannot give it."""
    gm: torch.fx.GraphModule | None = None
    method = "given"
    if want_graph:
        method = "hooks"
        if structure in ("auto", "fx"):
            try:
                gm = torch.fx.symbolic_trace(model)
                method = "fx"
            except Exception as err:  # fx raises many types; the fallback is recorded
                if structure == "fx":
                    raise
                notes.append(f"torch.fx could not trace the model ({type(err).__name__}: {err}); used forward hooks")
    tap = Tap(model, proof_eps, record=None if not want_graph else "layers" if gm is not None else "ops")
    output = forward(model, inputs, seed, saved, tap)
    leaves = float_leaves(output)
    if not leaves:
        raise ValueError("the model's output holds no floating-point tensor, so there is nothing to compare")
    if not all(bool(torch.isfinite(t).all()) for t in leaves):
        raise ValueError(
            f"with the normalization layers' eps set to proof_eps={proof_eps:g}, the model's output is not finite; "
            "some normalized group has zero variance on these inputs. Use a larger, varied batch of example "
            "inputs, or a larger proof_eps"
        )
    graph = None
    if want_graph:
        if gm is not None:
            graph = fx_graph(gm, model, tap.layer_ndims, lambda: _propagate_shapes(gm, inputs, seed, saved, notes))
        else:
            graph = tap.graph(output)
    return _Seen(method, graph, tap.norm_calls, leaves)


def _propagate_shapes(
    gm: torch.fx.GraphModule, inputs: tuple[Any, ...], seed: int, saved: SavedState, notes: list[str]
) -> None:
    """Record the shape of every value of the traced graph in its nodes' meta (one more
    forward pass, as :func:`~psiopt.discovery.proof.forward` runs them)."""
    torch.manual_seed(seed)
    fresh = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*fresh)
    except Exception as err:  # the layers whose path needs a shape are then rejected, saying so
        notes.append(f"the shapes of the traced graph could not be propagated ({type(err).__name__}: {err})")
    finally:
        saved.reset_buffers()


def _propose(
    model: nn.Module, params: dict[str, nn.Parameter], graph: Graph | None,
    candidates: Mapping[str, GroupingLike] | None,
) -> tuple[list[Candidate], list[RejectedCandidate]]:
    """The structural pass's candidates and rejections, or the given candidates; checked."""
    if candidates is None:
        assert graph is not None
        proposed, rejected = propose(model, graph, {id(p): n for n, p in params.items()})
    else:
        proposed = [Candidate(name=n, param=params[n], grouping=as_grouping(g)) for n, g in candidates.items()]
        rejected = []
    _check_candidates(proposed)
    return proposed, rejected


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _full_precision(model: nn.Module, inputs: tuple[Any, ...], notes: list[str]) -> tuple[nn.Module, tuple[Any, ...]]:
    """The model itself, or a float32 copy of it (and of the inputs) if it holds half-precision
    tensors: rounding in float16/bfloat16 would otherwise decide the proof, not the model."""
    tensors = [*model.parameters(), *model.buffers(), *(t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor))]
    halves = sorted({str(t.dtype).replace("torch.", "") for t in tensors if t.dtype in _HALF})
    if not halves:
        return model, inputs
    notes.append(f"the model holds {' and '.join(halves)} tensors: the proof ran on a float32 copy of it")
    work = copy.deepcopy(model).float()
    return work, tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in _HALF else t, inputs)


# -- check ----------------------------------------------------------------------------------


def _check_candidates(proposed: list[Candidate]) -> None:
    for cand in proposed:
        _check_dtype(cand.name, cand.param)
        try:
            cand.grouping.num_groups(cand.param.shape)
        except ValueError as err:
            raise ValueError(f"{cand.name}: {err}") from None
        PSIManifold(cand.grouping).check_nonzero_groups(cand.param.data, cand.name)


def _ill_conditioned(
    proposed: list[Candidate], calls: list[NormCall], stats: list[NormStats], dtype: torch.dtype, tol: float
) -> set[int]:
    """The normalization calls that see a (nearly) constant group, where rounding noise divided by
    a tiny standard deviation would decide the comparison, not the model. They are left out of
    the proof; one that a candidate relies on is an error."""
    # Rounding leaves (z - mean) a relative error of about eps_machine * RMS/std; require it
    # below tol/10 after normalization.
    limit = (10.0 * torch.finfo(dtype).eps / tol) ** 2
    relied_on = {name: cand.name for cand in proposed for name in cand.norm_layers}
    skip = set()
    for i, (call, st) in enumerate(zip(calls, stats)):
        if st.worst_ratio >= limit:
            continue
        if call.module_name in relied_on:
            raise ValueError(
                f"on the example inputs, {call.norm_type} {call.module_name!r} (after {relied_on[call.module_name]}) "
                f"sees a group that is (nearly) constant (variance / mean square = {st.worst_ratio:.2g}), so the "
                "proof would measure rounding noise; pass a batch of varied samples (e.g. at least 2 random ones)"
            )
        skip.add(i)
    return skip


def _check_arguments(
    model: Any, factors: Sequence[float], rtol: float | None, atol: float, proof_eps: float, trials: int,
    structure: str,
) -> tuple[float, float]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if structure not in ("auto", "fx", "hooks"):
        raise ValueError(f"structure must be 'auto', 'fx' or 'hooks', got {structure!r}")
    return _check_options(factors, rtol, atol, proof_eps, trials)


def _check_given(model: nn.Module, candidates: Mapping[str, GroupingLike]) -> None:
    by_name = dict(model.named_parameters())
    unknown = [n for n in candidates if n not in by_name]
    if unknown:
        raise ValueError(f"candidates name no parameter of the model: {unknown}; see model.named_parameters()")
    for n in candidates:
        _check_dtype(n, by_name[n])


def _check_options(
    factors: Sequence[float], rtol: float | None, atol: float, proof_eps: float, trials: int
) -> tuple[float, float]:
    try:
        low, high = (float(f) for f in factors)
    except (TypeError, ValueError):
        raise ValueError(f"factors must be a pair (low, high) of positive numbers, got {factors!r}") from None
    if not (0 < low <= 0.1 and high >= 10.0 and math.isfinite(high)):
        raise ValueError(
            f"factors must span at least 0.1..10 (0 < low <= 0.1, finite high >= 10) so that the proof tests "
            f"real rescalings; got {factors!r}"
        )
    if rtol is not None and not (rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol must be a positive finite number, got {rtol!r}")
    if not (atol >= 0 and math.isfinite(atol)):
        raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
    if not (proof_eps >= 0 and math.isfinite(proof_eps)):
        raise ValueError(f"proof_eps must be a finite number >= 0, got {proof_eps!r}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    return low, high


def _check_dtype(name: str, param: torch.Tensor) -> None:
    if param.dtype.is_complex or not param.dtype.is_floating_point:
        raise TypeError(
            f"{name} has dtype {param.dtype}; scale invariance and the PSI manifold need a real floating-point "
            "weight (float64, float32, float16 or bfloat16): convert the model, e.g. model.float()"
        )


def _check_layer_dtypes(model: nn.Module, param_names: dict[int, str]) -> None:
    """Before any forward: every weight the structural pass may propose must be real floating point."""
    for module in model.modules():
        if isinstance(module, CHANNEL_FIRST_LAYERS) or parametrize.is_parametrized(module):
            for p in module.parameters():
                if id(p) in param_names:
                    _check_dtype(param_names[id(p)], p)


def _least_precise(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


# -- measure --------------------------------------------------------------------------------


def _record(
    cand: Candidate, worst: float, calls: list[NormCall], stats: list[NormStats], factors: tuple[float, float],
    measure_eps: bool,
) -> ScaleInvariantWeight:
    """The record of an accepted candidate, with how much its normalization's real eps breaks
    invariance, from the inputs that normalization saw."""
    low, _ = factors
    mine = [(call, st) for call, st in zip(calls, stats) if call.module_name in cand.norm_layers]
    sensitivity = None
    if cand.norm_type == "weight_norm":
        sensitivity = (0.0, 0.0) if measure_eps else None
    elif mine and measure_eps:
        sensitivity = tuple(  # type: ignore[assignment]
            max(eps_sensitivity(st, _eps_of(call), c) for call, st in mine) for c in factors
        )
    bound = None
    min_var = min((st.min_var for _, st in mine), default=math.inf)
    if cand.eps is not None and math.isfinite(min_var) and min_var > 0:
        bound = cand.eps * (low**-2 - 1.0) / (2.0 * min_var)
    return ScaleInvariantWeight(
        name=cand.name,
        shape=tuple(cand.param.shape),
        grouping=cand.grouping,
        norm_layer=cand.norm_layers[0] if cand.norm_layers else None,
        norm_type=cand.norm_type,
        path=cand.path,
        proof_deviation=worst,
        eps=cand.eps,
        eps_sensitivity=sensitivity,
        eps_bound=bound,
        norm_layers=cand.norm_layers,
    )


def _eps_of(call: NormCall) -> float:
    # RMS norm's eps=None means the machine epsilon of the input's dtype.
    return call.spec.eps if call.spec.eps is not None else torch.finfo(call.input.dtype).eps

