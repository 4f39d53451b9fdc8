r"""Step time and step memory: the one harness that times optimizer steps.

Three measurements, all on fixed gradients (only ``optimizer.step()`` is timed):

* :func:`measure_methods`: every benchmark method's step (plus its after-step hook,
  ENorm's or SBWN's rescaling) on one model, against ``torch.optim.SGD(foreach=True)``.
* :func:`measure_scaling_point`: one parameter set of the scaling curve, each optimizer
  *path* of :data:`PATHS` (torch SGD foreach and fused; PSI-SGD's loop, foreach and
  fused steps; PSI-AdaSGD's fused step; torch AdamW foreach and fused; PSI-AdamW's
  foreach and fused steps; PSI-Adam's fused step) on the same parameters, against SGD
  foreach and fused and AdamW foreach and fused, and the extra peak memory of each
  path's step.
* :func:`measure_discovery`: the wall time of :func:`psiopt.find_scale_invariant`.

Protocol
--------
* **Interleaved**: all the steps compared on one model are built first, then timed in
  rounds, one step of each per round, the order rotating from round to round; so a
  slow spell of a shared machine hits every path alike. The *ratio* of a path to a
  baseline is the median over rounds of the per-round ratio; the *median* is the
  median step time.
* **Cold caches**: before every timed step, a buffer of :func:`cache_eviction_bytes`
  (twice the last-level cache) is rewritten, outside the clock. In training the
  forward and backward passes run between two optimizer steps and leave little of the
  weights and optimizer state in cache; and without it, a step's time would depend on
  which path ran just before it on the same parameters (one that leaves the weights
  and gradients in cache flatters the next).
* **Threads**: on CPU every step-time measurement and discovery run with one torch
  thread (the thread count is restored afterwards); CUDA steps are synchronized
  before the clock stops.
* **Memory**: the extra peak of one step is the highest memory allocated during it
  above what was allocated before it. On CUDA it is
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU it is
  read from the allocation events that ``torch.profiler`` records with
  ``profile_memory=True`` (every allocation and free of the CPU allocator, in order):
  the maximum of their running sum during the step, less its value when the step
  began. It is measured on extra steps outside the timed rounds (profiling slows the
  step).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import geoopt
import torch
import torch.nn.functional as F
from torch import nn

from . import models as zoo
from .environment import device_name
from .methods import MOMENTUM, BuildContext, MethodNotApplicable, zoo_scale_invariant_layers
from .records import DiscoveryTime, MethodStepTime, PathTiming, ScalingPoint, StepTimeResult, to_json
from .suites import DiscoverySpec, ScalingPointSpec, StepScalingSpec, StepTimeSpec
from .training import Done, available_methods, sync

__all__ = [
    "LR",
    "StepPath",
    "PATHS",
    "BASELINE_PATH",
    "FUSED_BASELINE_PATH",
    "ADAM_BASELINE_PATH",
    "ADAM_FUSED_BASELINE_PATH",
    "memory_method",
    "step_peak_extra_bytes",
    "cache_eviction_bytes",
    "interleaved_times",
    "median_ratio",
    "one_thread_on_cpu",
    "measure_methods",
    "measure_scaling_point",
    "measure_discovery",
]

LR = 0.01
"""Learning rate of every timed step (the time does not depend on it)."""


@dataclass(frozen=True)
class StepPath:
    """One way to take an optimizer step on a parameter set. ``family`` says which peers
    the report compares it with: ``"sgd"`` (SGD with momentum: torch's SGD foreach and
    fused) or ``"adam"`` (torch's AdamW foreach and fused)."""

    name: str
    label: str
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    family: str = "sgd"


def _psisgd(**options) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        import psiopt

        return psiopt.PSISGD(params, lr=LR, momentum=MOMENTUM, **options)

    return make


def _sgd(**options) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **options)

    return make


def _adamw(**options) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=LR, **options)

    return make


def _psiopt(name: str, **options) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    """``psiopt.<name>`` with its defaults and lr :data:`LR`."""

    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        import psiopt

        return getattr(psiopt, name)(params, lr=LR, **options)

    return make


