r"""Run a benchmark suite and record everything it measures.

:func:`run_benchmark` runs the parts of a :class:`~psiopt.bench.suites.Suite` in order
(training tasks, init-scale sweeps, full-batch problems, step time) and keeps the results
in one JSON-ready dict (the layout is ``results.schema.json``). The results file is
rewritten as runs finish (at most every 2 s, and after every part), and always when the
benchmark stops, so an interrupted benchmark (Ctrl-C) keeps every run it had finished;
that final write marks it ``"interrupted": true``.

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
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data as bench_data
from . import models as zoo
from .methods import (
    METHODS,
    BuildContext,
    Method,
    MethodNotApplicable,
    zoo_scale_invariant_layers,
)
from .rayleigh import FULL_BATCH_METHODS, make_rayleigh, run_full_batch
from .suites import Suite, TrainTask

__all__ = [
    "BenchConfig",
    "run_benchmark",
    "environment",
    "SMOOTHING",
    "DIVERGED_LOSS",
    "SCHEMA_VERSION",
]

SMOOTHING = 10
"""Window (steps) of the trailing mean that smooths the minibatch training loss."""

DIVERGED_LOSS = 1e3
"""A training loss above this (or non-finite) stops the run as diverged."""

SCHEMA_VERSION = 1

RunCallback = Callable[[dict[str, Any]], None]


@dataclass
class BenchConfig:
    """How to run a suite.

    Attributes
    ----------
    suite : Suite
        What to run.
    device : str
        ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).
    out_dir : Path
        Where ``results.json``, ``report.md`` and the plots go.
    data_dir : Path or None
        The CIFAR-10 directory (``gpu`` suite).
    quick, synthetic : bool
        As given on the command line (recorded in the results).
    progress : bool
        Show a tqdm progress bar on stderr.
    """

    suite: Suite
    device: str
    out_dir: Path
    data_dir: Path | None = None
    quick: bool = False
    synthetic: bool = False
    progress: bool = False


# -- environment ------------------------------------------------------------------------


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def environment(device: str) -> dict[str, Any]:
    """Device, library versions, git commit (``None`` outside a checkout), CPU/GPU names."""
    import geoopt

    import psiopt

    cuda = torch.cuda.is_available()
    return {
        "device": device,
        "torch_version": torch.__version__,
        "psiopt_version": psiopt.__version__,
        "geoopt_version": getattr(geoopt, "__version__", None),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "cpu_name": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": cuda,
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
    }


# -- helpers ----------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return mean, std


def _load_dataset(task: TrainTask, config: BenchConfig) -> bench_data.Dataset:
    kwargs = dict(task.data_kwargs)
    if task.data == "digits":
        return bench_data.load_digits(seed=0, **kwargs)
    if task.data == "mnist5k":
        return bench_data.load_mnist5k(seed=0, **kwargs)
    if task.data == "mnist1d":
        return bench_data.load_mnist1d(seed=0, **kwargs)
    if task.data == "cifar10":
        if config.data_dir is None:
            raise bench_data.DataError("the CIFAR-10 tasks need --data-dir (or --synthetic for step time only)")
        return bench_data.load_cifar10(config.data_dir, **kwargs)
    raise ValueError(f"unknown dataset {task.data!r}")


def _build_model(name: str, kwargs: dict, num_classes: int = 10) -> nn.Module:
    builder = getattr(zoo, name)
    return builder(num_classes=num_classes, **kwargs)


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


# -- one training run ------------------------------------------------------------------


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
) -> dict[str, Any]:
    """Train one model with one method, lr and seed; return the run record.

    ``init_scale`` multiplies the scale-invariant weights before the method builds its
    optimizer; ``bn_eps`` (if given) replaces every BatchNorm's eps.
    """
    torch.manual_seed(seed)
    model = _build_model(task.model, task.model_kwargs, dataset.num_classes)
    if bn_eps is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eps = bn_eps
    _scale_groups_(model, init_scale)
    model.to(device).train()
    order = _batch_order(dataset.x_train.shape[0], task.batch_size, task.steps, seed)
    example = dataset.x_train[order[0]]
    setup = method.build(model, BuildContext(lr=lr, base_lr=base_lr, example=example))
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
        _sync(device)
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
    return {
        "seed": seed,
        "lr": lr,
        "base_lr": base_lr,
        "init_scale": init_scale,
        "diverged": diverged,
        "steps_done": len(smoothed),
        "final_loss": None if diverged or not smoothed else smoothed[-1],
        "final_test_acc": None if diverged or not accs else accs[-1],
        "steps_to_target": steps_to_target,
        "seconds_to_target": seconds_to_target,
        "train_seconds": elapsed,
        "curve": {
            "step": [i + 1 for i in keep],
            "loss": [smoothed[i] for i in keep],
            "time_s": [times[i] for i in keep],
        },
        "eval": {"step": eval_steps, "test_acc": accs},
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if not r["diverged"]]
    loss_m, loss_s = _mean_std([r["final_loss"] for r in ok])
    acc_m, acc_s = _mean_std([r["final_test_acc"] for r in ok])
    reached = [r for r in ok if r["steps_to_target"] is not None]
    steps_m, _ = _mean_std([float(r["steps_to_target"]) for r in reached])
    secs_m, _ = _mean_std([r["seconds_to_target"] for r in reached])
    return {
        "seeds": len(runs),
        "diverged": len(runs) - len(ok),
        "final_loss_mean": loss_m,
        "final_loss_std": loss_s,
        "test_acc_mean": acc_m,
        "test_acc_std": acc_s,
        "reached_target": len(reached),
        "steps_to_target_mean": steps_m,
        "seconds_to_target_mean": secs_m,
        "train_seconds_mean": _mean_std([r["train_seconds"] for r in runs])[0],
    }


# -- the runner ---------------------------------------------------------------------------


class _Recorder:
    """Holds the results dict and rewrites ``results.json`` atomically.

    :meth:`save` writes at most once per ``min_interval`` seconds (the file grows to
    about a megabyte, and writing it after each of hundreds of short runs would cost
    more than the runs); :meth:`flush` always writes (after each part, and at the end
    or on interruption).
    """

    def __init__(self, path: Path, results: dict[str, Any], min_interval: float = 2.0):
        self.path = path
        self.results = results
        self.min_interval = min_interval
        self._last = -math.inf

    def save(self) -> None:
        if time.perf_counter() - self._last >= self.min_interval:
            self.flush()

    def flush(self) -> None:
        from .report import write_json

        write_json(self.results, self.path)
        self._last = time.perf_counter()


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True, leave=False)

    def tick(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text[:40])
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _available(names: tuple[str, ...], unavailable: dict[str, str]) -> list[Method]:
    out = []
    for name in names:
        method = METHODS[name]
        reason = method.unavailable_reason()
        if reason is not None:
            unavailable[name] = reason
        else:
            out.append(method)
    return out


def _count_units(suite: Suite) -> int:
    total = 0
    for task in suite.train:
        total += len(task.methods) * (len(task.lr_grid) + len(suite.seeds) - 1)
    for sweep in suite.sweeps:
        total += len(sweep.methods) * len(sweep.scales)
    if suite.full_batch is not None:
        fb = suite.full_batch
        total += len(fb.condition_numbers) * len(fb.scales) * len(fb.methods)
    for spec in suite.step_time:
        total += len(spec.methods) + 1
    return total


def _suite_config(config: BenchConfig) -> dict[str, Any]:
    suite = config.suite
    return {
        "suite": suite.name,
        "description": suite.description,
        "quick": config.quick,
        "synthetic": config.synthetic,
        "seeds": list(suite.seeds),
        "device": config.device,
        "data_dir": None if config.data_dir is None else str(config.data_dir),
        "smoothing_window": SMOOTHING,
        "diverged_loss": DIVERGED_LOSS,
        "momentum": 0.9,
        "train": [_jsonable(asdict(t)) for t in suite.train],
        "sweeps": [_jsonable(asdict(s)) for s in suite.sweeps],
        "full_batch": None if suite.full_batch is None else _jsonable(asdict(suite.full_batch)),
        "step_time": [_jsonable(asdict(s)) for s in suite.step_time],
        "methods": {name: {"label": m.label, "summary": m.summary, "own_si_lr": m.own_si_lr} for name, m in METHODS.items()},
        "full_batch_methods": {name: {"label": m.label, "summary": m.summary} for name, m in FULL_BATCH_METHODS.items()},
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def run_benchmark(config: BenchConfig, on_run_done: RunCallback | None = None) -> dict[str, Any]:
    """Run ``config.suite``; write ``results.json``, ``report.md`` and the plots.

    Parameters
    ----------
    config : BenchConfig
        The suite and where to write.
    on_run_done : callable, optional
        Called with each finished run's record (a progress hook).
        A ``KeyboardInterrupt`` raised there, like Ctrl-C, stops the benchmark and
        keeps the results finished so far.

    Returns
    -------
    dict
        The results (as written to ``results.json``); ``results["interrupted"]`` tells
        whether the run was cut short.
    """
    from .plots import make_plots
    from .report import json_ready, render_markdown

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "suite": config.suite.name,
        "quick": config.quick,
        "interrupted": False,
        "complete": False,
        "started_at": _now(),
        "finished_at": None,
        "wall_time_s": None,
        "part_seconds": {},
        "config": _suite_config(config),
        "environment": environment(str(device)),
        "unavailable_methods": {},
        "training": [],
        "scale_sweep": [],
        "full_batch": [],
        "step_time": [],
        "plots": [],
    }
    recorder = _Recorder(out_dir / "results.json", results)
    recorder.flush()
    progress = _Progress(_count_units(config.suite), config.progress)

    def done(record: dict[str, Any], text: str) -> None:
        recorder.save()
        progress.tick(text)
        if on_run_done is not None:
            on_run_done(record)

    try:
        tuned: dict[str, dict[str, dict[str, float | None]]] = {}
        datasets: dict[str, bench_data.Dataset] = {}
        parts: dict[str, float] = results["part_seconds"]
        for task in config.suite.train:
            part_start = time.perf_counter()
            dataset = _load_dataset(task, config).to(device)
            datasets[task.name] = dataset
            tuned[task.name] = _run_task(task, dataset, config, results, device, done)
            parts[f"training:{task.name}"] = time.perf_counter() - part_start
            recorder.flush()
        for sweep in config.suite.sweeps:
            part_start = time.perf_counter()
            task = next(t for t in config.suite.train if t.name == sweep.task)
            _run_sweep(sweep, task, datasets[task.name], tuned[task.name], config, results, device, done)
            parts[f"scale_sweep:{task.name}"] = time.perf_counter() - part_start
            recorder.flush()
        if config.suite.full_batch is not None:
            part_start = time.perf_counter()
            _run_full_batch(config.suite.full_batch, results, done)
            parts["full_batch"] = time.perf_counter() - part_start
            recorder.flush()
        for spec in config.suite.step_time:
            devices = [device]
            if config.suite.name != "gpu" and torch.cuda.is_available() and device.type != "cuda":
                devices.append(torch.device("cuda"))
            for dev in devices:
                part_start = time.perf_counter()
                _run_step_time(spec, dev, results, done)
                parts[f"step_time:{spec.model}:{dev}"] = time.perf_counter() - part_start
        results["complete"] = True
    except KeyboardInterrupt:
        results["interrupted"] = True
    finally:
        progress.close()
        results["finished_at"] = _now()
        results["wall_time_s"] = time.perf_counter() - started
        recorder.flush()
        try:
            results["plots"] = make_plots(results, out_dir)
        finally:
            recorder.flush()
            (out_dir / "report.md").write_text(render_markdown(json_ready(results)), encoding="utf-8")
    return results


def _run_task(
    task: TrainTask,
    dataset: bench_data.Dataset,
    config: BenchConfig,
    results: dict[str, Any],
    device: torch.device,
    done: Callable[[dict[str, Any], str], None],
) -> dict[str, dict[str, float | None]]:
    """Tune and run every method of ``task``; return ``{method: {"lr", "base_lr"}}``."""
    record: dict[str, Any] = {
        "task": task.name,
        "dataset": dataset.describe(),
        "model": task.model,
        "model_kwargs": _jsonable(task.model_kwargs),
        "batch_size": task.batch_size,
        "steps": task.steps,
        "lr_grid": list(task.lr_grid),
        "target_loss": task.target_loss,
        "schedule": task.schedule,
        "methods": [],
    }
    results["training"].append(record)
    unavailable: dict[str, str] = results["unavailable_methods"]
    chosen: dict[str, dict[str, float | None]] = {}
    for method in _available(task.methods, unavailable):
        entry: dict[str, Any] = {
            "method": method.name,
            "label": method.label,
            "status": "ok",
            "reason": None,
            "best_lr": None,
            "base_lr": None,
            "tuning": [],
            "runs": [],
            "summary": None,
        }
        record["methods"].append(entry)
        base_lr = chosen.get(method.base_method, {}).get("lr") if method.own_si_lr else None
        if method.own_si_lr and base_lr is None:
            entry["status"] = "skipped"
            entry["reason"] = (
                f"needs the tuned {method.base_method} lr of this task ({method.base_method} did not run or "
                "diverged everywhere)"
            )
            continue
        entry["base_lr"] = base_lr
        first, *others = config.suite.seeds
        by_lr: dict[float, dict[str, Any]] = {}
        try:
            for lr in task.lr_grid:
                run = train_run(task, method, dataset, lr, base_lr, first, device)
                by_lr[lr] = run
                entry["tuning"].append({"lr": lr, "final_loss": run["final_loss"], "diverged": run["diverged"]})
                done(run, f"{task.name} {method.name} lr={lr:g}")
        except MethodNotApplicable as exc:
            entry["status"] = "not_applicable"
            entry["reason"] = str(exc)
            continue
        finite = {lr: r["final_loss"] for lr, r in by_lr.items() if r["final_loss"] is not None}
        if not finite:
            entry["status"] = "diverged"
            entry["reason"] = "diverged at every learning rate of the grid"
            continue
        best = min(finite, key=finite.get)
        entry["best_lr"] = best
        entry["runs"].append(by_lr[best])
        entry["summary"] = _summary(entry["runs"])
        chosen[method.name] = {"lr": best, "base_lr": base_lr}
        for seed in others:
            run = train_run(task, method, dataset, best, base_lr, seed, device)
            entry["runs"].append(run)
            entry["summary"] = _summary(entry["runs"])
            done(run, f"{task.name} {method.name} seed={seed}")
    return chosen


def _run_sweep(sweep, task, dataset, chosen, config, results, device, done) -> None:
    record: dict[str, Any] = {
        "task": task.name,
        "scales": list(sweep.scales),
        "seed": config.suite.seeds[0],
        "bn_eps": sweep.bn_eps,
        "methods": [],
    }
    results["scale_sweep"].append(record)
    for name in sweep.methods:
        if name not in chosen:
            continue
        method = METHODS[name]
        entry: dict[str, Any] = {
            "method": name,
            "label": method.label,
            "lr": chosen[name]["lr"],
            "base_lr": chosen[name]["base_lr"],
            "runs": [],
            "final_loss_spread": None,
            "mean_loss_spread": None,
        }
        record["methods"].append(entry)
        for scale in sweep.scales:
            run = train_run(
                task, method, dataset, entry["lr"], entry["base_lr"], record["seed"], device, scale, sweep.bn_eps
            )
            entry["runs"].append(run)
            finals = [r["final_loss"] for r in entry["runs"]]
            means = [float(np.mean(r["curve"]["loss"])) if r["curve"]["loss"] else None for r in entry["runs"]]
            if all(v is not None for v in finals):
                entry["final_loss_spread"] = max(finals) - min(finals)
            else:
                entry["final_loss_spread"] = None
            if all(v is not None for v in means) and not any(r["diverged"] for r in entry["runs"]):
                entry["mean_loss_spread"] = max(means) - min(means)
            else:
                entry["mean_loss_spread"] = None
            done(run, f"sweep {name} x{scale:g}")


def _run_full_batch(spec, results, done) -> None:
    unavailable: dict[str, str] = results["unavailable_methods"]
    methods = []
    for name in spec.methods:
        m = FULL_BATCH_METHODS[name]
        reason = m.unavailable_reason()
        if reason is None:
            methods.append(m)
        else:
            unavailable[f"full-batch:{name}"] = reason
    for i, kappa in enumerate(spec.condition_numbers):
        problem = make_rayleigh(spec.groups, spec.dim, kappa, seed=i)
        gen = torch.Generator().manual_seed(1000 + i)
        direction = torch.randn(spec.groups, spec.dim, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            gap0 = float(problem.loss(direction)) - problem.f_star
        predicted = problem.predicted_iterations(problem.optimal_step, gap0, spec.tol)
        # a run that needs more than 3 times the predicted count is reported as "not reached"
        max_iters = spec.max_iters if predicted is None else min(spec.max_iters, max(200, 3 * predicted))
        for scale in spec.scales:
            entry = {
                "condition_number": kappa,
                "init_scale": scale,
                "groups": spec.groups,
                "dim": spec.dim,
                "f_star": problem.f_star,
                "optimal_step": problem.optimal_step,
                "predicted_rate": problem.contraction(problem.optimal_step) ** 2,
                "tol": spec.tol,
                "runs": [],
            }
            results["full_batch"].append(entry)
            for method in methods:
                run = run_full_batch(method, problem, direction * scale, spec.tol, max_iters)
                entry["runs"].append(run)
                done(run, f"rayleigh k={kappa:g} {method.name}")


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _cuda_step_peak(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak CUDA memory one step allocates above what was allocated before it (``None`` on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def _time_steps(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return samples


def _run_step_time(spec, device: torch.device, results, done) -> None:
    unavailable: dict[str, str] = results["unavailable_methods"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((spec.batch_size, *spec.input_shape), generator=gen).to(device)
    y = torch.randint(0, 10, (spec.batch_size,), generator=gen).to(device)

    def prepared(builder: Callable[[nn.Module], tuple[nn.Module, torch.optim.Optimizer, Callable | None]]):
        torch.manual_seed(0)
        model = _build_model(spec.model, spec.model_kwargs).to(device).train()
        model, opt, hook = builder(model)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()  # gradients stay fixed while timing

        def step() -> None:
            opt.step()
            if hook is not None:
                hook()

        params = {id(p): p for p in model.parameters()}
        param_bytes = sum(p.numel() * p.element_size() for p in params.values())
        return step, opt, param_bytes

    def baseline_builder(model):
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True), None

    record: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "model": spec.model,
        "model_kwargs": _jsonable(spec.model_kwargs),
        "batch_size": spec.batch_size,
        "warmup": spec.warmup,
        "repeats": spec.repeats,
        "baseline": "torch.optim.SGD(momentum=0.9, foreach=True)",
        "baseline_median_s": None,
        "param_bytes": None,
        "methods": [],
    }
    results["step_time"].append(record)
    base_step, base_opt, param_bytes = prepared(baseline_builder)
    base_samples = _time_steps(base_step, device, spec.warmup, spec.repeats)
    record["param_bytes"] = param_bytes
    record["baseline_median_s"] = statistics.median(base_samples)
    record["baseline_state_bytes"] = _state_bytes(base_opt)
    done(record, f"step time baseline {device.type}")
    for method in _available(spec.methods, unavailable):

        def builder(model, method=method):
            example = x
            setup = method.build(model, BuildContext(lr=0.01, base_lr=0.01, example=example))
            return setup.model, setup.optimizer, setup.after_step

        entry: dict[str, Any] = {"method": method.name, "label": method.label, "status": "ok", "reason": None}
        try:
            step, opt, _ = prepared(builder)
        except MethodNotApplicable as exc:
            entry.update(status="not_applicable", reason=str(exc))
            record["methods"].append(entry)
            continue
        samples = _time_steps(step, device, spec.warmup, spec.repeats)
        median = statistics.median(samples)
        entry.update(
            median_s=median,
            ratio_to_baseline=median / record["baseline_median_s"],
            state_bytes=_state_bytes(opt),
            cuda_step_peak_extra_bytes=_cuda_step_peak(step, device),
        )
        record["methods"].append(entry)
        done(entry, f"step time {method.name} {device.type}")
