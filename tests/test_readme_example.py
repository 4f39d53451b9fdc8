"""The README's swap example runs as written.

The test reads README.md, takes the ```python blocks that mention ``PSISGD`` and executes
them in order, in one namespace, so the examples a user copies are the ones that are tested.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

import psiopt

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def psisgd_examples() -> list[str]:
    blocks = [b for b in BLOCK.findall(README.read_text(encoding="utf-8")) if "PSISGD" in b]
    assert len(blocks) >= 2, "README.md lacks the swap and the lr-per-kind ```python examples that use PSISGD"
    return blocks


def test_readme_examples_run_step_on_the_manifold_and_set_the_lr_per_kind() -> None:
    swap, per_kind = psisgd_examples()[:2]
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(swap, str(README), "exec"), namespace)
    optimizer = namespace["optimizer"]
    assert isinstance(optimizer, psiopt.PSISGD)
    invariant = [
        (p, psiopt.PSIManifold(g["grouping"])) for g in optimizer.param_groups if g["grouping"] for p in g["params"]
    ]
    assert invariant, "the example's optimizer got no scale-invariant parameter"
    # The step was a PSI step: every scale-invariant weight kept finite rows and has a
    # momentum buffer horizontal to them.
    for p, manifold in invariant:
        buf = optimizer.state[p]["momentum_buffer"]
        rows, buf_rows = manifold.rows(p.detach()), manifold.rows(buf)
        assert buf_rows.abs().sum() > 0
        inner = (rows * buf_rows).sum(1).abs()
        assert (inner <= 1e-4 * rows.norm(dim=1) * buf_rows.norm(dim=1) + 1e-30).all()
        assert torch.isfinite(rows).all()

    exec(compile(per_kind, str(README), "exec"), namespace)
    lrs = {(g["grouping"], g["lr"]) for g in namespace["optimizer"].param_groups}
    assert lrs == {("channel", 0.05), (None, 0.1)}
