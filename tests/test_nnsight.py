"""nnsight backends: LanguageModel/NNsight over HF, NNsight over TransformerLens
(UnifiedTransformer), the front as nnsight traces, and sb.splice/sb.steer in user traces."""

from __future__ import annotations

import pytest
import torch

import saebridge as sb
from saebridge.errors import SpaceConversionError, TokensError, UnknownHookError
from saebridge.testing import RaiseAt
from saebridge.tolerance import logprob_atol
from tests.parity import logprob_gap

nnsight = pytest.importorskip("nnsight")

from saebridge.adapters.nnsight import UnifiedTransformer  # noqa: E402

# Tests here reach into nnsight's own objects (envoys, traces, the interleaver): they run
# over the "nnsight" subset of the backend matrix (@pytest.mark.backends("nnsight")).


def same_logprobs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return logprob_gap(a, b) <= logprob_atol(b.dtype)


@pytest.fixture
def sae():
    return sb.SAE.random("topk", 64, 48, "blocks.1.hook_resid_mid", k=6, seed=2,
                         activation_space="tl-processed")


@pytest.fixture
def tokens(models):
    return models("hf").to_tokens("Hello world, hello SAE")


def test_wrap_recognises_every_nnsight_model(tiny_dir, tokenizer, models):
    from transformers import AutoModelForCausalLM

    from saebridge.adapters.transformer_lens import from_hf

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    tl = from_hf(hf, tokenizer=tokenizer)
    wrapped = {"NNsight(hf)": sb.wrap(nnsight.NNsight(hf), tokenizer=tokenizer),
               "NNsight(tl)": sb.wrap(nnsight.NNsight(tl)),
               "UnifiedTransformer": sb.wrap(UnifiedTransformer(tl)),
               "LanguageModel": models("nnsight-hf")}
    ref = models("hf")
    tokens = ref.to_tokens("Hello world")
    for label, model in wrapped.items():
        assert model.backend == ("nnsight-tl" if "tl" in label or "Unified" in label
                                 else "nnsight-hf"), label
        assert set(model.hook_names()) == set(ref.hook_names()), label
        assert same_logprobs(model(tokens), ref(tokens)), label


@pytest.mark.backends("nnsight")
def test_every_front_method_matches_hf(models, backend, sae, tokens):
    model, ref = models(*backend), models("hf", backend.device)
    hook = sae.cfg.hook_name
    assert same_logprobs(model.run_with_saes(tokens, [sae]), ref.run_with_saes(tokens, [sae]))
    names = ["blocks.0.attn.hook_z", "blocks.1.ln1.hook_normalized", hook]
    (_, got), (_, want) = model.run_with_cache(tokens, names), ref.run_with_cache(tokens, names)
    for name in names:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)
    _, got = model.run_with_cache_with_saes(tokens, [sae], names=[hook])
    _, want = ref.run_with_cache_with_saes(tokens, [sae], names=[hook])
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)
    ops = [sb.Steer.from_sae(sae, 3, coef=4.0), sb.Ablate(sae, [0, 1]), sb.Clamp(sae, 5, 2.0)]
    assert same_logprobs(model.run_with_interventions(tokens, ops[:1] + ops[2:]),
                         ref.run_with_interventions(tokens, ops[:1] + ops[2:]))
    clean, spliced = model(tokens), model.run_with_saes(tokens, [sae])
    with model.saes([sae]):
        assert torch.equal(model(tokens), spliced)
    model.add_sae(sae)
    try:
        assert torch.equal(model(tokens), spliced)
    finally:
        model.reset_saes()
    assert torch.equal(model(tokens), clean)


def test_a_site_reached_several_times_is_edited_every_time(models, tokens):
    """TransformerLens calls ln1 once each for q, k and v: its hook_normalized is one
    location visited three times per forward, and nnsight must edit all three."""
    # Mean zero: processed TL centres the weights reading hook_normalized (fold_ln), so it
    # drops the mean of anything added there, while HF does not.
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    steer = sb.Steer("blocks.0.ln1.hook_normalized", vector - vector.mean(), coef=2.0)
    got = models("nnsight-tl").run_with_interventions(tokens, [steer])
    assert same_logprobs(got, models("tl-processed").run_with_interventions(tokens, [steer]))
    assert same_logprobs(got, models("hf").run_with_interventions(tokens, [steer]))


