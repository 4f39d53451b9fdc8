"""Run a benchmark suite and record everything it measures.

:func:`run_benchmark` runs the parts of a :class:`~psiopt.bench.suites.Suite` in order
(training tasks and their verdicts, init-scale sweeps, full-batch problems, step time, the step-time
scaling curve, discovery time) and collects their records in one
:class:`~psiopt.bench.records.BenchResults`. The results file is rewritten as runs
finish (at most every 2 s, and after every part), and always when the benchmark
stops, so an interrupted benchmark (Ctrl-C) keeps every run it had finished; that final
write marks it ``"interrupted": true``.

The measurement protocols live with the parts: :mod:`psiopt.bench.training`
(minibatch runs, tuning, sweeps), :mod:`psiopt.bench.rayleigh` (full batch) and
:mod:`psiopt.bench.steptime` (step time, memory, discovery time).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import data as bench_data
from .environment import environment
from .methods import METHODS, MOMENTUM
from .rayleigh import FULL_BATCH_METHODS, make_rayleigh, run_full_batch
from .records import BenchResults, FullBatchProblem, FullBatchRun, MethodTraining, RunConfig, from_json, to_json
from .steptime import measure_discovery, measure_methods, measure_scaling_point
from .suites import (
    DiscoverySpec, FullBatchSpec, ScaleSweep, StepScalingSpec, StepTimeSpec, Suite, TrainTask, task_seeds,
)
from .training import (
    BASIN_FACTOR,
    DIVERGED_LOSS,
    SMOOTHING,
    load_dataset,
    run_sweep,
    run_task,
    sweep_record,
    task_record,
)
from .verdicts import STEPS_RATIO_TARGET, task_verdicts

__all__ = [
    "BenchConfig",
    "run_benchmark",
    "SMOOTHING",
    "DIVERGED_LOSS",
]

RunCallback = Callable[[Any], None]


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Recorder:
    """Holds the results and rewrites ``results.json`` atomically.

    :meth:`save` writes at most once per ``min_interval`` seconds (the file grows to
    about a megabyte, and writing it after each of hundreds of short runs would cost
    more than the runs); :meth:`flush` always writes (after each part, and at the end
    or on interruption).
    """

    def __init__(self, path: Path, results: BenchResults, min_interval: float = 2.0):
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


def _step_time_devices(suite: Suite, device: torch.device) -> list[torch.device]:
    """The run's device, plus CUDA when present on a CPU run of a suite other than gpu."""
    if suite.name != "gpu" and torch.cuda.is_available() and device.type != "cuda":
        return [device, torch.device("cuda")]
    return [device]


def _count_units(suite: Suite, devices: int) -> int:
    total = 0
    for task in suite.train:
        total += len(task.methods) * (len(task.lr_grid) + len(task_seeds(task, suite.seeds)) - 1)
    for sweep in suite.sweeps:
        total += len(sweep.methods) * len(sweep.scales)
    if suite.full_batch is not None:
        fb = suite.full_batch
        total += len(fb.condition_numbers) * len(fb.scales) * len(fb.methods)
    total += devices * sum(len(spec.methods) for spec in suite.step_time)
    if suite.step_scaling is not None:
        total += devices * len(suite.step_scaling.points)
    return total + len(suite.discovery)


def _run_config(config: BenchConfig) -> RunConfig:
    suite = config.suite
    return RunConfig(
        suite=suite.name,
        description=suite.description,
        quick=config.quick,
        synthetic=config.synthetic,
        seeds=list(suite.seeds),
        device=config.device,
        data_dir=None if config.data_dir is None else str(config.data_dir),
        smoothing_window=SMOOTHING,
        diverged_loss=DIVERGED_LOSS,
        momentum=MOMENTUM,
        validation_fraction=bench_data.VALIDATION_FRACTION,
        basin_factor=BASIN_FACTOR,
        steps_ratio_target=STEPS_RATIO_TARGET,
        train=[to_json(t) for t in suite.train],
        sweeps=[to_json(s) for s in suite.sweeps],
        full_batch=None if suite.full_batch is None else to_json(suite.full_batch),
        step_time=[to_json(s) for s in suite.step_time],
        step_time_scaling=None if suite.step_scaling is None else to_json(suite.step_scaling),
        discovery_time=[to_json(s) for s in suite.discovery],
        methods={
            name: {
                "label": m.label,
                "summary": m.summary,
                "weight_decay": m.weight_decay,
                "lr_unit": m.lr_unit,
                "own_si_lr": m.own_si_lr,
            }
            for name, m in METHODS.items()
        },
        full_batch_methods={name: {"label": m.label, "summary": m.summary} for name, m in FULL_BATCH_METHODS.items()},
    )


