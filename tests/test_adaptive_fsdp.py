"""The adaptive steps (PSISGD's 'sgd' rate, PSIAdam, PSIAdamW, PSIAdaSGD) on FSDP2-sharded weights, on
CPU with gloo: channel groups, and groups split across the shards (a block grouping whose
middle block straddles them, a tensor grouping), step like a single process, with one
all-reduce per step for all of them and no other collective, and per-group states equal
on every rank; replicated DTensors step alone with no collective, and HSDP's layout
(replicated over one mesh dimension, sharded over the other) all-reduces over the
sharding dimension only."""

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
# channel (5 rows: 3 and 2), block(2) with a straddling block, a tensor grouping on 2 shards
SHARDED = ("conv1.weight", "conv2.weight", "fc.weight")
OPTIMIZERS = {
    "psisgd": lambda groups: psiopt.PSISGD(groups, lr=0.3, momentum=0.9, weight_decay=5e-4),
    "psisgd-no-momentum": lambda groups: psiopt.PSISGD(groups, lr=0.3),
    "psiadamw": lambda groups: psiopt.PSIAdamW(groups, lr=0.03, weight_decay=0.1),
    "psiadam-amsgrad-maximize": lambda groups: psiopt.PSIAdam(groups, lr=0.03, amsgrad=True, maximize=True),
    "psiadasgd-nesterov": lambda groups: psiopt.PSIAdaSGD(groups, lr=0.1, momentum=0.9, nesterov=True),
    "psiadasgd-no-momentum": lambda groups: psiopt.PSIAdaSGD(groups, lr=0.1),
}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(STEPS)]  # fmt: skip


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, maximize: bool) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    return -loss if maximize else loss


def _train(model, opt, batches, maximize=False, on_step=contextlib.nullcontext) -> None:
    for x, y in batches:
        opt.zero_grad()
        _loss(model, x, y, maximize).backward()
        with on_step():
            opt.step()


def _max_error(sharded: nn.Module, reference: nn.Module) -> float:
    return max(
        float((p.detach().full_tensor() - q.detach()).abs().max())
        for p, q in zip(sharded.parameters(), reference.parameters())
    )


def _split_states(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, list[torch.Tensor]]:
    named = dict(model.named_parameters())
    return {
        name: [t.clone() for key, t in sorted(opt.state[named[name]].items()) if key != "step" and t.dim() == 1]
        for name in SHARDED
    }


def _refusal(sharded: nn.Module, opt: torch.optim.Optimizer, poison) -> dict:
    """Step with a gradient that ``poison`` made NaN on one rank; whether both ranks refused
    with nothing changed, and the message."""
    before = [p.detach().full_tensor().clone() for p in sharded.parameters()]
    state_before = _split_states(sharded, opt)
    x, y = _batches()[1]
    opt.zero_grad()
    _loss(sharded, x, y, False).backward()
    poison()
    with pytest.raises(FloatingPointError) as refused:
        opt.step()
    unchanged = all(torch.equal(p.detach().full_tensor(), b) for p, b in zip(sharded.parameters(), before))
    after = _split_states(sharded, opt)
    unchanged = unchanged and all(torch.equal(a, b) for n in SHARDED for a, b in zip(after[n], state_before[n]))
    return dict(message=str(refused.value), unchanged=unchanged)


