"""The Triton kernels of the PSI steps (PSISGD's, PSIAdam's, PSIAdaSGD's) on machines with
and without a GPU.

* Without one, Triton's interpreter runs every case of ``tests/_triton_cases.py`` on CPU
  tensors against the reference loops, in one child process started with
  ``TRITON_INTERPRET=1`` (the variable must be set before the kernels are defined, and
  only that process sees it); each case is one test here.
* Every kernel launch the code makes is compiled for a Hopper GPU (``sm_90``): Triton's
  compiler needs no GPU, and it sees what the interpreter does not (types, constructs the
  compiled language lacks).
* With a CUDA device, the same cases run on CUDA tensors (marked ``cuda``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _triton_cases import CASES, run

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (psiopt's test extra installs it)"
)


def _check(result: dict) -> None:
    assert "failure" not in result, result.get("failure")
    over = {name: (error, tol) for name, (error, tol) in result["checks"].items() if not error <= tol}
    assert not over, f"{result['case']}: relative errors above tolerance {over}"


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    """Every case under Triton's interpreter, in one child process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_triton_cases.py")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["case"]] = result
    assert done.returncode == 0 and len(results) == len(CASES), done.stdout[-2000:] + done.stderr[-4000:]
    return results


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_the_reference_under_the_interpreter(interpreted, case) -> None:
    _check(interpreted[case])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_the_reference_on_cuda(case) -> None:
    _check(run(case, "cuda"))


# -- every launch compiles for a GPU this machine does not have ----------------------------


