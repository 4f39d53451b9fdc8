"""Test helpers shared by the optimizer tests: scale-invariant parameters and a sum of
Rayleigh quotients over their groups (scale invariant group by group)."""

from __future__ import annotations

import geoopt
import torch

import psiopt


def psi_param(shape, grouping="channel", dtype=torch.float64, seed=0) -> geoopt.ManifoldParameter:
    gen = torch.Generator().manual_seed(seed)
    return geoopt.ManifoldParameter(torch.randn(shape, generator=gen, dtype=dtype), manifold=psiopt.PSIManifold(grouping))


def rayleigh_loss(params, mats) -> torch.Tensor:
    """Sum of Rayleigh quotients of the groups: scale invariant group by group."""
    total = 0.0
    for p, a in zip(params, mats):
        w = p.manifold.rows(p).to(a.dtype)
        total = total + ((w @ a) * w).sum(1).div((w * w).sum(1)).sum()
    return total


def sym(d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=dtype)
    return m + m.T


def unit_rows(p: torch.Tensor) -> torch.Tensor:
    w = p.manifold.rows(p.detach())
    return w / torch.linalg.vector_norm(w, dim=1, keepdim=True)
