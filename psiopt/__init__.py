"""psiopt: optimization on the PSI manifold of positively scale-invariant weights."""

import warnings as _warnings

# geoopt 0.5 calls torch.jit.script at import, which torch >= 2.10 deprecates; the
# warning is geoopt's, not the user's, so it is silenced for that one import only.
with _warnings.catch_warnings():
    _warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
    import geoopt as _geoopt  # noqa: F401

from ._version import __version__
from .grouping import Grouping, as_grouping
from .manifold import PSIManifold, ZeroGroupError
from .discovery import (
    RejectedCandidate,
    ScaleInvarianceReport,
    ScaleInvariantWeight,
    find_scale_invariant,
    is_scale_invariant,
    mark_scale_invariant,
    scale_invariant_parameters,
)
from .groups import param_groups
from . import baselines, layers, nn
from .baselines import ENorm, SBWN
from .optim import PSIGD, PSIAdam, PSIAdamW, PSIAdaSGD, PSISGD

__all__ = [
    "__version__",
    "Grouping",
    "as_grouping",
    "PSIManifold",
    "ZeroGroupError",
    "find_scale_invariant",
    "param_groups",
    "mark_scale_invariant",
    "ScaleInvariantWeight",
    "RejectedCandidate",
    "ScaleInvarianceReport",
    "scale_invariant_parameters",
    "is_scale_invariant",
    "nn",
    "baselines",
    "layers",
    "ENorm",
    "SBWN",
    "PSISGD",
    "PSIAdaSGD",
    "PSIAdam",
    "PSIAdamW",
    "PSIGD",
]