def _launches() -> dict[str, object]:
    """One launch of each kernel per set of options that changes its compiled code: every
    flag on, every flag off, and the dtypes the kernels take, on small CPU tensors (PSIAdam's
    angular rate of power 2 in float32, of power 1 in float64, none in bfloat16)."""
    from psiopt.optim import _triton_adaptive as A
    from psiopt.optim import _triton_kernels as K

    def t(shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype)

    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        w, g, m = t((4, 9), dtype), t((4, 9), dtype), t((4, 9), dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        sums, bad, flag, inv = t((4, 6), acc), t((), torch.int32), t((), torch.int32), t(())
        every = dtype == torch.float32  # every flag on in float32, off in the others
        out[f"row_sums-{dtype}"] = K._row_sums_launch(w, g, m if every else None, inv if every else None, sums, bad)
        sgd = dict(lr=0.1, momentum=0.9 if every else 0.0, dampening=0.0, nesterov=every, first=every, maximize=not every)
        out[f"update-{dtype}"] = K._update_launch(
            w, g, m if every else None, sums, flag if every else None, inv if every else None, **sgd
        )
        out[f"psiadam-{dtype}"] = A._psiadam_launch(
            w, g, m, t(4, dtype), t(4, dtype) if every else None, sums, flag if every else None, inv if every else None,
            step=3.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, maximize=not every, nesterov=every,
            rate=None if dtype == torch.bfloat16 else (t(4, dtype), (1 / 3, 2.0 if every else 1.0, 1e-3)),
            left=flag if every else None,
        )  # fmt: skip
        out[f"psiadasgd-{dtype}"] = A._psiadasgd_launch(
            w, g, m if every else None, t(4, dtype), sums, flag if every else None, inv if every else None,
            first=every, lr=0.1, momentum=0.9 if every else 0.0, dampening=0.0, nesterov=every, eps=1e-10,
            maximize=False, left=flag if every else None,
        )  # fmt: skip
    return out


_TRITON_TYPES = {
    torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
    torch.int32: "i32", torch.bool: "i1",
}  # fmt: skip


def _source(launch):
    """The Triton source of ``launch`` with its argument types, as its call would make it."""
    from triton.compiler import ASTSource

    names = launch.kernel.arg_names
    values = dict(zip(names, launch.args), **launch.constants)
    assert set(values) == set(names), set(names) ^ set(values)
    signature, constants = {}, {}
    for name in names:
        value = values[name]
        if name in launch.constants:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32"
        else:
            assert isinstance(value, float), (name, value)
            signature[name] = "fp32"
    return ASTSource(launch.kernel, signature, constexprs=constants)


# The hyperparameters of _launches that float32 cannot hold, and the results of the
# arithmetic on them that the kernels' float64 constants may hold (1 - beta, ...).
_INEXACT_IN_FLOAT32 = (0.9, 0.1, 0.999, 1e-3, 1e-8, 1e-10, 0.81)
_F64_CONSTANT = re.compile(r"arith\.constant (?:dense<)?([-+0-9.eE]+)>? : (?:tensor<[0-9x]*xf64>|f64)")


@needs_triton
def test_every_kernel_launch_compiles_for_hopper_without_a_gpu(tmp_path, monkeypatch) -> None:
    """Each launch compiles to sm_90 machine code, and its float64 constants are exact:
    none is a float32 rounding of a hyperparameter (Triton makes a Python float a float32
    where it becomes a value of its own, e.g. returned by a jitted function; the
    interpreter does not always, so only the compiled code shows it)."""
    import triton
    from triton.backends.compiler import GPUTarget

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # read by Triton when it compiles
    target = GPUTarget("cuda", 90, 32)
    rounded = {float(np.float32(x)) for x in _INEXACT_IN_FLOAT32}
    assert all(float(np.float32(x)) != x for x in _INEXACT_IN_FLOAT32)
    for name, launch in _launches().items():
        compiled = triton.compile(_source(launch), target=target, options={"enable_fp_fusion": True})
        assert ".target sm_90" in compiled.asm["ptx"] and compiled.asm["cubin"], name
        constants = {float(c) for c in _F64_CONSTANT.findall(compiled.asm["ttir"])}
        assert not constants & rounded, f"{name}: float64 constants rounded to float32: {sorted(constants & rounded)}"


@needs_triton
def test_rows_the_kernels_would_write_wrongly_are_refused_before_any_write() -> None:
    """The kernels write rows with unit stride and per-group states as contiguous
    vectors; anything else is refused on the host, naming it, before any tensor is
    written (the checks run before the first launch, so no kernel runs here)."""
    from psiopt.optim._triton_adaptive import psiadam_update, psiadasgd_update

    w = torch.randn(4, 6)
    good = dict(exp_avgs=[torch.zeros(4, 6)] * 2, exp_avg_sqs=[torch.zeros(4)] * 2, max_exp_avg_sqs=None)
    options = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, maximize=False, nesterov=True)
    cases = [
        ("weights", dict(good, ws=[w, torch.randn(6, 4).T])),
        ("exp_avg", dict(good, ws=[w, w], exp_avgs=[torch.zeros(4, 6), torch.zeros(6, 4).T])),
        ("exp_avg_sq", dict(good, ws=[w, w], exp_avg_sqs=[torch.zeros(4), torch.zeros(8)[::2]])),
        ("max_exp_avg_sq", dict(good, ws=[w, w], max_exp_avg_sqs=[torch.zeros(4), torch.zeros(3)])),
    ]
    for name, args in cases:
        before = [t.clone() for t in args["ws"]]
        with pytest.raises(ValueError, match=rf"^{name}: "):
            psiadam_update(args["ws"], args["ws"], args["exp_avgs"], args["exp_avg_sqs"], args["max_exp_avg_sqs"],
                           [1.0, 1.0], [torch.zeros(4, 6)] * 2, **options)  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(args["ws"], before))
    with pytest.raises(ValueError, match=r"^sum: a per-group state must be a contiguous \(4,\) tensor"):
        psiadasgd_update([w], [w], [None], [torch.zeros(4, 1)], [torch.zeros(4, 6)], [True], lr=0.1, momentum=0.0,
                         dampening=0.0, nesterov=False, eps=1e-10, maximize=False)  # fmt: skip
