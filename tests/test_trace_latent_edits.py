"""Editing the latents ``sb.splice`` returns inside your own nnsight trace reaches the model
(dictionary_learning's idiom), on nnsight over HF and over TransformerLens: the same logits
as SAELens's ``hook_sae_acts_post`` hook (our front, checked against SAELens in
``test_latent_hooks.py``), and as the edit written out by hand."""

from __future__ import annotations

import pytest
import torch

import saebridge as sb
from saebridge.sae.blockdiag import block_diagonal
from saebridge.sae.transcoder import Transcoder
from tests.oracle import HAS_SAELENS, saelens_sae
from tests.parity import logprob_gap

TOL = 1e-4
TOKENS = torch.tensor([[1, 17, 5, 42, 9, 3, 77, 12], [4, 8, 15, 16, 23, 42, 2, 19]])
SPACE = {"activation_space": "tl-processed"}


def saes() -> dict[str, sb.SAE]:
    z = sb.SAE.random("standard", 64, 32, "blocks.0.attn.hook_z", seed=4, **SPACE)
    return {
        "resid_pre topk": sb.SAE.random("topk", 64, 48, "blocks.1.hook_resid_pre", k=6,
                                        seed=1, **SPACE),
        "resid_mid (attn out + block input)": sb.SAE.random(
            "jumprelu", 64, 48, "blocks.1.hook_resid_mid", seed=2, **SPACE),
        "layer_norm-normalised": sb.SAE.random(
            "standard", 64, 48, "blocks.0.hook_resid_post", seed=3,
            normalize_activations="layer_norm", **SPACE),
        "hook_z": z,
        "one head of hook_z": sb.SAE.random("topk", 16, 24, "blocks.0.attn.hook_z", k=4,
                                            seed=5, hook_head_index=2, **SPACE),
        "block-diagonal hook_z": block_diagonal(z, 4),
        "ln2.hook_normalized": sb.SAE.random("standard", 64, 32, "blocks.1.ln2.hook_normalized",
                                             seed=6, **SPACE),
    }


SAES = saes()


def edit(acts: torch.Tensor) -> None:
    """In place, as dictionary_learning's and SAELens's tutorials write it."""
    acts[..., 3] = 0.0
    acts[:, 2:5, 7] = 5.0
    acts[1] *= 1.5


def edit_hook(acts: torch.Tensor, hook) -> torch.Tensor:
    edit(acts)
    return acts


def traced(envoy, *saes_: sb.SAE, use_error_term: bool = False, do_edit=edit) -> torch.Tensor:
    with envoy.trace(TOKENS):
        for sae in saes_:
            do_edit(sb.splice(envoy, sae, use_error_term=use_error_term))
        out = envoy.output.save()
    return getattr(out, "logits", out)


@pytest.mark.backends("nnsight")
@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("case", list(SAES))
def test_edited_latents_reach_the_model(backend, models, case, use_error_term):
    sae = SAES[case]
    envoy, ref = models(*backend).adapter.envoy, models("hf")
    got = traced(envoy, sae, use_error_term=use_error_term)
    with ref.saes([sae], use_error_term=use_error_term):
        want = ref.run_with_hooks(TOKENS, fwd_hooks=[
            (f"{sae.cfg.hook_name}.hook_sae_acts_post", edit_hook)])
    assert logprob_gap(got, want) <= TOL
    spliced = ref.run_with_saes(TOKENS, [sae], use_error_term=use_error_term)
    assert logprob_gap(got, spliced) > 100 * TOL  # the edit made a difference


@pytest.mark.backends("nnsight")
def test_unedited_latents_leave_the_splice_bit_for_bit(backend, models):
    sae = SAES["resid_pre topk"]
    envoy = models(*backend).adapter.envoy
    splicer = sb.prepare_splice(envoy, sae)  # the splice without a write-back
    with envoy.trace(TOKENS):
        splicer(envoy)
        out = envoy.output.save()
    assert torch.equal(traced(envoy, sae, do_edit=lambda acts: acts.sum()),
                       getattr(out, "logits", out))


def test_edits_of_two_splices_both_reach_the_model(models):
    envoy, ref = models("nnsight-hf").adapter.envoy, models("hf")
    first, second = SAES["hook_z"], SAES["resid_pre topk"]
    got = traced(envoy, first, second, use_error_term=True)
    hooks = [(f"{s.cfg.hook_name}.hook_sae_acts_post", edit_hook) for s in (first, second)]
    with ref.saes([first, second], use_error_term=True):
        want = ref.run_with_hooks(TOKENS, fwd_hooks=hooks)
    assert logprob_gap(got, want) <= TOL


def by_hand(lm, sae: sb.SAE, change) -> tuple[torch.Tensor, torch.Tensor]:
    """dictionary_learning's idiom at ``blocks.1.hook_resid_pre`` (the block's input):
    ``f = ae.encode(x); change(f); x = ae.decode(f)``; the latents and the logits."""
    with lm.trace(TOKENS):
        block = lm.transformer.h[1]
        args, kwargs = block.inputs
        latents = sae.encode(args[0])
        change(latents)
        block.inputs = ((sae.decode(latents), *args[1:]), kwargs)
        latents, logits = latents.save(), lm.output.logits.save()
    return latents, logits


