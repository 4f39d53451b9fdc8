"""psiopt.param_groups under DDP and FSDP2: two gloo processes on the CPU.

Every rank gets the same batch, so DDP's averaged gradient is the single-process one
and the distributed runs must equal a single-process PSISGD run (float64, 1e-9).
"""

from __future__ import annotations

import gc
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _nets import three_groupings_net
from torch import nn

import psiopt

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

DT = torch.float64
WORLD = 2
STEPS = 3


def _channel_net(seed=0):
    """Only channel groupings, with 5 and 7 output channels: shards of unequal length on 2 ranks."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, bias=False),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 36, 7, bias=False),
        nn.BatchNorm1d(7),
        nn.ReLU(),
        nn.Linear(7, 3),
    ).to(DT)


def _batch(t):
    gen = torch.Generator().manual_seed(100 + t)
    return torch.randn(6, 3, 8, 8, generator=gen, dtype=DT), torch.randint(0, 3, (6,), generator=gen)


def _optimizer(groups):
    return psiopt.PSISGD(groups, lr=0.1, momentum=0.9, nesterov=True)


def _train(model, opt):
    for t in range(STEPS):
        x, y = _batch(t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _summary(groups):
    return [(g.get("grouping"), g["param_names"]) for g in groups]


def _reference(build):
    model = build()
    groups = psiopt.param_groups(model, _batch(0)[0])
    _train(model, _optimizer(groups))
    return model, _summary(groups)


def _full(t):
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def _assert_equal_to(model, reference, label):
    """Close to the single-process run, and bit-identical on every rank."""
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        full = _full(p.detach())
        torch.testing.assert_close(full, q.detach(), rtol=0, atol=1e-9, msg=f"{label}: {name}")
        gathered = [torch.empty_like(full) for _ in range(WORLD)]
        dist.all_gather(gathered, full.contiguous())
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"{label}: ranks differ on {name}"


def _launch(worker, tmp_path):
    # A file store, not a TCP one: no port to pick, and no server thread that the first
    # rank to finish would take down under the others.
    store = tmp_path / "store"
    mp.spawn(_entry, args=(worker, f"file://{store}"), nprocs=WORLD, join=True)


def _entry(rank, worker, init_method):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        worker()
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        # The worker's models (DDP, FSDP state, device meshes) hold the process group in
        # reference cycles; freed only at interpreter exit, gloo's threads can abort it.
        gc.collect()
        dist.destroy_process_group()


# -- DDP ---------------------------------------------------------------------------------


def _ddp_worker():
    from torch.nn.parallel import DistributedDataParallel as DDP

    reference, expected = _reference(three_groupings_net)
    assert [g for g, _ in expected] == ["channel", "block(2)", "tensor", None]

    after = DDP(three_groupings_net())  # discovery after wrapping, collectively, on ddp.module
    groups = psiopt.param_groups(after, _batch(0)[0])
    assert _summary(groups) == expected
    assert {p for g in groups for p in g["params"]} == set(after.parameters())
    _train(after, _optimizer(groups))
    _assert_equal_to(after.module, reference, "discovery after wrapping")

    # Ranks that find different weights all raise (rank 1 tests one candidate only).
    options = {"candidates": {"0.weight": "channel"}} if dist.get_rank() == 1 else {}
    with pytest.raises(RuntimeError, match="the ranks found different scale-invariant weights"):
        psiopt.param_groups(after, _batch(0)[0], **options)
    with pytest.raises(TypeError, match="DistributedDataParallel.*psiopt.param_groups"):
        psiopt.mark_scale_invariant(after, _batch(0)[0])

    plain = three_groupings_net()
    report = psiopt.find_scale_invariant(plain, _batch(0)[0])  # before wrapping
    before = DDP(plain)
    groups = psiopt.param_groups(before, report=report)
    assert _summary(groups) == expected
    _train(before, _optimizer(groups))
    _assert_equal_to(before.module, reference, "discovery before wrapping")


def test_ddp_equals_single_process_with_discovery_before_and_after_wrapping(tmp_path):
    _launch(_ddp_worker, tmp_path)


# -- FSDP2 -------------------------------------------------------------------------------


def _shard(model, layers):
    from torch.distributed.fsdp import fully_shard

    for i in layers:
        fully_shard(model[i])
    fully_shard(model)
    return model


def _fsdp_worker():
    # Groups on every grouping kind, with and without a report.
    plain = three_groupings_net()
    x = _batch(0)[0]
    expected = _summary(psiopt.param_groups(plain, x))
    report = psiopt.find_scale_invariant(plain, x)
    sharded = _shard(three_groupings_net(), (0, 3, 8))
    before = {n: _full(p.detach()).clone() for n, p in sharded.named_parameters()}
    for groups in (psiopt.param_groups(sharded, report=report), psiopt.param_groups(sharded, x)):
        assert _summary(groups) == expected
        held = [p for g in groups for p in g["params"]]
        assert len(held) == len(set(held)) and set(held) == set(sharded.parameters())
        assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in held)
    after = {n: _full(p.detach()) for n, p in sharded.named_parameters()}
    assert all(torch.equal(before[n], after[n]) for n in before)  # discovery ran on a replica
    with pytest.raises(TypeError, match=r"fully_shard \(FSDP2\).*psiopt.param_groups"):
        psiopt.mark_scale_invariant(sharded, x)

    # The step on channel groupings (rows whole on each rank), shards of unequal length.
    reference, expected = _reference(_channel_net)
    model = _shard(_channel_net(), (0, 4))
    groups = psiopt.param_groups(model, _batch(0)[0])
    assert _summary(groups) == expected and [g for g, _ in expected] == ["channel", None]
    _train(model, _optimizer(groups))
    _assert_equal_to(model, reference, "FSDP2")


def test_fsdp2_param_groups_with_and_without_report_and_channel_step(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    _launch(_fsdp_worker, tmp_path)
