"""How a weight tensor splits into scale-invariant groups.

A *grouping* says which entries of a weight tensor are rescaled together by the
positive-scaling symmetry that a normalization layer creates. Every grouping
psiopt supports reshapes the tensor to a matrix of shape ``(k, d)`` whose rows are
the groups, because the groups are always made of consecutive output channels
(dim 0) and PyTorch stores a weight's output channels along dim 0:

==========  ===============================================  ================
kind        layer pattern                                    groups
==========  ===============================================  ================
channel     Linear/Conv -> BatchNorm, InstanceNorm;          one per row /
            weight norm's direction ``v``                    output filter
tensor      Linear -> LayerNorm over the output features     the whole tensor
block       Conv/Linear -> GroupNorm(G, C)                   ``C/G`` consecutive
                                                             output channels
==========  ===============================================  ================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import nn

__all__ = ["Grouping", "GroupingLike", "as_grouping", "CHANNEL_FIRST_LAYERS"]

CHANNEL_FIRST_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers whose ``weight`` holds output channels along dim 0, the layout every grouping
assumes (transposed convolutions keep them in dim 1 and are not among them)."""

GroupKind = Literal["channel", "tensor", "block"]
_KINDS = ("channel", "tensor", "block")


@dataclass(frozen=True)
class Grouping:
    """Which entries of a weight tensor form one scale-invariant group.

    Parameters
    ----------
    kind : {"channel", "tensor", "block"}
        ``"channel"``: one group per output channel (dim 0). ``"tensor"``: the whole
        tensor is one group. ``"block"``: blocks of ``channels_per_group``
        consecutive output channels.
    channels_per_group : int, optional
        Required for ``"block"`` and only there: ``C / G`` for a ``GroupNorm(G, C)``.
    """

    kind: GroupKind = "channel"
    channels_per_group: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(
                f"unknown grouping kind {self.kind!r}; use one of {', '.join(map(repr, _KINDS))}"
            )
        if self.kind == "block":
            cpg = self.channels_per_group
            if not isinstance(cpg, int) or isinstance(cpg, bool) or cpg < 1:
                raise ValueError(
                    "a 'block' grouping needs channels_per_group, a positive int "
                    f"(C / G for GroupNorm(G, C)); got {cpg!r}"
                )
        elif self.channels_per_group is not None:
            raise ValueError(
                f"channels_per_group applies only to the 'block' grouping, not {self.kind!r}; "
                "leave it out"
            )

    # -- constructors -----------------------------------------------------------------
    @classmethod
    def per_channel(cls) -> "Grouping":
        """One group per output channel (rows of Linear, filters of ConvNd)."""
        return cls("channel")

    @classmethod
    def whole(cls) -> "Grouping":
        """The whole tensor is one group (Linear -> LayerNorm)."""
        return cls("tensor")

    @classmethod
    def blocks(cls, channels_per_group: int) -> "Grouping":
        """Blocks of ``channels_per_group`` consecutive output channels (GroupNorm)."""
        return cls("block", channels_per_group)

    # -- shape logic ------------------------------------------------------------------
    def num_groups(self, shape: torch.Size | tuple[int, ...]) -> int:
        """Number of groups ``k`` in a tensor of this shape; raises if it does not fit."""
        if len(shape) == 0:
            raise ValueError(
                "a scale-invariant weight must have at least one dimension (output channels); "
                "got a 0-d tensor"
            )
        channels = shape[0]
        if channels == 0 or any(s == 0 for s in shape):
            raise ValueError(f"a scale-invariant weight cannot be empty; got shape {tuple(shape)}")
        if self.kind == "channel":
            return channels
        if self.kind == "tensor":
            return 1
        cpg = self.channels_per_group
        assert cpg is not None
        if channels % cpg:
            raise ValueError(
                f"shape {tuple(shape)} has {channels} output channels, not a multiple of "
                f"channels_per_group={cpg}; use the C / G of the GroupNorm that follows the layer"
            )
        return channels // cpg

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` reshaped to ``(k, d)``, one group per row (a view when ``x`` is contiguous)."""
        return x.reshape(self.num_groups(x.shape), -1)

    def describe(self) -> str:
        """Short human-readable form, e.g. ``channel`` or ``block(4)``."""
        if self.kind == "block":
            return f"block({self.channels_per_group})"
        return self.kind

    def __str__(self) -> str:
        return self.describe()


GroupingLike = Union[Grouping, str]


def as_grouping(grouping: GroupingLike, channels_per_group: int | None = None) -> Grouping:
    """Turn ``"channel"``, ``"tensor"``, ``"block"`` (+ ``channels_per_group``), ``"block(4)"``
    or a :class:`Grouping` into a :class:`Grouping`."""
    if isinstance(grouping, Grouping):
        if channels_per_group is not None and channels_per_group != grouping.channels_per_group:
            raise ValueError(
                "channels_per_group given twice with different values: "
                f"{grouping.channels_per_group} in the Grouping and {channels_per_group}"
            )
        return grouping
    if isinstance(grouping, str):
        text = grouping.strip()
        if text.startswith("block(") and text.endswith(")"):
            try:
                cpg = int(text[len("block(") : -1])
            except ValueError:
                raise ValueError(f"cannot read a grouping from {grouping!r}; write e.g. 'block(4)'") from None
            return as_grouping("block", cpg if channels_per_group is None else channels_per_group)
        return Grouping(text, channels_per_group)  # type: ignore[arg-type]
    raise TypeError(
        f"a grouping must be a psiopt.Grouping or one of 'channel', 'tensor', 'block'; "
        f"got {type(grouping).__name__}"
    )
