"""The step-time harness: interleaving, ratios, memory, thread handling, unavailable paths, discovery time."""

from __future__ import annotations

import inspect
import sys
from dataclasses import replace

import pytest
import torch

import psiopt
from psiopt.bench import models
from psiopt.bench.methods import zoo_scale_invariant_layers
from psiopt.bench.steptime import (
    MIN_CACHE_EVICTION_BYTES,
    PATHS,
    StepPath,
    cache_eviction_bytes,
    interleaved_times,
    measure_discovery,
    measure_scaling_point,
    median_ratio,
    one_thread_on_cpu,
    step_peak_extra_bytes,
)
from psiopt.bench.suites import DiscoverySpec, ScalingPointSpec, StepScalingSpec

CPU = torch.device("cpu")
TINY = StepScalingSpec((), warmup=1, repeats=3, min_repeats=3, budget_s=0.0)


def test_interleaved_rounds_rotate_and_count():
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = interleaved_times(steps, CPU, warmup=1, repeats=4)
    assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4, "c": 4}
    assert calls == list("abc") + list("abc") + list("bca") + list("cab") + list("abc")


def test_budget_stops_after_min_repeats():
    samples = interleaved_times({"a": lambda: None}, CPU, warmup=0, repeats=50, min_repeats=5, budget_s=0.0)
    assert len(samples["a"]) == 5


