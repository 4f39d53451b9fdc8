"""The benchmark's results as typed records, and their JSON form.

Every part of a run produces dataclass records (a :class:`TrainRun` per training run,
a :class:`ScalingPoint` per parameter set of the step-time curve, ...), collected in one
:class:`BenchResults`. The runner fills them, :mod:`psiopt.bench.report` and
:mod:`psiopt.bench.plots` read them by attribute, and :func:`to_json` /
:func:`from_json` convert them to and from the content of ``results.json`` (whose JSON
Schema, ``results.schema.json``, has the same field names). A field is added in one
place here (plus its line in the schema); :func:`from_json` refuses a key that no field
holds, naming the record, so a producer and this module cannot drift apart silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

__all__ = [
    "SCHEMA_VERSION",
    "Environment",
    "RunConfig",
    "DatasetInfo",
    "Curve",
    "Evaluation",
    "TrainRun",
    "Summary",
    "TuningPoint",
    "MethodTraining",
    "TaskResult",
    "SweepMethod",
    "SweepResult",
    "FullBatchRun",
    "FullBatchProblem",
    "MethodStepTime",
    "StepTimeResult",
    "PathTiming",
    "ScalingPoint",
    "DiscoveryTime",
    "BenchResults",
    "to_json",
    "from_json",
]

SCHEMA_VERSION = 2
"""Version of ``results.json``'s layout (2: typed records, step-time scaling curve, discovery time)."""

MethodStatus = Literal["ok", "not_applicable", "diverged", "skipped"]
PathStatus = Literal["ok", "unavailable", "failed"]


@dataclass
class Environment:
    """Where the benchmark ran: device, library versions, git commit, CPU/GPU names."""

    device: str
    torch_version: str
    psiopt_version: str
    geoopt_version: str | None
    python_version: str
    platform: str
    git_commit: str | None
    cpu_name: str | None
    cpu_count: int | None
    torch_threads: int
    cuda_available: bool
    gpu_name: str | None


@dataclass
class RunConfig:
    """What was run. ``train``, ``sweeps``, ``full_batch``, ``step_time``, ``step_time_scaling``
    and ``discovery_time`` are the suite's specs as JSON; ``methods`` and
    ``full_batch_methods`` describe the registered methods."""

    suite: str
    description: str
    quick: bool
    synthetic: bool
    seeds: list[int]
    device: str
    data_dir: str | None
    smoothing_window: int
    diverged_loss: float
    momentum: float
    train: list[dict[str, Any]]
    sweeps: list[dict[str, Any]]
    full_batch: dict[str, Any] | None
    step_time: list[dict[str, Any]]
    step_time_scaling: dict[str, Any] | None
    discovery_time: dict[str, Any] | None
    methods: dict[str, dict[str, Any]]
    full_batch_methods: dict[str, dict[str, Any]]


# -- training ---------------------------------------------------------------------------


@dataclass
class DatasetInfo:
    """A dataset's name, sizes, input shape and number of classes."""

    name: str
    train_size: int
    test_size: int
    input_shape: list[int]
    num_classes: int


@dataclass
class Curve:
    """Smoothed training loss at recorded steps, with the cumulative training time."""

    step: list[int]
    loss: list[float]
    time_s: list[float]


@dataclass
class Evaluation:
    """Test accuracy (evaluation mode) at the evaluation steps."""

    step: list[int]
    test_acc: list[float]


@dataclass
class TrainRun:
    """One training run: one method, learning rate, seed and initial scale."""

    seed: int
    lr: float
    base_lr: float | None
    init_scale: float
    diverged: bool
    steps_done: int
    final_loss: float | None
    final_test_acc: float | None
    steps_to_target: int | None
    seconds_to_target: float | None
    train_seconds: float
    curve: Curve
    eval: Evaluation


