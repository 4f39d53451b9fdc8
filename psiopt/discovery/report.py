"""Report: what discovery found, as records and a printable table."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..grouping import Grouping

__all__ = ["ScaleInvariantWeight", "RejectedCandidate", "ScaleInvarianceReport"]


@dataclass(frozen=True)
class ScaleInvariantWeight:
    """One weight found scale invariant.

    Attributes
    ----------
    name : str
        Qualified parameter name, as in ``model.named_parameters()``.
    shape : tuple of int
        The parameter's shape.
    grouping : Grouping
        How the weight splits into independently rescalable groups.
    norm_layer : str or None
        Qualified name of the module whose normalization makes the weight invariant
        (a norm layer, a module whose ``forward`` calls ``F.batch_norm``/``F.layer_norm``...
        itself, or ``<module>.parametrizations.weight`` for weight norm); the first of
        :attr:`norm_layers`; ``None`` for a weight given through ``candidates=``.
    norm_type : str or None
        That normalization's kind: the module's class (``"BatchNorm2d"``,
        ``"GroupNorm"``, a subclass such as ``"BatchNormAct2d"``), ``"weight_norm"``,
        or ``"F.layer_norm"``... for a functional call in a module that is no norm layer.
    path : tuple of str
        The operations between the layer and the normalization layer (``("ReLU",)``).
    proof_deviation : float
        Worst relative change measured by the proof that accepted the weight (the joint
        test of all candidates, or its own test if the joint one failed), with
        normalization eps set to the proof eps, over every normalization's output
        (before its affine map) and the model's output; at most the proof's ``rtol``.
    eps : float or None
        The normalization's real ``eps`` (``None`` for weight norm and given
        candidates).
    eps_sensitivity : (float, float) or None
        Relative change of the normalization's output (before its affine map) at its
        real eps when *all* groups are multiplied by the low and by the high factor
        (default 0.1 and 10), computed from the input it saw: how much eps breaks
        invariance on these inputs. ``(0, 0)`` for weight norm, ``None`` for given
        candidates and with ``measure_eps=False``.
    eps_bound : float or None
        First-order prediction of the relative change of the most eps-sensitive
        normalized group when shrunk by the low factor :math:`c`:
        :math:`\\epsilon (c^{-2} - 1) / (2 \\sigma^2_{\\min})`, with
        :math:`\\sigma^2_{\\min}` the smallest nonzero group variance measured at the
        norm layer's input.
    norm_layers : tuple of str
        Every module whose normalization the weight's layer reaches (more than one
        when the layer is called at several places).
    """

    name: str
    shape: tuple[int, ...]
    grouping: Grouping
    norm_layer: str | None
    norm_type: str | None
    path: tuple[str, ...] = ()
    proof_deviation: float = 0.0
    eps: float | None = None
    eps_sensitivity: tuple[float, float] | None = None
    eps_bound: float | None = None
    norm_layers: tuple[str, ...] = ()

    @property
    def num_groups(self) -> int:
        """Number of scale-invariant groups of the weight."""
        return self.grouping.num_groups(self.shape)

    @property
    def cause(self) -> str:
        """``<norm_type> '<norm_layer>'``, the layer that makes the weight invariant."""
        if self.norm_layer is None:
            return "given"
        return f"{self.norm_type} '{self.norm_layer}'"


@dataclass(frozen=True)
class RejectedCandidate:
    """A weight considered and not found scale invariant, with the reason.

    Attributes
    ----------
    name : str
        Qualified parameter name.
    reason : str
        Why it is not scale invariant.
    stage : {"structural", "numerical"}
        Which pass rejected it.
    """

    name: str
    reason: str
    stage: str


@dataclass(frozen=True)
class ScaleInvarianceReport(Sequence[ScaleInvariantWeight]):
    """What :func:`find_scale_invariant` found: a sequence of :class:`ScaleInvariantWeight`.

    Printing it gives a table of the found weights and the rejected candidates.

    Attributes
    ----------
    weights : tuple of ScaleInvariantWeight
        The scale-invariant weights, in ``named_parameters()`` order.
    rejected : tuple of RejectedCandidate
        Weights of Linear/Conv layers (and given candidates) that are not, and why.
    method : {"fx", "hooks", "given"}
        How the structural pass saw the model: a torch.fx trace, a recorded forward pass
        (forward hooks and a TorchFunctionMode), or not at all (``"given"``:
        ``candidates=`` was used).
    notes : tuple of str
        Remarks on the run, e.g. why torch.fx tracing failed.
    dtype : torch.dtype
        The precision the proof ran in, which the tolerance was chosen for (float32 for a
        float16/bfloat16 model, proved on a float32 copy).
    rtol, atol : float
        The proof's tolerance: each normalization's output (before its affine map) may
        change by ``rtol`` times its largest entry, each output tensor by
        ``max|y' - y| <= atol + rtol * max|y|``.
    factors : tuple of float
        The range the random factors (powers of two) cover.
    proof_eps : float
        The eps of every normalization layer during the proof.
    """

    weights: tuple[ScaleInvariantWeight, ...]
    rejected: tuple[RejectedCandidate, ...]
    method: str
    notes: tuple[str, ...] = ()
    dtype: torch.dtype = torch.float32
    rtol: float = 0.0
    atol: float = 0.0
    factors: tuple[float, float] = (0.1, 10.0)
    proof_eps: float = 1e-30

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[ScaleInvariantWeight]:
        return iter(self.weights)

    def __getitem__(self, index):  # type: ignore[override]
        return self.weights[index]

    def names(self) -> tuple[str, ...]:
        """The qualified names of the scale-invariant weights."""
        return tuple(w.name for w in self.weights)

    def get(self, name: str) -> ScaleInvariantWeight | None:
        """The record of parameter ``name``, or ``None`` if it was not found invariant."""
        for w in self.weights:
            if w.name == name:
                return w
        return None

    def rejected_names(self) -> tuple[str, ...]:
        """The qualified names of the rejected candidates."""
        return tuple(r.name for r in self.rejected)

    def __str__(self) -> str:
        low, high = self.factors
        head = (
            f"{len(self.weights)} scale-invariant weight(s) (structure: {self.method}; proof: "
            f"factors {low:g}..{high:g}, norm eps -> {self.proof_eps:g}, {_dtype_name(self.dtype)} "
            f"rtol {self.rtol:g})"
        )
        lines = [head]
        if self.weights:
            rows = [
                (
                    w.name,
                    "x".join(map(str, w.shape)),
                    w.grouping.describe(),
                    str(w.num_groups),
                    w.cause,
                    "-" if w.eps_sensitivity is None else "{:.1e} / {:.1e}".format(*w.eps_sensitivity),
                )
                for w in self.weights
            ]
            titles = ("name", "shape", "grouping", "groups", "made invariant by", f"eps effect x{low:g} / x{high:g}")
            lines += _table(titles, rows)
        if self.rejected:
            lines.append(f"{len(self.rejected)} rejected:")
            lines += [f"  {r.name}: {r.reason}" for r in self.rejected]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _table(titles: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(t), *(len(r[i]) for r in rows)) for i, t in enumerate(titles)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["  " + fmt.format(*titles).rstrip(), "  " + "  ".join("-" * w for w in widths)] + [
        "  " + fmt.format(*r).rstrip() for r in rows
    ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


