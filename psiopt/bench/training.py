r"""Minibatch training runs: one run, a tuned task, an init-scale sweep.

Measurement protocol
--------------------
* **Batches**: for a given seed, every method sees the same minibatches (a seeded
  permutation per epoch) and starts from the same initial weights.
* **Training loss** at step :math:`t` is the minibatch loss (training mode), smoothed by
  the mean over the last ``SMOOTHING`` steps; *steps / seconds to target* are the first
  step (and its cumulative training time, evaluation excluded) at which the smoothed
  loss is at most the task's target; the *final loss* is the smoothed loss at the last
  step.
* **Tuning**: each method runs every learning rate of the task's grid with the first
  seed; the lr with the lowest final loss wins (a run whose loss becomes non-finite or
  exceeds ``DIVERGED_LOSS`` counts as diverged), and the other seeds run with it. The
  first seed's tuning run is reused as its result.
* **Schedule**: cosine decay from the lr to 0 over the run, for every method.
* **Test accuracy**: evaluation mode (BN running statistics), every ``eval_every`` steps
  and at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data as bench_data
from . import models as zoo
from .methods import METHODS, BuildContext, Method, MethodNotApplicable, zoo_scale_invariant_layers
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
    to_json,
)
from .suites import ScaleSweep, TrainTask

__all__ = [
    "SMOOTHING",
    "DIVERGED_LOSS",
    "Done",
    "load_dataset",
    "train_run",
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

Done = Callable[[Any, str], None]
"""Called with each finished record and a short description (progress, results file)."""


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return mean, std


def load_dataset(task: TrainTask, data_dir) -> bench_data.Dataset:
    """The dataset of ``task`` (``data_dir``: the CIFAR-10 directory, for the gpu suite)."""
    kwargs = dict(task.data_kwargs)
    if task.data == "digits":
        return bench_data.load_digits(seed=0, **kwargs)
    if task.data == "mnist5k":
        return bench_data.load_mnist5k(seed=0, **kwargs)
    if task.data == "mnist1d":
        return bench_data.load_mnist1d(seed=0, **kwargs)
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


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], chunk):
        correct += int((model(x[i : i + chunk]).argmax(dim=1) == y[i : i + chunk]).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])


def _record_every(steps: int) -> int:
    return max(1, steps // 100)


def train_run(
    task: TrainTask,
    method: Method,
    dataset: bench_data.Dataset,
    lr: float,
    base_lr: float | None,
    seed: int,
    device: torch.device,
    init_scale: float = 1.0,
    bn_eps: float | None = None,
    reports: dict | None = None,
) -> TrainRun:
    """Train one model with one method, lr and seed; return the run record.

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
    order = _batch_order(dataset.x_train.shape[0], task.batch_size, task.steps, seed)
    example = dataset.x_train[order[0]]
    setup = method.build(model, BuildContext(lr=lr, base_lr=base_lr, example=example, reports={} if reports is None else reports))
    model, opt = setup.model, setup.optimizer
    steps = task.steps
    if task.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps)))
    else:
        sched = None
    window: list[float] = []
    smoothed: list[float] = []
    times: list[float] = []
    eval_steps: list[int] = []
    accs: list[float] = []
    elapsed = 0.0
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    diverged = False
    for t in range(steps):
        idx = order[t]
        xb, yb = dataset.x_train[idx], dataset.y_train[idx]
        sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
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
        if steps_to_target is None and smooth <= task.target_loss:
            steps_to_target, seconds_to_target = t + 1, elapsed
        if (t + 1) % task.eval_every == 0 or t + 1 == steps:
            eval_steps.append(t + 1)
            accs.append(_accuracy(model, dataset.x_test, dataset.y_test))
    every = _record_every(steps)
    keep = [i for i in range(len(smoothed)) if (i + 1) % every == 0 or i == 0 or i == len(smoothed) - 1]
    return TrainRun(
        seed=seed,
        lr=lr,
        base_lr=base_lr,
        init_scale=init_scale,
        diverged=diverged,
        steps_done=len(smoothed),
        final_loss=None if diverged or not smoothed else smoothed[-1],
        final_test_acc=None if diverged or not accs else accs[-1],
        steps_to_target=steps_to_target,
        seconds_to_target=seconds_to_target,
        train_seconds=elapsed,
        curve=Curve(step=[i + 1 for i in keep], loss=[smoothed[i] for i in keep], time_s=[times[i] for i in keep]),
        eval=Evaluation(step=eval_steps, test_acc=accs),
    )


