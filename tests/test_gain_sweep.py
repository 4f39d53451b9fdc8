"""scripts/gain_sweep.py: it runs the bench's own protocol with the gain it is given (the
same steps as run_task in this process with the module constant set by hand), and refuses
bad arguments with a message."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from psiopt.bench import suites, training
from psiopt.optim import _rates, psisgd

ROOT = Path(__file__).resolve().parents[1]


def _sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gain_sweep.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def _steps_here(gain: float, seeds: tuple[int, ...]) -> str:
    """PSI-SGD's mean steps to target on digits-mlp at this gain, by the bench in this process."""
    task = next(t for t in suites._cpu_tasks(False) if t.name == "digits-mlp")
    task = dataclasses.replace(task, methods=("psisgd",))
    dataset = training.load_dataset(task, None)
    record = training.task_record(task, dataset, seeds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the script's default
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_rates, "SGD_RATE_GAIN", gain)
            psisgd._sgd_rate_rule.cache_clear()
            training.run_task(task, dataset, seeds, torch.device("cpu"), {}, record, lambda run, text: None)
    finally:
        psisgd._sgd_rate_rule.cache_clear()  # no rule made with the patched gain outlives the test
        torch.set_num_threads(threads)
    return f"{record.methods[0].summary.steps_to_target_mean:.1f}"


def test_each_gain_runs_the_bench_protocol_with_that_gain() -> None:
    done = _sweep("--method", "psisgd", "--gains", "1/8", "1/30", "--tasks", "digits-mlp", "--seeds", "2")
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| digits-mlp")]
    assert [(r[2].strip(), r[4].split()[0]) for r in rows] == [
        ("1/8", _steps_here(1 / 8, (0, 1))), ("1/30", _steps_here(1 / 30, (0, 1)))
    ]
    assert rows[0][4] != rows[1][4]  # the gain reached the optimizer (it changes the steps here)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--gains", "0"), "a gain must be positive"),
        (("--gains", "abc"), "'abc' is not a number or a fraction such as 1/30"),
        (("--gains", "1/0"), "is not a number or a fraction"),
        (("--gains", "1", "--tasks", "no-such-task"), "unknown tasks"),
        (("--gains", "3", "--bogus"), "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(args: tuple[str, ...], message: str) -> None:
    done = _sweep(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