@dataclass
class Summary:
    """Mean (and sample std) over the seeds of a method's runs at its tuned lr."""

    seeds: int
    diverged: int
    final_loss_mean: float | None
    final_loss_std: float | None
    test_acc_mean: float | None
    test_acc_std: float | None
    reached_target: int
    steps_to_target_mean: float | None
    seconds_to_target_mean: float | None
    train_seconds_mean: float | None


@dataclass
class TuningPoint:
    """Final loss of the tuning run at one grid learning rate."""

    lr: float
    final_loss: float | None
    diverged: bool


@dataclass
class MethodTraining:
    """One method on one task: its tuning, its runs at the tuned lr, their summary."""

    method: str
    label: str
    status: MethodStatus = "ok"
    reason: str | None = None
    best_lr: float | None = None
    base_lr: float | None = None
    tuning: list[TuningPoint] = field(default_factory=list)
    runs: list[TrainRun] = field(default_factory=list)
    summary: Summary | None = None


@dataclass
class TaskResult:
    """A training task and every method's result on it."""

    task: str
    dataset: DatasetInfo
    model: str
    model_kwargs: dict[str, Any]
    batch_size: int
    steps: int
    lr_grid: list[float]
    target_loss: float
    schedule: str
    methods: list[MethodTraining] = field(default_factory=list)


@dataclass
class SweepMethod:
    """One method's runs over the initial scales, and the spread of their losses."""

    method: str
    label: str
    lr: float
    base_lr: float | None
    runs: list[TrainRun] = field(default_factory=list)
    final_loss_spread: float | None = None
    mean_loss_spread: float | None = None


@dataclass
class SweepResult:
    """The init-scale sweep of one task."""

    task: str
    scales: list[float]
    seed: int
    bn_eps: float | None
    methods: list[SweepMethod] = field(default_factory=list)


# -- full batch -------------------------------------------------------------------------


@dataclass
class FullBatchRun:
    """One full-batch method on one Rayleigh problem (the record of
    :func:`psiopt.bench.rayleigh.run_full_batch`)."""

    method: str
    iterations: int | None
    max_iters: int
    initial_gap: float
    final_gap: float | None
    seconds: float
    measured_rate: float | None
    predicted_rate: float | None
    predicted_iterations: int | None
    curve_iters: list[int]
    curve_gap: list[float | None]
    #: Loss evaluations and gradients asked for over the run (None in results written before they were counted).
    forward_passes: int | None = None
    backward_passes: int | None = None


@dataclass
class FullBatchProblem:
    """One Rayleigh problem (condition number, initial scale) and every method's run."""

    condition_number: float
    init_scale: float
    groups: int
    dim: int
    f_star: float
    optimal_step: float
    predicted_rate: float
    tol: float
    runs: list[FullBatchRun] = field(default_factory=list)


# -- step time --------------------------------------------------------------------------


@dataclass
class MethodStepTime:
    """One benchmark method's optimizer step (plus its after-step hook) on one model."""

    method: str
    label: str
    status: Literal["ok", "not_applicable"] = "ok"
    reason: str | None = None
    median_s: float | None = None
    ratio_to_baseline: float | None = None
    state_bytes: int | None = None
    step_peak_extra_bytes: int | None = None


@dataclass
class StepTimeResult:
    """Every method's step time on one model and device, against SGD foreach."""

    device: str
    device_name: str | None
    model: str
    model_kwargs: dict[str, Any]
    batch_size: int
    warmup: int
    repeats: int
    baseline: str
    baseline_median_s: float | None = None
    baseline_state_bytes: int | None = None
    baseline_step_peak_extra_bytes: int | None = None
    param_bytes: int | None = None
    memory_method: str | None = None
    cache_eviction_bytes: int | None = None
    methods: list[MethodStepTime] = field(default_factory=list)


