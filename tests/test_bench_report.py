"""The report's verdict: psiopt's fastest optimizers against the fastest peer, with the
difference of test accuracy and its standard error."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

from psiopt.bench.records import Curve, Evaluation, MethodTraining, Summary, TrainRun
from psiopt.bench.report import _verdict_findings


def _entry(method: str, label: str, steps: list[int | None], accs: list[float]) -> MethodTraining:
    runs = [
        TrainRun(
            seed=i, lr=0.1, base_lr=None, init_scale=1.0, diverged=False, steps_done=100, final_loss=0.1,
            final_test_acc=acc, steps_to_target=s, seconds_to_target=None, train_seconds=1.0,
            curve=Curve([0], [1.0], [0.0]), eval=Evaluation([100], [acc]),
        )
        for i, (s, acc) in enumerate(zip(steps, accs))
    ]  # fmt: skip
    reached = [s for s in steps if s is not None]
    summary = Summary(
        seeds=len(steps), diverged=0, final_loss_mean=0.1, final_loss_std=0.0, test_acc_mean=statistics.fmean(accs),
        test_acc_std=statistics.stdev(accs) if len(accs) > 1 else None, reached_target=len(reached),
        steps_to_target_mean=statistics.fmean(reached) if reached else None, seconds_to_target_mean=None,
        train_seconds_mean=1.0,
    )  # fmt: skip
    return MethodTraining(method=method, label=label, runs=runs, summary=summary)


def _verdict(*entries: MethodTraining) -> str:
    (line,) = _verdict_findings(SimpleNamespace(training=[SimpleNamespace(task="t", methods=list(entries))]))
    return line


def test_met_by_a_psiopt_optimizer_as_fast_and_as_accurate_as_the_fastest_peer() -> None:
    line = _verdict(
        _entry("psiadam", "PSI-Adam", [30, 30, 30], [0.90, 0.91, 0.92]),  # fastest, less accurate
        _entry("psisgd", "PSI-SGD", [40, 40, 40], [0.95, 0.95, 0.96]),  # as fast as the peer, as accurate
        _entry("adamp", "AdamP", [40, 40, 40], [0.95, 0.96, 0.95]),
        _entry("adam", "Adam", [45, 45, 45], [0.99, 0.99, 0.99]),  # slower peers do not count
        _entry("enorm", "ENorm", [10, 10, 10], [0.99, 0.99, 0.99]),  # neither ours nor a peer
    )
    assert line.startswith("- **verdict, t**: met: psiopt's PSI-SGD reached the target in 40 steps")
    assert "the fastest peer, AdamP, in 40" in line and "+0.00 points" in line


def test_not_met_names_the_fastest_and_how_many_standard_errors_below() -> None:
    line = _verdict(
        _entry("psiadamw", "PSI-AdamW", [28, 28, 28], [0.962, 0.963, 0.964]),
        _entry("psisgd", "PSI-SGD", [50, None, 50], [0.99, 0.99, 0.99]),  # a seed missed the target
        _entry("adamp", "AdamP", [33, 33, 33], [0.966, 0.967, 0.968]),
    )
    # difference -0.4 points; standard error sqrt(var(a)/3 + var(b)/3)
    se = (statistics.variance([0.962, 0.963, 0.964]) / 3 + statistics.variance([0.966, 0.967, 0.968]) / 3) ** 0.5
    assert 0.004 > 2 * se  # more than 2 standard errors below: not noise
    assert line.startswith("- **verdict, t**: not met: psiopt's fastest, PSI-AdamW, reached the target in 28")
    assert f"-0.40 points, standard error {100 * se:.2f}, {0.004 / se:.1f} standard errors below" in line


def test_a_difference_within_two_standard_errors_is_met_within_noise() -> None:
    line = _verdict(
        _entry("psiadamw", "PSI-AdamW", [28, 28, 28], [0.95, 0.962, 0.97]),
        _entry("adamp", "AdamP", [33, 33, 33], [0.955, 0.967, 0.972]),
    )
    assert line.startswith("- **verdict, t**: met within noise: psiopt's PSI-AdamW reached the target in 28 steps")
    assert "-0.40 points" in line


def test_one_seed_gives_no_verdict() -> None:
    line = _verdict(_entry("psisgd", "PSI-SGD", [10], [0.9]), _entry("sgd", "SGD", [20], [0.95]))
    assert line == "- **verdict, t**: none (a verdict needs at least 2 seeds)."
