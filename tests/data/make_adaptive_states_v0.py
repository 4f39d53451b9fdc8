"""Writes tests/data/adaptive_states_v0.pt: state dicts of PSIAdam, PSIAdamW and PSIAdaSGD after
3 steps, and the weights and state after 3 more, as psiopt at commit 599b86d (before the
compiled adaptive kernels) computed them. test_adaptive_paths.py checks that today's code
resumes those states as that code went on. Run it with that psiopt on the path:

    git archive 599b86d psiopt | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old .venv/bin/python tests/data/make_adaptive_states_v0.py tests/data/adaptive_states_v0.pt
"""

import sys

import torch
from torch import nn

import psiopt

SHAPES = [((4, 3, 3, 3), "channel"), ((6, 4), "tensor"), ((5,), None)]
CONFIGS = {
    "psiadam": (psiopt.PSIAdam, dict(lr=0.05, betas=(0.8, 0.95))),
    "psiadamw-amsgrad": (psiopt.PSIAdamW, dict(lr=0.05, amsgrad=True, weight_decay=0.1)),
    "psiadasgd": (psiopt.PSIAdaSGD, dict(lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.01)),
}


def params():
    gen = torch.Generator().manual_seed(5)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s, _ in SHAPES]


def groups(ps):
    return [{"params": [p], "grouping": g} if g else {"params": [p]} for p, (_, g) in zip(ps, SHAPES)]


def grads(ps, k):
    gen = torch.Generator().manual_seed(100 + k)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)


def copied(tree):
    return torch.utils._pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


out = {"psiopt_commit": "599b86d", "torch_version": str(torch.__version__)}
for name, (cls, kw) in CONFIGS.items():
    ps = params()
    opt = cls(groups(ps), **kw)
    for k in range(3):
        grads(ps, k)
        opt.step()
    saved = {"weights": [p.detach().clone() for p in ps], "state_dict": copied(opt.state_dict())}
    for k in range(3, 6):
        grads(ps, k)
        opt.step()
    saved["final_weights"] = [p.detach().clone() for p in ps]
    saved["final_state"] = copied(opt.state_dict()["state"])
    out[name] = saved
torch.save(out, sys.argv[1])
