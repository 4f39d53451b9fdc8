r"""The verdicts: the targets psiopt's optimizers are held to, checked per task.

Every comparison uses the methods' runs at their tuned learning rates (tuned on the
validation split, :mod:`psiopt.bench.training`), over all the seeds. The speed is the
mean number of steps to the task's target; a side counts only if it reached the target
on **every** seed. The held-out metric is the mean final test accuracy, or the mean
final test loss on the tasks measured by their loss (the language model; lower is
better there), and the difference between two methods is judged against its standard
error, Welch's: :math:`\sqrt{s_a^2/n_a + s_b^2/n_b}` from the per-seed values; every
verdict that compares two methods reports the difference of their mean steps with its
standard error the same way, so that a reader sees whether the steps decided it.

(a) **PSI-SGD against the SGD family** (``"psisgd"``): against the fastest of SGD, SGDP
    and SGD-G, PSI-SGD (the drop-in swap, one lr on SGD's grid) is **met** when it
    reaches the target on every seed in at most :data:`STEPS_RATIO_TARGET` times the
    peer's mean steps, with a mean test accuracy no lower than the peer's minus one
    standard error of the difference.
(b) **psiopt's adaptive optimizers against Adam's family** (``"adaptive"``): against the
    fastest of Adam, AdamW and AdamP, **met** when one of PSI-AdaSGD, PSI-Adam and
    PSI-AdamW reaches the target on every seed in at most :data:`STEPS_RATIO_TARGET`
    times the peer's mean steps with a mean test metric no worse than the peer's (the
    difference is reported in standard errors too). The one shown is the fastest that
    meets it, else the fastest that reached the target on every seed: the best of three,
    which the report says.
(c) **PSI-AdamW against AdamW** (``"psiadamw-vs-adamw"``, on the tasks measured by their
    loss): **met** when PSI-AdamW reaches the target on every seed in no more mean steps
    than tuned AdamW (or AdamW misses it on some seed).

A verdict is **not met** when none of ours reached the target on every seed while a peer
did, and **no verdict** (with the reason) when no peer reached it on every seed (there is
no speed to compare with; (c) excepted), or with fewer than 2 seeds (no standard error).
"""

from __future__ import annotations

import math
import statistics

from .records import MethodTraining, TaskResult, Verdict

__all__ = [
    "STEPS_RATIO_TARGET",
    "SGD_PEERS",
    "ADAPTIVE_PEERS",
    "PSIOPT_ADAPTIVE",
    "reached_on_every_seed",
    "fastest",
    "metric_difference",
    "steps_difference",
    "task_verdicts",
    "verdicts",
]

STEPS_RATIO_TARGET = 0.9
"""psiopt's optimizer must reach the target in at most this fraction of the peer's steps."""

SGD_PEERS = ("sgd", "sgdp", "sgdg")
"""The SGD family PSI-SGD is measured against in verdict (a)."""

ADAPTIVE_PEERS = ("adam", "adamw", "adamp")
"""The adaptive optimizers psiopt's are measured against in verdict (b)."""

PSIOPT_ADAPTIVE = ("psiadasgd", "psiadam", "psiadamw")
"""psiopt's adaptive optimizers (verdict (b))."""

_EQUAL = 1e-9  # accuracies are fractions of a test set: equal means may differ by rounding only


def reached_on_every_seed(entry: MethodTraining) -> bool:
    """Whether every seed of ``entry`` reached the target (none diverged)."""
    s = entry.summary
    return s is not None and s.steps_to_target_mean is not None and s.reached_target == s.seeds > 0


def fastest(entries: list[MethodTraining]) -> MethodTraining | None:
    """The entry with the fewest mean steps to the target among those that reached it on
    every seed (the first in ``entries`` on a tie); ``None`` if none did."""
    full = [e for e in entries if reached_on_every_seed(e)]
    return min(full, key=lambda e: e.summary.steps_to_target_mean, default=None)


def _held_out(entry: MethodTraining, metric: str) -> list[float]:
    key = "final_test_acc" if metric == "accuracy" else "final_test_loss"
    return [getattr(r, key) for r in entry.runs if getattr(r, key) is not None]


