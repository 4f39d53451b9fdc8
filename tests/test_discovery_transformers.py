"""Discovery on Hugging Face transformers' models, and on the forms of RMS norm and QK-norm they use.

Every model is built from a tiny config: nothing is downloaded. What discovery finds must
equal the brute-force ground truth (``_ground_truth.py``, float64, eps -> 0) and the
targets: Qwen3's ``q_proj`` and ``k_proj`` per head (``block(head_dim)``, grouped-query
attention in ``k_proj``), nothing in Llama (pre-norm), BERT (post-LN after a residual add)
or ViT. A PSIAdamW step then rotates each head block of those weights at a fixed norm,
steps every other parameter as torch's AdamW does, bit for bit, and two runs from
rescaled blocks stay equivalent.

OLMo-2 and Gemma-3 normalize the output of each residual branch too, which makes more
weights invariant as a whole: ``o_proj`` and ``down_proj``, and ``v_proj`` and ``up_proj``,
whose common scale passes the attention and the gate's product.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import transformers
from _ground_truth import ground_truth
from torch import nn

import psiopt
from psiopt import Grouping

# -- the models -------------------------------------------------------------------------------

HEAD_DIM = 16
_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _qwen3(**config) -> nn.Module:
    return transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**_SMALL, **_TOKENS, num_key_value_heads=2, head_dim=HEAD_DIM, **config)
    )


def _llama(**config) -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL, **_TOKENS, num_key_value_heads=2, **config))


def _olmo2(**config) -> nn.Module:
    return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**_SMALL, **_TOKENS, num_key_value_heads=2, **config))


def _gemma3(**config) -> nn.Module:
    return transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**_SMALL, **_TOKENS, num_key_value_heads=2, head_dim=HEAD_DIM, **config)
    )


def _bert(**config) -> nn.Module:
    return transformers.BertModel(transformers.BertConfig(**_SMALL, **config), add_pooling_layer=False)


def _vit(**config) -> nn.Module:
    vit = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=16, patch_size=4,
        **config,
    )
    return transformers.ViTModel(vit, add_pooling_layer=False)


MODELS: dict[str, Callable[..., nn.Module]] = {"qwen3": _qwen3, "llama": _llama, "bert": _bert, "vit": _vit}
if hasattr(transformers, "Olmo2ForCausalLM"):
    MODELS["olmo2"] = _olmo2
if hasattr(transformers, "Gemma3ForCausalLM"):
    MODELS["gemma3"] = _gemma3
LANGUAGE_MODELS = [n for n in MODELS if n not in ("bert", "vit")]


def _layers(*names: str) -> set[str]:
    return {f"model.layers.{i}.{name}.weight" for i in range(_SMALL["num_hidden_layers"]) for name in names}


QK = ("self_attn.q_proj", "self_attn.k_proj")
# A norm on each branch's output, before the residual add: o_proj and down_proj reach it directly;
# a scale common to all of v_proj passes the attention and o_proj, of up_proj the gate's product and down_proj.
POST_NORMED = ("self_attn.o_proj", "mlp.down_proj", "self_attn.v_proj", "mlp.up_proj")
EXPECTED: dict[str, dict[str, Grouping]] = {
    # QK-norm per head: an RMSNorm over head_dim of each head of q_proj(x) and k_proj(x)
    "qwen3": dict.fromkeys(_layers(*QK), Grouping.blocks(HEAD_DIM)),
    "llama": {},
    "bert": {},
    "vit": {},
    # OLMo-2 normalizes the whole projection (no view), and its blocks' outputs before the residual add
    "olmo2": dict.fromkeys(_layers(*QK, *POST_NORMED), Grouping.whole()),
    # Gemma-3: QK-norm per head after view and transpose, and norms on the branches' outputs
    "gemma3": dict.fromkeys(_layers(*QK), Grouping.blocks(HEAD_DIM))
    | dict.fromkeys(_layers(*POST_NORMED), Grouping.whole()),
}


def _build(name: str, **config) -> nn.Module:
    """A model as training leaves it: biases and norm gains away from their init (a zero bias
    would make a biased layer look invariant)."""
    torch.manual_seed(0)
    model = MODELS[name](**config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.uniform_(-0.5, 0.5)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def _inputs(name: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    if name == "vit":
        return (torch.randn(2, 3, 16, 16, generator=gen),)
    return (torch.randint(0, _SMALL["vocab_size"], (2, 16), generator=gen),)


_RTOL = 1e-5  # transformers' RMSNorm modules normalize in float32, even in a float64 model


def _first(output) -> torch.Tensor:
    """The logits of a language model, the last hidden state of an encoder."""
    return output[0]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run hundreds of times faster on one thread than on a busy machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def truths(_one_thread) -> dict[str, dict[str, Grouping]]:
    return {name: ground_truth(_build(name), *_inputs(name), output=_first, rtol=_RTOL) for name in MODELS}


# -- what discovery finds ----------------------------------------------------------------------


# sdpa attention (the default) with the language models' key/value cache on (their default),
# eager attention, and no cache
SETTINGS = [(n, {}) for n in MODELS] + [(n, {"attn_implementation": "eager"}) for n in MODELS]
SETTINGS += [(n, {"use_cache": False}) for n in LANGUAGE_MODELS]


@pytest.mark.parametrize("name, config", SETTINGS, ids=[f"{n}-{'-'.join(map(str, c.values())) or 'sdpa'}" for n, c in SETTINGS])
def test_discovery_finds_the_targets_and_the_ground_truth(truths, name, config):
    model = _build(name, **config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = psiopt.find_scale_invariant(model, *_inputs(name))
    found = {w.name: w.grouping for w in report}
    assert found == EXPECTED[name] == truths[name], str(report)
    assert report.method == "hooks" and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_qwen3_query_and_key_projections_are_invariant_per_head(attn_implementation):
    model = _build("qwen3", attn_implementation=attn_implementation)
    report = psiopt.find_scale_invariant(model, *_inputs("qwen3"))
    assert set(report.names()) == _layers(*QK)
    for rec in report:
        attention = model.get_submodule(rec.name.rsplit(".", 2)[0])
        norm = "q_norm" if "q_proj" in rec.name else "k_norm"
        heads = 4 if norm == "q_norm" else 2  # grouped-query attention: k_proj has the key/value heads
        assert rec.grouping == Grouping.blocks(HEAD_DIM) and rec.num_groups == heads
        assert rec.norm_layer.endswith(norm) and rec.norm_type == "Qwen3RMSNorm" and rec.path == ("view",)
        assert rec.eps == getattr(attention, norm).variance_epsilon == 1e-6
        # the real eps breaks invariance by more than the proof's tolerance when a head shrinks
        # 10 times (the proof took the RMSNorm's root at its own eps), and less when it grows
        assert rec.eps_sensitivity[0] > report.rtol and rec.eps_sensitivity[0] > rec.eps_sensitivity[1] > 0
    assert psiopt.find_scale_invariant(model.to(torch.bfloat16), *_inputs("qwen3")).names() == report.names()


def test_a_bias_on_the_projections_is_rejected_with_the_reason():
    # Qwen3 with attention_bias: an RMS norm does not remove a bias, so scaling a head's rows
    # alone changes what it normalizes. psiopt's groups are rows of one tensor, so a head's rows
    # and its bias entries cannot be rescaled together: the weight is rejected.
    model = _build("qwen3", attention_bias=True)
    report = psiopt.find_scale_invariant(model, *_inputs("qwen3"))
    assert len(report) == 0
    reasons = dict(zip(report.rejected_names(), (r.reason for r in report.rejected)))
    for name in _layers(*QK):
        assert "it has a bias" in reasons[name] and "Qwen3RMSNorm" in reasons[name]
    assert ground_truth(model, *_inputs("qwen3"), output=_first, rtol=_RTOL) == {}
    # Given as a candidate anyway, the proof measures it and rejects it too.
    name = "model.layers.0.self_attn.q_proj.weight"
    given = psiopt.find_scale_invariant(model, *_inputs("qwen3"), candidates={name: Grouping.blocks(HEAD_DIM)})
    assert len(given) == 0 and given.rejected[0].stage == "numerical"
    assert "Qwen3RMSNorm 'model.layers.0.self_attn.q_norm'" in given.rejected[0].reason


# -- PSIAdamW on them --------------------------------------------------------------------------


def _loss(name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if name in LANGUAGE_MODELS:
        return model(*inputs, labels=inputs[0]).loss
    hidden = model(*inputs)[0]
    target = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3), dtype=hidden.dtype)
    return F.mse_loss(hidden, target)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_psiadamw_step_rotates_the_head_blocks_and_is_adamw_elsewhere(name):
    model = _build(name)
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = _inputs(name)
    groups = psiopt.param_groups(model, *inputs)
    assert {n for g in groups if "grouping" in g for n in g["param_names"]} == set(EXPECTED[name])
    if EXPECTED[name]:
        psi = psiopt.PSIAdamW(groups, lr=1e-2, weight_decay=0.1)
    else:
        with pytest.warns(UserWarning, match="no scale-invariant parameter"):
            psi = psiopt.PSIAdamW(groups, lr=1e-2, weight_decay=0.1)
    # psiopt takes torch's fused step on the other parameters by default, as torch does not on the CPU
    optimizers = (psi, torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, fused=True))
    for m, opt in zip((model, reference), optimizers):
        torch.manual_seed(0)  # the same dropout masks (BERT's)
        _loss(name, m, inputs).backward()
        opt.step()
    torch_params = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        grouping = EXPECTED[name].get(n)
        if grouping is None:
            assert torch.equal(p, torch_params[n]), n  # torch's AdamW update, bit for bit
            continue
        old, new = grouping.rows(before[n]), grouping.rows(p.detach())
        torch.testing.assert_close(new.norm(dim=1), old.norm(dim=1), rtol=1e-5, atol=0)
        cosine = (old * new).sum(dim=1) / (old.norm(dim=1) * new.norm(dim=1))
        assert bool((cosine < 1 - 1e-6).all()), n  # every head block turned


@pytest.mark.parametrize("name", [n for n in MODELS if EXPECTED[n]])
def test_runs_from_rescaled_head_blocks_stay_equivalent(name):
    # The defining property: start from w and from w with each invariant block multiplied by
    # its own factor; after the same PSIAdamW steps, every block points the same way and the
    # model computes the same function. In float64 with eps -> 0, so invariance is exact.
    eps = {"rms_norm_eps": 1e-30}
    first = _build(name, **eps).double()
    second = copy.deepcopy(first)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, grouping in EXPECTED[name].items():
            p = second.get_parameter(n)
            factors = torch.pow(2.0, torch.randint(-3, 4, (grouping.num_groups(p.shape),), generator=gen).double())
            p.copy_((grouping.rows(p) * factors.unsqueeze(1)).reshape(p.shape))
    inputs = _inputs(name)
    runs = []
    for model in (first, second):
        opt = psiopt.PSIAdamW(psiopt.param_groups(model, *inputs), lr=1e-2)
        for step in range(3):
            torch.manual_seed(step)
            opt.zero_grad()
            _loss(name, model, inputs).backward()
            opt.step()
        runs.append(model)
    a, b = (dict(m.named_parameters()) for m in runs)
    for n in a:
        grouping = EXPECTED[name].get(n)
        if grouping is None:
            torch.testing.assert_close(b[n], a[n], rtol=1e-9, atol=1e-12)
        else:
            unit = [F.normalize(grouping.rows(p.detach()), dim=1) for p in (a[n], b[n])]
            torch.testing.assert_close(unit[1], unit[0], rtol=0, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(_first(runs[1](*inputs)), _first(runs[0](*inputs)), rtol=1e-9, atol=1e-9)


def test_a_psiadamw_step_on_bfloat16_weights_keeps_the_head_norms():
    model = _build("qwen3").to(torch.bfloat16)
    inputs = _inputs("qwen3")
    groups = psiopt.param_groups(model, *inputs, scale_invariant={"lr": 0.05})
    before = {n: p.detach().float() for n, p in model.named_parameters()}
    opt = psiopt.PSIAdamW(groups, lr=1e-3)
    _loss("qwen3", model, inputs).backward()
    opt.step()
    for n, grouping in EXPECTED["qwen3"].items():
        p = model.get_parameter(n)
        assert p.dtype == torch.bfloat16
        old, new = grouping.rows(before[n]), grouping.rows(p.detach().float())
        torch.testing.assert_close(new.norm(dim=1), old.norm(dim=1), rtol=1e-2, atol=0)
        assert not torch.equal(new, old)


# -- the forms of RMS norm, and views of a projection ------------------------------------------

H, D, E = 4, 8, 16  # heads, head dim, input features


def _written(x: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: in float32, cast back."""
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _written_t5(x: torch.Tensor, eps: float) -> torch.Tensor:
    """T5's: the variance of a float32 copy, the original scaled."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(variance + eps)


def _written_div(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Divided by the root mean square, eps first, x * x."""
    return x / torch.sqrt(eps + (x * x).mean(dim=(-1,), keepdim=True))


