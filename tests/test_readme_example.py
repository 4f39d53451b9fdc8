"""The README's swap example runs as written.

The test reads README.md, takes the first ```python block that mentions ``PSISGD`` and
executes it, so the example a user copies is the one that is tested.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

import psiopt

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def swap_example() -> str:
    blocks = [b for b in BLOCK.findall(README.read_text(encoding="utf-8")) if "PSISGD" in b]
    assert blocks, "README.md has no ```python block that uses PSISGD (the swap example)"
    return blocks[0]


def test_readme_swap_example_runs_and_steps_on_the_manifold() -> None:
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(swap_example(), str(README), "exec"), namespace)
    optimizer = namespace["optimizer"]
    assert isinstance(optimizer, psiopt.PSISGD)
    marked = [p for g in optimizer.param_groups for p in g["params"] if psiopt.is_scale_invariant(p)]
    assert marked, "the example's optimizer got no scale-invariant parameter"
    # The step was a PSI step: every marked weight moved, kept its group norms, and has
    # a horizontal momentum buffer.
    for p in marked:
        buf = optimizer.state[p]["momentum_buffer"]
        rows, buf_rows = p.manifold.rows(p.detach()), p.manifold.rows(buf)
        assert buf_rows.abs().sum() > 0
        inner = (rows * buf_rows).sum(1).abs()
        assert (inner <= 1e-4 * rows.norm(dim=1) * buf_rows.norm(dim=1) + 1e-30).all()
        assert torch.isfinite(rows).all()