@pytest.mark.backends("nnsight")
@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z",
                                  "blocks.1.hook_resid_mid", "ln_final.hook_normalized"])
def test_an_error_mid_trace_leaves_no_state(models, sae, tokens, backend, hook):
    model = models(*backend)
    envoy = model.adapter.envoy
    before = model(tokens)
    params = {k: v.clone() for k, v in envoy._module.state_dict().items()}
    with pytest.raises(RuntimeError, match="mid-forward"):
        failing = RaiseAt(hook, RuntimeError("user code failed mid-forward"))
        model.run_with_interventions(tokens, [sb.Steer.from_sae(sae, 0), failing])
    assert not envoy.interleaver.mediators and not envoy.interleaver.interleaving
    assert all(not m._forward_hooks and not m._forward_pre_hooks
               for m in envoy._module.modules())
    assert torch.equal(model(tokens), before)
    for k, v in envoy._module.state_dict().items():
        assert torch.equal(v, params[k]), k


@pytest.mark.backends("nnsight")
def test_unknown_hooks_fail_before_the_trace(models, backend):
    model = models(*backend)
    bad = sb.SAE.random("standard", 64, 16, "blocks.0.hook_resid_pree")
    with pytest.raises(UnknownHookError, match=r"blocks\.0\.hook_resid_pre"):
        model.run_with_saes("Hello", saes=[bad])
    assert not model.adapter.envoy.interleaver.mediators


# ---- sb.splice / sb.steer inside the user's own trace -------------------------------------


@pytest.mark.backends("nnsight")
def test_splice_and_steer_inside_a_user_trace(models, sae, tokens, backend):
    model, ref = models(*backend), models("hf", backend.device)
    envoy = model.adapter.envoy
    z_sae = sb.SAE.random("standard", 64, 32, "blocks.0.attn.hook_z", seed=4,
                          activation_space="tl-processed")
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with envoy.trace(tokens):
        z_latents = sb.splice(envoy, z_sae).save()
        latents = sb.splice(envoy, sae, use_error_term=True).save()
        sb.steer(envoy, "blocks.1.hook_resid_post", vector, coef=3.0, positions=[1, 2])
        out = envoy.output.save()
    logits = getattr(out, "logits", out)
    ops = [sb.Splice(z_sae), sb.Splice(sae, use_error_term=True),
           sb.Steer("blocks.1.hook_resid_post", vector, 3.0, positions=[1, 2])]
    assert same_logprobs(logits, ref.run_with_interventions(tokens, ops))
    _, cache = ref.run_with_cache_with_saes(tokens, [z_sae, sae], names=[])
    torch.testing.assert_close(latents, cache[f"{sae.cfg.hook_name}.hook_sae_acts_post"],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_latents, cache["blocks.0.attn.hook_z.hook_sae_acts_post"],
                               atol=1e-5, rtol=1e-5)


def test_splice_in_a_user_trace_refuses_what_it_cannot_do(models, sae, tokens):
    envoy = models("nnsight-tl").adapter.envoy  # processed: centred residual stream
    raw = sb.SAE.random("standard", 64, 16, "blocks.1.hook_resid_pre", activation_space="hf")
    with pytest.raises(SpaceConversionError, match="raw residual mean"), envoy.trace(tokens):
        sb.splice(envoy, raw)
    assert not envoy.interleaver.mediators
    with pytest.raises(TypeError, match="inside an nnsight trace"):
        sb.splice(models("hf").adapter.model, sae)
    lm = models("nnsight-hf").adapter.envoy
    with pytest.raises(UnknownHookError, match="read but not written"), lm.trace(tokens):
        sb.steer(lm, "blocks.0.attn.hook_pattern", torch.zeros(2))


# ---- UnifiedTransformer ----------------------------------------------------------------


