"""Cross-backend equivalence on the tiny GPT-2: every backend (the ``backend`` fixture:
HF, TL-processed, TL-unprocessed, both TransformerBridge modes, nnsight over HF and over TL,
on every device) gives HF's log-probs.

Random SAEs (architecture, site, training space), random tokens, random steering: each
backend must agree with HF on the same device within the named fp32 tolerance. SAEs whose
pre-activations come within ``MARGIN`` of an on/off boundary are skipped, so float noise
(~1e-6) cannot flip a latent and the comparison stays meaningful.
"""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import saebridge as sb
from tests.parity import (
    ACTS_TOL,
    CHANGED,
    SITES,
    TOL,
    assert_changed,
    assert_same_latents,
    assert_same_logprobs,
    clear_of_boundaries,
    random_saes,
    tokens_st,
)

ARCHS = ["standard", "topk", "batchtopk", "jumprelu", "gated"]
D_SAE = 48
WIDTH = {"mlp.hook_post": 256}  # d_mlp; every other site is d_model (64) wide


def saes() -> st.SearchStrategy[sb.SAE]:
    return random_saes(list(SITES), lambda site: WIDTH.get(site, 64), ARCHS, D_SAE, k=8)


def pair(models, backend) -> tuple[sb.Model, sb.Model]:
    """The backend under test and the HF reference, on the backend's device."""
    return models(*backend), models("hf", backend.device)


@given(sae=saes(), tokens=tokens_st, error_term=st.booleans())
def test_splice_parity(models, backend, sae, tokens, error_term):
    model, hf = pair(models, backend)
    sae = sae.to(backend.device)
    assume(clear_of_boundaries(hf, sae, tokens))
    want = hf.run_with_saes(tokens, [sae], error_term)
    assert_same_logprobs(model.run_with_saes(tokens, [sae], error_term), want, backend.name)
    if error_term:  # the error term makes the splice invisible
        assert_same_logprobs(want, hf(tokens), "hf with the error term")
    hook = sae.cfg.hook_name
    (_, got), (_, ref) = (m.run_with_cache_with_saes(tokens, [sae], names=[hook],
                                                     use_error_term=error_term)
                          for m in (model, hf))
    assert_same_latents(got[f"{hook}.hook_sae_acts_post"], ref[f"{hook}.hook_sae_acts_post"],
                        backend.name)
    torch.testing.assert_close(got[hook], ref[hook], **ACTS_TOL, msg=backend.name)


@given(sae=saes(), tokens=tokens_st, feature=st.integers(0, D_SAE - 1),
       coef=st.floats(-10, 10), position=st.one_of(st.none(), st.integers(0, 1)))
def test_steer_parity(models, backend, sae, tokens, feature, coef, position):
    model, hf = pair(models, backend)
    steer = sb.Steer.from_sae(sae.to(backend.device), feature, coef, positions=position)
    assert_same_logprobs(model.run_with_interventions(tokens, [steer]),
                         hf.run_with_interventions(tokens, [steer]), backend.name)


@given(site=st.sampled_from(SITES), layer=st.integers(0, 1), seed=st.integers(0, 2**16),
       tokens=tokens_st, coef=st.floats(-5, 5),
       positions=st.one_of(st.none(), st.lists(st.integers(0, 1), min_size=1, unique=True)))
def test_random_vector_steer_parity_and_canonical_caches(models, backend, site, layer, seed,
                                                         tokens, coef, positions):
    """A random vector added anywhere: same log-probs, and every cached hook agrees with
    HF's in the canonical space."""
    model, hf = pair(models, backend)
    gen = torch.Generator().manual_seed(seed)
    shape = {"mlp.hook_post": (256,), "attn.hook_z": (4, 16)}.get(site, (64,))
    vector = torch.randn(shape, generator=gen).to(backend.device)
    steer = sb.Steer(f"blocks.{layer}.{site}", vector, coef, positions=positions)
    assert_same_logprobs(model.run_with_interventions(tokens, [steer]),
                         hf.run_with_interventions(tokens, [steer]), backend.name)
    (_, got), (_, ref) = model.run_with_cache(tokens), hf.run_with_cache(tokens)
    assert set(got) == set(ref)
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, **ACTS_TOL, msg=f"{name} on {backend}")


@given(sae=saes(), tokens=tokens_st, features=st.lists(st.integers(0, D_SAE - 1), min_size=1,
                                                       max_size=4, unique=True),
       value=st.one_of(st.none(), st.floats(0, 20)))
