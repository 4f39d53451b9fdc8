"""PSISGD on FSDP2-sharded weights (DTensors sharded on dim 0, unevenly), on CPU with gloo:
the same iterates as single-process PSISGD, with one all-reduce of a few numbers per step."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _nets import ThreeGroupingsNet, fully_sharded_copy, hand_param_groups
from torch import nn

import psiopt

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

WORLD = 2
STEPS = 4
# The constant angular rate (the 'sgd' rate takes the adaptive step: tests/test_adaptive_fsdp.py).
CONFIGS = [
    dict(momentum=0.9, nesterov=False, angular_rate="constant"),  # the default path (fused kernels on local shards if numba is installed)
    dict(momentum=0.9, nesterov=True, foreach=True, angular_rate="constant"),
    dict(momentum=0.9, dampening=0.1, capturable=True, angular_rate="constant"),
]
# Each config as is, then the default and the no-sync paths once more with every row of a
# split group that sits on rank 1 zeroed (conv2's channel 3, fc's rows 4-6): those groups
# are whole-nonzero, so the step must go on, not be refused for a zero part.
RUNS = [(config, False) for config in CONFIGS] + [(CONFIGS[0], True), (CONFIGS[2], True)]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(STEPS)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, on_step=contextlib.nullcontext) -> None:
    for x, y in _batches():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with on_step():
            opt.step()


@contextlib.contextmanager
def _counting_all_reduce(record: list[int]):
    """Count dist.all_reduce calls and their bytes inside this worker process only."""
    original = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        record.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        yield
    finally:
        dist.all_reduce = original


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = []
        for config, zero_split_rows in RUNS:
            torch.manual_seed(0)
            reference = ThreeGroupingsNet().double()
            if zero_split_rows:
                with torch.no_grad():
                    reference.conv2.weight[3].zero_()
                    reference.fc.weight[4:].zero_()
            sharded = fully_sharded_copy(reference, mesh)
            _train(reference, psiopt.PSISGD(hand_param_groups(reference), lr=0.1, **config))

            opt = psiopt.PSISGD(hand_param_groups(sharded), lr=0.1, **config)
            sizes: list[int] = []
            counts: list[dict] = []

            @contextlib.contextmanager
            def on_step():
                with _counting_all_reduce(sizes), CommDebugMode() as comm:
                    yield
                counts.append({str(k): v for k, v in comm.get_comm_counts().items()})

            _train(sharded, opt, on_step)
            err = max(
                float((p.detach().full_tensor() - q.detach()).abs().max())
                for p, q in zip(sharded.parameters(), reference.parameters())
            )
            model_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
            results.append(dict(err=err, sizes=sizes, counts=counts, model_bytes=model_bytes))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        # Models in reference cycles still hold the process group; freed at interpreter exit,
        # after gloo's threads, they abort the process (seen 1 run in 10 without this).
        gc.collect()
        dist.destroy_process_group()


def test_fsdp2_sharded_weights_step_like_a_single_process(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(results) == len(RUNS)
        for (config, _), result in zip(RUNS, results):
            assert result["err"] < 1e-9, (config, result["err"])
            # One all-reduce per step, of 6 sums per split group (conv2's 3 blocks, fc's
            # whole tensor) plus one flag per sharded weight and one for the other
            # gradients, in float64: 224 bytes, for a model of about 7 KB.
            assert result["sizes"] == [8 * (6 * 3 + 6 * 1 + 3 + 1)] * STEPS, (config, result["sizes"])
            for counts in result["counts"]:
                assert sum(counts.values()) == 1, (config, counts)  # no other collective: no all-gather
            assert result["model_bytes"] == 8 * sum(p.numel() for p in ThreeGroupingsNet().parameters())
