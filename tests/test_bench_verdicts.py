"""The verdicts on constructed records: which peer, the 0.9x steps bound, the accuracy
margin of one standard error (Welch), the loss metric, and their boundaries."""

from __future__ import annotations

import math
import statistics

import pytest

from psiopt.bench.records import Curve, Evaluation, MethodTraining, Summary, TaskResult, TrainRun, DatasetInfo
from psiopt.bench.training import summarize
from psiopt.bench.verdicts import STEPS_RATIO_TARGET, task_verdicts


def _entry(method: str, steps: list[int | None], held_out: list[float], metric: str = "accuracy") -> MethodTraining:
    runs = [
        TrainRun(
            seed=i, lr=0.1, base_lr=None, init_scale=1.0, diverged=False, steps_done=100, final_loss=0.1,
            final_val_acc=0.9, final_val_loss=0.3,
            final_test_acc=value if metric == "accuracy" else None,
            final_test_loss=value if metric == "loss" else 0.5,
            steps_to_target=s, seconds_to_target=None if s is None else 0.01 * s, train_seconds=1.0,
            curve=Curve([1], [1.0], [0.0]), eval=Evaluation([100], [0.3], [0.9]),
        )
        for i, (s, value) in enumerate(zip(steps, held_out))
    ]  # fmt: skip
    return MethodTraining(method=method, label=method, runs=runs, summary=summarize(runs))


def _task(*entries: MethodTraining, metric: str = "accuracy") -> TaskResult:
    return TaskResult(
        task="t", dataset=DatasetInfo("d", 10, 2, 2, [1], 2), model="m", model_kwargs={}, batch_size=1, steps=100,
        lr_grid=[0.1], target_loss=0.3, schedule="cosine", metric=metric,
        target_on="train_loss" if metric == "accuracy" else "val_loss", eval_every=10, methods=list(entries),
    )  # fmt: skip


def _by_target(task: TaskResult) -> dict:
    return {v.target: v for v in task_verdicts(task)}


def _welch(a: list[float], b: list[float]) -> float:
    return math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


PEER_ACC = [0.950, 0.955, 0.960, 0.965, 0.970]
OURS_ACC = [0.945, 0.950, 0.955, 0.960, 0.965]  # 0.5 points lower, the same spread


def test_psisgd_is_met_within_one_standard_error_at_0_9x_the_fastest_sgd_peers_steps() -> None:
    se = _welch(OURS_ACC, PEER_ACC)
    assert 0.005 < se  # the 0.5-point shortfall is within one standard error here
    v = _by_target(_task(
        _entry("psisgd", [45] * 5, OURS_ACC),
        _entry("sgd", [60] * 5, [0.99] * 5),  # slower: not the peer, however accurate
        _entry("sgdp", [50] * 5, PEER_ACC),  # the fastest peer
        _entry("sgdg", [40, 40, 40, 40, None], [0.9] * 5),  # faster, but missed the target on a seed
        _entry("adam", [10] * 5, [0.9] * 5),  # another family
    ))["psisgd"]  # fmt: skip
    assert (v.status, v.ours, v.peer) == ("met", "psisgd", "sgdp")
    assert v.steps_ratio == pytest.approx(0.9) and v.ours_steps == 45 and v.peer_steps == 50
    assert v.difference == pytest.approx(-0.005) and v.difference_se == pytest.approx(se)


def test_psisgd_steps_bound_is_inclusive_and_strict_above() -> None:
    at = _by_target(_task(_entry("psisgd", [45] * 5, PEER_ACC), _entry("sgd", [50] * 5, PEER_ACC)))["psisgd"]
    assert at.status == "met" and at.steps_ratio == pytest.approx(STEPS_RATIO_TARGET)
    above = _by_target(_task(_entry("psisgd", [45, 45, 45, 45, 46], PEER_ACC), _entry("sgd", [50] * 5, PEER_ACC)))
    assert above["psisgd"].status == "not met" and "above 0.9x" in above["psisgd"].reason


def test_psisgd_accuracy_margin_is_one_standard_error() -> None:
    peer = [0.950, 0.960, 0.970, 0.950, 0.970]
    spread = [-0.01, 0.0, 0.01, -0.01, 0.01]
    se = _welch(spread, peer)  # the same for every shift of ours
    for shift, status in ((-0.99, "met"), (-1.01, "not met")):
        ours = [p + shift * se for p in peer]
        v = _by_target(_task(_entry("psisgd", [40] * 5, ours), _entry("sgd", [50] * 5, peer)))["psisgd"]
        assert v.difference / v.difference_se == pytest.approx(shift, abs=1e-6)
        assert v.status == status, shift
    v = _by_target(_task(_entry("psisgd", [40] * 5, [p - 1.01 * se for p in peer]), _entry("sgd", [50] * 5, peer)))
    assert "worse test accuracy than the peer's by more than 1 standard error" in v["psisgd"].reason


