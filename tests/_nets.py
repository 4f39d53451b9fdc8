"""Small models the tests share: one scale-invariant weight of each grouping psiopt knows.

Test modules import this as ``from _nets import ...``: ``tests/`` has no ``__init__.py``,
so pytest puts it on ``sys.path`` (its default ``prepend`` import mode), and the workers
that ``torch.multiprocessing`` spawns start with the parent's ``sys.path``, so they import
it too when they unpickle a test's worker function.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["three_groupings_net", "ThreeGroupingsNet", "hand_param_groups", "fully_sharded_copy"]


def three_groupings_net(seed: int = 0) -> nn.Sequential:
    """Conv -> BatchNorm (channel), Conv -> GroupNorm(3, 6) (block(2)), Linear -> LayerNorm
    (tensor), then a Linear head, in float64, initialized from ``seed``.

    Its scale-invariant weights are ``0.weight``, ``3.weight`` and ``8.weight``; it takes
    ``(n, 3, h, w)`` images with ``h, w >= 5`` (the pooling makes the head's input size
    independent of them) and returns 3 logits.
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, bias=False),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 6, 3, bias=False),
        nn.GroupNorm(3, 6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 7, bias=False),
        nn.LayerNorm(7),
        nn.ReLU(),
        nn.Linear(7, 3),
    ).to(torch.float64)


class ThreeGroupingsNet(nn.Module):
    """A channel grouping (Conv -> BN, 5 channels: shards of 3 and 2), a block grouping
    whose middle block straddles the shards (Conv -> GroupNorm(3, 6): 3 channels per
    rank, 2 per group) and a tensor grouping (Linear -> LayerNorm, 7 rows: 4 and 3), for
    ``(n, 3, 8, 8)`` images, with named submodules; the shard sizes are those of FSDP2's
    ``fully_shard`` on 2 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 6, 3, bias=False)
        self.gn = nn.GroupNorm(3, 6)
        self.fc = nn.Linear(6 * 4 * 4, 7, bias=False)
        self.ln = nn.LayerNorm(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.gn(self.conv2(x)))
        x = torch.relu(self.ln(self.fc(x.flatten(1))))
        return self.head(x)


def hand_param_groups(model: ThreeGroupingsNet) -> list[dict]:
    """The param groups of a :class:`ThreeGroupingsNet`, written by hand (no discovery): one
    per scale-invariant weight, naming its grouping, then one with every other parameter."""
    si = {"conv1.weight": "channel", "conv2.weight": "block(2)", "fc.weight": "tensor"}
    named = dict(model.named_parameters())
    groups = [{"params": [named[name]], "grouping": g, "param_names": [name]} for name, g in si.items()]
    rest = [name for name in named if name not in si]
    return [*groups, {"params": [named[n] for n in rest], "param_names": rest}]


def fully_sharded_copy(reference: ThreeGroupingsNet, mesh) -> ThreeGroupingsNet:
    """A :class:`ThreeGroupingsNet` with ``reference``'s weights, every layer and then the
    root sharded with FSDP2's ``fully_shard`` on ``mesh`` (the layout the FSDP2 tests use)."""
    from torch.distributed.fsdp import fully_shard

    sharded = ThreeGroupingsNet().to(next(reference.parameters()).dtype)
    sharded.load_state_dict(reference.state_dict())
    for layer in (sharded.conv1, sharded.bn, sharded.conv2, sharded.gn, sharded.fc, sharded.ln, sharded.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    return sharded