def summarize(runs: list[TrainRun]) -> Summary:
    """Mean and sample std over ``runs`` (diverged runs counted, not averaged)."""
    ok = [r for r in runs if not r.diverged]
    loss_m, loss_s = _mean_std([r.final_loss for r in ok])
    acc_m, acc_s = _mean_std([r.final_test_acc for r in ok])
    reached = [r for r in ok if r.steps_to_target is not None]
    steps_m, _ = _mean_std([float(r.steps_to_target) for r in reached])
    secs_m, _ = _mean_std([r.seconds_to_target for r in reached])
    return Summary(
        seeds=len(runs),
        diverged=len(runs) - len(ok),
        final_loss_mean=loss_m,
        final_loss_std=loss_s,
        test_acc_mean=acc_m,
        test_acc_std=acc_s,
        reached_target=len(reached),
        steps_to_target_mean=steps_m,
        seconds_to_target_mean=secs_m,
        train_seconds_mean=_mean_std([r.train_seconds for r in runs])[0],
    )


def run_task(
    task: TrainTask,
    dataset: bench_data.Dataset,
    seeds: tuple[int, ...],
    device: torch.device,
    unavailable: dict[str, str],
    record: TaskResult,
    done: Done,
) -> dict[str, MethodTraining]:
    """Tune and run every method of ``task`` into ``record``; return the tuned methods by name.

    ``record`` is filled as runs finish (the results file shows partial progress).
    """
    tuned: dict[str, MethodTraining] = {}
    reports: dict = {}  # one discovery per architecture for all of this task's runs
    for method in available_methods(task.methods, unavailable):
        entry = MethodTraining(method=method.name, label=method.label)
        record.methods.append(entry)
        base = tuned.get(method.base_method)
        base_lr = base.best_lr if method.own_si_lr and base is not None else None
        if method.own_si_lr and base_lr is None:
            entry.status = "skipped"
            entry.reason = (
                f"needs the tuned {method.base_method} lr of this task ({method.base_method} did not run or "
                "diverged everywhere)"
            )
            continue
        entry.base_lr = base_lr
        first, *others = seeds
        by_lr: dict[float, TrainRun] = {}
        try:
            for lr in task.lr_grid:
                run = train_run(task, method, dataset, lr, base_lr, first, device, reports=reports)
                by_lr[lr] = run
                entry.tuning.append(TuningPoint(lr=lr, final_loss=run.final_loss, diverged=run.diverged))
                done(run, f"{task.name} {method.name} lr={lr:g}")
        except MethodNotApplicable as exc:
            entry.status = "not_applicable"
            entry.reason = str(exc)
            continue
        finite = {lr: r.final_loss for lr, r in by_lr.items() if r.final_loss is not None}
        if not finite:
            entry.status = "diverged"
            entry.reason = "diverged at every learning rate of the grid"
            continue
        best = min(finite, key=finite.get)
        entry.best_lr = best
        entry.runs.append(by_lr[best])
        entry.summary = summarize(entry.runs)
        tuned[method.name] = entry
        for seed in others:
            run = train_run(task, method, dataset, best, base_lr, seed, device, reports=reports)
            entry.runs.append(run)
            entry.summary = summarize(entry.runs)
            done(run, f"{task.name} {method.name} seed={seed}")
    return tuned


def task_record(task: TrainTask, dataset: bench_data.Dataset) -> TaskResult:
    """An empty record of ``task`` on ``dataset``, filled by :func:`run_task`."""
    return TaskResult(
        task=task.name,
        dataset=DatasetInfo(**dataset.describe()),
        model=task.model,
        model_kwargs=to_json(task.model_kwargs),
        batch_size=task.batch_size,
        steps=task.steps,
        lr_grid=list(task.lr_grid),
        target_loss=task.target_loss,
        schedule=task.schedule,
    )


def _spread(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else max(values) - min(values)


def run_sweep(
    sweep: ScaleSweep,
    task: TrainTask,
    dataset: bench_data.Dataset,
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
            )
            entry.runs.append(run)
            entry.final_loss_spread = _spread([r.final_loss for r in entry.runs])
            diverged = any(r.diverged or not r.curve.loss for r in entry.runs)
            means = [float(np.mean(r.curve.loss)) if r.curve.loss else None for r in entry.runs]
            entry.mean_loss_spread = None if diverged else _spread(means)
            done(run, f"sweep {name} x{scale:g}")


def sweep_record(sweep: ScaleSweep, seed: int) -> SweepResult:
    """An empty record of ``sweep``, filled by :func:`run_sweep`."""
    return SweepResult(task=sweep.task, scales=list(sweep.scales), seed=seed, bn_eps=sweep.bn_eps)
