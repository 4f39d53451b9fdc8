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

import copy
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
    "TextSource",
    "TuningPoint",
    "Verdict",
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
    "upgrade",
]

SCHEMA_VERSION = 3
"""Version of ``results.json``'s layout (2: typed records, step-time scaling curve, discovery
time; 3: the validation split, tuning on it, standard errors, lr sensitivity, weight
decays, verdicts, the language-model task)."""

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
    ``full_batch_methods`` describe the registered methods (label, summary, weight decay,
    lr unit, own_si_lr). ``validation_fraction``, ``basin_factor`` and
    ``steps_ratio_target`` are the protocol's constants (see :mod:`psiopt.bench.training`
    and :mod:`psiopt.bench.verdicts`)."""

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
    validation_fraction: float | None
    basin_factor: float | None
    steps_ratio_target: float | None
    train: list[dict[str, Any]]
    sweeps: list[dict[str, Any]]
    full_batch: dict[str, Any] | None
    step_time: list[dict[str, Any]]
    step_time_scaling: dict[str, Any] | None
    # one spec per model; results written before there were several hold one spec, or null
    discovery_time: list[dict[str, Any]] | dict[str, Any] | None
    methods: dict[str, dict[str, Any]]
    full_batch_methods: dict[str, dict[str, Any]]


# -- training ---------------------------------------------------------------------------


@dataclass
class TextSource:
    """Where a language-modelling dataset's bytes come from: the Python version whose
    standard library they are, the selection rule, and per part (train, validation,
    test) its number of files and bytes and the SHA-256 of its bytes."""

    python_version: str
    selection: str
    train_files: int
    train_bytes: int
    train_sha256: str
    val_files: int
    val_bytes: int
    val_sha256: str
    test_files: int
    test_bytes: int
    test_sha256: str


@dataclass
class DatasetInfo:
    """A dataset's name, the sizes of its three parts, input shape and number of classes
    (for text: training bytes, validation and test windows, and where the text is from)."""

    name: str
    train_size: int
    val_size: int | None
    test_size: int
    input_shape: list[int]
    num_classes: int
    text: TextSource | None = None


@dataclass
class Curve:
    """Smoothed training loss at recorded steps, with the cumulative training time."""

    step: list[int]
    loss: list[float]
    time_s: list[float]


@dataclass
class Evaluation:
    """Validation loss and accuracy (evaluation mode) at the evaluation steps."""

    step: list[int]
    val_loss: list[float]
    val_acc: list[float]


@dataclass
class TrainRun:
    """One training run: one method, learning rate, seed and initial scale.

    ``final_loss`` is the smoothed training loss at the end; ``final_val_*`` the
    validation metrics at the end; ``final_test_*`` the test metrics, measured once at
    the end (for a tuning run only once its lr was chosen; ``None`` for runs that no
    result reads, such as the other grid points and the init-scale sweep).
    """

    seed: int
    lr: float
    base_lr: float | None
    init_scale: float
    diverged: bool
    steps_done: int
    final_loss: float | None
    final_val_acc: float | None
    final_val_loss: float | None
    final_test_acc: float | None
    final_test_loss: float | None
    steps_to_target: int | None
    seconds_to_target: float | None
    train_seconds: float
    curve: Curve
    eval: Evaluation


@dataclass
class Summary:
    """Mean, sample std and standard error (std / sqrt(n)) over the seeds of a method's
    runs at its tuned lr; steps and seconds to target over the seeds that reached it."""

    seeds: int
    diverged: int
    final_loss_mean: float | None
    final_loss_std: float | None
    final_loss_se: float | None
    test_acc_mean: float | None
    test_acc_std: float | None
    test_acc_se: float | None
    test_loss_mean: float | None
    test_loss_std: float | None
    test_loss_se: float | None
    reached_target: int
    steps_to_target_mean: float | None
    steps_to_target_se: float | None
    seconds_to_target_mean: float | None
    train_seconds_mean: float | None


@dataclass
class TuningPoint:
    """The tuning run at one grid learning rate: what picks the lr (the final validation
    metrics) and the lr sensitivity (steps to target)."""

    lr: float
    diverged: bool
    final_loss: float | None
    final_val_acc: float | None
    final_val_loss: float | None
    steps_to_target: int | None


@dataclass
class MethodTraining:
    """One method on one task: its tuning, its runs at the tuned lr, their summary.

    ``basin`` is the grid lrs whose tuning run reached the target within
    ``basin_factor`` times the fewest steps any grid lr took (see
    :func:`psiopt.bench.training.lr_basin`)."""

    method: str
    label: str
    weight_decay: float | None = None
    status: MethodStatus = "ok"
    reason: str | None = None
    best_lr: float | None = None
    base_lr: float | None = None
    tuning: list[TuningPoint] = field(default_factory=list)
    basin: list[float] = field(default_factory=list)
    runs: list[TrainRun] = field(default_factory=list)
    summary: Summary | None = None


@dataclass
class TaskResult:
    """A training task and every method's result on it (``metric`` and ``target_on`` as
    in :class:`psiopt.bench.suites.TrainTask`). ``scale_invariant`` names the weights
    discovery put in scale-invariant groups for psiopt's optimizers (``None`` when none
    of them ran). ``seeds`` are the task's (:func:`psiopt.bench.suites.task_seeds`; ``None``
    in results written before tasks had their own: the run's)."""

    task: str
    dataset: DatasetInfo
    model: str
    model_kwargs: dict[str, Any]
    batch_size: int
    steps: int
    lr_grid: list[float]
    target_loss: float
    schedule: str
    metric: Literal["accuracy", "loss"]
    target_on: Literal["train_loss", "val_loss"]
    eval_every: int | None
    scale_invariant: list[str] | None = None
    methods: list[MethodTraining] = field(default_factory=list)
    seeds: list[int] | None = None


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


