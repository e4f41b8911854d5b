"""Any nn.Module with a user-supplied hook map: a hand-written transformer (nanoGPT style,
written here from scratch) carrying the tiny GPT-2's weights, wrapped with
``sb.wrap(module, hookmap={...})`` and compared with the HF GPT-2 through saebridge."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import saebridge as sb
from saebridge.errors import UnknownHookError
from saebridge.testing import RaiseAt, Record, hooks_left
from saebridge.tiny import tiny_gpt2, tiny_tokenizer
from saebridge.tolerance import logprob_atol

TOK = tiny_tokenizer()
N_HEADS, D_HEAD = 4, 16


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (N_HEADS, D_HEAD)).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D_HEAD)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        pattern = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        z = (pattern @ v).transpose(1, 2).flatten(-2)
        return self.proj(z)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d), nn.LayerNorm(d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int, d: int = 64, n_layers: int = 2, n_ctx: int = 64) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(n_ctx, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def from_gpt2(hf) -> TinyTransformer:
    """The hand-written model with GPT-2's weights (Conv1D stores ``[in, out]``)."""
    sd = hf.state_dict()
    model = TinyTransformer(hf.config.vocab_size)
    mine = {"wte.weight": sd["transformer.wte.weight"], "wpe.weight": sd["transformer.wpe.weight"],
            "ln_f.weight": sd["transformer.ln_f.weight"], "ln_f.bias": sd["transformer.ln_f.bias"],
            "head.weight": sd["lm_head.weight"]}
    for i in range(2):
        h = f"transformer.h.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            for p in ("weight", "bias"):
                mine[f"blocks.{i}.{ours}.{p}"] = sd[h + f"{theirs}.{p}"]
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("fc", "mlp.c_fc"), ("out", "mlp.c_proj")):
            mine[f"blocks.{i}.{ours}.weight"] = sd[h + f"{theirs}.weight"].T
            mine[f"blocks.{i}.{ours}.bias"] = sd[h + f"{theirs}.bias"]
    model.load_state_dict(mine)
    return model.eval()


def hookmap() -> dict[str, sb.HookSpec]:
    spec = sb.HookSpec
    out = {"hook_embed": spec("wte")}
    for i in range(2):
        b = f"blocks.{i}"
        out |= {f"{b}.hook_resid_pre": spec(b, io="input"),
                f"{b}.attn.hook_z": spec(f"{b}.attn.proj", io="input",
                                         reshape=(N_HEADS, D_HEAD)),
                f"{b}.hook_attn_out": spec(f"{b}.attn"),
                f"{b}.mlp.hook_post": spec(f"{b}.out", io="input"),
                f"{b}.hook_resid_post": spec(b)}
    return out


@pytest.fixture(scope="module")
def pair():
    hf, _ = tiny_gpt2(tokenizer=TOK)
    mine = from_gpt2(hf)
    return sb.wrap(hf, tokenizer=TOK), sb.wrap(mine, hookmap=hookmap(), tokenizer=TOK)


def test_wrapped_with_the_users_names_in_execution_order(pair):
    _, mine = pair
    assert mine.backend == "module"
    names = mine.hook_names()
    assert names[0] == "hook_embed"
    assert names.index("blocks.0.hook_resid_post") < names.index("blocks.1.hook_resid_pre")


def test_cache_equals_hf_gpt2_at_every_hook(pair):
    hf, mine = pair
    tokens = hf.to_tokens("Hello world, hello model")
    mine_logits, mine_cache = mine.run_with_cache(tokens)
    hf_logits = hf(tokens)
    torch.testing.assert_close(mine_logits, hf_logits, atol=1e-4, rtol=1e-4)
    assert mine_cache["blocks.1.attn.hook_z"].shape == (1, tokens.shape[1], N_HEADS, D_HEAD)
    # The home-made model is never processed: its cache is its raw activations, and the
    # HF cache is canonical (centred), so compare HF's raw activations through a grab.
    raw: dict[str, torch.Tensor] = {}
    hf.run_with_interventions(tokens, [Record(n, raw) for n in mine.hook_names()])
    for name, value in mine_cache.items():
        torch.testing.assert_close(value, raw[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("site", ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z",
                                  "blocks.1.mlp.hook_post"])
def test_splice_an_sae_like_on_hf(pair, site):
    hf, mine = pair
    d_in = 256 if site.endswith("hook_post") else 64
    sae = sb.SAE.random("topk", d_in, 48, site, k=8, seed=4, activation_space="hf")
    tokens = hf.to_tokens("Sparse autoencoders find features")
    want = hf.run_with_saes(tokens, [sae]).log_softmax(-1)
    got = mine.run_with_saes(tokens, [sae]).log_softmax(-1)
    assert (got - want).abs().max() <= logprob_atol(torch.float32)
    assert (got - mine(tokens).log_softmax(-1)).abs().max() > 1e-3  # the splice did something
    _, cache = mine.run_with_cache_with_saes(tokens, [sae], use_error_term=True)
    acts = cache[f"{site}.hook_sae_acts_post"]
    assert acts.shape[-1] == 48 and int((acts > 0).sum(-1).max()) <= 8
    out, inp = cache[f"{site}.hook_sae_output"], cache[f"{site}.hook_sae_input"]
    torch.testing.assert_close(out.flatten(2), inp.flatten(2))  # z: [heads, d_head] vs flat


def test_no_hook_is_left_behind_even_when_a_forward_raises(pair):
    _, mine = pair
    module = mine.adapter.model
    tokens = mine.to_tokens("Hello")
    with pytest.raises(Exception, match="boom"):
        mine.run_with_interventions(tokens, [RaiseAt("blocks.0.hook_attn_out",
                                                     RuntimeError("boom"))])
    assert hooks_left(module) == 0


def test_bad_hook_maps_say_what_is_wrong():
    model = from_gpt2(tiny_gpt2(tokenizer=TOK)[0])
    with pytest.raises(UnknownHookError, match=r"Nearest valid: 'hook_resid_pre'"):
        sb.wrap(model, hookmap={"blocks.0.hook_resid_pree": sb.HookSpec("blocks.0")})
    with pytest.raises(UnknownHookError, match=r"Nearest valid: 'blocks\.0\.attn'"):
        sb.wrap(model, hookmap={"blocks.0.hook_attn_out": sb.HookSpec("blocks.0.atn")})
    wrapped = sb.wrap(model, hookmap={"blocks.0.hook_attn_out": sb.HookSpec("blocks.0.attn")})
    with pytest.raises(UnknownHookError, match="hookmap"):
        wrapped.run_with_cache(torch.tensor([[1, 2, 3]]), names=["blocks.0.hook_mlp_out"])


