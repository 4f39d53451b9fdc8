"""The runner keeps what it finished when interrupted."""

from __future__ import annotations

import json

import pytest

from psiopt.bench.report import validate_results
from psiopt.bench.runner import BenchConfig, run_benchmark
from psiopt.bench.suites import make_suite


def test_interrupted_run_keeps_finished_results(tmp_path):
    finished = []

    def stop_at_third(record):
        finished.append(record)
        if len(finished) == 3:
            raise KeyboardInterrupt

    out = tmp_path / "b"
    results = run_benchmark(BenchConfig(make_suite("cpu", quick=True), "cpu", out), on_run_done=stop_at_third)
    assert results.interrupted and not results.complete
    on_disk = json.loads((out / "results.json").read_text())
    validate_results(on_disk)
    assert on_disk["interrupted"] is True and on_disk["finished_at"] is not None
    # the three finished runs are there: the first method's first three grid points
    tuning = on_disk["training"][0]["methods"][0]["tuning"]
    assert [t["lr"] for t in tuning] == list(make_suite("cpu", quick=True).train[0].lr_grid)[:3]
    assert [t["final_loss"] for t in tuning] == pytest.approx([r.final_loss for r in finished], rel=1e-6)
    assert on_disk["scale_sweep"] == [] and on_disk["step_time"] == [] and on_disk["step_time_scaling"] == []
    report = (out / "report.md").read_text()
    assert "**Interrupted**" in report


def test_method_not_applicable_is_recorded(tmp_path):
    suite = make_suite("step-time", quick=True)
    from dataclasses import replace

    spec = replace(suite.step_time[0], model="small_resnet", model_kwargs={"in_channels": 1, "width": 4},
                   methods=("sgd", "enorm"))
    results = run_benchmark(BenchConfig(replace(suite, step_time=(spec,)), "cpu", tmp_path / "s"))
    validate_results(json.loads((tmp_path / "s" / "results.json").read_text()))
    by = {m.method: m for m in results.step_time[0].methods}
    assert by["sgd"].status == "ok" and by["sgd"].ratio_to_baseline > 0
    assert by["enorm"].status == "not_applicable" and "nn.Sequential" in by["enorm"].reason


def test_a_task_with_min_seeds_runs_more_seeds_than_the_suite(tmp_path):
    from dataclasses import replace

    from psiopt.bench.suites import DEFAULT_SEEDS, LANGUAGE_MODEL_SEEDS, task_seeds, with_seeds

    full_lm = next(t for t in make_suite("cpu").train if t.name == "stdlib-lm")
    assert task_seeds(full_lm, DEFAULT_SEEDS) == tuple(range(LANGUAGE_MODEL_SEEDS))
    assert task_seeds(full_lm, (3, 7)) == (3, 7, *range(8, 8 + LANGUAGE_MODEL_SEEDS - 2))
    assert task_seeds(replace(full_lm, min_seeds=2), (0, 1, 2)) == (0, 1, 2)  # never fewer than the suite's
    by_hand = with_seeds(make_suite("cpu"), (0, 1))  # seeds given by hand are every task's seeds
    assert all(task_seeds(t, by_hand.seeds) == (0, 1) for t in by_hand.train)

    quick = make_suite("cpu", quick=True)
    lm = replace(next(t for t in quick.train if t.name == "stdlib-lm"), min_seeds=2)
    suite = replace(quick, train=(lm,), sweeps=(), full_batch=None, step_time=(), step_scaling=None, discovery=())
    results = run_benchmark(BenchConfig(suite, "cpu", tmp_path / "lm"))
    validate_results(json.loads((tmp_path / "lm" / "results.json").read_text()))
    (task,) = results.training
    assert results.config.seeds == [0] and task.seeds == [0, 1]
    assert all([r.seed for r in m.runs] == [0, 1] and m.summary.seeds == 2 for m in task.methods)
    verdict = next(v for v in results.verdicts if v.target == "psiadamw-vs-adamw")
    assert verdict.difference_se is not None  # two seeds give it a standard error
    report = (tmp_path / "lm" / "report.md").read_text()
    assert "mean ± standard error over the seeds (2 seeds: 0-1)" in report and "| steps difference ± SE |" in report
