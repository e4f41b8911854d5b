"""Writes at a LayerNorm's output (``ln*.hook_normalized``) across ``fold_ln``.

TransformerLens's ``fold_ln`` folds the gain into the weights that read the LayerNorm's
output and centres them, so a processed model drops the mean of whatever is written
there; an unfolded model (HF, unprocessed TransformerLens) keeps it. A reconstruction is
not exactly mean-free, so the same SAE gives different logits in the two unless the
conversion says so: a folded-space SAE's writes go back mean-free on an unfolded model,
and an unfolded-space SAE's writes into a folded model are refused (no value at that site
can carry the mean the folded weights drop).
"""

from __future__ import annotations

import pytest
import torch

import saebridge as sb
from saebridge.errors import SpaceConversionError
from tests.oracle import HAS_SAELENS, saelens_sae, tl_model
from tests.parity import logprob_gap

TOL = 1e-4
TOKENS = torch.tensor([[1, 17, 5, 42, 9, 3, 77, 12], [4, 8, 15, 16, 23, 42, 2, 19]])
HOOKS = ["blocks.1.ln1.hook_normalized", "blocks.1.ln2.hook_normalized",
         "ln_final.hook_normalized"]


@pytest.fixture(scope="module")
def processed(tiny_dir, tokenizer):
    """SAELens's ``HookedSAETransformer`` (a HookedTransformer without it), processed."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
    return tl_model(hf.eval(), tokenizer, "tl-processed")


def run_reference(model, sae: sb.SAE | None, hooks=()) -> torch.Tensor:
    """The processed model's own run: SAELens's splice where installed, else a hook."""
    with torch.no_grad():
        if sae is None:
            return model.run_with_hooks(TOKENS, fwd_hooks=list(hooks))
        if HAS_SAELENS:
            return model.run_with_saes(TOKENS, saes=[saelens_sae(sae)])
        return model.run_with_hooks(TOKENS, fwd_hooks=[
            (sae.cfg.hook_name, lambda x, hook: sae(x))])


@pytest.mark.parametrize("hook", HOOKS)
def test_a_folded_space_sae_splices_as_in_the_processed_model(backend, models, processed,
                                                              hook):
    sae = sb.SAE.random("standard", 64, 32, hook, seed=6, activation_space="tl-processed")
    got = models(*backend).run_with_saes(TOKENS, [sae])
    want = run_reference(processed, sae)
    assert logprob_gap(got, want) <= TOL
    recons = sae(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)))
    assert recons.mean(-1).abs().min() > 1e-3  # the mean that fold_ln drops is really there


def test_a_hook_function_writing_there_counts_as_in_the_processed_model(backend, models,
                                                                        processed):
    hook = "blocks.1.ln2.hook_normalized"
    shift = torch.linspace(-1.0, 2.0, 64)  # mean 0.5: dropped by the folded weights

    def add(x, hook):
        return x + shift

    got = models(*backend).run_with_hooks(TOKENS, fwd_hooks=[(hook, add)])
    want = run_reference(processed, None, [(hook, add)])
    assert logprob_gap(got, want) <= TOL
    assert logprob_gap(got, models(*backend)(TOKENS)) > 100 * TOL


@pytest.mark.parametrize("name", ["tl-processed", "nnsight-tl", "bridge-compat"])
def test_an_unfolded_space_sae_writing_into_a_folded_model_is_refused(models, name):
    model = models(name)
    if not model.adapter.space.fold_ln:
        pytest.skip("an unfolded model keeps the mean: nothing to refuse")
    hook = "blocks.1.ln2.hook_normalized"
    sae = sb.SAE.random("standard", 64, 32, hook, seed=6, activation_space="hf")
    clean = model(TOKENS)
    with pytest.raises(SpaceConversionError, match="fold_ln") as info:
        model.run_with_saes(TOKENS, [sae])
    assert "use_error_term=True" in str(info.value)
    assert model.attached == [] and torch.equal(model(TOKENS), clean)
    # The value itself written back, and reads, are fine.
    same = model.run_with_saes(TOKENS, [sae], use_error_term=True)
    assert logprob_gap(same, clean) <= TOL
    _, cache = model.run_with_cache_with_saes(TOKENS, [sae], use_error_term=True, names=[])
    assert f"{hook}.hook_sae_acts_post" in cache


def test_a_steer_there_counts_as_in_the_processed_model_also_compiled(models, processed):
    """A steer has the canonical meaning at a LayerNorm output: its mean is dropped on
    unfolded backends too, in local runs, in a user's trace and in remote requests."""
    hook = "blocks.1.ln2.hook_normalized"
    vector = torch.linspace(-1.0, 2.0, 64)
    want = run_reference(processed, None, [(hook, lambda x, hook: x + 3.0 * vector)])
    local, lm = models("hf"), models("nnsight-hf").adapter.envoy
    steer = sb.Steer(hook, vector, 3.0)
    assert logprob_gap(local.run_with_interventions(TOKENS, [steer]), want) <= TOL
    remote = sb.wrap(lm, remote="local").run_with_interventions(TOKENS, [steer])
    assert logprob_gap(remote, want) <= TOL
    with lm.trace(TOKENS):
        sb.steer(lm, hook, vector, 3.0)
        logits = lm.output.logits.save()
    assert logprob_gap(logits, want) <= TOL