PATHS: tuple[StepPath, ...] = (
    StepPath("sgd-foreach", "torch SGD foreach", _sgd(foreach=True)),
    StepPath("sgd-fused", "torch SGD fused", _sgd(fused=True)),
    StepPath("psisgd-loop", "PSI-SGD loop", _psisgd(foreach=False)),
    StepPath("psisgd-foreach", "PSI-SGD foreach", _psisgd(foreach=True)),
    StepPath("psisgd-fused", "PSI-SGD fused", _psisgd(fused=True)),
    StepPath("psisgd-constant-foreach", "PSI-SGD constant foreach", _psisgd(foreach=True, angular_rate="constant")),
    StepPath("psisgd-constant-fused", "PSI-SGD constant fused", _psisgd(fused=True, angular_rate="constant")),
    StepPath("psiadasgd-fused", "PSI-AdaSGD fused", _psiopt("PSIAdaSGD", momentum=MOMENTUM, fused=True)),
    StepPath("adamw-foreach", "torch AdamW foreach", _adamw(foreach=True), "adam"),
    StepPath("adamw-fused", "torch AdamW fused", _adamw(fused=True), "adam"),
    StepPath("psiadamw-foreach", "PSI-AdamW foreach", _psiopt("PSIAdamW", foreach=True), "adam"),
    StepPath("psiadamw-fused", "PSI-AdamW fused", _psiopt("PSIAdamW", fused=True), "adam"),
    StepPath("psiadam-fused", "PSI-Adam fused", _psiopt("PSIAdam", fused=True), "adam"),
)
"""The optimizer paths of the scaling curve: SGD with momentum 0.9 (torch's and PSI-SGD's
steps, at its default 'sgd' angular rate and at the constant one, PSI-AdaSGD's fused step) and the Adam family with its defaults (torch's AdamW,
PSI-AdamW's foreach and fused steps, PSI-Adam's fused step)."""

BASELINE_PATH = "sgd-foreach"
FUSED_BASELINE_PATH = "sgd-fused"
ADAM_BASELINE_PATH = "adamw-foreach"
ADAM_FUSED_BASELINE_PATH = "adamw-fused"


# -- measuring ----------------------------------------------------------------------------


def memory_method(device: torch.device) -> str:
    """How :func:`step_peak_extra_bytes` measures on ``device`` (recorded with the results)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before the step"
    return "torch.profiler(profile_memory=True): maximum running sum of the CPU allocator's allocations and frees"


def step_peak_extra_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak memory allocated during one ``step()`` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile, record_function

    # The profiler cannot see the size of a block allocated before it started, so a free
    # of such a block is missing from its events: the step measured is the second one
    # profiled, whose frees of blocks from the first are all recorded.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        with record_function(_MEASURED_STEP):
            step()
    events = prof.profiler.kineto_results.events()
    (measured,) = [e for e in events if e.name() == _MEASURED_STEP]
    begin, end = measured.start_ns(), measured.start_ns() + measured.duration_ns()
    memory = sorted(
        (e for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"), key=lambda e: e.start_ns()
    )
    running = 0
    at_begin = peak = None
    for event in memory:
        if event.start_ns() >= begin and at_begin is None:
            at_begin = peak = running
        running += event.nbytes()
        if begin <= event.start_ns() <= end:
            peak = max(peak, running)
    return 0 if at_begin is None else peak - at_begin


_MEASURED_STEP = "psiopt.bench: measured step"


def _last_level_cache_bytes(device: torch.device) -> int | None:
    """The largest cache of ``device``: the GPU's L2, or the CPU's largest cache level as
    Linux reports it (``None`` where neither is known)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=None)


MIN_CACHE_EVICTION_BYTES = 64 * 2**20
"""The least that :func:`cache_eviction_bytes` rewrites (used where the cache size is unknown)."""


