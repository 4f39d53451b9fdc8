r"""Minibatch training runs: one run, a tuned task, an init-scale sweep.

Measurement protocol
--------------------
* **Three disjoint parts of the data** (:mod:`psiopt.bench.data`): training, validation
  (:data:`~psiopt.bench.data.VALIDATION_FRACTION` of the training data, stratified by
  class; the language model's text is split by file) and test. Training reads the
  training part only; choosing a learning rate reads the validation part only; the
  test part is read once per reported run, at its end, after its learning rate was
  chosen (:func:`tune`), and never by a run that only tuned.
* **Batches**: for a given seed, every method sees the same minibatches (a seeded
  permutation per epoch) and starts from the same initial weights.
* **Training loss** at step :math:`t` is the minibatch loss (training mode), smoothed by
  the mean over the last :data:`SMOOTHING` steps; the *final loss* is the smoothed loss
  at the last step. A run whose loss becomes non-finite or exceeds
  :data:`DIVERGED_LOSS` stops as diverged.
* **Validation**: loss and accuracy (evaluation mode, BatchNorm's running statistics)
  on the whole validation part every ``eval_every`` steps and at the end (for the
  language model: on fixed windows of the validation text; accuracy is next-byte
  accuracy).
* **Steps / seconds to target**: the first step (and its cumulative training time,
  evaluation excluded) at which the task's ``target_on`` quantity is at most
  ``target_loss``: the smoothed training loss (classification), or the validation loss
  at an evaluation step (the language model).
* **Tuning** (:func:`tune`, :func:`choose_lr`): each method runs every learning rate of
  the task's grid with the first seed (the tuning seed). The chosen lr has the lowest
  final validation loss (a continuous measure: a few hundred validation samples rank
  learning rates by accuracy in steps of a sample, and did so by chance on half the
  methods of the digits task); remaining ties go to the smaller lr. A diverged run, or
  one with a non-finite validation loss, is never chosen. The tuning run at the chosen lr is the tuning
  seed's result; every other seed runs with the chosen lr.
* **Reported** (:func:`summarize`): means over the seeds that did not diverge, with the
  sample standard deviation and the standard error ``std / sqrt(n)``; steps and seconds
  to target over the seeds that reached it.
* **Learning-rate sensitivity** (:func:`lr_basin`): from the tuning runs, the grid
  learning rates at which the method reached the target within :data:`BASIN_FACTOR`
  times the fewest steps any grid lr took: the basin of good learning rates.
* **Schedule**: cosine decay from the lr to 0 over the run, for every method.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data as bench_data
from . import models as zoo
from .methods import METHODS, SI_LR_BASE, BuildContext, Method, MethodNotApplicable, zoo_scale_invariant_layers
from .records import (
    Curve,
    DatasetInfo,
    Evaluation,
    MethodTraining,
    Summary,
    SweepMethod,
    SweepResult,
    TaskResult,
    TrainRun,
    TuningPoint,
    from_json,
    to_json,
)
from .suites import ScaleSweep, TrainTask

__all__ = [
    "SMOOTHING",
    "DIVERGED_LOSS",
    "BASIN_FACTOR",
    "Done",
    "Trained",
    "load_dataset",
    "evaluate",
    "train_run",
    "record_test_metrics",
    "choose_lr",
    "lr_basin",
    "tune",
    "summarize",
    "run_task",
    "task_record",
    "run_sweep",
    "sweep_record",
    "available_methods",
    "sync",
]

SMOOTHING = 10
"""Window (steps) of the trailing mean that smooths the minibatch training loss."""

DIVERGED_LOSS = 1e3
"""A training loss above this (or non-finite) stops the run as diverged."""

BASIN_FACTOR = 1.25
"""A grid lr is in a method's basin when its tuning run reaches the target within this
factor of the fewest steps any grid lr took (25% slower than the method's best)."""

Done = Callable[[Any, str], None]
"""Called with each finished record and a short description (progress, results file)."""

Data = bench_data.Dataset | bench_data.TextDataset


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_dataset(task: TrainTask, data_dir) -> Data:
    """The dataset of ``task`` (``data_dir``: the CIFAR-10 directory, for the gpu suite)."""
    kwargs = dict(task.data_kwargs)
    if task.data == "digits":
        return bench_data.load_digits(seed=0, **kwargs)
    if task.data == "mnist5k":
        return bench_data.load_mnist5k(seed=0, **kwargs)
    if task.data == "mnist1d":
        return bench_data.load_mnist1d(seed=0, **kwargs)
    if task.data == "stdlib_text":
        return bench_data.load_stdlib_text(**kwargs)
    if task.data == "cifar10":
        if data_dir is None:
            raise bench_data.DataError("the CIFAR-10 tasks need --data-dir (or --synthetic for step time only)")
        return bench_data.load_cifar10(data_dir, **kwargs)
    raise ValueError(f"unknown dataset {task.data!r}")


def available_methods(names: tuple[str, ...], unavailable: dict[str, str]) -> list[Method]:
    """The registered methods ``names`` that can run; the others go into ``unavailable`` with the reason."""
    out = []
    for name in names:
        method = METHODS[name]
        reason = method.unavailable_reason()
        if reason is not None:
            unavailable[name] = reason
        else:
            out.append(method)
    return out


def _scale_groups_(model: nn.Module, scale: float) -> None:
    """Multiply every scale-invariant weight of a zoo model by ``scale`` (in place)."""
    if scale == 1.0:
        return
    with torch.no_grad():
        for layer in zoo_scale_invariant_layers(model):
            layer.weight.mul_(scale)


def _batch_order(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 + seed)
    needed = steps * batch_size
    perms = []
    total = 0
    while total < needed:
        perm = torch.randperm(n, generator=gen)
        usable = (n // batch_size) * batch_size
        perms.append(perm[:usable])
        total += usable
    return torch.cat(perms)[:needed].view(steps, batch_size)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``(..., classes)`` logits against ``(...)`` labels: one class per
    sample (classification) or per position (next-byte prediction)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` in evaluation mode (the
    mode is restored after); for a language model, per predicted byte."""
    was_training = model.training
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for i in range(0, x.shape[0], chunk):
        logits, target = model(x[i : i + chunk]), y[i : i + chunk]
        loss += float(_cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == target).sum())
        count += target.numel()
    model.train(was_training)
    return loss / max(1, count), correct / max(1, count)


def _record_every(steps: int) -> int:
    return max(1, steps // 100)


@dataclass
class Trained:
    """A finished run's record and its model as training left it (the test metrics of a
    tuning run are measured on it once its lr is chosen)."""

    run: TrainRun
    model: nn.Module


def train_run(
    task: TrainTask,
    method: Method,
    dataset: Data,
    lr: float,
    base_lr: float | None,
    seed: int,
    device: torch.device,
    init_scale: float = 1.0,
    bn_eps: float | None = None,
    reports: dict | None = None,
) -> Trained:
    """Train one model with one method, lr and seed on the training part, evaluating on
    the validation part; the test part is not read (see :func:`record_test_metrics`).

    ``init_scale`` multiplies the scale-invariant weights before the method builds its
    optimizer; ``bn_eps`` (if given) replaces every BatchNorm's eps; ``reports`` (see
    :class:`~psiopt.bench.methods.BuildContext`) shares discovery reports between runs.
    """
    torch.manual_seed(seed)
    model = zoo.build(task.model, task.model_kwargs, dataset.num_classes)
    if bn_eps is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eps = bn_eps
    _scale_groups_(model, init_scale)
    model.to(device).train()
    order = _batch_order(dataset.n_train, task.batch_size, task.steps, seed)
    example = dataset.train_batch(order[0])[0]
    ctx = BuildContext(lr=lr, base_lr=base_lr, example=example, reports={} if reports is None else reports)
    setup = method.build(model, ctx)
    model, opt = setup.model, setup.optimizer
    steps = task.steps
    if task.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps)))
    else:
        sched = None
    window: list[float] = []
    smoothed: list[float] = []
    times: list[float] = []
    evaluation = Evaluation(step=[], val_loss=[], val_acc=[])
    elapsed = 0.0
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    diverged = False
    for t in range(steps):
        xb, yb = dataset.train_batch(order[t])
        sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = _cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        if setup.after_step is not None:
            setup.after_step()
        if sched is not None:
            sched.step()
        value = loss.detach().item()  # synchronizes
        elapsed += time.perf_counter() - start
        if not math.isfinite(value) or value > DIVERGED_LOSS:
            diverged = True
            break
        window.append(value)
        if len(window) > SMOOTHING:
            window.pop(0)
        smooth = sum(window) / len(window)
        smoothed.append(smooth)
        times.append(elapsed)
        if task.target_on == "train_loss" and steps_to_target is None and smooth <= task.target_loss:
            steps_to_target, seconds_to_target = t + 1, elapsed
        if (t + 1) % task.eval_every == 0 or t + 1 == steps:
            val_loss, val_acc = evaluate(model, dataset.x_val, dataset.y_val)
            evaluation.step.append(t + 1)
            evaluation.val_loss.append(val_loss)
            evaluation.val_acc.append(val_acc)
            if task.target_on == "val_loss" and steps_to_target is None and val_loss <= task.target_loss:
                steps_to_target, seconds_to_target = t + 1, elapsed
    every = _record_every(steps)
    keep = [i for i in range(len(smoothed)) if (i + 1) % every == 0 or i == 0 or i == len(smoothed) - 1]
    finished = not diverged and bool(evaluation.step)
    run = TrainRun(
        seed=seed,
        lr=lr,
        base_lr=base_lr,
        init_scale=init_scale,
        diverged=diverged,
        steps_done=len(smoothed),
        final_loss=smoothed[-1] if finished else None,
        final_val_acc=evaluation.val_acc[-1] if finished else None,
        final_val_loss=evaluation.val_loss[-1] if finished else None,
        final_test_acc=None,
        final_test_loss=None,
        steps_to_target=steps_to_target,
        seconds_to_target=seconds_to_target,
        train_seconds=elapsed,
        curve=Curve(step=[i + 1 for i in keep], loss=[smoothed[i] for i in keep], time_s=[times[i] for i in keep]),
        eval=evaluation,
    )
    return Trained(run, model)


def record_test_metrics(trained: Trained, dataset: Data) -> TrainRun:
    """Measure the test loss and accuracy of a finished run on the test part, into its
    record (nothing for a diverged run); returns the record."""
    if not trained.run.diverged:
        trained.run.final_test_loss, trained.run.final_test_acc = evaluate(trained.model, dataset.x_test, dataset.y_test)
    return trained.run


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def choose_lr(points: list[TuningPoint]) -> float | None:
    """The learning rate the tuning runs ``points`` choose, on the validation part only:
    the lowest final validation loss, ties to the smaller lr. A diverged run, or one whose
    validation loss is missing or not finite, is never chosen; ``None`` when no run can be.
    """
    ok = [p for p in points if not p.diverged and _finite(p.final_val_loss)]
    if not ok:
        return None
    return min(ok, key=lambda p: (p.final_val_loss, p.lr)).lr


def lr_basin(points: list[TuningPoint], factor: float = BASIN_FACTOR) -> list[float]:
    """The grid lrs (sorted) whose tuning run reached the target in at most ``factor``
    times the fewest steps any of ``points`` took; empty when none reached it."""
    reached = [p for p in points if not p.diverged and p.steps_to_target is not None]
    if not reached:
        return []
    best = min(p.steps_to_target for p in reached)
    return sorted(p.lr for p in reached if p.steps_to_target <= factor * best)


def tune(
    task: TrainTask,
    method: Method,
    dataset: Data,
    seed: int,
    device: torch.device,
    entry: MethodTraining,
    base_lr: float | None,
    reports: dict,
    done: Done,
) -> Trained | None:
    """Run every lr of ``task``'s grid with ``seed`` into ``entry`` (its tuning points,
    basin and chosen lr), choosing on the validation part (:func:`choose_lr`); return the
    chosen run with its test metrics, or ``None`` when every run diverged.

    Every grid run finishes before the test part is read, and only the chosen run's
    model is evaluated on it.
    """
    kept: dict[float, Trained] = {}
    for lr in task.lr_grid:
        trained = train_run(task, method, dataset, lr, base_lr, seed, device, reports=reports)
        kept[lr] = trained
        r = trained.run
        entry.tuning.append(
            TuningPoint(lr, r.diverged, r.final_loss, r.final_val_acc, r.final_val_loss, r.steps_to_target)
        )
        done(r, f"{task.name} {method.name} lr={lr:g}")
    entry.basin = lr_basin(entry.tuning)
    entry.best_lr = choose_lr(entry.tuning)
    if entry.best_lr is None:
        return None
    chosen = kept[entry.best_lr]
    record_test_metrics(chosen, dataset)
    return chosen


def _stats(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """Mean, sample std and standard error (std / sqrt(n)); the last two ``None`` below 2 values."""
    if not values:
        return None, None, None
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None, None
    std = float(np.std(values, ddof=1))
    return mean, std, std / math.sqrt(len(values))


def summarize(runs: list[TrainRun]) -> Summary:
    """Means, sample stds and standard errors over ``runs`` (diverged runs counted, not
    averaged; steps and seconds to target over the runs that reached it)."""
    ok = [r for r in runs if not r.diverged]
    loss = _stats([r.final_loss for r in ok if r.final_loss is not None])
    acc = _stats([r.final_test_acc for r in ok if r.final_test_acc is not None])
    test_loss = _stats([r.final_test_loss for r in ok if r.final_test_loss is not None])
    reached = [r for r in ok if r.steps_to_target is not None]
    steps = _stats([float(r.steps_to_target) for r in reached])
    return Summary(
        seeds=len(runs),
        diverged=len(runs) - len(ok),
        final_loss_mean=loss[0],
        final_loss_std=loss[1],
        final_loss_se=loss[2],
        test_acc_mean=acc[0],
        test_acc_std=acc[1],
        test_acc_se=acc[2],
        test_loss_mean=test_loss[0],
        test_loss_std=test_loss[1],
        test_loss_se=test_loss[2],
        reached_target=len(reached),
        steps_to_target_mean=steps[0],
        steps_to_target_se=steps[2],
        seconds_to_target_mean=_stats([r.seconds_to_target for r in reached])[0],
        train_seconds_mean=_stats([r.train_seconds for r in runs])[0],
    )


def run_task(
    task: TrainTask,
    dataset: Data,
    seeds: tuple[int, ...],
    device: torch.device,
    unavailable: dict[str, str],
    record: TaskResult,
    done: Done,
) -> dict[str, MethodTraining]:
    """Tune (on the first seed) and run every method of ``task`` into ``record``; return
    the tuned methods by name.

    ``record`` is filled as runs finish (the results file shows partial progress).
    """
    tuned: dict[str, MethodTraining] = {}
    reports: dict = {}  # one discovery per architecture for all of this task's runs
    first, *others = seeds
    for method in available_methods(task.methods, unavailable):
        entry = MethodTraining(method=method.name, label=method.label, weight_decay=method.weight_decay)
        record.methods.append(entry)
        base_lr = None
        if method.own_si_lr:
            if SI_LR_BASE not in tuned:
                entry.status = "skipped"
                entry.reason = (
                    f"needs the tuned {SI_LR_BASE} lr of this task ({SI_LR_BASE} did not run or diverged everywhere)"
                )
                continue
            base_lr = tuned[SI_LR_BASE].best_lr
        entry.base_lr = base_lr
        try:
            chosen = tune(task, method, dataset, first, device, entry, base_lr, reports, done)
        except MethodNotApplicable as exc:
            entry.status = "not_applicable"
            entry.reason = str(exc)
            continue
        if chosen is None:
            entry.status = "diverged"
            entry.reason = "diverged at every learning rate of the grid"
            continue
        entry.runs.append(chosen.run)
        entry.summary = summarize(entry.runs)
        tuned[method.name] = entry
        for seed in others:
            run = record_test_metrics(
                train_run(task, method, dataset, entry.best_lr, base_lr, seed, device, reports=reports), dataset
            )
            entry.runs.append(run)
            entry.summary = summarize(entry.runs)
            done(run, f"{task.name} {method.name} seed={seed}")
    if reports:
        record.scale_invariant = sorted({name for report in reports.values() for name in report.names()})
    return tuned


def task_record(task: TrainTask, dataset: Data, seeds: tuple[int, ...]) -> TaskResult:
    """An empty record of ``task`` on ``dataset`` with these ``seeds``, filled by :func:`run_task`."""
    return TaskResult(
        task=task.name,
        dataset=from_json(DatasetInfo, dataset.describe()),
        model=task.model,
        model_kwargs=to_json(task.model_kwargs),
        batch_size=task.batch_size,
        steps=task.steps,
        lr_grid=list(task.lr_grid),
        target_loss=task.target_loss,
        schedule=task.schedule,
        metric=task.metric,
        target_on=task.target_on,
        eval_every=task.eval_every,
        seeds=list(seeds),
    )


def _spread(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else max(values) - min(values)


def run_sweep(
    sweep: ScaleSweep,
    task: TrainTask,
    dataset: Data,
    tuned: dict[str, MethodTraining],
    seed: int,
    device: torch.device,
    record: SweepResult,
    done: Done,
) -> None:
    """Train each tuned method of ``sweep`` from every initial scale into ``record``."""
    reports: dict = {}  # one discovery per architecture for all of the sweep's runs
    for name in sweep.methods:
        if name not in tuned:
            continue
        method = METHODS[name]
        entry = SweepMethod(method=name, label=method.label, lr=tuned[name].best_lr, base_lr=tuned[name].base_lr)
        record.methods.append(entry)
        for scale in sweep.scales:
            run = train_run(
                task, method, dataset, entry.lr, entry.base_lr, seed, device, scale, sweep.bn_eps, reports=reports
            ).run
            entry.runs.append(run)
            entry.final_loss_spread = _spread([r.final_loss for r in entry.runs])
            diverged = any(r.diverged or not r.curve.loss for r in entry.runs)
            means = [float(np.mean(r.curve.loss)) if r.curve.loss else None for r in entry.runs]
            entry.mean_loss_spread = None if diverged else _spread(means)
            done(run, f"sweep {name} x{scale:g}")


def sweep_record(sweep: ScaleSweep, seed: int) -> SweepResult:
    """An empty record of ``sweep``, filled by :func:`run_sweep`."""
    return SweepResult(task=sweep.task, scales=list(sweep.scales), seed=seed, bn_eps=sweep.bn_eps)
