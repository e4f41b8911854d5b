"""Compositions mean what SAELens computes: several SAEs, steers, ablations and clamps in one
run equal SAELens's ``HookedSAETransformer`` (or, without SAELens, a hand-written
TransformerLens oracle, :mod:`tests.oracle`) on a TransformerLens model loaded in the SAEs'
space, on every backend.

The case the rule exists for: an SAE downstream of an edit that wrote a mean into the
residual stream (another SAE's reconstruction, a steering vector that is not mean-free)
sees that mean in a processed model; an HF model's stream must be converted to what the
processed model holds, not re-centred.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import saebridge as sb
from tests.oracle import (
    HAS_SAELENS,
    Composition,
    Edit,
    logprob_gap,
    reference,
    reference_cache,
    tl_model,
)

pytestmark = pytest.mark.skipif(not hasattr(pytest.importorskip("transformer_lens"),
                                            "HookedTransformer"),
                                reason="the reference is a HookedTransformer (TransformerLens 3.x)")

TOL = 1e-4
"""fp32: max |Δ log-prob| against the reference (the issue's bound)."""
SITES = {"hook_resid_pre": 64, "hook_resid_mid": 64, "hook_resid_post": 64,
         "hook_attn_out": 64, "hook_mlp_out": 64, "mlp.hook_post": 256, "attn.hook_z": 64}
STEER_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
               "hook_mlp_out")
SPACES = ("tl-processed", "hf")

_REFS: dict[str, object] = {}


@pytest.fixture(scope="module")
def refs(tiny_dir, tokenizer):
    """``refs(space)``: the reference TransformerLens model in that space."""
    from transformers import AutoModelForCausalLM

    def get(space: str):
        if space not in _REFS:
            hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
            _REFS[space] = tl_model(hf.eval(), tokenizer, space)
        return _REFS[space]
    return get


@st.composite
def compositions(draw: st.DrawFn) -> tuple[str, Composition]:
    space = draw(st.sampled_from(SPACES))
    n_saes = draw(st.integers(1, 3))
    names = [f"blocks.{layer}.{site}" for layer in (0, 1) for site in SITES]
    hooks = draw(st.lists(st.sampled_from(names), min_size=n_saes, max_size=n_saes,
                          unique=True))
    comp = Composition()
    for hook in hooks:
        width = SITES[hook.split(".", 2)[2]]
        arch = draw(st.sampled_from(["standard", "topk"]))
        comp.saes.append(sb.SAE.random(
            arch, width, 32, hook, k=6 if arch == "topk" else None,
            seed=draw(st.integers(0, 2**16)), activation_space=space))
    for i in range(n_saes):
        kind = draw(st.sampled_from(["splice", "splice", "ablate", "clamp"]))
        if kind != "splice":
            features = tuple(draw(st.lists(st.integers(0, 31), min_size=1, max_size=4,
                                           unique=True)))
            positions = draw(st.one_of(st.none(), st.just((1, 2))))
            comp.edits[i] = Edit(features, None if kind == "ablate" else 3.0, positions)
    free = [f"blocks.{layer}.{s}" for layer in (0, 1) for s in STEER_SITES
            if f"blocks.{layer}.{s}" not in hooks]
    plain = any(i not in comp.edits for i in range(n_saes))  # a splice always does something
    for _ in range(draw(st.integers(0 if plain and n_saes > 1 else 1, 2))):
        hook = draw(st.sampled_from(free))
        seed = draw(st.integers(0, 2**16))
        vector = torch.randn(64, generator=torch.Generator().manual_seed(seed)) + 0.5
        comp.steers.append((hook, vector, draw(st.sampled_from([1.0, -2.0])),
                            draw(st.one_of(st.none(), st.just((0, 3))))))
    return space, comp


TOKENS = torch.tensor([[1, 17, 5, 42, 9, 3, 77, 12], [4, 8, 15, 16, 23, 42, 2, 19]])


@settings(max_examples=8, deadline=None)
@given(case=compositions())
def test_compositions_equal_saelens(backend, models, refs, case):
    space, comp = case
    model = models(*backend)
    want = reference(refs(space), comp, TOKENS)
    got = model.run_with_interventions(TOKENS, comp.interventions())
    clean = model(TOKENS)
    assert logprob_gap(got, clean) > 100 * TOL, "the composition must do something"
    gap = logprob_gap(got, want)
    assert gap <= TOL, f"{backend.name}: {space} composition off the reference by {gap:.2e}"


def test_a_steer_that_is_not_mean_free_reaches_a_downstream_sae(backend, models, refs):
    """The issue's case: steer blocks.0.hook_resid_post, an SAE at blocks.1.hook_resid_pre."""
    sae = sb.SAE.random("standard", 64, 32, "blocks.1.hook_resid_pre", seed=3,
                        activation_space="tl-processed")
    vector = torch.full((64,), 1.5)  # all mean: what re-centring would have removed
    comp = Composition(saes=[sae], steers=[("blocks.0.hook_resid_post", vector, 1.0, None)])
    got = models(*backend).run_with_interventions(TOKENS, comp.interventions())
    assert logprob_gap(got, reference(refs("tl-processed"), comp, TOKENS)) <= TOL