NORMS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "F.rms_norm": lambda x, eps: F.rms_norm(x, (x.shape[-1],), eps=eps),
    "written": _written,
    "written, T5": _written_t5,
    "written, division": _written_div,
}


class _Heads(nn.Module):
    """A projection split into heads and normalized per head, as attention's QK-norm does."""

    def __init__(self, norm: str, layout: str, module: bool = False):
        super().__init__()
        self.layout, self.eps = layout, 1e-6
        self.proj = nn.Linear(E, H * D, bias=False)
        self.rms_norm = nn.RMSNorm(D, eps=self.eps) if module else None
        self.function = NORMS.get(norm)
        self.out = nn.Linear(H * D, 3)

    def norm(self, q: torch.Tensor) -> torch.Tensor:
        return self.rms_norm(q) if self.rms_norm is not None else self.function(q, self.eps)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.proj(x)
        if self.layout == "view":
            q = q.view(b, t, H, D)
        elif self.layout == "unflatten":
            q = q.unflatten(-1, (H, D))
        elif self.layout == "view, transpose":  # Gemma-3: (b, heads, t, head_dim)
            q = q.view(b, t, H, D).transpose(1, 2)
        elif self.layout == "reshape, permute":
            q = q.reshape(b, t, -1, D).permute(0, 2, 1, 3)
        elif self.layout == "heads last":  # normalizes over the heads: one group, the whole tensor
            q = q.view(b, t, H, D).transpose(-1, -2)
        return self.out(torch.tanh(self.norm(q)).reshape(b, t, H * D))


