r"""The CUDA kernel module of the adaptive steps (PSIAdam, PSIAdamW, PSIAdaSGD, and PSISGD
with its ``"sgd"`` angular rate): the entry points that :mod:`._adaptive_step` looks up
under :data:`._adaptive_step.CUDA_KERNELS`, over the Triton kernels of
:mod:`._triton_adaptive`.

Imported only when an adaptive step runs on a CUDA tensor with Triton installed (under
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors: the tests force this module
onto them). The interface and its use are those of numba's
:mod:`._cpu_adaptive_kernels`; the arithmetic is the same one definition of each
formula, compiled by Triton (:func:`psiopt.manifold.one_pass_row_scalars`, the rules of
:mod:`._adaptive` and the angular rate's :func:`._adaptive.rate_factor` and
:func:`._adaptive.next_virtual_sq_norm`). One step on a param group's tensors of one
dtype (:class:`AdaptiveRows`, kept by the optimizer from one step to the next):

1. the **check pass** (:meth:`AdaptiveRows.check`): :func:`._triton_adaptive.row_sums`
   of every tensor (one launch per tensor, reading the weights, gradient and first
   moment once for the six sums, kept for the write pass), each tensor's flag of a bad
   row, and whether the other gradients are finite, then **one read of those flags by
   the host**. The interface asks for the positions of the flagged tensors, and the
   optimizer chooses from them how to step, so this read is a device synchronization
   on every step: the host waits for the check pass to finish before it queues the
   write pass (on the CPU the kernels run on the host, and the answer costs nothing).
   It is the only one of a step on the kept batches.
2. the **write pass** (:meth:`AdaptiveRows.update`): :func:`._triton_adaptive.psiadam_update`
   or :func:`._triton_adaptive.psiadasgd_update` on the kept sums, one launch per tensor,
   nothing read back. A row whose step is not finite (a state that no step wrote, changed
   from outside the optimizer behind torch's version counter) is left as it was and
   flagged on the device; the flag is read with the next check pass's, which reports
   the tensor, so the next step is the general one, whose check of the state names it.
   So :meth:`AdaptiveRows.update` reports nothing itself (it returns no position); a
   state that is finite and still gives no finite step (a negative second moment) leaves
   its rows as they were at every step without an error.

The step counters are CPU tensors (as torch's Adam keeps them): the bias corrections are
computed from them on the host, without waiting for the device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._adaptive_step import _KeptRows
from ._functional import _PLAIN
from ._triton_adaptive import psiadam_update, psiadasgd_update
from ._triton_kernels import _row_sums_launch, check_rows, supports

__all__ = ["AdaptiveRows", "all_finite", "supports"]


def _non_finite(tensors: list[Tensor], device: torch.device) -> Tensor:
    """A 0-d bool tensor on ``device``, without a host synchronization: whether an entry of
    ``tensors`` (dense, at least one) is not finite. From the largest magnitudes, which
    cannot overflow."""
    return ~torch.stack([n.to(device) for n in torch._foreach_norm(tensors, math.inf)]).isfinite().all()


def _dense(tensors: list[Tensor]) -> bool:
    return all(type(t) in _PLAIN and t.layout == torch.strided and t.is_floating_point() for t in tensors)


def all_finite(tensors: list[Tensor]) -> bool | None:
    """Whether every entry of ``tensors`` is finite: one host read of a device flag (a
    synchronization; :mod:`._adaptive_step` asks it once, of a new batch's state).
    ``None`` where a tensor is not a dense floating-point tensor (the caller checks)."""
    if not _dense(tensors):
        return None
    return not tensors or not bool(_non_finite(tensors, tensors[0].device))


class AdaptiveRows(_KeptRows):
    """One param group's scale-invariant tensors of one dtype as the Triton kernels step
    them, kept by the optimizer from one step to the next: the entry point of this
    module, with the arguments and methods of :class:`._cpu_adaptive_kernels.AdaptiveRows`.

    ``rule``: ``"adam"`` (states ``exp_avg_sq`` and, with AMSGrad, ``max_exp_avg_sq``;
    hyper ``(lr, beta1, beta2, eps, amsgrad, nesterov)``; ``counters`` the ``step``
    tensors) or ``"adasgd"`` (state ``sum``; hyper ``(lr, momentum, dampening, nesterov,
    eps)``; no counters, each tensor's scalars ``(first, 0, 0)`` from the caller). With
    ``has_rate`` (the adam rule's only: no optimizer gives PSIAdaSGD an angular rate),
    each tensor's last state is the virtual squared norm. The sums of the check pass
    (float32, float64 for float64 weights) and the flags are kept on the device.
    """

    def __init__(self, rule: str, params: list[Tensor], moments: list[Tensor] | None,
                 states: list[tuple[Tensor, ...]], rows: list, counters: list[Tensor] | None = None, *,
                 has_rate: bool = False) -> None:  # fmt: skip
        super().__init__(params, moments, states, counters)
        if rule not in ("adam", "adasgd") or (has_rate and rule != "adam"):
            raise ValueError(f"the Triton adaptive kernels step the rules 'adam' (with or without an angular rate) "
                             f"and 'adasgd', got {rule!r} with has_rate={has_rate}")  # fmt: skip
        self.rule, self.has_rate, self.rows = rule, has_rate, rows
        # Row views with unit stride along a row (check_rows): a gradient laid out as its
        # weight (step_grads) has the same.
        self.ws = [r(p) for r, p in zip(rows, params)]
        self.ms = [None] * len(params) if moments is None else [r(m) for r, m in zip(rows, moments)]
        n_states = {"adam": (1, 2), "adasgd": (1,)}[rule]
        for w, m, state in zip(self.ws, self.ms, self.states):
            if len(state) - has_rate not in n_states:
                raise ValueError(f"the rule {rule!r} has {' or '.join(map(str, n_states))} per-group states, then the "
                                 "virtual squared norm where has_rate")  # fmt: skip
            check_rows(w, {"first moment": m}, {f"per-group state {i}": s for i, s in enumerate(state)})
        device = params[0].device if params else torch.device("cpu")
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        counts = [w.shape[0] for w in self.ws]
        self.sums = list(torch.empty(sum(counts), 6, dtype=acc, device=device).split_with_sizes(counts))
        # Per tensor: a bad row found by the check pass, or a row that the last write pass
        # left as it was; then whether an other gradient is not finite. Zero between steps
        # but for the write pass's marks.
        self.flags = torch.zeros(len(params) + 1, dtype=torch.int32, device=device)
        self._grads: list[Tensor] | None = None

    def check(self, grads: list[Tensor], others: list[Tensor] = ()) -> list[int] | None:
        """The check pass with these gradients (any layout: one not laid out as its weight
        is copied into that layout for this step), and whether every entry of ``others``
        (the group's other gradients) is finite. Returns the positions of the tensors with
        a bad row: a sum not finite (weights, gradient or first moment), a zero or
        underflowing squared weight norm, or a row that the last :meth:`update` left as it
        was. ``None`` where an entry of ``others`` is not finite, or one of them is not a
        dense floating-point tensor, or a gradient is sparse. Its answer is read by the
        host: a device synchronization (see the module's docstring)."""
        if not _dense(others) or any(g.layout != torch.strided for g in grads):
            return None
        self._grads = [rows(g) for rows, g in zip(self.rows, self.step_grads(grads))]
        for i, (w, g, m) in enumerate(zip(self.ws, self._grads, self.ms)):
            if w.shape[0]:
                _row_sums_launch(w, g, m, None, self.sums[i], self.flags[i])()
        if others:
            self.flags[-1] = _non_finite(list(others), self.flags.device)
        flags = self.flags.tolist()
        self.flags.zero_()
        if flags[-1]:
            return None
        return [i for i, flag in enumerate(flags[:-1]) if flag]

    def update(self, xs: list[tuple[float, float, float]] | None, hyper: tuple[float, ...], *, maximize: bool,
               skip: list[int] = (), rate: tuple[float, float, float] | None = None) -> list[int]:  # fmt: skip
        """The write pass after :meth:`check`, in place, but on the tensors at the positions
        ``skip``, with the sums of the check pass. ``xs``, ``hyper``, ``rate``: as
        :meth:`._cpu_adaptive_kernels.AdaptiveRows.update`; each counter of a tensor
        stepped is incremented. Nothing is read back to the host: returns ``[]``; a row
        left as it was (its step not finite) is flagged for the next :meth:`check`."""
        if (rate is not None) != self.has_rate:
            raise ValueError("an angular rate is given exactly to a batch made with has_rate")
        skipped = set(skip)
        stepped = [i for i in range(len(self.params)) if i not in skipped]
        if not stepped:
            return []
        ws, gs, ms, sums = ([seq[i] for i in stepped] for seq in (self.ws, self._grads, self.ms, self.sums))
        left = [self.flags[i] for i in stepped]
        states = [self.states[i] for i in stepped]
        if self.rule == "adam":
            lr, beta1, beta2, eps, amsgrad, nesterov = hyper
            steps = [float(self.counters[i]) + 1.0 for i in stepped]
            psiadam_update(
                ws, gs, ms, [s[0] for s in states], [s[1] for s in states] if amsgrad else None, steps, sums,
                lr=float(lr), beta1=beta1, beta2=beta2, eps=eps, maximize=maximize, nesterov=bool(nesterov),
                rate=rate, virtual_sq_norms=[s[-1] for s in states] if rate is not None else None, left=left,
            )  # fmt: skip
            torch._foreach_add_([self.counters[i] for i in stepped], 1.0)
        else:
            lr, momentum, dampening, nesterov, eps = hyper
            firsts = [False] * len(stepped) if xs is None else [bool(xs[i][0]) for i in stepped]
            psiadasgd_update(
                ws, gs, ms, [s[0] for s in states], sums, firsts, lr=float(lr), momentum=momentum,
                dampening=dampening, nesterov=bool(nesterov), eps=eps, maximize=maximize, left=left,
            )  # fmt: skip
        self._grads = None
        return []