def test_two_saes_in_a_row_equal_saelens_and_caches_show_the_written_mean(backend, models,
                                                                          refs):
    up = sb.SAE.random("standard", 64, 32, "blocks.0.hook_resid_mid", seed=5,
                       activation_space="tl-processed")
    down = sb.SAE.random("topk", 64, 32, "blocks.1.hook_resid_pre", seed=6, k=6,
                         activation_space="tl-processed")
    site = "blocks.0.hook_resid_post"
    got, cache = models(*backend).run_with_cache_with_saes(TOKENS, [up, down], names=[site])
    ref = refs("tl-processed")
    assert logprob_gap(got, reference(ref, Composition(saes=[up, down]), TOKENS)) <= TOL
    # The cache reports what processed TransformerLens holds under the same edits: the
    # upstream reconstruction's mean is still in the stream.
    want = reference_cache(ref, [up, down], site, TOKENS)
    torch.testing.assert_close(cache[site], want, atol=1e-4, rtol=1e-4)
    assert want.mean(-1).abs().max() > 1e-3  # not a centred stream


def test_a_composition_in_a_remote_request_equals_saelens(models, refs):
    """The same rule in a request (nnsight's local simulation of the remote path): the
    edits' written mean is tracked by the shipped steps, reset at each forward."""
    lm = models("nnsight-hf").adapter.envoy
    up = sb.SAE.random("standard", 64, 32, "blocks.0.hook_attn_out", seed=7,
                       activation_space="tl-processed")
    down = sb.SAE.random("topk", 64, 32, "blocks.1.hook_resid_mid", seed=8, k=6,
                         activation_space="tl-processed")
    comp = Composition(saes=[up, down], edits={1: Edit((2, 3), 4.0, (1, 2))},
                       steers=[("blocks.0.hook_resid_pre", torch.full((64,), 0.7), 1.0, None)])
    want = reference(refs("tl-processed"), comp, TOKENS)
    got = sb.wrap(lm, remote="local").run_with_interventions(TOKENS, comp.interventions())
    assert logprob_gap(got, want) <= TOL
    # A generation replays the steps at every forward: the same tokens as a local run.
    remote = sb.wrap(lm, remote="local").generate(TOKENS[:1, :4], 3,
                                                  interventions=comp.interventions())
    local = models("nnsight-hf").generate(TOKENS[:1, :4], 3, interventions=comp.interventions())
    assert torch.equal(remote, local)


# ---- one SAE per hook, and exclude_special_tokens, as SAELens ---------------------------


def _saelens_logits(ref, attached, run_saes, tokens, **kwargs):
    """SAELens: ``attached`` added with add_sae, then run_with_saes(``run_saes``)."""
    from tests.oracle import saelens_sae

    ref.reset_saes()
    try:
        for sae in attached:
            ref.add_sae(saelens_sae(sae))
        with torch.no_grad():
            return ref.run_with_saes(tokens, saes=[saelens_sae(s) for s in run_saes],
                                     **kwargs)
    finally:
        ref.reset_saes()


needs_saelens = pytest.mark.skipif(not HAS_SAELENS, reason="compares with SAELens itself")


@needs_saelens
def test_one_sae_per_hook_as_saelens(backend, models, refs):
    hook = "blocks.1.hook_resid_pre"
    a, b, c = (sb.SAE.random("standard", 64, 32, hook, seed=s, activation_space="tl-processed")
               for s in (11, 12, 13))
    model, ref = models(*backend), refs("tl-processed")
    model.add_sae(a)
    try:
        with_a = model(TOKENS)
        model.add_sae(b)  # overwrites a, as HookedSAETransformer.add_sae does
        assert model.attached == [sb.Splice(b)]
        assert logprob_gap(model(TOKENS), _saelens_logits(ref, [b], [], TOKENS)) <= TOL
        model.add_sae(a)
        # run_with_saes over an attached SAE at the same hook replaces it for the run ...
        got = model.run_with_saes(TOKENS, [c])
        assert logprob_gap(got, _saelens_logits(ref, [a], [c], TOKENS)) <= TOL
        assert logprob_gap(got, with_a) > 100 * TOL
        # ... and restores it after, as does saes().
        assert torch.equal(model(TOKENS), with_a)
        with model.saes([b, c]):  # the later of two at one hook wins
            assert logprob_gap(model(TOKENS), _saelens_logits(ref, [c], [], TOKENS)) <= TOL
        assert torch.equal(model(TOKENS), with_a)
        # Stacking two SAEs at one hook is explicit, and differs.
        stacked = model.run_with_interventions(TOKENS, [sb.Splice(c)])
        assert logprob_gap(stacked, got) > 100 * TOL
    finally:
        model.reset_saes()