LAYOUTS = {"view": Grouping.blocks(D), "unflatten": Grouping.blocks(D), "view, transpose": Grouping.blocks(D),
           "reshape, permute": Grouping.blocks(D), "heads last": Grouping.whole()}


# nn.RMSNorm(head_dim) does not take the heads last
CASES = [
    (norm, layout) for norm in ["nn.RMSNorm", *NORMS] for layout in LAYOUTS if (norm, layout) != ("nn.RMSNorm", "heads last")
]


@pytest.mark.parametrize("norm, layout", CASES)
def test_norms_of_a_view_of_a_projection(norm, layout):
    torch.manual_seed(0)
    model = _Heads(norm, layout, module=norm == "nn.RMSNorm")
    x = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(1))
    assert ground_truth(model, x, rtol=_RTOL) == {"proj.weight": LAYOUTS[layout]}
    for structure in ("auto", "hooks"):
        report = psiopt.find_scale_invariant(model, x, structure=structure)
        assert {w.name: w.grouping for w in report} == {"proj.weight": LAYOUTS[layout]}, str(report)
        assert report.method == ("fx" if structure == "auto" else "hooks")
        assert report[0].eps == 1e-6 and report[0].eps_sensitivity[0] > 0
        expected_type = {"nn.RMSNorm": "RMSNorm", "F.rms_norm": "F.rms_norm"}.get(norm, "rms_norm (written out)")
        assert report[0].norm_type == expected_type


