"""GPT-2 hook map: names, errors, and every site read/written where TransformerLens has it."""

from __future__ import annotations

import pytest
import torch

import saebridge as sb
from saebridge.errors import UnknownHookError
from saebridge.hookmap import hook_map, names, resolve
from saebridge.testing import Record

REQUIRED = ["hook_embed", "hook_pos_embed", "ln_final.hook_normalized"] + [
    f"blocks.1.{n}" for n in (
        "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_q", "attn.hook_k",
        "attn.hook_v", "attn.hook_z", "attn.hook_pattern", "hook_attn_out", "mlp.hook_pre",
        "mlp.hook_post", "hook_mlp_out")]


def test_gpt2_map_covers_the_required_hooks(models):
    hf_names = models("hf").hook_names()
    for name in REQUIRED:
        assert name in hf_names
    assert set(hf_names) <= set(models("tl-processed").adapter.model.hook_dict)


def test_unknown_hook_lists_nearest_names():
    hmap = hook_map("GPT2LMHeadModel")
    with pytest.raises(UnknownHookError) as err:
        resolve(hmap, "blocks.1.hook_resid_pree", 2)
    assert "blocks.1.hook_resid_pre" in str(err.value)
    with pytest.raises(KeyError):  # the builtin still catches it
        resolve(hmap, "blocks.7.hook_resid_pre", 2)
    with pytest.raises(UnknownHookError, match="0 to 1"):
        resolve(hmap, "blocks.7.hook_resid_pre", 2)


def test_names_are_in_execution_order():
    order = names(hook_map("GPT2LMHeadModel"), 2)
    assert order.index("blocks.0.hook_resid_post") < order.index("blocks.1.hook_resid_pre")
    assert order.index("blocks.0.attn.hook_z") < order.index("blocks.0.hook_attn_out")


@pytest.mark.parametrize("backend", ["hf", "tl-processed", "tl-unprocessed"])
def test_cache_matches_tl_processed_at_every_hook(models, backend):
    """Cache values are canonical (TL-processed) on every backend: each conversion
    raw → processed checked against a TL model built from the same weights."""
    tokens = models("hf").to_tokens("Hello world, hello model")
    _, ref = models("tl-processed").run_with_cache(tokens)
    _, cache = models(backend).run_with_cache(tokens)
    assert set(cache) == set(ref)
    for name in ref:
        torch.testing.assert_close(cache[name], ref[name], atol=2e-5, rtol=1e-4, msg=name)


def test_hf_native_activations_equal_unprocessed_tl(models):
    """The raw HF sites (incl. resid_mid without a module boundary, z from c_proj's input)
    are exactly TL's unprocessed hooks."""
    tokens = models("hf").to_tokens("Hello world, hello model")
    seen: dict[str, dict[str, torch.Tensor]] = {}
    for backend in ("hf", "tl-unprocessed"):
        model, seen[backend] = models(backend), {}
        grab = [Record(n, seen[backend]) for n in model.hook_names()]
        model.run_with_interventions(tokens, grab)
    for name, value in seen["tl-unprocessed"].items():
        torch.testing.assert_close(seen["hf"][name], value, atol=2e-5, rtol=1e-4, msg=name)


def test_processed_to_raw_conversion_rebuilds_the_raw_stream(models):
    """The hard direction: a centred stream back to raw needs the raw mean, rebuilt by the
    tracker from hook_z / mlp.hook_post. Compared with HF's native activations."""
    tokens = models("hf").to_tokens("Layer norm reads the stream")
    raw: dict[str, torch.Tensor] = {}
    models("hf").run_with_interventions(tokens, [Record(n, raw) for n in models("hf").hook_names()])
    tl = models("tl-processed")
    back: dict[str, torch.Tensor] = {}
    # An SAE op in raw space makes the engine build the tracker; reuse it via a real SAE.
    sae = sb.SAE.random("standard", 64, 32, "blocks.1.hook_resid_post", activation_space="hf")
    grabs = [Record(n, back, sb.ActivationSpace.parse("hf")) for n in tl.hook_names()
             if n.split(".")[-1] != "hook_pattern"]
    tl.run_with_interventions(tokens, [*grabs, sb.Splice(sae, use_error_term=True)])
    for name, value in back.items():
        torch.testing.assert_close(value, raw[name], atol=5e-5, rtol=1e-4, msg=name)


def test_processed_logits_are_raw_logits_minus_their_vocab_mean(models):
    tokens = models("hf").to_tokens("Hello world")
    raw, processed = models("hf")(tokens), models("tl-processed")(tokens)
    torch.testing.assert_close(processed, raw - raw.mean(-1, keepdim=True), atol=2e-5, rtol=1e-4)


def test_resid_mid_write_reaches_the_rest_of_the_block(models):
    """ln_2's input is not the residual GPT2Block adds to: a write must go elsewhere."""
    tokens = models("hf").to_tokens("Hello world")
    vec = torch.randn(64, generator=torch.Generator().manual_seed(1))
    steer = [sb.Steer("blocks.0.hook_resid_mid", vec, coef=3.0)]
    out = {b: models(b).run_with_interventions(tokens, steer).log_softmax(-1)
           for b in ("hf", "tl-unprocessed")}
    torch.testing.assert_close(out["hf"], out["tl-unprocessed"], atol=1e-4, rtol=0)
    assert (out["hf"] - models("hf")(tokens).log_softmax(-1)).abs().max() > 1e-2


def test_pattern_is_read_only_on_hf(models):
    tokens = models("hf").to_tokens("Hello")
    with pytest.raises(UnknownHookError, match="read but not written"):
        models("hf").run_with_interventions(
            tokens, [sb.Steer("blocks.0.attn.hook_pattern", torch.zeros(2))])
