"""Host synchronizations of one optimizer step on a CUDA device, for scripts/gpu-check.sh.

Each optimizer steps a small BatchNorm CNN (``psiopt.param_groups``: scale-invariant conv
weights and Euclidean biases and BN parameters) twice, then the step measured runs under
``torch.cuda.set_sync_debug_mode("warn")``, which warns at every synchronizing CUDA call;
the warnings are counted. A step whose design promises no synchronization (PSISGD with
``capturable=True``) then runs again under ``"error"``, which raises at the first one.

What the designs say: PSISGD ``capturable=True`` takes none (its checks refuse a bad step
on the device); PSISGD ``capturable=False`` reads one flag back to raise on bad input;
PSIAdam / PSIAdamW synchronize for their checks (non-finite gradients, zero groups):
their count is recorded, not promised. Writes the counts as JSON (``--out``) and exits
with status 1 if a promise is broken.

Usage: ``python scripts/gpu_syncs.py --out syncs.json`` (psiopt importable).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable

import torch

import psiopt
from psiopt.bench import models

# name: (make the optimizer from param groups, the most synchronizations its design allows or None)
OPTIMIZERS: dict[str, tuple[Callable, int | None]] = {
    "PSISGD capturable=True": (lambda g: psiopt.PSISGD(g, lr=0.01, momentum=0.9, capturable=True), 0),
    "PSISGD (default: fused)": (lambda g: psiopt.PSISGD(g, lr=0.01, momentum=0.9), 1),
    "PSISGD foreach=True": (lambda g: psiopt.PSISGD(g, lr=0.01, momentum=0.9, foreach=True), 1),
    "PSIAdamW (default)": (lambda g: psiopt.PSIAdamW(g, lr=1e-3), None),
}


def _backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=False)
    torch.nn.functional.cross_entropy(model(x), y).backward()


def _synchronizations(step: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def measure(make: Callable, raise_on_sync: bool) -> int:
    torch.manual_seed(0)
    model = models.cnn_bn(in_channels=3, width=16).cuda()
    x, y = torch.randn(32, 3, 32, 32, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    opt = make(psiopt.param_groups(model, x, scale_invariant={"lr": 0.1}))
    for _ in range(2):  # the first steps make the state and compile the kernels
        _backward(model, x, y)
        opt.step()
    _backward(model, x, y)
    count = _synchronizations(opt.step)
    if raise_on_sync:
        _backward(model, x, y)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the counts (JSON)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_syncs: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    results, broken = {}, []
    for name, (make, promised) in OPTIMIZERS.items():
        try:
            count = measure(make, raise_on_sync=promised == 0)
        except RuntimeError as err:  # "error" mode raised: a synchronization where none is promised
            results[name] = {"synchronizations": None, "promised_at_most": promised, "error": str(err)}
            broken.append(name)
            print(f"{name}: synchronized under set_sync_debug_mode('error'): {err}")
            continue
        results[name] = {"synchronizations": count, "promised_at_most": promised}
        if promised is not None and count > promised:
            broken.append(name)
        print(f"{name}: {count} host synchronization(s) per step" + ("" if promised is None else f" (design: at most {promised})"))
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": results}, f, indent=2)
    if broken:
        print(f"gpu_syncs: broken promises: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