def cache_eviction_bytes(device: torch.device) -> int:
    """Bytes rewritten before every timed step to leave the caches cold: twice the
    last-level cache of ``device``, at least :data:`MIN_CACHE_EVICTION_BYTES`."""
    return max(MIN_CACHE_EVICTION_BYTES, 2 * (_last_level_cache_bytes(device) or 0))


def interleaved_times(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    warmup: int,
    repeats: int,
    min_repeats: int | None = None,
    budget_s: float | None = None,
    evict_bytes: int = 0,
) -> dict[str, list[float]]:
    """Time one call of each of ``steps`` per round; return the seconds of every round, by name.

    ``warmup`` untimed rounds first (they allocate momentum buffers and compile kernels).
    Up to ``repeats`` rounds; after ``min_repeats`` rounds, stop once ``budget_s``
    seconds have passed. The order of the steps rotates by one each round. With
    ``evict_bytes``, a buffer of that size is rewritten before every timed step, off
    the clock (see *Cold caches* above).
    """
    evictor = torch.zeros(evict_bytes // 4, dtype=torch.float32, device=device) if evict_bytes else None
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if evictor is not None:
                evictor.add_(1.0)  # read and written: every line of it passes through the cache
                sync(device)
            start = time.perf_counter()
            steps[name]()
            sync(device)
            samples[name].append(time.perf_counter() - start)
        if (
            budget_s is not None
            and r + 1 >= (min_repeats or repeats)
            and time.perf_counter() - started > budget_s
        ):
            break
    return samples


def median_ratio(samples: list[float], baseline: list[float]) -> float:
    """Median over rounds of the per-round ratio ``samples[r] / baseline[r]``."""
    return statistics.median(s / b for s, b in zip(samples, baseline))


@contextmanager
def one_thread_on_cpu(device: torch.device) -> Iterator[int]:
    """Run the block with one torch thread on CPU; restore the thread count after. Yields the count used."""
    if device.type != "cpu":
        yield torch.get_num_threads()
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(threads)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    tensors = [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(v.numel() * v.element_size() for v in tensors)


# -- every method on one model ------------------------------------------------------------


def measure_methods(
    spec: StepTimeSpec, device: torch.device, unavailable: dict[str, str], done: Done
) -> StepTimeResult:
    """Step time and memory of every method of ``spec`` against SGD foreach, interleaved."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((spec.batch_size, *spec.input_shape), generator=gen).to(device)
    y = torch.randint(0, 10, (spec.batch_size,), generator=gen).to(device)
    record = StepTimeResult(
        device=str(device),
        device_name=device_name(device),
        model=spec.model,
        model_kwargs=to_json(spec.model_kwargs),
        batch_size=spec.batch_size,
        warmup=spec.warmup,
        repeats=spec.repeats,
        baseline="torch.optim.SGD(momentum=0.9, foreach=True)",
        memory_method=memory_method(device),
    )

    def prepared(method=None) -> tuple[Callable[[], None], torch.optim.Optimizer, int]:
        torch.manual_seed(0)
        model = zoo.build(spec.model, spec.model_kwargs).to(device).train()
        hook = None
        if method is None:
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, foreach=True)
        else:
            setup = method.build(model, BuildContext(lr=LR, base_lr=LR, example=x))
            model, opt, hook = setup.model, setup.optimizer, setup.after_step
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()  # gradients stay fixed while timing

        def step() -> None:
            opt.step()
            if hook is not None:
                hook()

        param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        return step, opt, param_bytes

    with one_thread_on_cpu(device):
        steps: dict[str, Callable[[], None]] = {}
        optimizers: dict[str, torch.optim.Optimizer] = {}
        base_step, base_opt, record.param_bytes = prepared()
        steps[BASELINE_PATH], optimizers[BASELINE_PATH] = base_step, base_opt
        for method in available_methods(spec.methods, unavailable):
            entry = MethodStepTime(method=method.name, label=method.label)
            record.methods.append(entry)
            try:
                steps[method.name], optimizers[method.name], _ = prepared(method)
            except MethodNotApplicable as exc:
                entry.status, entry.reason = "not_applicable", str(exc)
        record.cache_eviction_bytes = cache_eviction_bytes(device)
        samples = interleaved_times(steps, device, spec.warmup, spec.repeats, evict_bytes=record.cache_eviction_bytes)
        base = samples[BASELINE_PATH]
        record.baseline_median_s = statistics.median(base)
        record.baseline_state_bytes = _state_bytes(optimizers[BASELINE_PATH])
        record.baseline_step_peak_extra_bytes = step_peak_extra_bytes(steps[BASELINE_PATH], device)
        for entry in record.methods:
            if entry.status != "ok":
                continue
            entry.median_s = statistics.median(samples[entry.method])
            entry.ratio_to_baseline = median_ratio(samples[entry.method], base)
            entry.state_bytes = _state_bytes(optimizers[entry.method])
            entry.step_peak_extra_bytes = step_peak_extra_bytes(steps[entry.method], device)
            done(entry, f"step time {entry.method} {device.type}")
    return record


# -- the scaling curve -------------------------------------------------------------------


def _marked_parameters(point: ScalingPointSpec, device: torch.device) -> list[nn.Parameter]:
    """The parameters of ``point``'s zoo model, its scale-invariant weights marked with one
    group per output channel, each with a fixed random gradient."""
    torch.manual_seed(0)
    model = zoo.build(point.model, point.model_kwargs, point.num_classes).to(device)
    import psiopt

    for layer in zoo_scale_invariant_layers(model):
        layer.weight = geoopt.ManifoldParameter(layer.weight.detach(), manifold=psiopt.PSIManifold("channel"))
    gen = torch.Generator(device=device).manual_seed(0)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device)
    return params


def _own_copy(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """A copy of ``params`` (same classes, manifolds, values and layouts) for one path, sharing
    their gradients (which no step writes): each path steps weights that only it writes, as
    in training, where an optimizer's kept state (PSIAdam's check pass reads a weight only
    when something else wrote it) stays valid from one step to the next."""
    copies = []
    for p in params:
        data = p.detach().clone()
        q = (
            geoopt.ManifoldParameter(data, manifold=p.manifold)
            if isinstance(p, geoopt.ManifoldParameter)
            else nn.Parameter(data)
        )
        q.grad = p.grad
        copies.append(q)
    return copies


def _build_path(path: StepPath, params: list[nn.Parameter]) -> tuple[torch.optim.Optimizer | None, str | None]:
    try:
        return path.make(params), None
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def measure_scaling_point(
    point: ScalingPointSpec, spec: StepScalingSpec, device: torch.device, paths: tuple[StepPath, ...] = PATHS
) -> ScalingPoint:
    """Every path of ``paths`` on the parameters of ``point``, interleaved.

    A path whose optimizer refuses its option (an installed torch or psiopt without it)
    is recorded as ``"unavailable"``; one whose first step raises as ``"failed"``;
    both with the error as the reason. Each path steps its own copy of the parameters
    (:func:`_own_copy`); the gradients are shared.
    """
    import psiopt

    params = _marked_parameters(point, device)
    with one_thread_on_cpu(device) as threads:
        record = ScalingPoint(
            name=point.name,
            model=point.model,
            model_kwargs=to_json(point.model_kwargs),
            device=str(device),
            device_name=device_name(device),
            threads=threads,
            num_params=sum(p.numel() for p in params),
            num_psi_params=sum(p.numel() for p in params if psiopt.is_scale_invariant(p)),
            num_tensors=len(params),
            warmup=spec.warmup,
            repeats=0,
            memory_method=memory_method(device),
            own_copies=True,
        )
        steps: dict[str, Callable[[], None]] = {}
        for path in paths:
            entry = PathTiming(path=path.name, label=path.label, family=path.family)
            record.paths.append(entry)
            opt, reason = _build_path(path, _own_copy(params))
            if opt is None:
                entry.status, entry.reason = "unavailable", reason
                continue
            try:
                opt.step()  # the first step allocates the momentum buffers and compiles kernels
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
                entry.status, entry.reason = "failed", f"{type(exc).__name__}: {exc}"
                continue
            steps[path.name] = opt.step
        record.cache_eviction_bytes = cache_eviction_bytes(device)
        samples = interleaved_times(
            steps, device, spec.warmup, spec.repeats, spec.min_repeats, spec.budget_s, record.cache_eviction_bytes
        )
        record.repeats = len(next(iter(samples.values()), []))
        peaks = {name: step_peak_extra_bytes(step, device) for name, step in steps.items()}
    def ratio(times: list[float], baseline: str) -> float | None:
        return median_ratio(times, samples[baseline]) if baseline in samples else None

    for entry in record.paths:
        if entry.status != "ok":
            continue
        times = samples[entry.path]
        entry.median_s = statistics.median(times)
        entry.ratio_to_sgd_foreach = ratio(times, BASELINE_PATH)
        entry.ratio_to_sgd_fused = ratio(times, FUSED_BASELINE_PATH)
        entry.ratio_to_adamw_foreach = ratio(times, ADAM_BASELINE_PATH)
        entry.ratio_to_adamw_fused = ratio(times, ADAM_FUSED_BASELINE_PATH)
        entry.step_peak_extra_bytes = peaks[entry.path]
        if BASELINE_PATH in peaks:
            entry.extra_peak_vs_sgd_foreach_bytes = peaks[entry.path] - peaks[BASELINE_PATH]
    return record


# -- discovery --------------------------------------------------------------------------


def measure_discovery(spec: DiscoverySpec, unavailable: dict[str, str]) -> DiscoveryTime | None:
    """Wall time of :func:`psiopt.find_scale_invariant` on ``spec``'s model, on one CPU thread.

    A transformers model that cannot be built (transformers missing, or without that
    class) is not timed: ``unavailable["discovery:<model>"]`` says why, and ``None`` is
    returned.
    """
    import psiopt

    reason = _unavailable_reason(spec)
    if reason is not None:
        unavailable[f"discovery:{spec.model}"] = reason
        return None
    model, example, expected = _discovery_model(spec)
    seconds = []
    with one_thread_on_cpu(torch.device("cpu")) as threads:
        for _ in range(spec.repeats):
            start = time.perf_counter()
            report = psiopt.find_scale_invariant(model, example)
            seconds.append(time.perf_counter() - start)
    return DiscoveryTime(
        model=spec.model,
        model_kwargs=to_json(spec.model_kwargs),
        num_params=sum(p.numel() for p in model.parameters()),
        input_shape=list(example.shape),
        threads=threads,
        repeats=spec.repeats,
        median_s=statistics.median(seconds),
        min_s=min(seconds),
        found=len(report),
        expected=expected,
        target_s=spec.target_s,
    )


def _unavailable_reason(spec: DiscoverySpec) -> str | None:
    if spec.source != "transformers":
        return None
    try:
        import transformers
    except ImportError:
        return "transformers is not installed, so this discovery time was not measured (pip install 'psiopt[bench]')"
    if not hasattr(transformers, spec.model):
        return f"transformers {transformers.__version__} has no {spec.model}, so this discovery time was not measured"
    return None


def _discovery_model(spec: DiscoverySpec) -> tuple[nn.Module, torch.Tensor, int]:
    """The model (random weights), an example batch, and how many scale-invariant weights it has."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if spec.source == "transformers":
        import transformers

        cls = getattr(transformers, spec.model)
        model = cls(cls.config_class(**spec.model_kwargs))
        tokens = torch.randint(0, model.config.vocab_size, (spec.batch_size, *spec.input_shape), generator=gen)
        # A QK-norm (Qwen3's q_norm and k_norm) makes the attention's q_proj and k_proj invariant.
        expected = sum(2 for m in model.modules() if hasattr(m, "q_norm") and hasattr(m, "k_norm"))
        return model, tokens, expected
    model = zoo.build(spec.model, spec.model_kwargs, spec.num_classes)
    example = torch.randn((spec.batch_size, *spec.input_shape), generator=gen)
    return model, example, len(zoo_scale_invariant_layers(model))
