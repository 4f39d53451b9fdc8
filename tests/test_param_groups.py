"""psiopt.param_groups, optimizer state that loads with weights_only=True, and marking in place."""

from __future__ import annotations

import copy
import io

import geoopt
import pytest
import torch
from _nets import three_groupings_net
from torch import nn
from torch.optim import optimizer as torch_optimizer

import psiopt

DT = torch.float64
EXPECTED = [("channel", ["0.weight"]), ("block(2)", ["3.weight"]), ("tensor", ["8.weight"])]


def _batch(t=0, n=6):
    gen = torch.Generator().manual_seed(100 + t)
    return torch.randn(n, 3, 8, 8, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen)


def _summary(groups):
    return [(g.get("grouping"), g["param_names"]) for g in groups]


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        x, y = _batch(t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


# -- the groups --------------------------------------------------------------------------


def test_one_group_per_grouping_then_the_rest_each_parameter_once():
    model = three_groupings_net()
    groups = psiopt.param_groups(model, _batch()[0])
    assert _summary(groups)[:3] == EXPECTED
    rest = groups[3]
    assert "grouping" not in rest
    assert rest["param_names"] == [f"{i}.{kind}" for i in (1, 4, 9, 11) for kind in ("weight", "bias")]
    held = [p for g in groups for p in g["params"]]
    assert len(held) == len(set(held)) and set(held) == set(model.parameters())  # the model's own objects
    assert all(type(p) is nn.Parameter for p in held)  # nothing marked or replaced


def test_tied_parameter_appears_once():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(shared, nn.BatchNorm1d(4), nn.ReLU(), shared, nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT)
    groups = psiopt.param_groups(model, torch.randn(8, 4, dtype=DT))
    assert _summary(groups)[0] == ("channel", ["0.weight"])
    held = [p for g in groups for p in g["params"]]
    assert len(held) == len(set(held)) == len(list(model.parameters()))
    psiopt.PSISGD(groups, lr=0.1)  # torch accepts them: no parameter twice


def test_options_are_merged_per_kind():
    groups = psiopt.param_groups(
        three_groupings_net(), _batch()[0], scale_invariant={"lr": 0.05}, others={"weight_decay": 5e-4}
    )
    assert [g.get("lr") for g in groups] == [0.05, 0.05, 0.05, None]
    assert [g.get("weight_decay") for g in groups] == [None, None, None, 5e-4]
    opt = psiopt.PSISGD(groups, lr=0.1, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05, 0.05, 0.1]


def test_report_runs_no_forward_pass():
    model = three_groupings_net()
    report = psiopt.find_scale_invariant(model, _batch()[0])
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    discovered = psiopt.param_groups(three_groupings_net(), _batch()[0])
    assert _summary(psiopt.param_groups(model, report=report)) == _summary(discovered)
    assert calls == []


def test_compiled_model_after_a_forward_gives_the_eager_groups():
    model = three_groupings_net()
    eager = psiopt.param_groups(model, _batch()[0])
    compiled = torch.compile(model, backend="eager")
    compiled(_batch()[0])
    report = psiopt.find_scale_invariant(model, _batch()[0])
    for groups in (psiopt.param_groups(compiled, _batch()[0]), psiopt.param_groups(compiled, report=report)):
        assert _summary(groups) == _summary(eager)
        assert all(a is b for ge, gc in zip(eager, groups) for a, b in zip(ge["params"], gc["params"]))


def test_names_match_across_a_compiled_submodule():
    model = three_groupings_net()
    model[3] = torch.compile(model[3], backend="eager")  # names become 3._orig_mod.weight
    report = psiopt.find_scale_invariant(three_groupings_net(), _batch()[0])  # names of the plain model
    groups = psiopt.param_groups(model, report=report)
    assert _summary(groups)[:3] == EXPECTED
    assert groups[1]["params"][0] is model[3]._orig_mod.weight


# -- bad input ---------------------------------------------------------------------------


def test_report_naming_a_missing_parameter_is_refused():
    report = psiopt.find_scale_invariant(three_groupings_net(), _batch()[0])
    smaller = nn.Sequential(*list(three_groupings_net())[:6])
    with pytest.raises(ValueError, match=r"report names parameter '8\.weight', which the model does not have"):
        psiopt.param_groups(smaller, report=report)


def test_grouping_that_does_not_fit_the_shape_is_refused():
    report = psiopt.find_scale_invariant(three_groupings_net(), _batch()[0])
    other = three_groupings_net()
    other[3] = nn.Conv2d(5, 7, 3, bias=False).to(DT)  # 7 channels: not blocks of 2
    with pytest.raises(ValueError, match=r"parameter '3\.weight'.*'block\(2\)' does not fit.*7 output channels"):
        psiopt.param_groups(other, report=report)


def test_one_parameter_with_two_groupings_is_refused():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(shared, nn.BatchNorm1d(4), shared).to(DT)
    report = [
        psiopt.ScaleInvariantWeight("0.weight", (4, 4), psiopt.Grouping("channel"), None, None),
        psiopt.ScaleInvariantWeight("2.weight", (4, 4), psiopt.Grouping("tensor"), None, None),
    ]
    with pytest.raises(ValueError, match=r"'0\.weight' is in the report twice.*'2\.weight' with grouping 'tensor'"):
        psiopt.param_groups(model, report=report)


def test_parameter_in_two_param_groups_is_named():
    model = three_groupings_net()
    groups = psiopt.param_groups(model, _batch()[0])
    groups[3]["params"].append(model[0].weight)
    groups[3]["param_names"].append("0.weight")
    with pytest.raises(ValueError, match=r"parameter '0\.weight' is already in param group 0"):
        psiopt.PSISGD(groups, lr=0.1)


def test_options_may_not_set_what_param_groups_sets():
    with pytest.raises(ValueError, match=r"scale_invariant= may not set \['grouping'\]"):
        psiopt.param_groups(three_groupings_net(), _batch()[0], scale_invariant={"grouping": "tensor"})
    with pytest.raises(ValueError, match="example inputs"):
        psiopt.param_groups(three_groupings_net())


# -- checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("assign", [False, True])
def test_resume_from_weights_only_state_dicts_is_bit_exact(assign):
    report = psiopt.find_scale_invariant(three_groupings_net(), _batch()[0])

    def make(model):
        groups = psiopt.param_groups(model, report=report, scale_invariant={"lr": 0.05}, others={"weight_decay": 1e-3})
        return psiopt.PSISGD(groups, lr=0.1, momentum=0.9, nesterov=True)

    straight = three_groupings_net()
    straight_opt = make(straight)
    _train(straight, straight_opt, 6)

    first = three_groupings_net()
    first_opt = make(first)
    _train(first, first_opt, 3)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert [g.get("grouping") for g in saved["optimizer"]["param_groups"]] == ["channel", "block(2)", "tensor", None]

    resumed = three_groupings_net(seed=1)
    resumed.load_state_dict(saved["model"], assign=assign)
    resumed_opt = make(resumed)  # built after loading: it holds the loaded objects
    resumed_opt.load_state_dict(saved["optimizer"])
    _train(resumed, resumed_opt, 3, start=3)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_grouping_object_is_kept_as_text():
    model = three_groupings_net()
    opt = psiopt.PSISGD([{"params": [model[0].weight], "grouping": psiopt.Grouping.per_channel()}], lr=0.1)
    assert opt.param_groups[0]["grouping"] == "channel"
    gd = psiopt.PSIGD([{"params": [model[3].weight], "grouping": psiopt.Grouping.blocks(2)}], lr=0.1)
    assert gd.state_dict()["param_groups"][0]["grouping"] == "block(2)"


# -- marking: in place, no global hook ---------------------------------------------------


def _global_optimizer_hooks():
    return [
        h
        for hooks in (torch_optimizer._global_optimizer_pre_hooks, torch_optimizer._global_optimizer_post_hooks)
        for h in hooks.values()
    ]


def test_no_global_optimizer_hook():
    before = _global_optimizer_hooks()
    model = three_groupings_net()
    psiopt.mark_scale_invariant(model, _batch()[0])
    assert _global_optimizer_hooks() == before
    assert not any(str(getattr(h, "__module__", "")).startswith("psiopt") for h in before)


def test_marking_keeps_every_parameter_object_tied_modules_included():
    model = three_groupings_net()
    other = nn.Sequential(model[0], nn.BatchNorm2d(5).to(DT))  # the conv tied into a second model
    ids = [id(p) for p in model.parameters()]
    report = psiopt.mark_scale_invariant(model, _batch()[0])
    assert [id(p) for p in model.parameters()] == ids
    assert [n for n, _ in psiopt.scale_invariant_parameters(model)] == [n for _, names in EXPECTED for n in names]
    assert psiopt.is_scale_invariant(other[0].weight) and other[0].weight is model[0].weight
    opt = psiopt.PSISGD(other.parameters(), lr=0.1)  # the second model's optimizer works
    other(_batch()[0]).square().sum().backward()
    opt.step()
    assert report.names() == tuple(n for _, names in EXPECTED for n in names)


def test_mark_again_after_load_state_dict_assign():
    model = three_groupings_net()
    psiopt.mark_scale_invariant(model, _batch()[0])
    state = three_groupings_net(seed=1).state_dict()
    model.load_state_dict(state, assign=True)  # torch puts new objects in the modules
    assert model[0].weight.data_ptr() == state["0.weight"].data_ptr()
    marked = {n: str(p.manifold.grouping) for n, p in psiopt.scale_invariant_parameters(model)}
    assert marked == {n: g for g, names in EXPECTED for n in names}
    copied = copy.deepcopy(model)
    copied.load_state_dict(three_groupings_net(seed=2).state_dict(), assign=True)  # the copy's hook marks the copy
    assert psiopt.is_scale_invariant(copied[3].weight) and not psiopt.is_scale_invariant(copied[11].weight)
    assert model[3].weight.data_ptr() == state["3.weight"].data_ptr()


def test_marking_a_compiled_model_points_to_param_groups():
    compiled = torch.compile(three_groupings_net(), backend="eager")
    with pytest.raises(TypeError, match=r"torch.compile'd module.*psiopt.param_groups"):
        psiopt.mark_scale_invariant(compiled, _batch()[0])
    assert not any(isinstance(p, geoopt.ManifoldParameter) for p in compiled.parameters())


def test_param_groups_of_a_marked_model_are_the_same():
    model = three_groupings_net()
    psiopt.mark_scale_invariant(model, _batch()[0])
    assert _summary(psiopt.param_groups(model, _batch()[0]))[:3] == EXPECTED