def test_ablate_and_clamp_parity(models, backend, sae, tokens, features, value):
    model, hf = pair(models, backend)
    sae = sae.to(backend.device)
    assume(clear_of_boundaries(hf, sae, tokens))
    edit = sb.Ablate(sae, features) if value is None else sb.Clamp(sae, features, value)
    assert_same_logprobs(model.run_with_interventions(tokens, [edit]),
                         hf.run_with_interventions(tokens, [edit]), backend.name)


@st.composite
def interventions_at_distinct_sites(draw):
    """3-4 interventions (splice, steer, ablate, clamp) each at its own site. ReLU SAEs: a
    continuous encoder, so backends agree within tolerance without margin checks."""
    sites = draw(st.lists(st.tuples(st.integers(0, 1), st.sampled_from(SITES)), min_size=3,
                          max_size=4, unique=True))
    ops = []
    for i, (layer, site) in enumerate(sites):
        sae = sb.SAE.random("standard", WIDTH.get(site, 64), D_SAE,
                            f"blocks.{layer}.{site}", seed=draw(st.integers(0, 2**16)),
                            activation_space=draw(st.sampled_from(["hf", "tl-processed"])))
        kind = draw(st.sampled_from(["splice", "steer", "ablate", "clamp"]))
        ops.append(sb.Splice(sae) if kind == "splice" else
                   sb.Steer.from_sae(sae, i, coef=3.0) if kind == "steer" else
                   sb.Ablate(sae, [i, i + 1]) if kind == "ablate" else sb.Clamp(sae, [i], 5.0))
    return ops


@given(ops=interventions_at_distinct_sites(), tokens=tokens_st, data=st.data())
def test_execution_order_independence(models, backend, ops, tokens, data):
    """Interventions at different sites apply in the model's execution order: any
    permutation of the list gives the same logits, on every backend."""
    model, hf = pair(models, backend)
    for op in ops:
        if hasattr(op, "sae"):
            op.sae = op.sae.to(backend.device)
        if isinstance(op, sb.Steer):
            op.vector = op.vector.to(backend.device)
    shuffled = data.draw(st.permutations(ops))
    logits = model.run_with_interventions(tokens, ops)
    assert torch.equal(model.run_with_interventions(tokens, shuffled), logits)
    assert_same_logprobs(logits, hf.run_with_interventions(tokens, ops), backend.name)


def test_ablating_an_inactive_feature_changes_nothing(models, backend):
    """Latent edits keep the error term: only the named features change the output."""
    model = models(*backend)
    sae = sb.SAE.random("topk", 64, D_SAE, "blocks.1.hook_resid_pre", k=4, seed=5,
                        activation_space="tl-processed").to(backend.device)
    tokens = model.to_tokens("Hello world")
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], names=[])
    acts = cache["blocks.1.hook_resid_pre.hook_sae_acts_post"]
    inactive = int((acts == 0).all(0).all(0).nonzero()[0])
    active = int(acts[0, -1].argmax())
    clean = model(tokens)
    torch.testing.assert_close(model.run_with_interventions(tokens, [sb.Ablate(sae, inactive)]),
                               clean, atol=1e-5, rtol=0)  # the same model: tighter than TOL
    assert_changed(model.run_with_interventions(tokens, [sb.Ablate(sae, active)]), clean,
                   f"{backend.name}, active latent ablated")


def test_space_conversion_matters(models):
    """Without the conversion the answer is wrong: the same SAE weights labelled with the
    wrong training space give different latents and log-probs on HF."""
    tokens = models("hf").to_tokens("Sparse autoencoders find features")
    right = sb.SAE.random("standard", 64, D_SAE, "blocks.1.hook_resid_post", seed=7,
                          activation_space="tl-processed")
    wrong = sb.SAE.random("standard", 64, D_SAE, "blocks.1.hook_resid_post", seed=7,
                          activation_space="hf")
    assert torch.equal(right.W_enc, wrong.W_enc)
    ref = models("tl-processed").run_with_saes(tokens, [right]).log_softmax(-1)
    good = models("hf").run_with_saes(tokens, [right]).log_softmax(-1)
    bad = models("hf").run_with_saes(tokens, [wrong]).log_softmax(-1)
    assert (good - ref).abs().max() <= TOL
    assert (bad - ref).abs().max() > CHANGED