def test_cache_eviction_rewrites_twice_the_last_level_cache_before_each_timed_step(monkeypatch):
    from psiopt.bench import steptime

    monkeypatch.setattr(steptime, "_last_level_cache_bytes", lambda device: 48 * 2**20)
    assert cache_eviction_bytes(CPU) == 96 * 2**20
    monkeypatch.setattr(steptime, "_last_level_cache_bytes", lambda device: None)
    assert cache_eviction_bytes(CPU) == MIN_CACHE_EVICTION_BYTES
    monkeypatch.undo()
    assert cache_eviction_bytes(CPU) >= MIN_CACHE_EVICTION_BYTES

    # The buffer is rewritten before every timed step (not before warm-up steps), off the clock:
    # each step sees it one pass further on.
    seen: list[float] = []
    real_add = torch.Tensor.add_
    buffers: list[torch.Tensor] = []

    def add_(self, *args, **kwargs):
        if self.numel() == 1024:
            buffers.append(self)
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "add_", add_)
    steps = {name: (lambda: seen.append(float(buffers[-1][0]) if buffers else 0.0)) for name in "ab"}
    interleaved_times(steps, CPU, warmup=2, repeats=3, evict_bytes=4096)
    assert seen == [0.0] * 4 + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_median_ratio_pairs_rounds():
    # the per-round ratios are 2, 2, 2 although the medians of the raw times are 2 and 1.5
    assert median_ratio([2.0, 4.0, 8.0], [1.0, 2.0, 4.0]) == 2.0
    assert median_ratio([1.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0


def test_cpu_step_peak_counts_the_step_allocations():
    x = torch.randn(500, 1000)  # 2 MB
    state = {"kept": torch.zeros(250, 1000)}

    def step() -> None:
        y = x * 2  # +2 MB
        z = y + 1  # +2 MB: the peak, 4 MB above the start
        del y, z
        state["kept"] = torch.zeros(250, 1000)  # +1 MB, then the previous 1 MB is freed

    peak = step_peak_extra_bytes(step, CPU)
    assert 4_000_000 <= peak < 4_000_000 + 4096
    assert step_peak_extra_bytes(lambda: None, CPU) == 0


def test_one_thread_is_restored_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with one_thread_on_cpu(CPU) as threads:
            assert threads == 1 and torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def _psisgd_has_fused() -> bool:
    return "fused" in inspect.signature(psiopt.PSISGD).parameters


def test_scaling_point_on_a_tiny_cnn():
    point = ScalingPointSpec("tiny", "cnn_bn", {"in_channels": 1, "width": 2})
    record = measure_scaling_point(point, TINY, CPU)
    model = models.cnn_bn(in_channels=1, width=2)
    assert record.num_params == sum(p.numel() for p in model.parameters())
    assert record.num_psi_params == sum(m.weight.numel() for m in zoo_scale_invariant_layers(model))
    assert record.num_tensors == len(list(model.parameters()))
    assert record.threads == 1 and record.repeats == 3
    by = {e.path: e for e in record.paths}
    assert [e.path for e in record.paths] == [p.name for p in PATHS]
    assert by["sgd-foreach"].ratio_to_sgd_foreach == 1.0 and by["sgd-foreach"].extra_peak_vs_sgd_foreach_bytes == 0
    for name in ("psisgd-loop", "psisgd-foreach"):
        assert by[name].status == "ok" and by[name].median_s > 0 and by[name].ratio_to_sgd_foreach > 0
        assert by[name].step_peak_extra_bytes >= 0
    fused = by["psisgd-fused"]
    if _psisgd_has_fused():
        assert fused.status == "ok", fused.reason
    else:
        assert fused.status == "unavailable" and "fused" in fused.reason and fused.median_s is None
    if by["sgd-fused"].status == "ok":
        assert by["sgd-fused"].ratio_to_sgd_fused == 1.0
    # The Adam family, against AdamW foreach and fused measured in the same rounds.
    assert {e.path for e in record.paths if e.family == "adam"} == {
        "adamw-foreach", "adamw-fused", "psiadamw-foreach", "psiadamw-fused", "psiadam-fused"
    }
    assert by["adamw-foreach"].ratio_to_adamw_foreach == 1.0 and by["adamw-fused"].ratio_to_adamw_fused == 1.0
    for name in ("psiadamw-foreach", "psiadamw-fused", "psiadam-fused", "psiadasgd-fused"):
        assert by[name].status == "ok", by[name].reason
        assert by[name].ratio_to_adamw_fused > 0 and by[name].ratio_to_sgd_foreach > 0
        assert by[name].step_peak_extra_bytes >= 0


def test_a_path_whose_step_raises_is_recorded_as_failed():
    class Broken(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("no kernel for this device")

    paths = (PATHS[0], StepPath("broken", "broken", lambda params: Broken(params, lr=0.1)))
    point = ScalingPointSpec("tiny", "mlp_bn", {"in_features": 3, "hidden": (4,)})
    record = measure_scaling_point(point, TINY, CPU, paths)
    broken = record.paths[1]
    assert broken.status == "failed" and broken.reason == "RuntimeError: no kernel for this device"
    assert record.paths[0].status == "ok"


def test_discovery_time_on_a_narrow_resnet50():
    before = torch.get_num_threads()
    unavailable: dict[str, str] = {}
    record = measure_discovery(DiscoverySpec("resnet50", {"width": 2}, (3, 64, 64), 4, 1), unavailable)
    assert torch.get_num_threads() == before
    assert record.threads == 1 and record.found == record.expected == 53
    assert 0 < record.min_s <= record.median_s and record.target_s == 2.0
    assert record.input_shape == [4, 3, 64, 64] and unavailable == {}


TINY_QWEN3 = DiscoverySpec(
    "Qwen3ForCausalLM",
    {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
     "num_key_value_heads": 2, "head_dim": 16},
    (16,), 2, 1, source="transformers",
)


def test_discovery_time_on_a_transformers_language_model():
    # every layer's q_proj and k_proj: found == expected == 2 x 3 layers, on 2 x 16 random tokens
    unavailable: dict[str, str] = {}
    record = measure_discovery(TINY_QWEN3, unavailable)
    assert record.found == record.expected == 6 and record.input_shape == [2, 16] and unavailable == {}
    assert record.model == "Qwen3ForCausalLM" and record.model_kwargs == TINY_QWEN3.model_kwargs


def test_discovery_time_without_transformers_says_why(monkeypatch):
    unavailable: dict[str, str] = {}
    assert measure_discovery(replace(TINY_QWEN3, model="NoSuchModelForCausalLM"), unavailable) is None
    assert "has no NoSuchModelForCausalLM" in unavailable["discovery:NoSuchModelForCausalLM"]
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    assert measure_discovery(TINY_QWEN3, unavailable) is None
    assert "transformers is not installed" in unavailable["discovery:Qwen3ForCausalLM"]



def test_report_compares_each_family_of_the_curve_with_its_own_peers():
    from psiopt.bench.records import PathTiming, ScalingPoint
    from psiopt.bench.report import _scaling_table

    def point(paths):
        return ScalingPoint(name="p", model="cnn_bn", model_kwargs={}, device="cpu", device_name=None, threads=1,
                            num_params=10, num_psi_params=8, num_tensors=3, warmup=1, repeats=2, memory_method="m",
                            paths=paths)  # fmt: skip

    paths = [
        PathTiming("sgd-foreach", "SGD", median_s=1e-3, ratio_to_sgd_foreach=1.0, ratio_to_adamw_fused=0.8),
        PathTiming("psiadamw-fused", "PSI-AdamW", median_s=2e-3, ratio_to_sgd_foreach=2.0, ratio_to_sgd_fused=3.0,
                   family="adam", ratio_to_adamw_foreach=0.5, ratio_to_adamw_fused=1.25),
    ]  # fmt: skip
    title, columns, rows = _scaling_table("cpu", [point(paths)], "adam")
    assert "Adam family" in title and columns[3:5] == ["ratio to AdamW foreach", "ratio to AdamW fused"]
    assert [r[1:5] for r in rows] == [["PSI-AdamW", "2", "0.5", "1.25"]]
    _, columns, rows = _scaling_table("cpu", [point(paths)], "sgd")
    assert columns[3:5] == ["ratio to SGD foreach", "ratio to SGD fused"] and [r[1] for r in rows] == ["SGD"]
    assert _scaling_table("cpu", [point(paths[:1])], "adam") is None  # results without the Adam family


def test_each_path_steps_its_own_copy_of_the_parameters():
    """Each path's optimizer gets its own copy of the parameters (same values, classes and
    manifolds; the gradients shared): no step sees weights another path wrote."""
    seen = []

    def recording(params):
        seen.append(params)
        return torch.optim.SGD(params, lr=0.0)

    paths = tuple(StepPath(f"p{i}", f"p{i}", recording) for i in range(2))
    point = ScalingPointSpec("tiny", "cnn_bn", {"in_channels": 1, "width": 2})
    record = measure_scaling_point(point, TINY, CPU, paths)
    assert record.own_copies and len(seen) == 2
    for p, q in zip(*seen):
        assert p is not q and p.data_ptr() != q.data_ptr() and torch.equal(p, q)
        assert type(p) is type(q) and getattr(p, "manifold", None) is getattr(q, "manifold", None)
        assert p.grad is q.grad
    assert any(psiopt.is_scale_invariant(p) for p in seen[0])
