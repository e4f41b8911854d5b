"""Cross-backend equivalence over every architecture: GPT-2, GPT-NeoX, Llama and Gemma-2.

Each tiny model is saved once and loaded into HF, HookedTransformer (processed and
unprocessed, TransformerLens 3.x only) and TransformerBridge (raw and compatibility mode).
Random SAEs (architecture, site, training space), random tokens and random steering must
give the same log-probs as HF on every backend, within the one fp32 tolerance; every
cached hook must agree in the canonical space.
"""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import saebridge as sb
from saebridge.testing import Record
from saebridge.tolerance import logprob_atol

TOL = logprob_atol(torch.float32)
MARGIN = 1e-4
D_SAE = 32
ARCHS = ["standard", "topk", "jumprelu", "gated"]
D_MLP = {"gpt2": 256, "neox": 256, "llama": 128, "gemma2": 128}
SITES = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
         "hook_mlp_out", "mlp.hook_post", "attn.hook_z"]


def sites(family: str) -> list[str]:
    # Pythia runs attention and MLP in parallel: there is no resid_mid.
    return [s for s in SITES if not (family == "neox" and s == "hook_resid_mid")]


def d_in(family: str, site: str) -> int:
    return D_MLP[family] if site == "mlp.hook_post" else 64


tokens_st = st.builds(
    lambda seed, batch, pos: torch.randint(1, 384, (batch, pos),
                                           generator=torch.Generator().manual_seed(seed)),
    st.integers(0, 2**16), st.integers(1, 2), st.integers(2, 10))


@st.composite
def family_saes(draw, family: str):
    site = draw(st.sampled_from(sites(family)))
    arch = draw(st.sampled_from(ARCHS))
    return sb.SAE.random(arch, d_in(family, site), D_SAE,
                         f"blocks.{draw(st.integers(0, 1))}.{site}",
                         k=6 if arch == "topk" else None, seed=draw(st.integers(0, 2**16)),
                         activation_space=draw(st.sampled_from(["hf", "tl-processed"])))


def max_logprob_gap(out: dict[str, torch.Tensor]) -> dict[str, float]:
    ref = out["hf"].log_softmax(-1)
    return {b: (v.log_softmax(-1) - ref).abs().max().item() for b, v in out.items()}


def assert_same_logprobs(out: dict[str, torch.Tensor]) -> None:
    for backend, gap in max_logprob_gap(out).items():
        assert gap <= TOL, f"{backend} vs hf: max |Δ log-prob| {gap:.2e} > {TOL:g}"


def latents_clear_of_boundaries(model: sb.Model, sae: sb.SAE, tokens: torch.Tensor) -> bool:
    """Float noise (~1e-6) must not flip a latent: skip SAEs with a pre-activation within
    MARGIN of its on/off boundary (for gated SAEs, also the gate's)."""
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], names=[])
    hook = sae.cfg.hook_name
    pre = cache[f"{hook}.hook_sae_acts_pre"]
    arch = sae.cfg.architecture
    if arch == "topk":
        top = pre.topk(sae.cfg.k + 1, dim=-1).values
        gap = min((top[..., -2] - top[..., -1]).min().item(), top[..., :-1].abs().min().item())
    elif arch == "jumprelu":
        gap = (pre - sae.threshold).abs().min().item()
    else:
        gap = pre.abs().min().item()
    if arch == "gated":
        x = cache[f"{hook}.hook_sae_input"]
        x = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
        gap = min(gap, (x @ sae.W_enc + sae.b_gate).abs().min().item())
    return gap > MARGIN


@given(data=st.data(), tokens=tokens_st, error_term=st.booleans())
def test_splice_parity(arch_models, family, family_backends, device, data, tokens,
                       error_term):
    sae = data.draw(family_saes(family)).to(device)
    assume(latents_clear_of_boundaries(arch_models(family, "hf", device), sae, tokens))
    models = {b: arch_models(family, b, device) for b in family_backends}
    out = {b: m.run_with_saes(tokens, [sae], error_term) for b, m in models.items()}
    assert_same_logprobs(out)
    key = f"{sae.cfg.hook_name}.hook_sae_acts_post"
    caches = {b: m.run_with_cache_with_saes(tokens, [sae], names=[sae.cfg.hook_name])[1]
              for b, m in models.items()}
    for backend, cache in caches.items():
        assert torch.equal(cache[key] > 0, caches["hf"][key] > 0), backend
        torch.testing.assert_close(cache[key], caches["hf"][key], atol=1e-4, rtol=1e-4,
                                   msg=backend)


@given(data=st.data(), tokens=tokens_st, coef=st.floats(-5, 5),
       position=st.one_of(st.none(), st.integers(0, 1)))
def test_steer_parity(arch_models, family, family_backends, device, data, tokens, coef,
                      position):
    site = data.draw(st.sampled_from(sites(family)))
    layer = data.draw(st.integers(0, 1))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    shape = (4, 16) if site == "attn.hook_z" else (d_in(family, site),)
    steer = sb.Steer(f"blocks.{layer}.{site}", torch.randn(shape, generator=gen), coef,
                     positions=position)
    assert_same_logprobs({b: arch_models(family, b, device).run_with_interventions(
        tokens, [steer]) for b in family_backends})


def test_every_cached_hook_is_canonical(arch_models, family, family_backend):
    """Cache keys are canonical TransformerLens names and values are in the canonical
    (processed) space on every backend: compared with compatibility-mode TransformerLens,
    hook by hook, and the clean log-probs with HF's."""
    tokens = arch_models(family, "hf").to_tokens("Hello world, hello model and SAE")
    ref_logits, ref = arch_models(family, "bridge-compat").run_with_cache(tokens)
    backend = family_backend
    logits, cache = arch_models(family, backend).run_with_cache(tokens)
    assert set(cache) == set(ref)
    for name in ref:
        torch.testing.assert_close(cache[name], ref[name], atol=5e-5, rtol=1e-4, msg=name)
    assert_same_logprobs({"hf": ref_logits, backend: logits})


def test_native_activations_agree_between_raw_backends(arch_models, family, family_backends):
    """HF through torch hooks, unprocessed HookedTransformer and the raw bridge compute the
    same native activations at every site (z from ``o_proj``'s input, ``mlp.hook_post``
    from ``down_proj``'s, Gemma-2's post-norm outputs, NeoX's interleaved q/k/v …)."""
    raw = [b for b in ("hf", "bridge", "tl-unprocessed") if b in family_backends]
    tokens = arch_models(family, "hf").to_tokens("Layer norm reads the stream")
    seen: dict[str, dict[str, torch.Tensor]] = {}
    for backend in raw:
        model, seen[backend] = arch_models(family, backend), {}
        assert model.space.name == "hf", backend
        model.run_with_interventions(tokens, [Record(n, seen[backend])
                                              for n in model.hook_names()])
    for backend in raw[1:]:
        assert set(seen[backend]) == set(seen["hf"]), backend
        for name, value in seen[backend].items():
            torch.testing.assert_close(value, seen["hf"][name], atol=2e-5, rtol=1e-4,
                                       msg=f"{name} on {backend}")


