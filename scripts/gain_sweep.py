"""The angular rates' gains against the benchmark: steps to target of PSI-SGD (gain kappa)
or PSI-AdamW (gain kappa_A) on the CPU suite's training tasks, for several gains.

Each gain runs the bench's own protocol (:func:`psiopt.bench.training.tune` on the first
seed, the lr chosen by validation loss, then the other seeds at that lr) and prints one
line per task: the chosen lr, the mean steps to target (seeds that reached it), the mean
test metric with its standard error, and the tuning seed's steps at every grid lr. The
gains are module constants of :mod:`psiopt.optim._rates`; this script sets them in its
own process only. It answers one question: whether some other gain, the same for every
task, would meet issue 17's targets where the committed ones do not
(``benchmarks/results/cpu-gain-sweep/`` holds a run).

Usage: ``python scripts/gain_sweep.py --method psisgd --gains 1/60 1/30 1/15 1/8``
(``--method psiadamw`` sweeps kappa_A; ``--tasks`` to choose tasks; ``--threads``).
"""

from __future__ import annotations

import argparse
from fractions import Fraction

import torch

from psiopt.bench import suites, training
from psiopt.bench.methods import METHODS
from psiopt.bench.records import MethodTraining
from psiopt.optim import _rates

GAIN_OF = {"psisgd": "SGD_RATE_GAIN", "psiadamw": "ADAM_RATE_GAIN", "psiadam": "ADAM_RATE_GAIN"}


def _line(task, name: str, gain: str, entry: MethodTraining, runs) -> str:
    summary = training.summarize(runs)
    loss = task.metric == "loss"
    metric, se = (
        (summary.test_loss_mean, summary.test_loss_se) if loss else (summary.test_acc_mean, summary.test_acc_se)
    )
    steps = "-" if summary.steps_to_target_mean is None else f"{summary.steps_to_target_mean:.1f}"
    grid = " ".join(f"{p.lr:g}:{p.steps_to_target if p.steps_to_target is not None else '-'}" for p in entry.tuning)
    return (
        f"| {task.name} | {name} | {gain} | {entry.best_lr:g} | {steps} ({summary.reached_target}/{summary.seeds}) "
        f"| {metric:.4f} ± {se or 0.0:.4f} | {grid} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(GAIN_OF), default="psisgd")
    parser.add_argument("--gains", nargs="+", required=True, help="gains, as numbers or fractions (1/30)")
    parser.add_argument("--tasks", nargs="*", default=None, help="default: every CPU task the method runs on")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = [t for t in suites._cpu_tasks(False) if args.method in t.methods]
    if args.tasks:
        unknown = set(args.tasks) - {t.name for t in tasks}
        if unknown:
            parser.error(f"unknown tasks (or tasks without {args.method}): {sorted(unknown)}")
        tasks = [t for t in tasks if t.name in args.tasks]
    method = METHODS[args.method]
    seeds = tuple(range(args.seeds))
    print("| task | method | gain | lr | steps to target (reached) | test metric ± SE | tuning seed: steps at each lr |")
    print("|---|---|---|---|---|---|---|")
    for gain in args.gains:
        setattr(_rates, GAIN_OF[args.method], float(Fraction(gain)))
        for task in tasks:
            dataset = training.load_dataset(task, None)
            entry = MethodTraining(method=method.name, label=method.label, weight_decay=method.weight_decay)
            reports: dict = {}
            chosen = training.tune(task, method, dataset, seeds[0], torch.device("cpu"), entry, None, reports,
                                   lambda record, text: None)  # fmt: skip
            if chosen is None:
                print(f"| {task.name} | {args.method} | {gain} | diverged at every lr | | | |", flush=True)
                continue
            runs = [chosen.run]
            for seed in seeds[1:]:
                run = training.train_run(task, method, dataset, entry.best_lr, None, seed, torch.device("cpu"),
                                         reports=reports)  # fmt: skip
                runs.append(training.record_test_metrics(run, dataset))
            print(_line(task, args.method, gain, entry, runs), flush=True)


if __name__ == "__main__":
    main()