def test_a_written_out_norm_in_half_precision_is_proved_on_a_float32_copy():
    torch.manual_seed(0)
    model = _Heads("written", "view").to(torch.bfloat16)
    report = psiopt.find_scale_invariant(model, torch.randn(2, 5, E, dtype=torch.bfloat16))
    assert report.names() == ("proj.weight",) and report.dtype == torch.float32


class _TiedEmbedding(nn.Module):
    """A Linear whose weight is also the embedding: its output is normalized, the embedding's is not."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.proj = nn.Linear(8, 32, bias=False)
        self.proj.weight = self.embed.weight
        self.norm = nn.RMSNorm(32)

    def forward(self, ids):
        return self.norm(self.proj(torch.tanh(self.embed(ids).mean(1))))


@pytest.mark.parametrize("structure", ["auto", "hooks"])
def test_a_weight_tied_to_an_embedding_is_rejected(structure):
    torch.manual_seed(0)
    model = _TiedEmbedding()
    ids = torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(1))
    assert ground_truth(model, ids, rtol=_RTOL) == {}
    report = psiopt.find_scale_invariant(model, ids, structure=structure)
    assert len(report) == 0
    (rejected,) = report.rejected
    assert rejected.stage == "structural" and "also read outside its layer" in rejected.reason
    assert "Embedding 'embed'" in rejected.reason
    # Given anyway, the proof rejects it on the model's output.
    given = psiopt.find_scale_invariant(model, ids, candidates={"embed.weight": "tensor"})
    assert len(given) == 0 and given.rejected[0].stage == "numerical"


class _Merged(nn.Module):
    """Channels merged with the tokens before the norm: each normalized group mixes them."""

    def __init__(self, bias: bool):
        super().__init__()
        self.proj = nn.Linear(E, H * D, bias=bias)
        self.eps = 1e-6

    def forward(self, x):
        b, t, _ = x.shape
        merged = self.proj(x).reshape(b, t * H, D).transpose(1, 2).reshape(b, D, t, H)
        return F.rms_norm(merged, (t, H), eps=self.eps)


def test_channels_merged_with_other_dims_leave_only_a_common_scale():
    x = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = _Merged(bias=False)
    report = psiopt.find_scale_invariant(model, x)
    assert {w.name: w.grouping for w in report} == ground_truth(model, x, rtol=_RTOL) == {"proj.weight": Grouping.whole()}
    # A bias does not scale with the weight: not even the whole tensor is invariant.
    torch.manual_seed(0)
    biased = _Merged(bias=True)
    report = psiopt.find_scale_invariant(biased, x)
    assert len(report) == 0 and ground_truth(biased, x, rtol=_RTOL) == {}
    assert "merges the layer's output channels with other dims" in report.rejected[0].reason