@dataclass
class PathTiming:
    """One optimizer path (``sgd-fused``, ``psisgd-loop``, ``psiadamw-fused``, ...) on one
    parameter set. ``family`` (``"sgd"`` or ``"adam"``) names the peers the report
    compares it with; the ratios to all four peers are recorded where they ran.

    ``status`` is ``"unavailable"`` when the installed torch or psiopt does not offer the
    path (its constructor refused the option), ``"failed"`` when it was built but its
    step raised; ``reason`` says why.
    """

    path: str
    label: str
    status: PathStatus = "ok"
    reason: str | None = None
    median_s: float | None = None
    ratio_to_sgd_foreach: float | None = None
    ratio_to_sgd_fused: float | None = None
    step_peak_extra_bytes: int | None = None
    extra_peak_vs_sgd_foreach_bytes: int | None = None
    family: str = "sgd"
    ratio_to_adamw_foreach: float | None = None
    ratio_to_adamw_fused: float | None = None


@dataclass
class ScalingPoint:
    """The step time of every optimizer path on one parameter set (one point of the curve)."""

    name: str
    model: str
    model_kwargs: dict[str, Any]
    device: str
    device_name: str | None
    threads: int
    num_params: int
    num_psi_params: int
    num_tensors: int
    warmup: int
    repeats: int
    memory_method: str
    cache_eviction_bytes: int | None = None
    paths: list[PathTiming] = field(default_factory=list)
    own_copies: bool = False  # each path stepped its own copy of the parameters (results before: shared)


@dataclass
class DiscoveryTime:
    """Wall time of :func:`psiopt.find_scale_invariant` on one model, against a target."""

    model: str
    model_kwargs: dict[str, Any]
    num_params: int
    input_shape: list[int]
    threads: int
    repeats: int
    median_s: float
    min_s: float
    found: int
    expected: int
    target_s: float


# -- the whole run ----------------------------------------------------------------------


@dataclass
class BenchResults:
    """Everything one ``psiopt bench`` run measured (the content of ``results.json``)."""

    suite: str
    quick: bool
    started_at: str
    config: RunConfig
    environment: Environment
    schema_version: int = SCHEMA_VERSION
    interrupted: bool = False
    complete: bool = False
    finished_at: str | None = None
    wall_time_s: float | None = None
    part_seconds: dict[str, float] = field(default_factory=dict)
    unavailable_methods: dict[str, str] = field(default_factory=dict)
    training: list[TaskResult] = field(default_factory=list)
    scale_sweep: list[SweepResult] = field(default_factory=list)
    full_batch: list[FullBatchProblem] = field(default_factory=list)
    step_time: list[StepTimeResult] = field(default_factory=list)
    step_time_scaling: list[ScalingPoint] = field(default_factory=list)
    discovery_time: list[DiscoveryTime] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


# -- JSON -------------------------------------------------------------------------------


def to_json(record: Any) -> Any:
    """A record (or list / dict of records) as JSON-ready dicts, lists and scalars."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: to_json(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if isinstance(record, dict):
        return {str(k): to_json(v) for k, v in record.items()}
    if isinstance(record, (list, tuple)):
        return [to_json(v) for v in record]
    return record


R = TypeVar("R")


def from_json(cls: type[R], data: Any) -> R:
    """Build the record ``cls`` from its JSON form (what :func:`to_json` gives).

    Raises
    ------
    ValueError
        If ``data`` has a key that ``cls`` (or a nested record) has no field for, or
        lacks a field that has no default; the message names the record and the key.
    """
    return _convert(cls, data, cls.__name__)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(options[0], value, where) if len(options) == 1 else value
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        return {k: _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object for {tp.__name__}, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ValueError(
                f"{where}: {tp.__name__} has no field {', '.join(map(repr, unknown))}; add it to "
                "psiopt/bench/records.py (and results.schema.json)"
            )
        missing = [
            name
            for name, f in fields.items()
            if name not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"{where}: {tp.__name__} lacks {', '.join(map(repr, missing))}")
        return tp(**{k: _convert(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    return value
