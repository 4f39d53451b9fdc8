"""Write a benchmark's results: the JSON file, its schema, the Markdown report, the stdout table.

Every number in the report and the table is read from the typed results
(:class:`~psiopt.bench.records.BenchResults`, the content of ``results.json``) and
printed with :func:`fmt`, so the report can be checked against the JSON: nothing in it
is typed in by hand.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from .records import (
    BenchResults, MethodTraining, PathTiming, ScalingPoint, StepTimeResult, TaskResult, Verdict, from_json, to_json, upgrade,
)  # fmt: skip

__all__ = [
    "SCHEMA_FILE",
    "load_schema",
    "validate_results",
    "write_json",
    "json_ready",
    "load_results",
    "fmt",
    "tables",
    "render_markdown",
    "render_table",
]

SCHEMA_FILE = "results.schema.json"
"""Name of the JSON Schema shipped in :mod:`psiopt.bench` (``psiopt/bench/results.schema.json``)."""


def load_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``results.json``."""
    text = resources.files("psiopt.bench").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def validate_results(results: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``results`` does not follow the schema."""
    import jsonschema

    jsonschema.validate(results, load_schema(), cls=jsonschema.Draft202012Validator)


def _clean(obj: Any) -> Any:
    """Floats rounded to 7 significant digits (float32 training holds no more); NaN/inf
    become ``None`` (JSON has no such numbers)."""
    if isinstance(obj, float):
        return float(f"{obj:.7g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def json_ready(results: BenchResults) -> BenchResults:
    """``results`` exactly as :func:`write_json` stores it (what the report is rendered from)."""
    return from_json(BenchResults, _clean(to_json(results)))


def load_results(path: Path) -> BenchResults:
    """Read a ``results.json``: brought to this version's layout
    (:func:`~psiopt.bench.records.upgrade`), validated against the schema, then as
    typed records."""
    data = upgrade(json.loads(Path(path).read_text(encoding="utf-8")))
    validate_results(data)
    return from_json(BenchResults, data)


def write_json(results: BenchResults, path: Path) -> None:
    """Write ``results`` to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".results-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_clean(to_json(results)), f, separators=(",", ":"), allow_nan=False)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fmt(x: Any, digits: int = 4) -> str:
    """A number as printed in the report: ``digits`` significant digits, ``-`` for ``None``."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _pm(mean: float | None, se: float | None) -> str:
    """``mean ± standard error`` (``-`` for what was not measured)."""
    if mean is None:
        return "-"
    return f"{fmt(mean)} ± {fmt(se)}"


def _lr_text(entry: MethodTraining) -> str:
    if entry.best_lr is None:
        return "-"
    if entry.base_lr is not None:
        return f"{fmt(entry.best_lr)} (others {fmt(entry.base_lr)})"
    return fmt(entry.best_lr)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _mib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**20


def _cold(record: StepTimeResult | ScalingPoint) -> str:
    """How the caches were left before each timed step, for a table's title."""
    if not record.cache_eviction_bytes:
        return ""
    return f", caches evicted before each step ({record.cache_eviction_bytes // 2**20} MiB rewritten)"


def _millions(n: int) -> str:
    return f"{n / 1e6:.3g}M"


SCALING_FAMILIES = {
    "sgd": ("SGD foreach", "SGD fused", "momentum 0.9"),
    "adam": ("AdamW foreach", "AdamW fused", "the Adam family with torch's defaults"),
}
"""The step-time curve's tables: each family of paths against its two torch peers."""


def _ratios(e: PathTiming, family: str) -> tuple[float | None, float | None]:
    if family == "adam":
        return e.ratio_to_adamw_foreach, e.ratio_to_adamw_fused
    return e.ratio_to_sgd_foreach, e.ratio_to_sgd_fused


def _scaling_table(device: str, points: list[ScalingPoint], family: str) -> tuple[str, list[str], list[list]] | None:
    """The step-time curve of one family of paths on one device, or ``None`` if it has none."""
    foreach, fused, what = SCALING_FAMILIES[family]
    rows = []
    for point in points:
        for e in point.paths:
            if e.family != family:
                continue
            size = f"{point.name}: {_millions(point.num_params)} ({point.num_tensors} tensors)"
            if e.status != "ok":
                rows.append([size, e.label, e.status, "-", "-", "-", "-"])
                continue
            to_foreach, to_fused = _ratios(e, family)
            rows.append(
                [
                    size,
                    e.label,
                    fmt(_ms(e.median_s), 3),
                    fmt(to_foreach, 3),
                    fmt(to_fused, 3),
                    fmt(_mib(e.step_peak_extra_bytes), 3),
                    fmt(_mib(e.extra_peak_vs_sgd_foreach_bytes), 3),
                ]
            )
    if not rows:
        return None
    first = points[0]
    scope = "" if family == "sgd" else ", the Adam family"
    copies = ", each path on its own copy of the parameters" if first.own_copies else ""
    return (
        f"step time against size on {device} ({first.device_name}){scope}, {first.threads} thread(s), {what}, "
        f"interleaved rounds{copies}{_cold(first)}",
        [
            "parameter set",
            "path",
            "median ms/step",
            f"ratio to {foreach}",
            f"ratio to {fused}",
            "step peak extra MiB",
            "peak vs SGD foreach MiB",
        ],
        rows,
    )


Table = tuple[str, list[str], list[list[str]]]


def _held_out_name(task: TaskResult) -> str:
    return "test accuracy" if task.metric == "accuracy" else "test loss"


def _target_text(task: TaskResult) -> str:
    quantity = "train loss" if task.target_on == "train_loss" else "validation loss"
    return f"target {quantity} {fmt(task.target_loss)}"


def _training_tables(results: BenchResults) -> list[Table]:
    out: list[Table] = []
    for task in results.training:
        rows = []
        for e in task.methods:
            s = e.summary
            if e.status != "ok" or s is None:
                rows.append([e.label, e.status, fmt(e.weight_decay), "-", "-", "-", "-", "-", "-"])
                continue
            held_out = _pm(s.test_acc_mean, s.test_acc_se) if task.metric == "accuracy" else _pm(
                s.test_loss_mean, s.test_loss_se
            )
            rows.append(
                [
                    e.label,
                    _lr_text(e),
                    fmt(e.weight_decay),
                    _pm(s.final_loss_mean, s.final_loss_se),
                    held_out,
                    f"{_pm(s.steps_to_target_mean, s.steps_to_target_se)} ({s.reached_target}/{s.seeds})",
                    fmt(s.seconds_to_target_mean),
                    fmt(s.train_seconds_mean),
                    f"{s.diverged}/{s.seeds}",
                ]
            )
        ds = task.dataset
        found = "" if task.scale_invariant is None else f"; discovery: {len(task.scale_invariant)} scale-invariant weights"
        title = (
            f"{task.task}: {task.model} on {ds.name} ({ds.train_size} train / {fmt(ds.val_size)} validation / "
            f"{ds.test_size} test), {task.steps} steps, batch {task.batch_size}, {_target_text(task)}{found}; "
            f"mean ± standard error over the seeds{_own_seeds_text(task, results)}"
        )
        headers = [
            "method",
            "lr (validation-best)",
            "weight decay",
            "final train loss",
            _held_out_name(task),
            "steps to target (reached)",
            "s to target",
            "train s/run",
            "diverged",
        ]
        out.append((title, headers, rows))
        out += _sensitivity_table(task, results)
    for sweep in results.scale_sweep:
        rows = []
        for e in sweep.methods:
            finals = ["diverged" if r.diverged else fmt(r.final_loss) for r in e.runs]
            finals += ["-"] * (len(sweep.scales) - len(finals))
            rows.append([e.label, *finals, fmt(e.final_loss_spread), fmt(e.mean_loss_spread)])
        eps = fmt(sweep.bn_eps) if sweep.bn_eps is not None else "default"
        out.append(
            (
                f"init-scale sweep on {sweep.task} (seed {sweep.seed}, BatchNorm eps {eps}): final train loss "
                "when every scale-invariant group starts multiplied by the scale",
                ["method", *[f"x{fmt(s)}" for s in sweep.scales], "spread (final)", "spread (mean over run)"],
                rows,
            )
        )
    return out


def _basin_text(entry: MethodTraining, grid: list[float]) -> str:
    if not entry.basin:
        return f"0/{len(grid)}"
    low, high = min(entry.basin), max(entry.basin)
    if low == high:
        return f"{len(entry.basin)}/{len(grid)} ({fmt(low)})"
    return f"{len(entry.basin)}/{len(grid)} ({fmt(low)}..{fmt(high)}, {math.log10(high / low):.3g} decades)"


def _sensitivity_table(task: TaskResult, results: BenchResults) -> list[Table]:
    """Steps to target at every grid lr of the tuning seed, with the final validation
    metric that chose the lr (marked ``*``), and each method's basin."""
    grid = task.lr_grid
    rows = []
    for e in task.methods:
        if not e.tuning:
            continue
        by = {t.lr: t for t in e.tuning}
        cells = []
        for lr in grid:
            t = by.get(lr)
            if t is None:
                cells.append("-")
            elif t.diverged:
                cells.append("diverged")
            else:
                steps = fmt(t.steps_to_target) if t.steps_to_target is not None else "not reached"
                cells.append(f"{steps} ({fmt(t.final_val_loss, 3)}){' *' if lr == e.best_lr else ''}")
        rows.append([e.label, *cells, _basin_text(e, grid)])
    if not rows:
        return []
    seed = results.config.seeds[0]
    title = (
        f"{task.task}: learning-rate sensitivity (seed {seed}): steps to target at each grid lr (final validation loss; "
        f"* the chosen lr); basin: the lrs within {fmt(results.config.basin_factor)}x the method's fewest steps"
    )
    return [(title, ["method", *[fmt(g) for g in grid], "basin"], rows)]


def _own_seeds_text(task: TaskResult, results: BenchResults) -> str:
    """`` (20 seeds: 0-19)`` where the task ran other seeds than the run's, else nothing."""
    if task.seeds is None or task.seeds == results.config.seeds:
        return ""
    consecutive = task.seeds == list(range(task.seeds[0], task.seeds[0] + len(task.seeds)))
    listed = f"{task.seeds[0]}-{task.seeds[-1]}" if consecutive else ", ".join(map(str, task.seeds))
    return f" ({len(task.seeds)} seeds: {listed})"


def _verdict_table(results: BenchResults) -> list[Table]:
    if not results.verdicts:
        return []
    rows = [
        [
            v.task,
            v.target,
            v.status,
            v.ours or "-",
            v.peer or "-",
            fmt(v.steps_ratio, 3),
            _steps_difference_text(v),
            _difference_text(v),
        ]
        for v in results.verdicts
    ]
    title = "verdicts (see the findings for each target and the reasons)"
    headers = ["task", "target", "verdict", "ours", "peer", "steps ratio", "steps difference ± SE",
               "test metric difference ± SE"]  # fmt: skip
    return [(title, headers, rows)]


def _steps_difference_text(v: Verdict) -> str:
    if v.steps_difference is None:
        return "-"
    return f"{v.steps_difference:+.1f} ± {v.steps_difference_se:.1f}"


def _difference_text(v: Verdict) -> str:
    if v.difference is None:
        return "-"
    if v.metric == "accuracy":
        return f"{100 * v.difference:+.2f} ± {100 * v.difference_se:.2f} points"
    return f"{v.difference:+.4f} ± {v.difference_se:.4f} loss"


def _full_batch_tables(results: BenchResults) -> list[Table]:
    if not results.full_batch:
        return []
    rows = []
    for p in results.full_batch:
        for r in p.runs:
            rows.append(
                [
                    fmt(p.condition_number),
                    fmt(p.init_scale),
                    r.method,
                    fmt(r.iterations) if r.iterations is not None else f"> {r.max_iters}",
                    fmt(r.forward_passes),  # None in results written before they were counted
                    fmt(r.backward_passes),
                    fmt(r.predicted_iterations),
                    fmt(r.measured_rate, 6),
                    fmt(r.predicted_rate, 6),
                    fmt(r.final_gap, 3),
                ]
            )
    title = f"full batch: sums of Rayleigh quotients, iterations to f - f* <= {fmt(results.full_batch[0].tol)}"
    headers = [
        "kappa", "init scale", "method", "iterations", "forward", "backward",
        "predicted", "measured rate", "predicted rate", "final gap",
    ]
    return [(title, headers, rows)]


def _step_time_tables(results: BenchResults) -> list[Table]:
    out: list[Table] = []
    for st in results.step_time:
        rows = [
            [
                "SGD foreach (baseline)",
                fmt(_ms(st.baseline_median_s)),
                "1",
                fmt(st.baseline_state_bytes),
                fmt(_mib(st.baseline_step_peak_extra_bytes), 3),
            ]
        ]
        for e in st.methods:
            if e.status != "ok":
                rows.append([e.label, e.status, "-", "-", "-"])
            else:
                rows.append(
                    [
                        e.label,
                        fmt(_ms(e.median_s)),
                        fmt(e.ratio_to_baseline, 3),
                        fmt(e.state_bytes),
                        fmt(_mib(e.step_peak_extra_bytes), 3),
                    ]
                )
        out.append(
            (
                f"optimizer step time on {st.device} ({st.device_name}), {st.model} "
                f"({fmt(st.param_bytes)} bytes of parameters), median of {st.repeats} interleaved steps{_cold(st)}",
                ["method", "median ms/step", "ratio to SGD foreach", "optimizer state bytes", "step peak extra MiB"],
                rows,
            )
        )
    by_device: dict[str, list[ScalingPoint]] = {}
    for point in results.step_time_scaling:
        by_device.setdefault(point.device, []).append(point)
    for device, points in by_device.items():
        for family in SCALING_FAMILIES:
            table = _scaling_table(device, points, family)
            if table is not None:
                out.append(table)
    for d in results.discovery_time:
        verdict = "within" if d.median_s <= d.target_s else "above"
        out.append(
            (
                f"scale-invariance discovery time ({d.threads} thread(s), input {'x'.join(map(str, d.input_shape))})",
                ["model", "parameters", "median s", "min s", "repeats", "found / expected", "target s", "verdict"],
                [
                    [
                        d.model + (f" {d.model_kwargs}" if d.model_kwargs else ""),
                        _millions(d.num_params),
                        fmt(d.median_s, 3),
                        fmt(d.min_s, 3),
                        str(d.repeats),
                        f"{d.found} / {d.expected}",
                        fmt(d.target_s),
                        verdict,
                    ]
                ],
            )
        )
    return out


def tables(results: BenchResults) -> list[Table]:
    """The report's tables as ``(title, headers, rows)``, rendered by both outputs."""
    return _verdict_table(results) + _training_tables(results) + _full_batch_tables(results) + _step_time_tables(results)


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _verdict_findings(results: BenchResults) -> list[str]:
    """One sentence per verdict, with its numbers."""
    labels = {name: m.get("label", name) for name, m in results.config.methods.items()}
    lines = []
    for v in results.verdicts:
        text = f"- **verdict {v.target}, {v.task}**: {v.status}"
        if v.ours is not None and v.peer is not None and v.steps_ratio is not None:
            text += (
                f": {labels.get(v.ours, v.ours)} reached the target in {fmt(v.ours_steps)} steps, "
                f"{labels.get(v.peer, v.peer)} in {fmt(v.peer_steps)} ({fmt(v.steps_ratio, 3)}x"
            )
            if v.steps_difference is not None:
                se = v.steps_difference_se
                se_units = f", {v.steps_difference / se:+.1f} standard errors" if se else ""
                text += f"; difference {_steps_difference_text(v)} steps{se_units}"
            text += ")"
            if v.difference is not None:
                se_units = f", {v.difference / v.difference_se:+.1f} standard errors" if v.difference_se else ""
                text += f"; test {v.metric} difference {_difference_text(v)}{se_units}"
        if v.reason:
            text += f" ({v.reason})"
        lines.append(text + ".")
    targets = dict.fromkeys(f"- target **{v.target}** ({v.metric}): {v.description}." for v in results.verdicts)
    return lines + list(targets)


def _discovery_findings(results: BenchResults) -> list[str]:
    """A warning for each task on which discovery found no scale-invariant weight (there
    psiopt's optimizers step every parameter as torch's optimizers do)."""
    return [
        f"- **{task.task}**: discovery found no scale-invariant weight in `{task.model}`, so psiopt's optimizers "
        "stepped every parameter as torch's would (PSI-Adam as Adam, PSI-AdamW as AdamW, PSI-SGD as SGD)."
        for task in results.training
        if task.scale_invariant == []
    ]


def _step_time_findings(results: BenchResults) -> list[str]:
    lines = []
    for st in results.step_time:
        by = {e.method: e for e in st.methods if e.status == "ok"}
        if "psisgd" in by:
            lines.append(
                f"- **step time ({st.model}, {st.device})**: one PSI-SGD step took "
                f"{fmt(by['psisgd'].ratio_to_baseline, 3)}x the time of torch SGD (foreach)."
            )
    for point in results.step_time_scaling:
        ok = [e for e in point.paths if e.status == "ok" and e.path.startswith("psi")]
        sgd = [e for e in ok if e.family == "sgd"]
        adam = [e for e in ok if e.family == "adam" and e.ratio_to_adamw_fused is not None]
        if sgd:
            ratios = ", ".join(f"{e.label} {fmt(e.ratio_to_sgd_foreach, 3)}x" for e in sgd)
            lines.append(
                f"- **step time at {_millions(point.num_params)} parameters ({point.name}, {point.device})**: "
                f"{ratios} the time of torch SGD (foreach)."
            )
        if adam:
            ratios = ", ".join(
                f"{e.label} {fmt(e.ratio_to_adamw_fused, 3)}x (foreach: {fmt(e.ratio_to_adamw_foreach, 3)}x)" for e in adam
            )
            lines.append(
                f"- **Adam family at {_millions(point.num_params)} parameters ({point.name}, {point.device})**: "
                f"{ratios} the time of torch AdamW fused (foreach)."
            )
    for d in results.discovery_time:
        verdict = "within" if d.median_s <= d.target_s else "above"
        lines.append(
            f"- **discovery ({d.model}, {_millions(d.num_params)} parameters, {d.threads} thread)**: "
            f"find_scale_invariant took {fmt(d.median_s, 3)} s (median of {d.repeats}), {verdict} the "
            f"{fmt(d.target_s)} s target; it found {d.found} of {d.expected} scale-invariant weights."
        )
    return lines


def _findings(results: BenchResults) -> list[str]:
    """The verdicts, step time and the init-scale sweep in sentences, computed from the results."""
    lines = _verdict_findings(results) + _discovery_findings(results) + _step_time_findings(results)
    for sweep in results.scale_sweep:
        by = {e.method: e for e in sweep.methods}
        if "sgd" in by and "psisgd" in by:
            lines.append(
                f"- **init-scale sweep ({sweep.task})**: spread of the final loss over scales "
                f"{', '.join(fmt(s) for s in sweep.scales)}: PSI-SGD {fmt(by['psisgd'].final_loss_spread)}, "
                f"SGD {fmt(by['sgd'].final_loss_spread)}."
            )
    return lines


_PROTOCOL = """\
## Protocol

- Data: every dataset in three disjoint parts. Training reads the training part; the
  validation part ({val_fraction} of the training data, stratified by class; the language
  model's text split by file) chooses each method's learning rate; the test part is read
  once per reported run, at its end, after the lr was chosen.
- Tuning: every method runs every lr of the task's grid with the first seed; the chosen lr
  has the lowest final validation loss; a diverged run is never chosen. Then
  every seed runs with it (the first seed's tuning run is its result); same initial weights
  and same minibatches for every method at a given seed; cosine decay to 0; momentum 0.9 in
  the SGD family.
- The swap: PSI-SGD, PSI-AdaSGD, PSI-Adam and PSI-AdamW run as the one-line replacement of
  SGD / Adam / AdamW, `psiopt.PSISGD(psiopt.param_groups(model, x), lr=lr, momentum=0.9,
  weight_decay=5e-4)`, with one lr from the same grid. RiemannianSGD on the sphere and SGD-G
  keep their own angular lr on the scale-invariant groups and SGD's tuned lr elsewhere (shown
  as "others"). The Adam family's lr is 0.1 x the grid value.
- Weight decay (column "weight decay"; one value per method on every task): 5e-4 for SGD and
  the SGD family (PSI-SGD, PSI-AdaSGD, SGDP, SGD-G and RSGD on their other parameters, the SGD
  of WN, ENorm and SBWN), 0 for Adam, PSI-Adam and RAdam on the sphere, 1e-2 (decoupled) for
  AdamW, PSI-AdamW and AdamP. psiopt's optimizers decay only the parameters that are not
  scale invariant.
- Train loss: minibatch loss averaged over the last {window} steps. Steps / seconds to target:
  the first step where the task's target quantity (the smoothed train loss, or the
  validation loss at an evaluation step) falls to the target (training time only,
  evaluation excluded). Mean ± standard error (sample std / sqrt(n)) over the seeds that
  did not diverge (a loss above 1e3 or not finite stops a run; the "diverged" column counts
  them); steps / seconds to target over the seeds that reached it.
- Learning-rate sensitivity: the tuning runs at every grid lr; a method's basin is the grid
  lrs at which it reached the target within {basin}x its fewest steps on the grid.
- Verdicts (psiopt.bench.verdicts): (a) PSI-SGD against the fastest of SGD, SGDP, SGD-G that
  reached the target on every seed: met if it reaches it on every seed in at most {ratio}x
  the peer's mean steps with a mean test accuracy at least the peer's minus one standard
  error of the difference (Welch); (b) the best of PSI-AdaSGD, PSI-Adam, PSI-AdamW against
  the fastest of Adam, AdamW, AdamP: at most {ratio}x the steps and a mean test accuracy no
  lower; on the language model the test loss replaces the accuracy (lower is better), and
  (c) PSI-AdamW must take no more steps than tuned AdamW.
- Init-scale sweep: the scale-invariant weights (every conv / hidden linear weight) are
  multiplied by each scale before the method builds its optimizer; same seed and batches;
  each method keeps its tuned lr. Spread = max - min over scales. The swept models' BatchNorm
  eps is set tiny (shown in the title): BN divides by sqrt(var + eps), so with the default
  1e-5 a group scaled by 1e-2 sees eps/1e-4 = 0.1 and the scaled start is a different
  network, not an equivalent one. Training is chaotic in float32: equivalent runs drift
  apart slowly through rounding, so spreads of PSI-invariant methods are small, not 0.
- Full batch: f(w) = Σ_j w_jᵀA_jw_j / w_jᵀw_j with every A_j of spectrum 1, 2, ..., 1+κ,
  f* from scipy.linalg.eigh. Predicted rate of the gap per iteration for a fixed angular step
  η: ρ(η)², ρ(η) = max_(i≥2) |1 - 2η(λ_i - λ_1)| (the Riemannian Hessian at the optimum is
  2(A - λ_1 I)); with η* = 1/(λ_2 + λ_d - 2λ_1), ρ = (κ-1)/(κ+1); predicted iterations
  log(gap_0/tol)/log(1/ρ²) (asymptotic). Euclidean GD uses the step η*·d (the same angular
  step at unit scale), fixed across scales. Measured rate: gap ratio per iteration on the tail
  (gaps from 1e-4 down). A run stops at min(max_iters, max(200, 3 x predicted iterations));
  "> N" means the tolerance was not reached in those N iterations. Forward / backward: the
  loss evaluations and gradients each method asked for over the run (one of each per
  iteration without line search; PSI-GD's line search adds a forward pass per trial, and no
  backward, as the runner's closure takes the `backward` flag).
- Step time: `optimizer.step()` (+ the method's after-step hook: ENorm / SBWN rescaling)
  with fixed gradients, one torch thread on CPU. Every step compared on one model is
  built first and timed interleaved: one step of each per round, the order rotating each
  round; before each timed step, off the clock, a buffer of twice the last-level cache
  (at least 64 MiB) is rewritten, so that every step starts with cold caches, as after
  a forward and backward pass in training. Median = median step time; ratio = median over rounds of the per-round ratio to
  `torch.optim.SGD(momentum=0.9, foreach=True)` (or `fused=True`) on the same parameters.
  State bytes: all tensors in `optimizer.state`. Extra peak: the highest memory allocated
  during one step above what was allocated before it (CUDA: `torch.cuda.max_memory_allocated`;
  CPU: the running sum of the allocator's allocations and frees recorded by `torch.profiler`
  with `profile_memory=True`), measured on extra steps outside the timed rounds.
- Scaling curve: the parameters of zoo models from 0.1M to 25.6M (ResNet-50's shapes), every
  conv / hidden linear weight marked with one group per output channel, fixed random
  gradients (each path its own copy of the parameters where the table says so; before,
  the paths stepped the same tensors). The SGD family (momentum 0.9: torch SGD,
  PSI-SGD, PSI-AdaSGD) is compared with torch SGD foreach and fused, the Adam family (torch's
  defaults: AdamW, PSI-AdamW, PSI-Adam) with torch AdamW foreach and fused, each ratio
  measured in the same rounds. A path the installed torch or psiopt does not offer is listed
  as unavailable, with its error.
- Discovery time: `psiopt.find_scale_invariant(model, x)` with one torch thread (the thread
  count is restored after), median over the repeats; found = weights it marked, expected =
  the zoo model's conv / hidden linear weights.
"""



def _unavailable_paths(results: BenchResults) -> list[str]:
    reasons: dict[tuple[str, str], str] = {}
    for point in results.step_time_scaling:
        for e in point.paths:
            if e.status != "ok" and e.reason:
                reasons.setdefault((e.label, point.device), f"{e.status}: {e.reason.splitlines()[0]}")
    return [f"- step path `{label}` on {device}: {text}" for (label, device), text in reasons.items()]


def _methods_section(results: BenchResults) -> list[str]:
    """The methods of the run's tasks with their summary line and weight decay."""
    run = dict.fromkeys(e.method for task in results.training for e in task.methods)
    lines = []
    for name in run:
        m = results.config.methods.get(name, {})
        decay = m.get("weight_decay")
        decay_text = f"; weight decay {fmt(decay)}" if decay is not None else ""
        lines.append(f"- **{m.get('label', name)}** (`{name}`): {m.get('summary', '')}{decay_text}")
    return ["## Methods", "", *lines, ""] if lines else []


def render_markdown(results: BenchResults) -> str:
    """The Markdown report (``report.md``)."""
    env = results.environment
    lines = [f"# psiopt benchmark: suite `{results.suite}`" + (" (quick)" if results.quick else ""), ""]
    if results.interrupted:
        lines += ["**Interrupted**: this report holds only the runs finished before the interruption.", ""]
    lines += [
        f"- started {results.started_at}, finished {results.finished_at}, wall time {fmt(results.wall_time_s)} s",
        f"- seeds: {', '.join(str(s) for s in results.config.seeds)}; device: {env.device}",
        "- wall time of each part: "
        + (", ".join(f"{name} {fmt(sec, 3)} s" for name, sec in results.part_seconds.items()) or "-"),
        f"- psiopt {env.psiopt_version}, torch {env.torch_version}, geoopt {env.geoopt_version}, "
        f"Python {env.python_version}, git commit {env.git_commit or 'unknown'}",
        f"- CPU: {env.cpu_name} ({env.torch_threads} torch threads); GPU: {env.gpu_name or 'none'}",
        "",
    ]
    findings = _findings(results)
    if findings:
        lines += ["## Findings", "", *findings, ""]
    not_run = [f"- `{k}`: {v}" for k, v in results.unavailable_methods.items()] + _unavailable_paths(results)
    if not_run:
        lines += ["## Methods not run", "", *not_run, ""]
    for title, headers, rows in tables(results):
        lines += [f"## {title}", "", _md_table(headers, rows), ""]
    for task in results.training:
        for e in task.methods:
            if e.status not in ("ok", "diverged") and e.reason:
                lines.append(f"- {task.task} / {e.label}: {e.status}: {e.reason.splitlines()[0]}")
    lines += ["", *_methods_section(results)]
    if results.plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p}]({p})" for p in results.plots]
    config = results.config
    lines += [
        "",
        _PROTOCOL.format(
            window=config.smoothing_window,
            val_fraction="-" if config.validation_fraction is None else f"{config.validation_fraction:.3g}",
            basin=fmt(config.basin_factor),
            ratio=fmt(config.steps_ratio_target),
        ),
    ]
    return "\n".join(lines) + "\n"


def render_table(results: BenchResults) -> str:
    """The plain-text tables printed on stdout."""
    blocks = []
    for title, headers, rows in tables(results):
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
        body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        blocks.append("\n".join([title, line, "-" * len(line), *body]))
    return "\n\n".join(blocks) + "\n"
