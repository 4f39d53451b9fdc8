"""Where a benchmark runs: device, library versions, git commit, CPU and GPU names."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from .records import Environment

__all__ = ["environment", "cpu_name", "device_name"]


def cpu_name() -> str | None:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux), or ``None``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def device_name(device: torch.device) -> str | None:
    """The GPU's name for a CUDA device, else the CPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def environment(device: str) -> Environment:
    """Device, library versions, git commit (``None`` outside a checkout), CPU/GPU names."""
    import geoopt

    import psiopt

    cuda = torch.cuda.is_available()
    return Environment(
        device=device,
        torch_version=torch.__version__,
        psiopt_version=psiopt.__version__,
        geoopt_version=getattr(geoopt, "__version__", None),
        python_version=platform.python_version(),
        platform=platform.platform(),
        git_commit=_git_commit(),
        cpu_name=cpu_name(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        cuda_available=cuda,
        gpu_name=torch.cuda.get_device_name(0) if cuda else None,
    )
