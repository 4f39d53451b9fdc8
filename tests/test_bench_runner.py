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