def _welch(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """``mean(a) - mean(b)`` and its standard error (Welch); ``None`` when a side has
    fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return statistics.fmean(a) - statistics.fmean(b), se


def metric_difference(ours: MethodTraining, peer: MethodTraining, metric: str) -> tuple[float, float] | None:
    """The difference of the mean held-out metric (``ours`` minus ``peer``: test accuracy,
    or test loss for ``metric="loss"``) and its standard error (Welch); ``None`` when a
    side has fewer than 2 seeds."""
    return _welch(_held_out(ours, metric), _held_out(peer, metric))


def steps_difference(ours: MethodTraining, peer: MethodTraining) -> tuple[float, float] | None:
    """The difference of the mean steps to target (``ours`` minus ``peer``, over the seeds
    that reached it) and its standard error (Welch); ``None`` when a side has fewer than 2
    such seeds."""
    def steps(entry: MethodTraining) -> list[float]:
        return [float(r.steps_to_target) for r in entry.runs if r.steps_to_target is not None]

    return _welch(steps(ours), steps(peer))


def _set_steps_difference(verdict: Verdict, ours: MethodTraining, peer: MethodTraining) -> None:
    difference = steps_difference(ours, peer)
    if difference is not None:
        verdict.steps_difference, verdict.steps_difference_se = difference


def _better_by(difference: float, metric: str) -> float:
    """How much better ours is (positive: better): the accuracy difference, or minus the loss difference."""
    return difference if metric == "accuracy" else -difference


def _compare(
    task: TaskResult, target: str, description: str, ours: MethodTraining, peer: MethodTraining, allowed_se: float
) -> Verdict:
    """The verdict of ``ours`` against ``peer`` (both reached the target on every seed):
    met when at most :data:`STEPS_RATIO_TARGET` of the peer's steps and the held-out
    metric no worse than the peer's minus ``allowed_se`` standard errors."""
    verdict = Verdict(task.task, target, description, "no verdict", task.metric, ours.method, peer.method,
                      ours.summary.steps_to_target_mean, peer.summary.steps_to_target_mean)  # fmt: skip
    verdict.steps_ratio = verdict.ours_steps / verdict.peer_steps
    _set_steps_difference(verdict, ours, peer)
    difference = metric_difference(ours, peer, task.metric)
    if difference is None:
        verdict.reason = "a verdict needs at least 2 seeds, for a standard error"
        return verdict
    verdict.difference, verdict.difference_se = difference
    fast = verdict.steps_ratio <= STEPS_RATIO_TARGET + _EQUAL
    good = _better_by(verdict.difference, task.metric) >= -allowed_se * verdict.difference_se - _EQUAL
    verdict.status = "met" if fast and good else "not met"
    reasons = []
    if not fast:
        reasons.append(f"{verdict.steps_ratio:.3g}x the peer's steps, above {STEPS_RATIO_TARGET:g}x")
    if not good:
        allowed = f" by more than {allowed_se:g} standard error" if allowed_se else ""
        reasons.append(f"a worse test {task.metric} than the peer's{allowed}")
    verdict.reason = "; ".join(reasons) or None
    return verdict


def _ran(task: TaskResult, names: tuple[str, ...]) -> list[MethodTraining]:
    return [e for e in task.methods if e.method in names and e.status == "ok" and e.summary is not None]


def _not_reached(task: TaskResult, target: str, description: str, peer: MethodTraining | None,
                 ours_names: tuple[str, ...]) -> Verdict:  # fmt: skip
    """The verdict when no method of ours reached the target on every seed."""
    if peer is None:
        reason = "neither side has a method that reached the target on every seed"
        return Verdict(task.task, target, description, "no verdict", task.metric, reason=reason)
    return Verdict(task.task, target, description, "not met", task.metric, peer=peer.method,
                   peer_steps=peer.summary.steps_to_target_mean,
                   reason=f"{' / '.join(ours_names)} did not reach the target on every seed")  # fmt: skip


def _psisgd_verdict(task: TaskResult) -> Verdict | None:
    ours, peers = _ran(task, ("psisgd",)), _ran(task, SGD_PEERS)
    if not ours and not peers:
        return None
    description = (
        f"PSI-SGD in <= {STEPS_RATIO_TARGET:g}x the steps of the fastest of SGD, SGDP, SGD-G, test "
        f"{task.metric} within 1 standard error"
    )
    peer = fastest(peers)
    if not ours or not reached_on_every_seed(ours[0]):
        return _not_reached(task, "psisgd", description, peer, ("psisgd",))
    if peer is None:
        return Verdict(task.task, "psisgd", description, "no verdict", task.metric, ours=ours[0].method,
                       ours_steps=ours[0].summary.steps_to_target_mean,
                       reason="no SGD-family peer reached the target on every seed")  # fmt: skip
    return _compare(task, "psisgd", description, ours[0], peer, allowed_se=1.0)


def _adaptive_verdict(task: TaskResult) -> Verdict | None:
    ours, peers = _ran(task, PSIOPT_ADAPTIVE), _ran(task, ADAPTIVE_PEERS)
    if not ours and not peers:
        return None
    description = (
        f"the best of PSI-AdaSGD, PSI-Adam, PSI-AdamW in <= {STEPS_RATIO_TARGET:g}x the steps of the fastest of "
        f"Adam, AdamW, AdamP, test {task.metric} no worse"
    )
    peer = fastest(peers)
    candidates = sorted((e for e in ours if reached_on_every_seed(e)), key=lambda e: e.summary.steps_to_target_mean)
    if not candidates:
        return _not_reached(task, "adaptive", description, peer, PSIOPT_ADAPTIVE)
    if peer is None:
        return Verdict(task.task, "adaptive", description, "no verdict", task.metric, ours=candidates[0].method,
                       ours_steps=candidates[0].summary.steps_to_target_mean,
                       reason="no adaptive peer reached the target on every seed")  # fmt: skip
    compared = [_compare(task, "adaptive", description, e, peer, allowed_se=0.0) for e in candidates]
    return next((v for v in compared if v.status == "met"), compared[0])


def _psiadamw_verdict(task: TaskResult) -> Verdict | None:
    if task.metric != "loss":
        return None
    ours, peers = _ran(task, ("psiadamw",)), _ran(task, ("adamw",))
    if not ours and not peers:
        return None
    description = "PSI-AdamW in no more steps than tuned AdamW"
    if not ours or not reached_on_every_seed(ours[0]):
        return _not_reached(task, "psiadamw-vs-adamw", description, fastest(peers), ("psiadamw",))
    psi = ours[0]
    verdict = Verdict(task.task, "psiadamw-vs-adamw", description, "met", task.metric, ours=psi.method,
                      ours_steps=psi.summary.steps_to_target_mean)  # fmt: skip
    if not peers or not reached_on_every_seed(peers[0]):
        verdict.reason = "AdamW did not reach the target on every seed"
        return verdict
    adamw = peers[0]
    verdict.peer, verdict.peer_steps = adamw.method, adamw.summary.steps_to_target_mean
    verdict.steps_ratio = verdict.ours_steps / verdict.peer_steps
    _set_steps_difference(verdict, psi, adamw)
    difference = metric_difference(psi, adamw, task.metric)
    if difference is not None:
        verdict.difference, verdict.difference_se = difference
    if verdict.steps_ratio > 1.0 + _EQUAL:
        verdict.status, verdict.reason = "not met", f"{verdict.steps_ratio:.3g}x AdamW's steps"
    return verdict


def task_verdicts(task: TaskResult) -> list[Verdict]:
    """The verdicts (a), (b) and (c) that apply to ``task`` (those whose methods ran)."""
    made = (_psisgd_verdict(task), _adaptive_verdict(task), _psiadamw_verdict(task))
    return [v for v in made if v is not None]


def verdicts(tasks: list[TaskResult]) -> list[Verdict]:
    """Every task's verdicts, in task order."""
    return [v for task in tasks for v in task_verdicts(task)]
