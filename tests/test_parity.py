"""Cross-backend equivalence: HF, TL-processed, TL-unprocessed, nnsight over HF and nnsight
over TL give the same log-probs.

Random SAEs (architecture, site, training space), random tokens, random steering: every
backend must agree with HF within the named fp32 tolerance. SAEs whose pre-activations
come within ``MARGIN`` of an on/off boundary are skipped, so float noise (~1e-6) cannot
flip a latent and the comparison stays meaningful.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import saebridge as sb
from saebridge.tolerance import logprob_atol

BACKENDS = ["hf", "tl-processed", "tl-unprocessed", "nnsight-hf", "nnsight-tl"]
SITES = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
         "hook_mlp_out", "mlp.hook_post", "attn.hook_z"]
ARCHS = ["standard", "topk", "batchtopk", "jumprelu", "gated"]
MARGIN = 1e-4
D_SAE = 48
TOL = logprob_atol(torch.float32)


@st.composite
def saes(draw):
    site = draw(st.sampled_from(SITES))
    layer = draw(st.integers(0, 1))
    arch = draw(st.sampled_from(ARCHS))
    d_in = 256 if site == "mlp.hook_post" else 64
    return sb.SAE.random(arch, d_in, D_SAE, f"blocks.{layer}.{site}",
                         k=8 if "topk" in arch else None, seed=draw(st.integers(0, 2**16)),
                         activation_space=draw(st.sampled_from(["hf", "tl-processed"])))


tokens_st = st.builds(
    lambda seed, batch, pos: torch.randint(1, 384, (batch, pos),
                                           generator=torch.Generator().manual_seed(seed)),
    st.integers(0, 2**16), st.integers(1, 2), st.integers(2, 10))


def margin(sae: sb.SAE, acts_pre: torch.Tensor) -> float:
    """Distance of the nearest pre-activation to its architecture's on/off boundary."""
    arch = sae.cfg.architecture
    if arch == "topk":
        top = acts_pre.topk(sae.cfg.k + 1, dim=-1).values
        return min((top[..., -2] - top[..., -1]).min().item(), top[..., :-1].abs().min().item())
    if arch in ("jumprelu", "batchtopk"):
        return (acts_pre - sae.threshold).abs().min().item()
    return acts_pre.abs().min().item()


def gate_margin(sae: sb.SAE, sae_input: torch.Tensor) -> float:
    """Gated SAEs also switch on the gate pre-activation, which SAELens does not expose."""
    x = sae_input - sae.b_dec if sae.cfg.apply_b_dec_to_input else sae_input
    return (x @ sae.W_enc + sae.b_gate).abs().min().item()


def run_all(models, device, fn):
    return {b: fn(models(b, device)) for b in BACKENDS}


def assert_same_logprobs(out: dict[str, torch.Tensor]) -> None:
    ref = out["hf"].log_softmax(-1)
    for backend, logits in out.items():
        diff = (logits.log_softmax(-1) - ref).abs().max().item()
        assert diff <= TOL, f"{backend} vs hf: max |Δ log-prob| {diff:.2e} > {TOL:g}"


def _sae_margin_ok(models, device, sae, tokens) -> bool:
    _, cache = models("hf", device).run_with_cache_with_saes(tokens, saes=[sae], names=[])
    hook = sae.cfg.hook_name
    gap = margin(sae, cache[f"{hook}.hook_sae_acts_pre"])
    if sae.cfg.architecture == "gated":
        gap = min(gap, gate_margin(sae, cache[f"{hook}.hook_sae_input"]))
    return gap > MARGIN


@given(sae=saes(), tokens=tokens_st, error_term=st.booleans())
def test_splice_parity(models, device, sae, tokens, error_term):
    sae = sae.to(device)
    assume(_sae_margin_ok(models, device, sae, tokens))
    out = run_all(models, device, lambda m: m.run_with_saes(tokens, [sae], error_term))
    assert_same_logprobs(out)
    if error_term:  # the error term makes the splice invisible
        assert_same_logprobs({"hf": models("hf", device)(tokens), "spliced": out["hf"]})
    caches = run_all(models, device, lambda m: m.run_with_cache_with_saes(
        tokens, [sae], names=[sae.cfg.hook_name], use_error_term=error_term)[1])
    key = f"{sae.cfg.hook_name}.hook_sae_acts_post"
    for backend, cache in caches.items():
        assert torch.equal(cache[key] > 0, caches["hf"][key] > 0), backend
        torch.testing.assert_close(cache[key], caches["hf"][key], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cache[sae.cfg.hook_name], caches["hf"][sae.cfg.hook_name],
                                   atol=1e-4, rtol=1e-4)


@given(sae=saes(), tokens=tokens_st, feature=st.integers(0, D_SAE - 1),
       coef=st.floats(-10, 10), position=st.one_of(st.none(), st.integers(0, 1)))
