"""The angular rates' gains against the benchmark: steps to target of PSI-SGD (gain kappa)
or PSI-AdamW (gain kappa_A) on the CPU suite's training tasks, for several gains.

Each gain runs the bench's own protocol (:func:`psiopt.bench.training.run_task`: every
grid lr on the first seed, the lr chosen by validation loss, then the other seeds at that
lr) and prints one line per task: the chosen lr, the mean steps to target (seeds that reached it), the mean
test metric with its standard error, and the tuning seed's steps at every grid lr. The
gains are module constants of :mod:`psiopt.optim._rates`; this script sets them in its
own process only, and clears the rules the optimizers cached with the previous gain. It answers one question: whether some other gain, the same for every
task, would meet issue 17's targets where the committed ones do not
(``benchmarks/results/cpu-gain-sweep/`` holds a run).

Usage: ``python scripts/gain_sweep.py --method psisgd --gains 1/60 1/30 1/15 1/8``
(``--method psiadamw`` sweeps kappa_A; ``--tasks`` to choose tasks; ``--threads``).
"""

from __future__ import annotations

import argparse
import dataclasses
from fractions import Fraction

import torch

from psiopt.bench import suites, training
from psiopt.bench.records import MethodTraining
from psiopt.optim import _rates, psiadam, psisgd

GAIN_OF = {"psisgd": "SGD_RATE_GAIN", "psiadamw": "ADAM_RATE_GAIN", "psiadam": "ADAM_RATE_GAIN"}


def _gain(text: str) -> float:
    """A gain given as a number or a fraction (``1/30``): positive and finite."""
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction such as 1/30") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a gain must be positive, got {text!r}")
    return value


def _set_gain(method: str, gain: float) -> None:
    """Set the module constant of ``method``'s gain, in this process, and forget the rules
    the optimizers cached with the previous one."""
    setattr(_rates, GAIN_OF[method], gain)
    psisgd._sgd_rate_rule.cache_clear()
    psiadam._psiadam_rule.cache_clear()


def _line(task, gain: str, entry: MethodTraining) -> str:
    if entry.summary is None:
        return f"| {task.name} | {entry.method} | {gain} | {entry.status}: {entry.reason} | | | |"
    summary = entry.summary
    loss = task.metric == "loss"
    metric, se = (
        (summary.test_loss_mean, summary.test_loss_se) if loss else (summary.test_acc_mean, summary.test_acc_se)
    )
    steps = "-" if summary.steps_to_target_mean is None else f"{summary.steps_to_target_mean:.1f}"
    grid = " ".join(f"{p.lr:g}:{p.steps_to_target if p.steps_to_target is not None else '-'}" for p in entry.tuning)
    return (
        f"| {task.name} | {entry.method} | {gain} | {entry.best_lr:g} | {steps} "
        f"({summary.reached_target}/{summary.seeds}) | {metric:.4f} ± {se or 0.0:.4f} | {grid} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(GAIN_OF), default="psisgd")
    parser.add_argument("--gains", nargs="+", required=True, help="gains, as numbers or fractions (1/30)")
    parser.add_argument("--tasks", nargs="*", default=None, help="default: every CPU task the method runs on")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    gains = []
    for text in args.gains:
        try:
            gains.append((text, _gain(text)))
        except argparse.ArgumentTypeError as error:
            parser.error(f"--gains: {error}")
    torch.set_num_threads(args.threads)
    tasks = [t for t in suites._cpu_tasks(False) if args.method in t.methods]
    if args.tasks:
        unknown = set(args.tasks) - {t.name for t in tasks}
        if unknown:
            parser.error(f"unknown tasks (or tasks without {args.method}): {sorted(unknown)}")
        tasks = [t for t in tasks if t.name in args.tasks]
    print("| task | method | gain | lr | steps to target (reached) | test metric ± SE | tuning seed: steps at each lr |")
    print("|---|---|---|---|---|---|---|")
    for text, gain in gains:
        _set_gain(args.method, gain)
        for task in tasks:
            task = dataclasses.replace(task, methods=(args.method,))
            dataset = training.load_dataset(task, None)
            seeds = tuple(range(args.seeds))
            record = training.task_record(task, dataset, seeds)
            training.run_task(task, dataset, seeds, torch.device("cpu"), {}, record, lambda run, text: None)
            print(_line(task, text, record.methods[0]), flush=True)


if __name__ == "__main__":
    main()