def test_the_edit_equals_dictionary_learnings_write_back_by_hand(models):
    """``f = ae.encode(x); f[...] = …; submodule.output = ae.decode(f)``, written out."""
    lm = models("nnsight-hf").adapter.envoy
    sae = sb.SAE.random("topk", 64, 48, "blocks.1.hook_resid_pre", k=6, seed=8,
                        activation_space="hf")
    _, want = by_hand(lm, sae, edit)
    assert logprob_gap(traced(lm, sae), want) <= TOL


@pytest.mark.parametrize("how", ["edited", "edited to the same values", "unedited"])
def test_gradients_reach_the_latents_as_by_hand(models, how):
    """Attribution through the latents: d(loss)/d(latents) equals dictionary_learning's
    by-hand write-back, edited or not (an in-place edit that changes no value included)."""
    lm = models("nnsight-hf").adapter.envoy
    sae = sb.SAE.random("topk", 64, 48, "blocks.1.hook_resid_pre", k=6, seed=8,
                        activation_space="hf")
    change = {"edited": edit, "edited to the same values": lambda a: a.mul_(1.0),
              "unedited": lambda a: None}[how]
    written, want = by_hand(lm, sae, change)
    with lm.trace(TOKENS):
        latents = sb.splice(lm, sae)
        change(latents)
        latents, got = latents.save(), lm.output.logits.save()
    assert logprob_gap(got, want) <= TOL
    grads = [torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), acts)[0]
             for logits, acts in ((got, latents), (want, written))]
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_a_transcoders_latents_edit_its_output_site(models):
    lm, ref = models("nnsight-hf").adapter.envoy, models("hf")
    tc = Transcoder.random("topk", 64, 96, 64, "blocks.0.hook_resid_mid",
                           "blocks.0.hook_mlp_out", k=6, seed=9, skip=True,
                           activation_space="hf")
    _, cache = ref.run_with_cache_with_saes(TOKENS, [tc], names=[])
    x = cache["blocks.0.hook_resid_mid.hook_sae_input"]  # in the transcoder's own space
    latents = tc.encode(x)
    clean = tc(x)
    edit(latents)
    edited = clean + tc.decode(latents) - tc.decode(tc.encode(x))
    for use_error_term in (False, True):
        got = traced(lm, tc, use_error_term=use_error_term)

        def write(out, hook, edited=edited, use_error_term=use_error_term):
            return out + edited - clean if use_error_term else edited

        want = ref.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_mlp_out", write)])
        assert logprob_gap(got, want) <= TOL


def test_edits_after_the_model_moved_on_or_after_the_trace_change_nothing(models):
    lm, ref = models("nnsight-hf").adapter.envoy, models("hf")
    sae = SAES["resid_pre topk"]
    with lm.trace(TOKENS):
        latents = sb.splice(lm, sae).save()
        logits = lm.output.logits.save()
        edit(latents)  # the model has already run to its end
    edit(latents)  # a saved tensor, edited after the run: only the tensor changes
    assert logprob_gap(logits, ref.run_with_saes(TOKENS, [sae])) <= TOL


def test_an_edit_that_raises_leaves_no_state(models):
    lm, ref = models("nnsight-hf").adapter.envoy, models("hf")
    sae = SAES["resid_pre topk"]

    def bad(acts):
        acts[..., 10_000] = 0.0  # out of range: IndexError inside the body

    with pytest.raises(IndexError):
        traced(lm, sae, do_edit=bad)
    assert not lm.interleaver.mediators
    assert torch.equal(traced(lm, sae, do_edit=lambda acts: None),
                       traced(lm, sae, do_edit=lambda acts: None))
    with lm.trace(TOKENS):
        out = lm.output.logits.save()
    assert logprob_gap(out, ref(TOKENS)) <= TOL


def one_row_edit(acts: torch.Tensor) -> torch.Tensor:
    acts[..., 3] = 0.0
    acts[:, 2:5, 7] = 5.0
    return acts


def test_edits_in_batched_invokes_reach_only_their_rows(models):
    lm, ref = models("nnsight-hf").adapter.envoy, models("hf")
    sae = sb.SAE.random("topk", 64, 48, "blocks.1.hook_resid_pre", k=6, seed=8,
                        activation_space="hf")
    first, second = TOKENS[:1], TOKENS[1:]
    with lm.trace() as tracer:
        with tracer.invoke(first):
            one_row_edit(sb.splice(lm, sae))
            edited = lm.output.logits.save()
        with tracer.invoke(second):
            sb.splice(lm, sae)
            plain = lm.output.logits.save()
    with ref.saes([sae]):
        want = ref.run_with_hooks(first, fwd_hooks=[
            (f"{sae.cfg.hook_name}.hook_sae_acts_post", lambda a, hook: one_row_edit(a))])
    assert logprob_gap(edited, want) <= TOL
    assert logprob_gap(plain, ref.run_with_saes(second, [sae])) <= TOL


@pytest.mark.skipif(not HAS_SAELENS, reason="passes SAELens's own SAE object")
def test_a_saelens_sae_object_splices_and_edits_like_its_conversion(models):
    lm = models("nnsight-hf").adapter.envoy
    sae = SAES["resid_pre topk"]
    got = traced(lm, saelens_sae(sae))
    assert torch.equal(got, traced(lm, sae))
    splicer = sb.prepare_splice(lm, saelens_sae(sae))
    with lm.trace(TOKENS):
        latents = splicer(lm).save()
    assert latents.shape[-1] == sae.cfg.d_sae
