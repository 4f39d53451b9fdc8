"""The property psiopt stands on: equivalent weights follow equivalent trajectories.

A BatchNorm CNN on scikit-learn's bundled digits (real 8x8 images), in float64. Run A
starts from ``w``; run B from the same network with every scale-invariant group
multiplied by its own random factor in ``[1e-2, 1e2]``; both see the same batches.
Under PSISGD the normalized groups ``w_j/||w_j||`` of A and B must agree to 1e-8 at
every one of 200 steps, and the losses too.

Two things limit exactness, and both are handled here:

* the norm layers' ``eps``, the only term that breaks the invariance, is set to 1e-20;
* training is chaotic and amplifies rounding. Run C starts from A's weights perturbed
  by a relative 1e-15 (rounding level) and measures that floor; the test asserts it
  stays far below the tolerance, so a pass is not luck of the chosen steps.

The negative control: the same experiment with ``torch.optim.SGD`` drifts far apart.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import psiopt

STEPS = 200
BATCH = 32
TOL = 1e-8
LR = 0.05


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float64).unsqueeze(1)
    return images, torch.tensor(data.target, dtype=torch.long)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, eps=1e-20),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16, eps=1e-20),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).double()


def _normalized_groups(model: nn.Module) -> torch.Tensor:
    rows = []
    for _, p in psiopt.scale_invariant_parameters(model):
        w = p.manifold.rows(p.detach())
        rows.append((w / torch.linalg.vector_norm(w, dim=1, keepdim=True)).flatten())
    return torch.cat(rows)


def _setup(seed: int):
    torch.manual_seed(seed)
    images, labels = _digits()
    model = _cnn()
    report = psiopt.mark_scale_invariant(model, images[:BATCH])
    assert set(report.names()) == {"0.weight", "4.weight"}  # both convs feed a BatchNorm

    scaled = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed + 1)
    factors = []
    with torch.no_grad():
        for _, p in psiopt.scale_invariant_parameters(scaled):
            k = p.manifold.num_groups(p)
            a = 10.0 ** (4.0 * torch.rand(k, 1, generator=gen, dtype=torch.float64) - 2.0)
            p.manifold.rows(p).mul_(a)
            factors.append(a)

    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.mul_(1.0 + 1e-15 * torch.randn(p.shape, generator=gen, dtype=p.dtype))

    order = torch.randperm(len(images), generator=gen)
    batches = [order[(i * BATCH) % (len(images) - BATCH) :][:BATCH] for i in range(STEPS)]
    return images, labels, (model, scaled, perturbed), factors, batches


def _train(models, make_optimizer, images, labels, batches):
    """Step every model on the same batches; record per-step max deviation of the
    normalized groups (vs the first model) and the losses."""
    optimizers = [make_optimizer(m) for m in models]
    deviations = np.zeros((STEPS, len(models) - 1))
    losses = np.zeros((STEPS, len(models)))
    for t, idx in enumerate(batches):
        for i, (m, opt) in enumerate(zip(models, optimizers)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(images[idx]), labels[idx])
            loss.backward()
            opt.step()
            losses[t, i] = loss.item()
        ref = _normalized_groups(models[0])
        for i, m in enumerate(models[1:]):
            deviations[t, i] = float((_normalized_groups(m) - ref).abs().max())
    return deviations, losses


def assert_equivalent_trajectories(make) -> None:
    """Train the model, its rescaled copy and a perturbed copy with optimizers from ``make``
    and check the defining property against the chaos floor (shared by every psiopt
    optimizer's test of it)."""
    images, labels, models, factors, batches = _setup(seed=0)
    model, scaled, perturbed = models
    deviations, losses = _train([model, scaled, perturbed], make, images, labels, batches)
    scale_dev, chaos_floor = deviations[:, 0], deviations[:, 1]

    # The chaos floor: rounding-level differences stay far below the tolerance at these
    # steps and learning rate, so the comparison below is meaningful.
    assert chaos_floor.max() < TOL * 1e-2, f"chaos floor {chaos_floor.max():.2e} too close to the tolerance"
    # The property: at every step, the rescaled run is in the class of the original.
    assert scale_dev.max() < TOL, f"normalized groups differ by {scale_dev.max():.2e} (step {scale_dev.argmax()})"
    np.testing.assert_allclose(losses[:, 1], losses[:, 0], rtol=TOL, atol=0)
    # Training happened: the loss went down, the directions moved far from the start.
    assert losses[-20:, 0].mean() < 0.5 * losses[:20, 0].mean()

    # With the norm-keeping representative, run B is exactly a * (run A), up to rounding.
    with torch.no_grad():
        pairs = zip(psiopt.scale_invariant_parameters(model), psiopt.scale_invariant_parameters(scaled), factors)
        for (_, pa), (_, pb), a in pairs:
            torch.testing.assert_close(pb.manifold.rows(pb), a * pa.manifold.rows(pa), rtol=TOL, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_equivalent_weights_follow_equivalent_trajectories(nesterov: bool) -> None:
    assert_equivalent_trajectories(lambda m: psiopt.PSISGD(m.parameters(), lr=LR, momentum=0.9, nesterov=nesterov))


@pytest.mark.slow
def test_negative_control_euclidean_sgd_drifts() -> None:
    images, labels, models, _, batches = _setup(seed=0)
    model, scaled, _ = models

    def make(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9)

    deviations, _ = _train([model, scaled], make, images, labels, batches)
    # Plain SGD's effective step lr/||w_j||^2 depends on the arbitrary scale: the two
    # equivalent starts leave each other's class.
    assert deviations[:, 0].max() > 1e-2