@contextlib.contextmanager
def _gloo(rank: int, init_file: str):
    """This rank in a gloo process group of ``WORLD`` ranks, one torch thread; yields the
    real ``dist.all_reduce`` (restored on the way out, whatever a test replaced it with)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    original_all_reduce = dist.all_reduce
    try:
        yield original_all_reduce
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.all_reduce = original_all_reduce
        # Models in reference cycles still hold the process group; freed at interpreter exit,
        # after gloo's threads, they abort the process.
        gc.collect()
        dist.destroy_process_group()


def _counting(original_all_reduce):
    """``(sizes, collectives, on_step)``: ``on_step()`` wraps one optimizer step, appending
    the bytes of each ``dist.all_reduce`` it makes to ``sizes`` and its number of
    collectives of any kind (DTensor's own included) to ``collectives``."""
    from torch.distributed.tensor.debug import CommDebugMode

    sizes: list[int] = []
    collectives: list[int] = []

    def counted(tensor, *args, **kwargs):
        sizes.append(tensor.numel() * tensor.element_size())
        return original_all_reduce(tensor, *args, **kwargs)

    @contextlib.contextmanager
    def on_step():
        dist.all_reduce = counted
        try:
            with CommDebugMode() as comm:
                yield
            collectives.append(sum(comm.get_comm_counts().values()))
        finally:
            dist.all_reduce = original_all_reduce

    return sizes, collectives, on_step


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    with _gloo(rank, init_file) as original_all_reduce:
        mesh = init_device_mesh("cpu", (WORLD,))
        results: dict[str, object] = {}
        for name, make in OPTIMIZERS.items():
            maximize = "maximize" in name
            torch.manual_seed(0)
            reference = ThreeGroupingsNet().double()
            if name == "psiadamw":
                with torch.no_grad():  # a split group whose part on rank 1 is zero: whole-nonzero, it steps
                    reference.fc.weight[4:].zero_()
            sharded = fully_sharded_copy(reference, mesh)
            _train(reference, make(hand_param_groups(reference)), _batches(), maximize)
            opt = make(hand_param_groups(sharded))
            sizes, collectives, on_step = _counting(original_all_reduce)
            _train(sharded, opt, _batches(), maximize, on_step)
            results[name] = dict(
                err=_max_error(sharded, reference), sizes=sizes, collectives=collectives,
                states=_split_states(sharded, opt),
            )  # fmt: skip

        # Resumed from optimizer.state_dict() after two steps: the same as four steps in one go.
        torch.manual_seed(0)
        reference = ThreeGroupingsNet().double()
        sharded = fully_sharded_copy(reference, mesh)
        _train(reference, OPTIMIZERS["psisgd"](hand_param_groups(reference)), _batches())
        opt = OPTIMIZERS["psisgd"](hand_param_groups(sharded))
        _train(sharded, opt, _batches()[:2])
        saved = opt.state_dict()
        opt = OPTIMIZERS["psisgd"](hand_param_groups(sharded))
        opt.load_state_dict(saved)
        # Earlier versions kept a channel weight's per-group states as replicated DTensors.
        for key in ("exp_avg_sq", "virtual_sq_norm"):
            state = opt.state[sharded.conv1.weight]
            state[key] = distribute_tensor(state[key], mesh, [Replicate()])
        _train(sharded, opt, _batches()[2:])
        results["resumed"] = _max_error(sharded, reference)

        # A NaN on rank 1 only, in a split group's gradient or in a Euclidean one: both ranks
        # refuse (the flag travels in the step's all-reduce), and nothing changes.
        for where, weight in (("split", "fc"), ("euclidean", "head")):
            torch.manual_seed(0)
            sharded = fully_sharded_copy(ThreeGroupingsNet().double(), mesh)
            opt = OPTIMIZERS["psiadamw"](hand_param_groups(sharded))
            _train(sharded, opt, _batches()[:1])

            def poison(sharded=sharded, weight=weight):
                if rank == 1:
                    getattr(sharded, weight).weight.grad.to_local()[0, 0] = float("nan")

            results[f"nan-{where}"] = _refusal(sharded, opt, poison)

        torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_fsdp2_adaptive_steps_on_split_groups_step_like_a_single_process(tmp_path) -> None:
    pytest.importorskip("torch.distributed.fsdp")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for rank, results in enumerate(ranks):
        for name in OPTIMIZERS:
            result = results[name]
            assert result["err"] < 1e-9, (name, result["err"])
            # One all-reduce per step and no other collective: the 6 sums of every group
            # (conv1's 5 channels, conv2's 3 blocks, fc's 1 tensor) and one flag (another
            # gradient not finite), in float64: 440 bytes.
            assert result["sizes"] == [8 * (6 * (5 + 3 + 1) + 1)] * STEPS, (name, result["sizes"])
            assert result["collectives"] == [1] * STEPS, (name, result["collectives"])
        assert results["resumed"] < 1e-9
        for where in ("split", "euclidean"):
            refusal = results[f"nan-{where}"]
            assert refusal["unchanged"], (where, refusal)
            assert "refused" in refusal["message"], (where, refusal)
        assert "'fc.weight'" in results["nan-split"]["message"]  # the sums name it on every rank
        if rank == 1:
            assert "'head.weight'" in results["nan-euclidean"]["message"]
        else:
            assert "another rank" in results["nan-euclidean"]["message"]
    # The per-group states of sharded weights are replicated: equal on both ranks.
    for name in OPTIMIZERS:
        for weight in SHARDED:
            first, second = (results[name]["states"][weight] for results in ranks)
            assert first and all(torch.equal(a, b) for a, b in zip(first, second)), (name, weight)


# Three raw weights, one per grouping, with gradients given by hand: 5 channels (3 + 2 rows
# on two shards), block(2) on 6 rows (3 + 3: the middle block straddles), one tensor group.
LAYOUT_WEIGHTS = (((5, 3, 3, 3), "channel"), ((6, 4), "block(2)"), ((5, 4), "tensor"))


def _layout_run(make, weights: list[torch.Tensor], grads: list[list[torch.Tensor]], on_step=contextlib.nullcontext):
    groups = [{"params": [w], "grouping": g} for w, (_, g) in zip(weights, LAYOUT_WEIGHTS)]
    opt = make(groups)
    for step_grads in grads:
        for w, g in zip(weights, step_grads):
            w.grad = g
        with on_step():
            opt.step()


def _layout_worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    with _gloo(rank, init_file) as original_all_reduce:
        layouts = {
            "replicated": (init_device_mesh("cpu", (WORLD,)), [Replicate()]),
            # HSDP's layout: replicated over the first mesh dimension, sharded over the second.
            "hsdp": (init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard")),
                     [Replicate(), Shard(0)]),
        }  # fmt: skip
        gen = torch.Generator().manual_seed(5)
        start = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape, _ in LAYOUT_WEIGHTS]
        grads = [[torch.randn(shape, generator=gen, dtype=torch.float64) for shape, _ in LAYOUT_WEIGHTS]
                 for _ in range(STEPS)]  # fmt: skip
        results: dict[str, object] = {}
        for layout, (mesh, placements) in layouts.items():
            for name, make in OPTIMIZERS.items():
                reference = [nn.Parameter(w.clone()) for w in start]
                _layout_run(make, reference, grads)
                weights = [nn.Parameter(distribute_tensor(w.clone(), mesh, placements)) for w in start]
                dgrads = [[distribute_tensor(g, mesh, placements) for g in step] for step in grads]
                sizes, collectives, on_step = _counting(original_all_reduce)
                _layout_run(make, weights, dgrads, on_step)
                err = max(float((w.detach().full_tensor() - r.detach()).abs().max()) for w, r in zip(weights, reference))
                results[f"{layout}/{name}"] = dict(err=err, sizes=sizes, collectives=collectives)
        torch.save(results, f"{out_dir}/layouts-rank{rank}.pt")


def test_replicated_and_hsdp_dtensors_step_like_a_single_process(tmp_path) -> None:
    pytest.importorskip("torch.distributed.tensor")
    mp.spawn(_layout_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"layouts-rank{rank}.pt")
        for name in OPTIMIZERS:
            # Replicated: every rank holds whole groups and steps them alone, with no collective.
            replicated = results[f"replicated/{name}"]
            assert replicated["err"] < 1e-9, (name, replicated["err"])
            assert replicated["sizes"] == [] and replicated["collectives"] == [0] * STEPS, (name, replicated)
            # HSDP: the sums go over the sharding dimension only, in one all-reduce of 440 bytes per step.
            hsdp = results[f"hsdp/{name}"]
            assert hsdp["err"] < 1e-9, (name, hsdp["err"])
            assert hsdp["sizes"] == [8 * (6 * (5 + 3 + 1) + 1)] * STEPS, (name, hsdp["sizes"])
            assert hsdp["collectives"] == [1] * STEPS, (name, hsdp["collectives"])
