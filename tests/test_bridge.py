"""TransformerLens ``TransformerBridge`` as a backend (TransformerLens 3.x and 4.x).

Raw mode computes HF's numbers; ``enable_compatibility_mode()`` processed TL's. Hook
names resolve through the bridge's aliases but caches stay keyed canonically; SAEs
trained in one space give the right latents in the other; and no model the user passed
in is mutated. Needs no HookedTransformer, so it also runs under TransformerLens 4.x.
"""

from __future__ import annotations

import copy

import pytest
import torch

import saebridge as sb
from saebridge.errors import SpaceConversionError, UnknownHookError, UnsupportedArchitectureError
from saebridge.hookmap import hook_map, names
from saebridge.testing import Record
from saebridge.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer
from saebridge.tolerance import logprob_atol

pytest.importorskip("transformer_lens.model_bridge")
from transformer_lens.model_bridge.sources._bridge_builder import (
    build_bridge_from_module,
)

from saebridge.adapters.tl_bridge import bridge_from_hf

TOK = tiny_tokenizer()


def user_bridge(hf, compat: bool):
    """A bridge built the way a user builds one: around the HF model itself (in place)."""
    bridge = build_bridge_from_module(hf, hf.config.architectures[0], hf_config=hf.config)
    if compat:
        bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(tokenizer=TOK)[0]


@pytest.mark.parametrize("compat", [False, True])
def test_wrap_a_user_built_bridge(gpt2, compat):
    """The space is read off the bridge: raw is HF's, compatibility mode is processed TL's
    (detected from its weights); both agree with HF in log-probs and in the cache."""
    bridge = user_bridge(copy.deepcopy(gpt2), compat)
    model = sb.wrap(bridge, tokenizer=TOK)
    assert model.backend == "transformer_bridge"
    assert model.space.name == ("tl-processed" if compat else "hf")
    hf = sb.wrap(gpt2, tokenizer=TOK)
    tokens = hf.to_tokens("Hello world, hello model")
    ref_logits, ref = hf.run_with_cache(tokens)
    logits, cache = model.run_with_cache(tokens)
    diff = (logits.log_softmax(-1) - ref_logits.log_softmax(-1)).abs().max()
    assert diff <= logprob_atol(torch.float32)
    assert set(cache) == set(ref)
    for name in ref:
        torch.testing.assert_close(cache[name], ref[name], atol=5e-5, rtol=1e-4, msg=name)


def test_cache_keys_are_canonical_not_the_bridge_names(gpt2):
    model = sb.wrap(bridge_from_hf(gpt2), tokenizer=TOK)
    bridge = model.adapter.model
    resolved = {"blocks.0.hook_resid_pre": "blocks.0.hook_in",
                "blocks.0.attn.hook_z": "blocks.0.attn.o.hook_in",
                "blocks.0.hook_mlp_out": "blocks.0.mlp.hook_out"}
    for canonical, own in resolved.items():  # the aliases this adapter hooks through
        assert bridge.hook_dict[canonical] is bridge.hook_dict[own]
    sae = sb.SAE.random("topk", 64, 32, "blocks.0.attn.hook_z", k=4, seed=1)
    _, cache = model.run_with_cache_with_saes(model.to_tokens("Hello"), saes=[sae])
    canonical = set(names(hook_map("GPT2LMHeadModel"), 2))
    assert {k for k in cache if ".hook_sae_" not in k} == set(model.hook_names()) <= canonical
    assert not any(own in cache for own in resolved.values())
    assert "blocks.0.attn.hook_z.hook_sae_acts_post" in cache


@pytest.mark.parametrize("site", ["blocks.1.hook_resid_post", "blocks.1.attn.hook_z"])
def test_processed_sae_on_a_raw_bridge_needs_the_conversion(gpt2, site):
    """An SAE trained on processed TL activations, on a raw-mode bridge: with the space
    conversion its latents equal those on the compatibility-mode bridge (the activations
    it was trained on); the same weights without the conversion (labelled ``hf``) give
    different latents, and different log-probs when spliced."""
    raw = sb.wrap(bridge_from_hf(gpt2), tokenizer=TOK)
    compat = sb.wrap(bridge_from_hf(gpt2, compatibility_mode=True), tokenizer=TOK)
    assert (raw.space.name, compat.space.name) == ("hf", "tl-processed")
    tokens = raw.to_tokens("Sparse autoencoders find features")
    right = sb.SAE.random("standard", 64, 48, site, seed=7, activation_space="tl-processed")
    wrong = sb.SAE.random("standard", 64, 48, site, seed=7, activation_space="hf")
    key = f"{site}.hook_sae_acts_post"

    def latents(model, sae):
        return model.run_with_cache_with_saes(tokens, saes=[sae], names=[])[1][key]

    truth = latents(compat, right)
    torch.testing.assert_close(latents(raw, right), truth, atol=1e-4, rtol=1e-4)
    assert (latents(raw, wrong) - truth).abs().max() > 1e-2
    ref = compat.run_with_saes(tokens, [right]).log_softmax(-1)
    good = raw.run_with_saes(tokens, [right]).log_softmax(-1)
    bad = raw.run_with_saes(tokens, [wrong]).log_softmax(-1)
    assert (good - ref).abs().max() <= logprob_atol(torch.float32)
    assert (bad - ref).abs().max() > 1e-2