def test_psisgd_must_reach_the_target_on_every_seed() -> None:
    v = _by_target(_task(_entry("psisgd", [10, 10, 10, 10, None], PEER_ACC), _entry("sgd", [50] * 5, PEER_ACC)))
    assert v["psisgd"].status == "not met" and "did not reach the target on every seed" in v["psisgd"].reason
    none_reach = _by_target(_task(_entry("psisgd", [None] * 5, PEER_ACC), _entry("sgd", [None] * 5, PEER_ACC)))
    assert none_reach["psisgd"].status == "no verdict"
    no_peer = _by_target(_task(_entry("psisgd", [10] * 5, PEER_ACC), _entry("sgd", [None] * 5, PEER_ACC)))
    assert no_peer["psisgd"].status == "no verdict" and "no SGD-family peer" in no_peer["psisgd"].reason


def test_one_seed_gives_no_verdict() -> None:
    v = _by_target(_task(_entry("psisgd", [10], [0.9]), _entry("sgd", [20], [0.95])))["psisgd"]
    assert v.status == "no verdict" and "at least 2 seeds" in v.reason


def test_adaptive_needs_no_lower_accuracy_and_takes_the_best_of_psiopts_three() -> None:
    v = _by_target(_task(
        _entry("psiadam", [20] * 5, OURS_ACC),  # fastest, less accurate: fails
        _entry("psiadamw", [27] * 5, PEER_ACC),  # 0.9x, as accurate: meets
        _entry("psiadasgd", [28] * 5, [0.99] * 5),  # too slow
        _entry("adam", [30] * 5, PEER_ACC),
        _entry("adamw", [35] * 5, [0.99] * 5),
        _entry("adamp", [30, 30, None, 30, 30], [0.99] * 5),
    ))["adaptive"]  # fmt: skip
    assert (v.status, v.ours, v.peer) == ("met", "psiadamw", "adam")
    assert v.difference == pytest.approx(0.0, abs=1e-12)
    worse = _by_target(_task(_entry("psiadam", [20] * 5, OURS_ACC), _entry("adam", [30] * 5, PEER_ACC)))
    assert worse["adaptive"].status == "not met" and worse["adaptive"].ours == "psiadam"
    assert "worse test accuracy than the peer's" in worse["adaptive"].reason
    assert "standard error" not in worse["adaptive"].reason  # no margin in (b)


def test_language_model_verdicts_use_the_test_loss_and_psiadamw_against_adamw() -> None:
    lower = [2.10, 2.11, 2.12, 2.13, 2.14]
    higher = [x + 0.01 for x in lower]
    v = _by_target(_task(
        _entry("psiadamw", [100] * 5, lower, "loss"),
        _entry("psiadam", [80] * 5, [x + 0.01 for x in higher], "loss"),  # faster, but a higher test loss
        _entry("adamw", [100] * 5, higher, "loss"),
        _entry("adam", [120] * 5, lower, "loss"),
        metric="loss",
    ))  # fmt: skip
    assert set(v) == {"adaptive", "psiadamw-vs-adamw"}  # no SGD family on this task
    assert v["adaptive"].status == "not met"  # psiadam 0.8x but worse loss; psiadamw 1.0x: too slow
    assert v["adaptive"].ours == "psiadam" and v["adaptive"].difference == pytest.approx(0.01)
    c = v["psiadamw-vs-adamw"]
    assert (c.status, c.steps_ratio) == ("met", 1.0) and c.difference == pytest.approx(-0.01)
    slower = _by_target(_task(_entry("psiadamw", [101] * 5, lower, "loss"), _entry("adamw", [100] * 5, lower, "loss"),
                              metric="loss"))  # fmt: skip
    assert slower["psiadamw-vs-adamw"].status == "not met"
    adamw_missed = _by_target(_task(_entry("psiadamw", [150] * 5, lower, "loss"),
                                    _entry("adamw", [100, 100, None, 100, 100], lower, "loss"), metric="loss"))
    assert adamw_missed["psiadamw-vs-adamw"].status == "met"


def test_comparisons_report_the_steps_difference_with_its_welch_standard_error() -> None:
    ours_steps, peer_steps = [44, 46, 45, 43, 47], [50, 53, 49, 51, 52]
    v = _by_target(_task(_entry("psisgd", ours_steps, PEER_ACC), _entry("sgd", peer_steps, PEER_ACC)))["psisgd"]
    assert v.steps_difference == pytest.approx(statistics.fmean(ours_steps) - statistics.fmean(peer_steps))
    assert v.steps_difference_se == pytest.approx(_welch(ours_steps, peer_steps))
    lower = [2.10, 2.11, 2.12, 2.13, 2.14]
    c = _by_target(_task(_entry("psiadamw", [150, 170, 160, 140, 155], lower, "loss"),
                         _entry("adamw", [160, 180, 150, 165, 170], lower, "loss"), metric="loss"))  # fmt: skip
    c = c["psiadamw-vs-adamw"]
    assert c.steps_difference == pytest.approx(155 - 165)
    assert c.steps_difference_se == pytest.approx(_welch([150, 170, 160, 140, 155], [160, 180, 150, 165, 170]))
    missed = _by_target(_task(_entry("psiadamw", [150, 170, 160, 140, 155], lower, "loss"),
                              _entry("adamw", [160, None, 150, 165, 170], lower, "loss"), metric="loss"))  # fmt: skip
    assert missed["psiadamw-vs-adamw"].status == "met"
    assert missed["psiadamw-vs-adamw"].steps_difference is None  # AdamW missed a seed: no steps to compare
