"""The bench's measurement protocol: the test part is never read while tuning, the chosen
lr is the validation-best, the lr basin, standard errors, steps to a validation target,
and reading results of the previous layout."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from psiopt.bench import data
from psiopt.bench.methods import METHODS
from psiopt.bench.records import MethodTraining, SCHEMA_VERSION, TaskResult, TrainRun, TuningPoint, upgrade
from psiopt.bench.report import load_results, render_markdown, validate_results
from psiopt.bench.suites import TrainTask
from psiopt.bench.training import (
    BASIN_FACTOR,
    choose_lr,
    evaluate,
    lr_basin,
    run_task,
    summarize,
    task_record,
    train_run,
    tune,
)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TASK = TrainTask(
    "tiny", "digits", {"limit": 360}, "mlp_bn", {"in_features": 64, "hidden": (16,)}, 32, 24, (0.01, 0.3, 10.0),
    1.2, 6, methods=("sgd", "rsgd-sphere"),
)


class GuardedDataset(data.Dataset):
    """A dataset whose test part raises when read while ``allowed()`` is false, and counts reads."""

    def __init__(self, base: data.Dataset, allowed):
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        self._x_test, self._y_test = fields.pop("x_test"), fields.pop("y_test")
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        self.allowed, self.reads = allowed, 0

    def _read(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.allowed():
            raise AssertionError("the test part was read while tuning")
        self.reads += 1
        return tensor

    x_test = property(lambda self: self._read(self._x_test))
    y_test = property(lambda self: self._read(self._y_test))


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load_digits(seed=0, limit=360)


def _tune(dataset, done=lambda record, text: None) -> MethodTraining:
    entry = MethodTraining(method="sgd", label="SGD")
    entry.chosen = tune(TASK, METHODS["sgd"], dataset, 0, CPU, entry, None, {}, done)
    return entry


def test_the_test_part_is_read_once_and_only_after_every_grid_run(digits):
    finished: list[TrainRun] = []
    guarded = GuardedDataset(digits, allowed=lambda: len(finished) == len(TASK.lr_grid))
    entry = _tune(guarded, done=lambda record, text: finished.append(record))
    assert len(entry.tuning) == len(TASK.lr_grid) and entry.best_lr is not None
    assert guarded.reads == 2  # x_test and y_test, once: the chosen run's test metrics
    run = entry.chosen.run
    assert run.lr == entry.best_lr and run.final_test_acc is not None
    assert (run.final_test_loss, run.final_test_acc) == evaluate(entry.chosen.model, digits.x_test, digits.y_test)
    # the other grid runs never read it
    assert [r.final_test_acc is None for r in finished] == [lr != entry.best_lr for lr in TASK.lr_grid]


def test_the_choice_does_not_depend_on_the_test_part(digits):
    scrambled = dataclasses.replace(digits, y_test=torch.roll(digits.y_test, 1), x_test=-digits.x_test)
    a, b = _tune(digits), _tune(scrambled)
    assert a.best_lr == b.best_lr and a.tuning == b.tuning and a.basin == b.basin
    assert a.chosen.run.final_test_acc != b.chosen.run.final_test_acc


def test_run_task_reads_the_test_part_once_per_reported_run(digits):
    state = {"tuning": True}

    def done(record, text):
        state["tuning"] = "lr=" in text and not text.endswith(f"lr={TASK.lr_grid[-1]:g}")

    guarded = GuardedDataset(digits, allowed=lambda: not state["tuning"])
    record = task_record(TASK, digits, (0, 1, 2))  # (describe reads the sizes of the parts)
    tuned = run_task(TASK, guarded, (0, 1, 2), CPU, {}, record, done)
    assert set(tuned) == {"sgd", "rsgd-sphere"}
    assert guarded.reads == 2 * 3 * 2  # (x_test, y_test) x 3 seeds x 2 methods
    for entry in record.methods:
        assert [r.seed for r in entry.runs] == [0, 1, 2] and all(r.final_test_acc is not None for r in entry.runs)
        assert entry.runs[0] is not None and entry.best_lr == choose_lr(entry.tuning)
        assert entry.weight_decay == METHODS[entry.method].weight_decay
    assert record.dataset.val_size == digits.x_val.shape[0] and record.metric == "accuracy"
    assert record.methods[1].base_lr == record.methods[0].best_lr  # the sphere's others take SGD's tuned lr


def test_the_chosen_lr_is_the_validation_best(digits):
    entry = _tune(digits)
    best = max(entry.tuning, key=lambda p: (p.final_val_acc, -p.final_val_loss))
    assert entry.best_lr == best.lr
    accs = [p.final_val_acc for p in entry.tuning]
    assert len(set(accs)) > 1  # the grid spans good and bad lrs, so the choice means something


def _point(lr, acc=None, loss=None, diverged=False, steps=None) -> TuningPoint:
    return TuningPoint(lr=lr, diverged=diverged, final_loss=None, final_val_acc=acc, final_val_loss=loss,
                       steps_to_target=steps)  # fmt: skip


def test_choose_lr_rules():
    # The lowest validation loss wins, whatever the accuracies; a diverged run never does.
    points = [_point(0.1, 0.99, 0.30), _point(0.3, 0.95, 0.25), _point(1.0, 0.90, 0.20), _point(3.0, 0.99, 0.1, True)]
    assert choose_lr(points) == 1.0
    tie = [_point(0.3, 0.95, 0.2), _point(0.1, 0.90, 0.2)]
    assert choose_lr(tie) == 0.1  # then the smaller lr
    lm = [_point(0.1, None, 2.3), _point(0.3, None, 2.1), _point(1.0, None, float("nan"))]
    assert choose_lr(lm) == 0.3  # no accuracy needed; a non-finite loss is never chosen
    assert choose_lr([_point(0.1, 0.9, 0.3, diverged=True)]) is None


def test_lr_basin_is_within_the_factor_of_the_fewest_steps():
    points = [_point(0.01), _point(0.03, steps=125), _point(0.1, steps=100), _point(0.3, steps=126),
              _point(1.0, steps=50, diverged=True), _point(3.0, steps=None)]  # fmt: skip
    assert BASIN_FACTOR == 1.25
    assert lr_basin(points) == [0.03, 0.1]
    assert lr_basin(points, factor=1.3) == [0.03, 0.1, 0.3]
    assert lr_basin([_point(0.1), _point(0.3, diverged=True)]) == []


def test_summary_standard_errors():
    runs = []
    for seed, (acc, steps) in enumerate([(0.90, 10), (0.92, 20), (0.97, None), (0.95, 30)]):
        runs.append(TrainRun(seed, 0.1, None, 1.0, False, 50, 0.1 * (seed + 1), 0.9, 0.3, acc, 1 - acc, steps,
                             None if steps is None else 0.1, 1.0, None, None))  # fmt: skip
    s = summarize(runs)
    accs = [0.90, 0.92, 0.97, 0.95]
    assert s.test_acc_mean == pytest.approx(np.mean(accs))
    assert s.test_acc_se == pytest.approx(np.std(accs, ddof=1) / 2)
    assert s.test_loss_se == pytest.approx(s.test_acc_se)
    assert s.steps_to_target_mean == 20 and s.steps_to_target_se == pytest.approx(10 / math.sqrt(3))
    assert s.reached_target == 3 and s.seeds == 4
    one = summarize(runs[:1])
    assert one.test_acc_mean == 0.90 and one.test_acc_se is None and one.test_acc_std is None


def test_steps_to_a_validation_target_count_evaluation_steps():
    text = data.load_stdlib_text(context=16, max_bytes=300_000, val_windows=16, test_windows=16)
    task = TrainTask("lm", "stdlib_text", {}, "qknorm_lm", {"context": 16, "dim": 16, "depth": 1, "heads": 2},
                     8, 30, (1.0,), 4.0, 5, methods=("adamw",), metric="loss", target_on="val_loss")  # fmt: skip
    run = train_run(task, METHODS["adamw"], text, 3.0, None, 0, CPU).run
    assert run.eval.step == [5, 10, 15, 20, 25, 30]
    first = next(s for s, loss in zip(run.eval.step, run.eval.val_loss) if loss <= 4.0)
    assert run.steps_to_target == first and run.final_val_loss == run.eval.val_loss[-1]
    assert run.final_test_loss is None  # not read by a run on its own


def test_results_of_the_previous_layout_are_read_through_upgrade():
    path = ROOT / "benchmarks" / "results" / "cpu-default" / "results.json"
    raw = json.loads(path.read_text())
    if raw["schema_version"] == SCHEMA_VERSION:
        pytest.skip("the committed results are of this layout")
    results = load_results(path)
    assert results.schema_version == SCHEMA_VERSION and results.verdicts == []
    task = results.training[0]
    assert task.metric == "accuracy" and task.dataset.val_size is None
    assert all(r.final_val_acc is None and r.eval.step == [] for m in task.methods for r in m.runs)
    assert all(r.final_test_acc is not None for m in task.methods if m.status == "ok" for r in m.runs)
    assert "| SGD |" in render_markdown(results)
    validate_results(upgrade(raw))
    assert upgrade(upgrade(raw)) == upgrade(raw)
    with pytest.raises(ValueError, match="schema version 1"):
        upgrade({**raw, "schema_version": 1})
