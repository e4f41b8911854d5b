"""Hooks at an attached SAE's own hook points (``{hook}.hook_sae_acts_post`` …), SAELens's
steering idiom, on every backend, against SAELens's ``HookedSAETransformer`` itself."""

from __future__ import annotations

import pytest
import torch

import saebridge as sb
from saebridge.errors import ShapeError, UnknownHookError
from tests.oracle import HAS_SAELENS, logprob_gap, saelens_sae, tl_model

pytestmark = pytest.mark.skipif(not HAS_SAELENS, reason="compares with SAELens itself")

TOL = 1e-4
HOOK = "blocks.1.hook_resid_pre"
TOKENS = torch.tensor([[1, 17, 5, 42, 9, 3, 77, 12], [4, 8, 15, 16, 23, 42, 2, 19]])


@pytest.fixture(scope="module")
def ref(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
    return tl_model(hf.eval(), tokenizer, "tl-processed")


@pytest.fixture(scope="module")
def sae():
    return sb.SAE.random("topk", 64, 32, HOOK, seed=41, k=6, activation_space="tl-processed")


def steer_latent(acts, hook):
    acts[:, :, 3] = 6.0  # in place, as tutorials write it
    return acts


def scale_recons(x, hook):
    return 0.5 * x


def shift_input(x, hook):
    return x + 0.3


def zero_error(x, hook):
    return torch.zeros_like(x)


CASES = {"acts_post": [("hook_sae_acts_post", steer_latent)],
         "input+recons": [("hook_sae_input", shift_input), ("hook_sae_recons", scale_recons)],
         "output": [("hook_sae_output", scale_recons)],
         "error": [("hook_sae_error", zero_error)]}


@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_hooks_inside_the_sae_equal_saelens(backend, models, ref, sae, case, use_error_term):
    if case == "error" and not use_error_term:
        pytest.skip("SAELens fires hook_sae_error only with use_error_term")
    hooks = [(f"{HOOK}.{key}", fn) for key, fn in CASES[case]]
    model = models(*backend)
    with model.saes([sae], use_error_term=use_error_term):
        got = model.run_with_hooks(TOKENS, fwd_hooks=hooks)
    ref.reset_saes()
    try:
        ref.add_sae(saelens_sae(sae), use_error_term=use_error_term)
        with torch.no_grad():
            want = ref.run_with_hooks(TOKENS, fwd_hooks=hooks)
    finally:
        ref.reset_saes()
    assert logprob_gap(got, want) <= TOL
    assert logprob_gap(got, model.run_with_saes(TOKENS, [sae], use_error_term)) > 100 * TOL
    assert model.attached == [] and torch.equal(model(TOKENS), model(TOKENS))


def test_latent_hooks_with_saes_and_caches(models, sae):
    model = models("hf")
    hooks = [(f"{HOOK}.hook_sae_acts_post", steer_latent)]
    logits = model.run_with_hooks_with_saes(TOKENS, saes=[sae], fwd_hooks=hooks)
    with model.saes([sae]), model.hooks(fwd_hooks=hooks):
        same, cache = model.run_with_cache(TOKENS, names=[HOOK])
    assert torch.equal(logits, same)
    assert (cache[f"{HOOK}.hook_sae_acts_post"][..., 3] == 6.0).all()
    # The sparse fast path is kept when no latent hook is registered.
    with model.saes([sae]):
        assert torch.equal(model(TOKENS), model.run_with_saes(TOKENS, [sae]))


def test_bad_latent_hooks_are_refused(models, sae):
    model = models("hf")
    with pytest.raises(UnknownHookError, match="no SAE is spliced in"):
        model.run_with_hooks(TOKENS, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", steer_latent)])
    with model.saes([sae]), pytest.raises(ShapeError, match="hook_sae_acts_post"):
        model.run_with_hooks(TOKENS, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post",
                                                 lambda a, h: a[..., :3])])
    assert model.attached == []


def test_run_with_cache_under_interventions(backend, models, sae):
    model = models(*backend)
    steer = sb.Steer("blocks.0.hook_resid_post", torch.full((64,), 0.5))
    _, cache = model.run_with_cache(TOKENS, names=["blocks.0.hook_resid_post"],
                                    interventions=[steer])
    _, clean = model.run_with_cache(TOKENS, names=["blocks.0.hook_resid_post"])
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"],
                               clean["blocks.0.hook_resid_post"] + 0.5, atol=1e-5, rtol=0)


def test_sb_trace_reads_and_writes_an_attached_saes_latents(backend, models, sae):
    model = models(*backend)
    with model.saes([sae]):
        with sb.trace(model, TOKENS) as t:
            latents = t[f"{HOOK}.hook_sae_acts_post"]
            edited = latents.clone()
            edited[:, :, 3] = 6.0
            t[f"{HOOK}.hook_sae_acts_post"] = edited
            resid = t[HOOK]
        hooked = model.run_with_hooks(TOKENS, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post",
                                                          steer_latent)])
        _, cache = model.run_with_cache(TOKENS, names=[HOOK])
    torch.testing.assert_close(latents, cache[f"{HOOK}.hook_sae_acts_post"])
    assert torch.equal(t.logits, hooked)
    assert not torch.allclose(resid, cache[HOOK])  # the edit reached the stream


def test_hooks_inside_a_hook_z_sae_equal_saelens(models, ref):
    """A hook_z SAE's own hook points see SAELens's shapes: input and reconstruction flat
    ``[..., d_in]``, error and output per head."""
    z_sae = sb.SAE.random("standard", 64, 32, "blocks.0.attn.hook_z", seed=43,
                          activation_space="tl-processed")
    seen = {}

    def note(x, hook):
        seen.setdefault(hook.name.rpartition(".")[2], tuple(x.shape))
        return 0.8 * x if hook.name.endswith("recons") else None

    hooks = [(f"blocks.0.attn.hook_z.{k}", note) for k in ("hook_sae_input", "hook_sae_recons",
                                                          "hook_sae_output")]
    model = models("hf")
    with model.saes([z_sae]):
        got = model.run_with_hooks(TOKENS, fwd_hooks=hooks)
    ours, seen = seen, {}
    ref.reset_saes()
    try:
        ref.add_sae(saelens_sae(z_sae))
        with torch.no_grad():
            want = ref.run_with_hooks(TOKENS, fwd_hooks=hooks)
    finally:
        ref.reset_saes()
    assert ours == seen
    assert logprob_gap(got, want) <= TOL