@needs_saelens
def test_exclude_special_tokens_as_saelens(backend, models, refs, tokenizer):
    sae = sb.SAE.random("topk", 64, 32, "blocks.0.hook_resid_post", seed=21, k=6,
                        activation_space="tl-processed")
    bos = tokenizer.bos_token_id
    tokens = TOKENS.clone()
    tokens[:, 0], tokens[1, 4] = bos, bos
    model, ref = models(*backend), refs("tl-processed")
    for exclude in (True, [bos, 42]):
        got = model.run_with_saes(tokens, [sae], exclude_special_tokens=exclude)
        want = _saelens_logits(ref, [], [sae], tokens, exclude_special_tokens=exclude)
        assert logprob_gap(got, want) <= TOL
        assert logprob_gap(got, model.run_with_saes(tokens, [sae])) > 100 * TOL
    _, cache = model.run_with_cache_with_saes(tokens, [sae], exclude_special_tokens=True,
                                              names=[sae.cfg.hook_name])
    hook = sae.cfg.hook_name
    # Bypassed positions: the output is the input, the error zero (SAELens's records).
    assert torch.equal(cache[f"{hook}.hook_sae_error"][:, 0],
                       torch.zeros_like(cache[f"{hook}.hook_sae_error"][:, 0]))
    torch.testing.assert_close(cache[f"{hook}.hook_sae_output"][:, 0],
                               cache[f"{hook}.hook_sae_input"][:, 0])
    with model.saes([sae], exclude_special_tokens=True):
        assert torch.equal(model(tokens), model.run_with_saes(tokens, [sae],
                                                              exclude_special_tokens=True))


def test_exclude_special_tokens_refuses_bad_input(models):
    model = models("hf")
    sae = sb.SAE.random("standard", 64, 32, "blocks.0.hook_resid_post", seed=1)
    d_vocab = model.adapter.d_vocab
    with pytest.raises(sb.errors.TokensError, match=str(d_vocab)):
        model.run_with_saes(TOKENS, [sae], exclude_special_tokens=[d_vocab + 5])
    with pytest.raises(sb.errors.ArgumentTypeError, match="bool or a list"):
        model.run_with_saes(TOKENS, [sae], exclude_special_tokens="bos")
    with pytest.raises(sb.errors.TokensError):
        model.add_sae(sae, exclude_special_tokens=[-1])
    assert model.attached == []


def test_exclude_special_tokens_in_a_remote_request(models, tokenizer):
    lm = models("nnsight-hf").adapter.envoy
    sae = sb.SAE.random("standard", 64, 32, "blocks.0.hook_resid_post", seed=2)
    tokens = TOKENS.clone()
    tokens[:, 0] = tokenizer.bos_token_id
    got = sb.wrap(lm, remote="local").run_with_saes(tokens, [sae], exclude_special_tokens=True)
    want = models("nnsight-hf").run_with_saes(tokens, [sae], exclude_special_tokens=True)
    assert logprob_gap(got, want) <= TOL


@needs_saelens
def test_a_transcoder_then_an_sae_as_saelens(backend, models, refs):
    """A transcoder's write is an edit like any other: a downstream SAE sees the mean of its
    prediction, as in SAELens.

    Without a skip term: SAELens 6.54's ``HookedSAETransformer`` splices with
    ``sae.decode(sae.encode(x))``, which drops a ``SkipTranscoder``'s ``x @ W_skip.T``
    (its own ``forward`` adds it); saebridge keeps the skip term (0.36 log-prob apart).
    """
    from saebridge.sae.transcoder import Transcoder

    tc = Transcoder.random("standard", 64, 48, 64, "blocks.0.ln2.hook_normalized",
                           "blocks.0.hook_mlp_out", seed=31, skip=False,
                           activation_space="tl-processed")
    sae = sb.SAE.random("standard", 64, 32, "blocks.1.hook_resid_pre", seed=32,
                        activation_space="tl-processed")
    got = models(*backend).run_with_saes(TOKENS, [tc, sae])
    want = _saelens_logits(refs("tl-processed"), [], [tc, sae], TOKENS)
    assert logprob_gap(got, want) <= TOL


def test_head_shaped_views_of_the_stream_keep_the_written_mean(models):
    """``hook_attn_in`` repeats ``resid_pre`` over the heads: after an edit wrote a mean
    into the stream, each head's copy shows it, as the stream itself does."""
    model = models("hf")
    steer = sb.Steer("blocks.0.hook_resid_post", torch.full((64,), 0.5))
    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_in"]
    _, cache = model.run_with_cache(TOKENS, names=names, interventions=[steer])
    resid, heads = cache["blocks.1.hook_resid_pre"], cache["blocks.1.hook_attn_in"]
    torch.testing.assert_close(heads, resid.unsqueeze(2).expand_as(heads), atol=1e-5, rtol=0)