def test_unified_transformer_tokenises_traces_and_generates(models, tokenizer):
    model = models("nnsight-tl")
    ut = model.adapter.envoy
    assert isinstance(ut, UnifiedTransformer)
    assert torch.equal(ut.to_tokens("Hello world"), models("hf").to_tokens("Hello world"))
    with ut.trace("Hello world"):
        by_text = ut.output.save()
    assert torch.equal(by_text, model(ut.to_tokens("Hello world")))
    other = torch.flip(ut.to_tokens("Hello world"), [1])
    with ut.trace() as tracer:  # two invokes (text and ids) batched into one forward
        with tracer.invoke("Hello world"):
            first = ut.blocks[1].hook_resid_pre.output.save()
        with tracer.invoke(other):
            second = ut.blocks[1].hook_resid_pre.output.save()
    _, cache = model.run_with_cache(torch.cat([ut.to_tokens("Hello world"), other]),
                                    ["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(torch.cat([first, second]), cache["blocks.1.hook_resid_pre"])
    with ut.generate("Hello world", max_new_tokens=3, do_sample=False) as tracer:
        ids = tracer.result.save()
    assert torch.equal(ids, model.generate(ut.to_tokens("Hello world"), 3))
    with pytest.raises(TokensError, match="padding"), ut.trace() as tracer:
        with tracer.invoke("Hello world"):
            pass
        with tracer.invoke("Hello"):
            pass


def test_unified_transformer_from_a_hooked_transformer(models, tokenizer):
    from saebridge.adapters.transformer_lens import from_hf

    tl = from_hf(models("hf").adapter.model, tokenizer=tokenizer, fold_ln=False,
                 center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    ut = UnifiedTransformer(tl)
    assert ut.tokenizer is tl.tokenizer
    assert sb.wrap(ut).space.name == "hf"
    with pytest.raises(TypeError, match="already a HookedTransformer"):
        UnifiedTransformer(tl, fold_ln=False)


@pytest.mark.parametrize("compat", [False, True])
def test_nnsight_over_a_transformer_bridge(models, sae, tokens, compat):
    from saebridge.adapters.tl_bridge import bridge_from_hf

    hf = models("hf")
    bridge = bridge_from_hf(hf.adapter.model, tokenizer=hf.adapter.tokenizer,
                            compatibility_mode=compat)
    model = sb.wrap(nnsight.NNsight(bridge))
    assert model.backend == "nnsight-bridge"
    steer = sb.Steer("blocks.0.hook_resid_mid", torch.randn(64), coef=2.0)  # carried on
    ops = [sb.Splice(sae), steer, sb.Ablate(sae, [0, 1])]
    assert same_logprobs(model.run_with_interventions(tokens, ops),
                         hf.run_with_interventions(tokens, ops))
    _, got = model.run_with_cache(tokens, ["blocks.1.hook_resid_mid", "blocks.0.attn.hook_z"])
    _, want = hf.run_with_cache(tokens, ["blocks.1.hook_resid_mid", "blocks.0.attn.hook_z"])
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4)
    assert torch.equal(model.generate(tokens, 3, interventions=[steer]),
                       hf.generate(tokens, 3, interventions=[steer]))
    envoy = model.adapter.envoy
    z_sae = sb.SAE.random("standard", 64, 32, "blocks.0.attn.hook_z", seed=4,
                          activation_space="tl-processed")
    with envoy.trace(tokens):  # a bridge's z is flat at the module: its conversion applies
        latents = sb.splice(envoy, z_sae).save()
    _, cache = hf.run_with_cache_with_saes(tokens, [z_sae], names=[])
    torch.testing.assert_close(latents, cache["blocks.0.attn.hook_z.hook_sae_acts_post"],
                               atol=1e-4, rtol=1e-4)

    def edit(acts, hook=None):
        acts[..., 2] = 4.0
        return acts

    with envoy.trace(tokens):  # an edit of the latents goes back through the conversion
        edit(sb.splice(envoy, z_sae))
        out = envoy.output.save()
    with hf.saes([z_sae]):
        want_edit = hf.run_with_hooks(tokens, fwd_hooks=[
            ("blocks.0.attn.hook_z.hook_sae_acts_post", edit)])
    assert same_logprobs(getattr(out, "logits", out), want_edit)
    assert not same_logprobs(want_edit, hf.run_with_saes(tokens, [z_sae]))
    with pytest.raises(UnknownHookError, match="ln2's input"), envoy.trace(tokens):
        sb.splice(envoy, sae)
    with sb.trace(model, tokens) as t:
        z = t["blocks.0.attn.hook_z"]
    torch.testing.assert_close(z, want["blocks.0.attn.hook_z"], atol=1e-4, rtol=1e-4)
