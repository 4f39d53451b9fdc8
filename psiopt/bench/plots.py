"""PNG plots of a benchmark's results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
import numpy as np

from .records import BenchResults, ScalingPoint, TaskResult, TrainRun

__all__ = ["make_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(runs: list[TrainRun], key: str, target_on: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The mean over the runs of the quantity the target applies to: the smoothed train
    loss against steps or training time (``key``), or the validation loss at the
    evaluation steps (``target_on="val_loss"``, against steps only)."""
    full = [r for r in runs if not r.diverged and r.curve.step]
    if not full:
        return None
    if target_on == "val_loss":
        if key != "step":
            return None
        n = min(len(r.eval.step) for r in full)
        return np.asarray(full[0].eval.step[:n]), np.mean([r.eval.val_loss[:n] for r in full], axis=0)
    n = min(len(r.curve.step) for r in full)
    x = np.mean([getattr(r.curve, key)[:n] for r in full], axis=0)
    y = np.mean([r.curve.loss[:n] for r in full], axis=0)
    return x, y


def _save(fig, out_dir: Path, name: str, names: list[str], bottom: float = 0.14) -> None:
    # fixed margins: matplotlib's automatic layouts cost ~0.5 s of text measuring per figure
    fig.subplots_adjust(left=0.1, right=0.97, bottom=bottom, top=0.9, wspace=0.25, hspace=0.4)
    fig.savefig(out_dir / name, dpi=80)
    names.append(name)


