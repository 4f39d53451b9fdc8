"""Typed results records: JSON round trip, clear errors for keys no record holds."""

from __future__ import annotations

import pytest

from psiopt.bench.records import (
    FullBatchRun,
    MethodStepTime,
    PathTiming,
    ScalingPoint,
    from_json,
    to_json,
)


def _scaling_point() -> ScalingPoint:
    return ScalingPoint(
        name="p", model="cnn_bn", model_kwargs={"width": 2}, device="cpu", device_name=None, threads=1,
        num_params=10, num_psi_params=8, num_tensors=3, warmup=1, repeats=2, memory_method="m",
        paths=[PathTiming("sgd-foreach", "SGD", median_s=1e-3, ratio_to_sgd_foreach=1.0),
               PathTiming("psisgd-fused", "PSI fused", status="unavailable", reason="TypeError: fused")],
    )


def test_round_trip_keeps_nested_records():
    point = _scaling_point()
    data = to_json(point)
    assert data["paths"][1] == {
        "path": "psisgd-fused", "label": "PSI fused", "status": "unavailable", "reason": "TypeError: fused",
        "median_s": None, "ratio_to_sgd_foreach": None, "ratio_to_sgd_fused": None,
        "step_peak_extra_bytes": None, "extra_peak_vs_sgd_foreach_bytes": None,
        "family": "sgd", "ratio_to_adamw_foreach": None, "ratio_to_adamw_fused": None,
    }
    back = from_json(ScalingPoint, data)
    assert back == point and isinstance(back.paths[0], PathTiming)


def test_results_written_before_the_adam_family_was_timed_still_load():
    data = to_json(_scaling_point())
    for path in data["paths"]:
        for key in ("family", "ratio_to_adamw_foreach", "ratio_to_adamw_fused"):
            del path[key]
    back = from_json(ScalingPoint, data)
    assert [p.family for p in back.paths] == ["sgd", "sgd"] and back.paths[0].ratio_to_adamw_fused is None


def test_unknown_key_names_the_record_and_the_fix():
    data = to_json(MethodStepTime("sgd", "SGD"))
    data["cuda_step_peak_extra_bytes"] = 1
    with pytest.raises(ValueError, match=r"MethodStepTime has no field 'cuda_step_peak_extra_bytes'.*records\.py"):
        from_json(MethodStepTime, data)


def test_missing_required_field_is_named():
    run = {"method": "gd", "iterations": 3, "max_iters": 10, "initial_gap": 1.0, "final_gap": 0.0, "seconds": 0.1,
           "measured_rate": None, "predicted_rate": None, "predicted_iterations": None, "curve_iters": [0],
           "curve_gap": [1.0]}
    assert from_json(FullBatchRun, run).iterations == 3
    del run["seconds"]
    with pytest.raises(ValueError, match="FullBatchRun lacks 'seconds'"):
        from_json(FullBatchRun, run)
    data = to_json(_scaling_point())
    data["paths"][1] = 3
    with pytest.raises(ValueError, match=r"ScalingPoint\.paths\[1\]: expected an object for PathTiming, got int"):
        from_json(ScalingPoint, data)