def test_grouped_query_value_bias_conversion_on_a_raw_bridge():
    """Llama with attention biases and 2 key/value heads for 4 query heads: the processed
    space lacks b_V at hook_v (per kv head) and hook_z (repeated per query head)."""
    hf, _ = tiny_llama(tokenizer=TOK)
    raw = sb.wrap(bridge_from_hf(hf), tokenizer=TOK)
    compat = sb.wrap(bridge_from_hf(hf, compatibility_mode=True), tokenizer=TOK)
    tokens = raw.to_tokens("Hello world")
    names_ = ["blocks.1.attn.hook_v", "blocks.1.attn.hook_z"]
    _, ref = compat.run_with_cache(tokens, names=names_)
    _, got = raw.run_with_cache(tokens, names=names_)
    for name in names_:
        torch.testing.assert_close(got[name], ref[name], atol=5e-5, rtol=1e-4, msg=name)
    b_V = hf.model.layers[1].self_attn.v_proj.bias.unflatten(0, (2, 16))
    grab: dict[str, torch.Tensor] = {}
    raw.run_with_interventions(tokens, [Record("blocks.1.attn.hook_v", grab)])
    torch.testing.assert_close(grab["blocks.1.attn.hook_v"] - b_V, ref["blocks.1.attn.hook_v"],
                               atol=5e-5, rtol=1e-4)


def test_bridge_from_hf_never_mutates_the_model_passed_in(gpt2):
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    types = {n: type(m) for n, m in gpt2.named_modules()}
    tokens = torch.tensor([[0, 5, 9, 20]])
    ref = gpt2(tokens).logits
    bridge_from_hf(gpt2)
    bridge_from_hf(gpt2, compatibility_mode=True)
    assert {n: type(m) for n, m in gpt2.named_modules()} == types
    after = gpt2.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    torch.testing.assert_close(gpt2(tokens).logits, ref, atol=0, rtol=0)
    hf = sb.wrap(gpt2, tokenizer=TOK)  # still an ordinary HF model for every backend
    assert hf.space.name == "hf"


def test_a_model_processed_in_place_is_detected_and_reported(gpt2):
    """A user bridge (compatibility mode) rewrote the HF model it was built around:
    wrapping that HF model, or converting it, fails with what happened and what to do."""
    victim = copy.deepcopy(gpt2)
    bridge = user_bridge(victim, compat=True)
    with pytest.raises(UnsupportedArchitectureError, match="processed in place") as err:
        sb.wrap(victim, tokenizer=TOK)
    assert "sb.wrap(bridge)" in str(err.value)
    with pytest.raises(UnsupportedArchitectureError, match="processed in place"):
        bridge_from_hf(victim)
    assert sb.wrap(bridge, tokenizer=TOK).space.name == "tl-processed"


def test_processing_in_place_after_bridge_from_hf_is_detected(gpt2):
    """bridge_from_hf recorded a raw bridge; the user then ran enable_compatibility_mode()
    on it. The recorded space is stale: the adapter notices, reads the processing off the
    weights, and (the raw constants still being valid) raw-space SAEs still splice right."""
    hf = sb.wrap(gpt2, tokenizer=TOK)
    tokens = hf.to_tokens("Hello world hello")
    sae = sb.SAE.random("standard", 64, 32, "blocks.1.hook_resid_post", seed=1,
                        activation_space="hf")
    bridge = bridge_from_hf(gpt2)
    bridge.enable_compatibility_mode(disable_warnings=True)
    model = sb.wrap(bridge, tokenizer=TOK)
    assert model.space.name == "tl-processed"
    got = model.run_with_saes(tokens, [sae]).log_softmax(-1)
    want = hf.run_with_saes(tokens, [sae]).log_softmax(-1)
    assert (got - want).abs().max() <= logprob_atol(torch.float32)


def test_a_processed_bridge_without_raw_constants_says_so(gpt2):
    """A compatibility-mode bridge built by the user lost the raw residual mean for good:
    an SAE trained on raw activations at a centred site cannot be served exactly."""
    model = sb.wrap(user_bridge(copy.deepcopy(gpt2), compat=True), tokenizer=TOK)
    sae = sb.SAE.random("standard", 64, 32, "blocks.1.hook_resid_post", activation_space="hf")
    with pytest.raises(SpaceConversionError, match=r"bridge_from_hf|from_hf"):
        model.run_with_saes(model.to_tokens("Hello"), [sae])


def test_resid_mid_write_reaches_the_rest_of_the_block(gpt2):
    """The bridge's hook_resid_mid is ln2's input; a write there must still reach the
    residual the block adds the MLP output to."""
    raw = sb.wrap(bridge_from_hf(gpt2), tokenizer=TOK)
    hf = sb.wrap(gpt2, tokenizer=TOK)
    tokens = hf.to_tokens("Hello world")
    vec = torch.randn(64, generator=torch.Generator().manual_seed(1))
    steer = [sb.Steer("blocks.0.hook_resid_mid", vec, coef=3.0)]
    out = {m.backend: m.run_with_interventions(tokens, steer).log_softmax(-1) for m in (hf, raw)}
    torch.testing.assert_close(out["transformer_bridge"], out["hf"], atol=1e-4, rtol=0)
    assert (out["hf"] - hf(tokens).log_softmax(-1)).abs().max() > 1e-2


def test_unknown_and_read_only_hooks(gpt2):
    model = sb.wrap(bridge_from_hf(gpt2), tokenizer=TOK)
    tokens = model.to_tokens("Hello")
    with pytest.raises(UnknownHookError, match=r"'blocks\.0\.hook_resid_pre'"):
        model.run_with_cache(tokens, names=["blocks.0.hook_resid_pree"])
    with pytest.raises(UnknownHookError, match="read but not written"):
        model.run_with_interventions(tokens, [sb.Steer("blocks.0.attn.hook_pattern",
                                                       torch.zeros(4))])