def make_plots(results: BenchResults, out_dir: Path) -> list[str]:
    """Write the plots into ``out_dir``; return their file names (relative to ``out_dir``)."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    names: list[str] = []
    for task in results.training:
        for key, xlabel, suffix in (("step", "step", "loss-vs-steps"), ("time_s", "training time (s)", "loss-vs-time")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            drawn = False
            for e in task.methods:
                curve = _mean_curve(e.runs, key, task.target_on) if e.status == "ok" else None
                if curve is None:
                    continue
                ax.plot(*curve, label=f"{e.label} (lr {e.best_lr:g})", lw=1.4)
                drawn = True
            if not drawn:
                plt.close(fig)
                continue
            ax.axhline(task.target_loss, color="gray", ls=":", lw=1, label="target")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(
                "validation loss" if task.target_on == "val_loss"
                else f"train loss (mean of last {results.config.smoothing_window} steps)"
            )
            ax.set_title(f"{task.task}: mean over {len(task.seeds or results.config.seeds)} seed(s)")
            ax.legend(fontsize=7)
            _save(fig, out_dir, f"{task.task}-{suffix}.png", names)
            plt.close(fig)
        _sensitivity_plot(plt, task, out_dir, names)
    for sweep in results.scale_sweep:
        methods = [e for e in sweep.methods if e.runs]
        if not methods:
            continue
        cols = min(3, len(methods))
        rows = int(np.ceil(len(methods) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
        for ax, e in zip(axes.flat, methods):
            for r in e.runs:
                if r.curve.step:
                    ax.plot(r.curve.step, r.curve.loss, lw=1.2, label=f"x{r.init_scale:g}")
            spread = e.final_loss_spread
            ax.set_title(f"{e.label}: spread {spread:.3g}" if spread is not None else e.label, fontsize=9)
            ax.set_yscale("log")
            ax.set_xlabel("step")
        for ax in axes.flat[len(methods) :]:
            ax.axis("off")
        axes[0][0].set_ylabel("train loss")
        axes[0][0].legend(fontsize=7, title="init scale")
        fig.suptitle(f"init-scale sweep on {sweep.task}", fontsize=10)
        _save(fig, out_dir, f"{sweep.task}-scale-sweep.png", names)
        plt.close(fig)
    if results.full_batch:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        problems = results.full_batch
        methods = sorted({r.method for p in problems for r in p.runs})
        scales = sorted({p.init_scale for p in problems})
        markers = ["o", "s", "^", "D", "v"]
        for mi, m in enumerate(methods):
            for si, s in enumerate(scales):
                pts = [
                    (p.condition_number, r.iterations if r.iterations is not None else r.max_iters, r.iterations is None)
                    for p in problems
                    if p.init_scale == s
                    for r in p.runs
                    if r.method == m
                ]
                if not pts:
                    continue
                ks, its, capped = zip(*pts)
                line = ax1.plot(ks, its, marker=markers[si % len(markers)], ls="-" if s == 1.0 else "--", color=f"C{mi}", lw=1,
                                label=f"{m} x{s:g}")[0]
                for k, it, c in pts:
                    if c:
                        ax1.plot([k], [it], marker="x", color=line.get_color(), ms=10)
        predicted = sorted(
            {
                (p.condition_number, r.predicted_iterations)
                for p in problems
                for r in p.runs
                if r.predicted_iterations is not None
            }
        )
        if predicted:
            ks, its = zip(*predicted)
            ax1.plot(ks, its, color="k", lw=2, alpha=0.4, label="predicted (rate ρ(η*)²)")
        ax1.set_xscale("log")
        ax1.set_yscale("log")
        ax1.set_xlabel("condition number κ")
        ax1.set_ylabel(f"iterations to gap {problems[0].tol:g} (x: not reached)")
        ax1.legend(fontsize=6, ncol=2)
        hardest = max(p.condition_number for p in problems)
        for p in problems:
            if p.condition_number != hardest:
                continue
            for mi, m in enumerate(methods):
                for r in p.runs:
                    if r.method == m:
                        gaps = np.array([g if g is not None and g > 0 else np.nan for g in r.curve_gap], dtype=float)
                        ax2.plot(np.maximum(r.curve_iters, 1), gaps, color=f"C{mi}",
                                 ls="-" if p.init_scale == 1.0 else "--", lw=1, label=f"{m} x{p.init_scale:g}")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("iteration")
        ax2.set_ylabel("f - f*")
        ax2.set_title(f"κ = {hardest:g}")
        ax2.legend(fontsize=6, ncol=2)
        _save(fig, out_dir, "full-batch.png", names)
        plt.close(fig)
    for st in results.step_time:
        ok = [e for e in st.methods if e.status == "ok"]
        if not ok:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar([e.label for e in ok], [e.ratio_to_baseline for e in ok], color="C0")
        ax.axhline(1.0, color="k", lw=1, ls=":")
        ax.set_ylabel("median step time / SGD(foreach=True)")
        ax.set_title(f"step time, {st.model} on {st.device}", fontsize=10)
        plt.setp(ax.get_xticklabels(), rotation=35, ha="right", fontsize=8)
        device = st.device.replace(":", "")
        _save(fig, out_dir, f"step-time-{st.model}-{device}.png", names, bottom=0.3)
        plt.close(fig)
    by_device: dict[str, list[ScalingPoint]] = {}
    for point in results.step_time_scaling:
        by_device.setdefault(point.device, []).append(point)
    for device, points in by_device.items():
        device_name = device.replace(":", "")
        _scaling_plot(plt, points, out_dir, f"step-time-scaling-{device_name}.png", names, "sgd")
        _scaling_plot(plt, points, out_dir, f"step-time-scaling-adam-{device_name}.png", names, "adam")
    return names


def _scaling_plot(plt, points: list[ScalingPoint], out_dir: Path, name: str, names: list[str], family: str) -> None:
    """Ratio to the family's peer (SGD foreach; for the Adam family AdamW fused, the
    issue's target) against the number of parameters, one line per path of the family."""
    labels = list(dict.fromkeys(e.label for p in points for e in p.paths if e.status == "ok" and e.family == family))
    if not labels:
        return
    peer = "AdamW(fused=True)" if family == "adam" else "SGD(foreach=True)"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, label in enumerate(labels):
        pts = sorted(
            (p.num_params, e.ratio_to_adamw_fused if family == "adam" else e.ratio_to_sgd_foreach)
            for p in points
            for e in p.paths
            if e.label == label and e.status == "ok"
        )
        ax.plot(*zip(*pts), marker="o", lw=1.4, color=f"C{i}", label=label)
    ax.axhline(1.0, color="k", lw=1, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"median step time / {peer}")
    ax.set_title(f"optimizer step time against size on {points[0].device}, {points[0].threads} thread(s)", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, out_dir, name, names)
    plt.close(fig)


def _sensitivity_plot(plt, task: TaskResult, out_dir: Path, names: list[str]) -> None:
    """Steps to target against the grid lr (the tuning runs), one line per method; a grid
    lr whose run did not reach the target (or diverged) is an x at the top of the plot."""
    methods = [e for e in task.methods if e.tuning]
    if not methods:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ceiling = task.steps * 1.08
    for i, e in enumerate(methods):
        color = f"C{i % 10}"
        points = sorted((t.lr, t.steps_to_target) for t in e.tuning if not t.diverged and t.steps_to_target)
        if points:
            ax.plot(*zip(*points), marker="o", lw=1.4, color=color, label=e.label)
        missed = [t.lr for t in e.tuning if t.diverged or not t.steps_to_target]
        if missed:
            ax.plot(missed, [ceiling] * len(missed), ls="", marker="x", color=color, label=None if points else e.label)
    ax.axhline(task.steps, color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_ylim(0, ceiling * 1.05)
    ax.set_xlabel("learning rate (grid value; the Adam family uses 0.1x)")
    ax.set_ylabel("steps to target (x: not reached or diverged)")
    ax.set_title(f"{task.task}: learning-rate sensitivity (tuning seed)")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, out_dir, f"{task.task}-lr-sensitivity.png", names)
    plt.close(fig)