def run_benchmark(config: BenchConfig, on_run_done: RunCallback | None = None) -> BenchResults:
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
    BenchResults
        The results (as written to ``results.json``); ``results.interrupted`` tells
        whether the run was cut short.
    """
    from .plots import make_plots
    from .report import json_ready, render_markdown

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = _Run(config, out_dir, on_run_done)
    results = run.results
    try:
        run.all_parts()
        results.complete = True
    except KeyboardInterrupt:
        results.interrupted = True
    finally:
        run.progress.close()
        results.finished_at = _now()
        results.wall_time_s = time.perf_counter() - started
        run.recorder.flush()
        try:
            results.plots = make_plots(json_ready(results), out_dir)
        finally:
            run.recorder.flush()
            (out_dir / "report.md").write_text(render_markdown(json_ready(results)), encoding="utf-8")
    return results


class _Run:
    """One benchmark run: the results being filled, the results file, the progress bar.

    Each part of the suite is a method; :meth:`part` times it into
    ``results.part_seconds`` and writes the results file after it.
    """

    def __init__(self, config: BenchConfig, out_dir: Path, on_run_done: RunCallback | None):
        self.config = config
        self.suite = config.suite
        self.device = torch.device(config.device)
        self.on_run_done = on_run_done
        self.results = BenchResults(
            suite=self.suite.name,
            quick=config.quick,
            started_at=_now(),
            config=_run_config(config),
            environment=environment(str(self.device)),
        )
        self.recorder = _Recorder(out_dir / "results.json", self.results)
        self.recorder.flush()
        self.step_devices = _step_time_devices(self.suite, self.device)
        self.progress = _Progress(_count_units(self.suite, len(self.step_devices)), config.progress)
        self.datasets: dict[str, bench_data.Dataset | bench_data.TextDataset] = {}
        self.tuned: dict[str, dict[str, MethodTraining]] = {}

    def done(self, record: Any, text: str) -> None:
        """A run finished: save the results (throttled), tick the progress bar, call the hook."""
        self.recorder.save()
        self.progress.tick(text)
        if self.on_run_done is not None:
            self.on_run_done(record)

    def part(self, name: str, run: Callable[..., None], *args: Any) -> None:
        start = time.perf_counter()
        run(*args)
        self.results.part_seconds[name] = time.perf_counter() - start
        self.recorder.flush()

    def all_parts(self) -> None:
        suite = self.suite
        for task in suite.train:
            self.part(f"training:{task.name}", self.train, task)
        for sweep in suite.sweeps:
            self.part(f"scale_sweep:{sweep.task}", self.sweep, sweep)
        if suite.full_batch is not None:
            self.part("full_batch", _run_full_batch, suite.full_batch, self.results, self.done)
        for spec in suite.step_time:
            for device in self.step_devices:
                self.part(f"step_time:{spec.model}:{device}", self.step_time, spec, device)
        if suite.step_scaling is not None:
            for device in self.step_devices:
                self.part(f"step_time_scaling:{device}", self.step_scaling, suite.step_scaling, device)
        for spec in suite.discovery:
            self.part(f"discovery_time:{spec.model}", self.discovery, spec)

    def train(self, task: TrainTask) -> None:
        dataset = self.datasets[task.name] = load_dataset(task, self.config.data_dir).to(self.device)
        seeds = task_seeds(task, self.suite.seeds)
        record = task_record(task, dataset, seeds)
        self.results.training.append(record)
        self.tuned[task.name] = run_task(
            task, dataset, seeds, self.device, self.results.unavailable_methods, record, self.done
        )
        self.results.verdicts += task_verdicts(record)  # once every run of the task finished

    def sweep(self, sweep: ScaleSweep) -> None:
        task = next(t for t in self.suite.train if t.name == sweep.task)
        seed = self.suite.seeds[0]
        record = sweep_record(sweep, seed)
        self.results.scale_sweep.append(record)
        run_sweep(sweep, task, self.datasets[task.name], self.tuned[task.name], seed, self.device, record, self.done)

    def step_time(self, spec: StepTimeSpec, device: torch.device) -> None:
        self.results.step_time.append(measure_methods(spec, device, self.results.unavailable_methods, self.done))

    def step_scaling(self, spec: StepScalingSpec, device: torch.device) -> None:
        for point in spec.points:
            record = measure_scaling_point(point, spec, device)
            self.results.step_time_scaling.append(record)
            self.done(record, f"step scaling {point.name} {device.type}")

    def discovery(self, spec: DiscoverySpec) -> None:
        record = measure_discovery(spec, self.results.unavailable_methods)
        if record is None:  # not measurable here: unavailable_methods says why
            self.progress.tick(f"discovery {spec.model}: not run")
            return
        self.results.discovery_time.append(record)
        self.done(record, f"discovery {spec.model}")


def _run_full_batch(spec: FullBatchSpec, results: BenchResults, done: Callable[[Any, str], None]) -> None:
    methods = []
    for name in spec.methods:
        m = FULL_BATCH_METHODS[name]
        reason = m.unavailable_reason()
        if reason is None:
            methods.append(m)
        else:
            results.unavailable_methods[f"full-batch:{name}"] = reason
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
            entry = FullBatchProblem(
                condition_number=kappa,
                init_scale=scale,
                groups=spec.groups,
                dim=spec.dim,
                f_star=problem.f_star,
                optimal_step=problem.optimal_step,
                predicted_rate=problem.contraction(problem.optimal_step) ** 2,
                tol=spec.tol,
            )
            results.full_batch.append(entry)
            for method in methods:
                # rayleigh.py returns its record as a dict: a new key there needs its field in FullBatchRun
                run = from_json(FullBatchRun, run_full_batch(method, problem, direction * scale, spec.tol, max_iters))
                entry.runs.append(run)
                done(run, f"rayleigh k={kappa:g} {method.name}")
