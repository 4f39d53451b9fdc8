"""scripts/gpu-check.sh where it cannot measure anything: without a GPU it stops at once,
with a nonzero status and a message saying why, and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_stops_without_a_gpu_and_says_why(tmp_path) -> None:
    done = _gpu_check("--out", str(tmp_path / "results"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gpu-check: no CUDA GPU here, so nothing was measured." in done.stderr
    # It names the Python it tried with its torch (built without CUDA here), and what to do.
    assert f"{sys.executable}: torch {torch.__version__} (CUDA build: None), torch.cuda.is_available() = False" in done.stderr
    assert "Run this on a machine with an NVIDIA GPU" in done.stderr
    assert not (tmp_path / "results").exists()


def test_gpu_check_refuses_an_unknown_argument() -> None:
    done = _gpu_check("--bogus")
    assert done.returncode == 2 and "unknown argument --bogus" in done.stderr