# -- verdicts ---------------------------------------------------------------------------


@dataclass
class Verdict:
    """One target of one task, checked on the results (:mod:`psiopt.bench.verdicts`).

    ``ours`` and ``peer`` are the two methods compared; ``steps_ratio`` is ours' mean
    steps to target over the peer's, ``steps_difference`` ours' mean steps minus the
    peer's and ``steps_difference_se`` its standard error (Welch; ``None`` in results
    written before it); ``difference`` is ours' mean held-out metric
    minus the peer's (test accuracy, or test loss where ``metric`` is ``"loss"``:
    there a negative difference is better), ``difference_se`` its standard error
    (Welch). ``status`` is ``"met"``, ``"not met"``, or ``"no verdict"`` (with the
    reason: a side without a method that reached the target on every seed, fewer than 2
    seeds).
    """

    task: str
    target: str
    description: str
    status: Literal["met", "not met", "no verdict"]
    metric: Literal["accuracy", "loss"]
    ours: str | None = None
    peer: str | None = None
    ours_steps: float | None = None
    peer_steps: float | None = None
    steps_ratio: float | None = None
    difference: float | None = None
    difference_se: float | None = None
    reason: str | None = None
    steps_difference: float | None = None
    steps_difference_se: float | None = None


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
    verdicts: list[Verdict] = field(default_factory=list)
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


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A ``results.json`` content of an older layout in this version's (a new dict).

    Version 2 (the protocol before the validation split: learning rates picked by the
    final training loss) had no validation metrics, standard errors, lr sensitivity,
    recorded weight decays or verdicts: they come out ``null`` (empty lists), not
    measured. Its test accuracy along training (which version 3 never reads before a
    run's end) is dropped. Version 3 comes back as it is.

    Raises
    ------
    ValueError
        For a version this module does not know.
    """
    version = data.get("schema_version")
    if version == SCHEMA_VERSION:
        return data
    if version != 2:
        raise ValueError(f"results of schema version {version!r}: this psiopt reads versions 2 and {SCHEMA_VERSION}")
    out = copy.deepcopy(data)
    out["schema_version"] = SCHEMA_VERSION
    out["verdicts"] = []
    out["config"].update(validation_fraction=None, basin_factor=None, steps_ratio_target=None)
    runs = []
    for task in out["training"]:
        task.update(metric="accuracy", target_on="train_loss", eval_every=None, scale_invariant=None)
        task["dataset"]["val_size"] = None
        for method in task["methods"]:
            method.update(weight_decay=None, basin=[])
            method["tuning"] = [
                {**t, "final_val_acc": None, "final_val_loss": None, "steps_to_target": None} for t in method["tuning"]
            ]
            if method["summary"] is not None:
                method["summary"].update(
                    final_loss_se=None, test_acc_se=None, test_loss_mean=None, test_loss_std=None, test_loss_se=None,
                    steps_to_target_se=None,
                )
            runs += method["runs"]
    runs += [run for sweep in out["scale_sweep"] for method in sweep["methods"] for run in method["runs"]]
    for run in runs:
        run.update(final_val_acc=None, final_val_loss=None, final_test_loss=None)
        run["eval"] = {"step": [], "val_loss": [], "val_acc": []}
    return out