def test_steer_parity(models, device, sae, tokens, feature, coef, position):
    sae = sae.to(device)
    steer = sb.Steer.from_sae(sae, feature, coef, positions=position)
    assert_same_logprobs(run_all(models, device,
                                 lambda m: m.run_with_interventions(tokens, [steer])))


@given(site=st.sampled_from(SITES), layer=st.integers(0, 1), seed=st.integers(0, 2**16),
       tokens=tokens_st, coef=st.floats(-5, 5),
       positions=st.one_of(st.none(), st.lists(st.integers(0, 1), min_size=1, unique=True)))
def test_random_vector_steer_parity_and_canonical_caches(models, device, site, layer, seed,
                                                         tokens, coef, positions):
    """A random vector added anywhere: same log-probs, and every cached hook agrees in the
    canonical space across backends."""
    gen = torch.Generator().manual_seed(seed)
    shape = {"mlp.hook_post": (256,), "attn.hook_z": (4, 16)}.get(site, (64,))
    vector = torch.randn(shape, generator=gen).to(device)
    steer = sb.Steer(f"blocks.{layer}.{site}", vector, coef, positions=positions)
    out = run_all(models, device, lambda m: m.run_with_interventions(tokens, [steer]))
    assert_same_logprobs(out)
    caches = run_all(models, device, lambda m: m.run_with_cache(tokens)[1])
    for name, value in caches["hf"].items():
        for backend, cache in caches.items():
            torch.testing.assert_close(cache[name], value, atol=1e-4, rtol=1e-4,
                                       msg=f"{name} on {backend}")


@given(sae=saes(), tokens=tokens_st, features=st.lists(st.integers(0, D_SAE - 1), min_size=1,
                                                       max_size=4, unique=True),
       value=st.one_of(st.none(), st.floats(0, 20)))
def test_ablate_and_clamp_parity(models, device, sae, tokens, features, value):
    sae = sae.to(device)
    assume(_sae_margin_ok(models, device, sae, tokens))
    edit = sb.Ablate(sae, features) if value is None else sb.Clamp(sae, features, value)
    out = run_all(models, device, lambda m: m.run_with_interventions(tokens, [edit]))
    assert_same_logprobs(out)


@st.composite
def interventions_at_distinct_sites(draw):
    """3-4 interventions (splice, steer, ablate, clamp) each at its own site. ReLU SAEs: a
    continuous encoder, so backends agree within tolerance without margin checks."""
    sites = draw(st.lists(st.tuples(st.integers(0, 1), st.sampled_from(SITES)), min_size=3,
                          max_size=4, unique=True))
    ops = []
    for i, (layer, site) in enumerate(sites):
        sae = sb.SAE.random("standard", 256 if site == "mlp.hook_post" else 64, D_SAE,
                            f"blocks.{layer}.{site}", seed=draw(st.integers(0, 2**16)),
                            activation_space=draw(st.sampled_from(["hf", "tl-processed"])))
        kind = draw(st.sampled_from(["splice", "steer", "ablate", "clamp"]))
        ops.append(sb.Splice(sae) if kind == "splice" else
                   sb.Steer.from_sae(sae, i, coef=3.0) if kind == "steer" else
                   sb.Ablate(sae, [i, i + 1]) if kind == "ablate" else sb.Clamp(sae, [i], 5.0))
    return ops


@given(ops=interventions_at_distinct_sites(), tokens=tokens_st, data=st.data())
def test_execution_order_independence(models, device, ops, tokens, data):
    """Interventions at different sites apply in the model's execution order: any
    permutation of the list gives the same logits, on every backend."""
    for op in ops:
        if hasattr(op, "sae"):
            op.sae = op.sae.to(device)
        if isinstance(op, sb.Steer):
            op.vector = op.vector.to(device)
    shuffled = data.draw(st.permutations(ops))
    out = run_all(models, device, lambda m: m.run_with_interventions(tokens, ops))
    for backend, logits in out.items():
        again = models(backend, device).run_with_interventions(tokens, shuffled)
        assert torch.equal(again, logits), backend
    assert_same_logprobs(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ablating_an_inactive_feature_changes_nothing(models, backend):
    """Latent edits keep the error term: only the named features change the output."""
    model = models(backend)
    sae = sb.SAE.random("topk", 64, D_SAE, "blocks.1.hook_resid_pre", k=4, seed=5,
                        activation_space="tl-processed")
    tokens = model.to_tokens("Hello world")
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], names=[])
    acts = cache["blocks.1.hook_resid_pre.hook_sae_acts_post"]
    inactive = int((acts == 0).all(0).all(0).nonzero()[0])
    active = int(acts[0, -1].argmax())
    clean = model(tokens)
    torch.testing.assert_close(model.run_with_interventions(tokens, [sb.Ablate(sae, inactive)]),
                               clean, atol=1e-5, rtol=0)
    assert (model.run_with_interventions(tokens, [sb.Ablate(sae, active)]) - clean).abs().max() \
        > 1e-4


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
    assert (bad - ref).abs().max() > 100 * TOL
