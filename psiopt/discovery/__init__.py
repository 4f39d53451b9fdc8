r"""Find and mark the scale-invariant weights of a model.

A weight is *scale invariant* when each of its groups (see :class:`psiopt.Grouping`)
can be multiplied by its own positive factor without changing the network's output
in training mode. :func:`find_scale_invariant` finds those weights in four stages, one
module each. :func:`psiopt.param_groups` hands them to psiopt's optimizers as param
groups; :func:`mark_scale_invariant` turns each into a :class:`geoopt.ManifoldParameter`
on a :class:`psiopt.PSIManifold`, which is what geoopt's optimizers (and SGD-G) read.

See (:mod:`psiopt.discovery.graph`)
-----------------------------------
The model is traced with :func:`torch.fx.symbolic_trace` and run once on the example
inputs under a :class:`torch.overrides.TorchFunctionMode` that records every torch
function and tensor method it calls. When tracing fails (for example, Python control
flow that depends on the data), or with ``structure="hooks"``, the recorded pass is the
graph, and :attr:`ScaleInvarianceReport.method` says ``"hooks"`` (transformers' models,
for instance). Both views see functional calls (``F.relu``, ``x + y``, ``F.batch_norm``
in a module's own ``forward``), so a normalization is recognized by what it computes,
not by its class: a subclass of a torch norm layer with its own ``forward`` (timm's
``BatchNormAct2d``, ``GroupNormAct``, ``LayerNorm2d``), an activation fused after it,
``F.layer_norm`` in a model's forward, or an RMS norm written out as
``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``, in float32 with casts back
and forth, as transformers' ``LlamaRMSNorm``, ``Qwen3RMSNorm``, ``Gemma3RMSNorm``... do
(:mod:`psiopt.discovery.written` lists the forms).

Propose (:mod:`psiopt.discovery.structure`)
-------------------------------------------
A weight is a candidate when it is the weight of a Linear/ConvNd computation (depthwise
and grouped convs included) whose output reaches a normalization, *and nothing else*,
through per-channel, positively homogeneous operations (:math:`f(c z) = c f(z)` for
:math:`c > 0`) and layout changes; what comes after the normalization (an activation,
a squeeze-excitation gate, a residual add, a layer scale) does not matter. The tables
live in :mod:`psiopt.layers`:

====================================  =====================================================
between the layer and the norm        allowed
====================================  =====================================================
nothing, ``Identity``, max pooling,   yes (also with a bias on the layer: these commute
adaptive pooling                      with a per-channel :math:`c z + b`)
ReLU, LeakyReLU, PReLU, average       yes when the layer has no bias (a bias does not
pooling, Dropout                      scale with the weight)
permute, transpose, flatten, view,    yes; the channels are followed, also when a view
reshape, unflatten, (un)squeeze,      splits them, as attention splits a projection's
contiguous                            output into heads ``(B, T, heads, head_dim)``; a
                                      reshape must not merge them with other dims
Tanh, Sigmoid, GELU, ReLU6, add,      no: not positively homogeneous, or mixes in other
mul, anything else                    tensors
====================================  =====================================================

==========================================  ===========================================
normalization (module or function)          grouping of the weight
==========================================  ===========================================
batch norm, instance norm                   ``channel``
group norm with G groups of C channels      ``block(C/G)`` (``channel`` if G = C,
                                            ``tensor`` if G = 1)
layer norm, RMS norm over dims that         ``tensor`` (one group: all output features
include the layer's output channels         are normalized together); e.g. a conv, then
                                            permute to channels-last and ``F.layer_norm``
                                            over the channels (ConvNeXt's ``LayerNorm2d``)
layer norm, RMS norm over the minor part    ``block(head_dim)``: each head's rows; e.g.
of split channels                           the QK-norm of Qwen3 and Gemma-3 (a view into
                                            heads, then an RMS norm over ``head_dim``;
                                            OLMo-2's, over the whole projection, gives
                                            ``tensor``)
layer norm, RMS norm over other dims only   ``channel``
==========================================  ===========================================

A bias before the norm: batch and instance norm subtract a per-channel mean, which
removes the bias, so the *weight alone* stays invariant (scaling weight and bias
together is the symmetry of the design note; BatchNorm makes the bias's gradient
exactly 0, so psiopt leaves biases to the Euclidean optimizer). Group and layer norm
with ``tensor``/``block`` groupings mix channels with different biases, and RMS norm
subtracts no mean, so there a biased layer is rejected (a ``q_proj`` with a bias before
a QK-norm, say: its head's rows and bias entries would have to be rescaled together,
and a group of psiopt is rows of one tensor).

When a layer's channels do not reach a normalization one by one, a bias-free layer is
followed once more, for a scale common to its whole output (``tensor`` grouping): then
the path may also multiply by tensors that do not depend on the layer (attention's
weights times its values, a gate's product), pass other bias-free Linear/ConvNd layers,
and pick or repeat entries (``x[..., None]``, ``expand``, a ``cat`` with empty tensors, as
a key/value cache's first step makes). The post-norms of OLMo-2 and Gemma-3 make their
``v_proj`` and ``up_proj`` invariant so.

An operation whose result the model's output does not depend on (a cache keeping a slice
for the next call) is no use of a value. A weight that something other than its layer
also reads (an embedding tied to the layer, say) is rejected: what that reader computes
is not normalized.

Independently of any norm layer, the direction ``v`` of
:func:`torch.nn.utils.parametrizations.weight_norm` (parameter
``parametrizations.weight.original1``) is invariant to each row's scale, since the
layer uses :math:`g\, v/\|v\|`: it is found with the ``channel`` grouping (``tensor``
for ``dim=None``). Other parametrizations hide the weight and are rejected. The
transposed convolutions keep output channels in dim 1 of their weight, which no
grouping describes, so they are rejected too.

Prove (:mod:`psiopt.discovery.proof`)
-------------------------------------
Each candidate is then tested on the example inputs, with every submodule in
training mode (the mode a network is trained in; in ``eval()`` BatchNorm uses running
statistics and nothing is invariant): its groups are multiplied by random powers of
two covering ``factors`` (by default :math:`[0.1, 10]`, so :math:`2^{-4}..2^4`), with
one group at each end, then by the mirrored factors :math:`2^{a+b}/2^{e_j}` so that
every group sees both a shrink and a growth. Multiplying by a power of two is exact in
floating point, so for an invariant weight the normalization's statistics, and its
output, do not change by a single rounding, however deep in a float32 network it sits;
a weight that is not invariant changes them by orders of magnitude more. The check is made where invariance happens: the output of every
normalization, before its affine map, must stay within ``rtol`` of the unscaled one
relative to its own scale, and the model's output within ``rtol`` relative to its
largest entry. A small gain after the normalization (a LayerScale of 1e-6, the
zero-initialized last BatchNorm of a residual branch) thus neither hides a weight that
is not invariant nor one that is.

The normalization's ``eps`` breaks invariance slightly:
:math:`\mathrm{BN}(c z) = (z - \mu)/\sqrt{\sigma^2 + \epsilon/c^2}`, so shrinking a
channel whose variance is :math:`\sigma^2` by :math:`c` changes its normalized output by
about :math:`\epsilon (c^{-2} - 1)/(2\sigma^2)`. To tell that apart from a real failure
(a Tanh between layer and norm), the proof replaces every normalization call's eps by
``proof_eps`` (default ``1e-30``: zero for all purposes, yet a channel that is all zeros
still normalizes to 0 instead of NaN). Each found weight then reports how much the
*real* eps breaks invariance at its normalization
(:attr:`ScaleInvariantWeight.eps_sensitivity`, :attr:`ScaleInvariantWeight.eps_bound`).

A model holding float16 or bfloat16 tensors is proved on a float32 copy: the answer
is the model's, not its rounding's, and is the same in every precision.

The model comes back exactly as it was: parameters (never written: the scaled copies
are swapped in through ``.data``), buffers (BatchNorm running statistics and
``num_batches_tracked``), the train/eval flag of every submodule, and the global random
state (Python, NumPy, torch CPU and CUDA); each forward runs with a fixed seed so
dropout draws the same masks in every run.

Marking (:mod:`psiopt.discovery.marking`)
-----------------------------------------
:func:`mark_scale_invariant` turns each found parameter, in place, into a
``geoopt.ManifoldParameter`` on ``PSIManifold(grouping)`` (the object stays the same,
so nothing that holds it goes stale), for geoopt's optimizers. psiopt's optimizers
read scale invariance from their param groups: :func:`psiopt.param_groups`.
"""

from .find import find_scale_invariant
from .marking import is_scale_invariant, mark_scale_invariant, scale_invariant_parameters
from .report import RejectedCandidate, ScaleInvarianceReport, ScaleInvariantWeight

__all__ = [
    "ScaleInvariantWeight",
    "RejectedCandidate",
    "ScaleInvarianceReport",
    "find_scale_invariant",
    "mark_scale_invariant",
    "scale_invariant_parameters",
    "is_scale_invariant",
]
