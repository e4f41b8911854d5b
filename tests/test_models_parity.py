"""Cross-backend equivalence over every architecture: GPT-2, GPT-NeoX, Llama and Gemma-2.

Each tiny model is saved once and loaded into every backend of the ``backend`` fixture: HF,
HookedTransformer (processed and unprocessed, TransformerLens 3.x only), TransformerBridge
(raw and compatibility mode), nnsight over HF and nnsight over processed TransformerLens.
Random SAEs (architecture, site, training space), random tokens and random steering must
give the same log-probs as HF on every backend, within the one fp32 tolerance; every
cached hook must agree in the canonical space.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import saebridge as sb
from saebridge.adapters.tl_bridge import NEVER_RUN
from saebridge.hookmap.registry import architecture
from saebridge.hookmap.site import Site
from saebridge.hookmap.tl_config import tl_fields
from saebridge.testing import Record
from saebridge.tiny import tiny_config
from tests.parity import (
    SITES,
    assert_same_latents,
    assert_same_logprobs,
    clear_of_boundaries,
    random_saes,
    tokens_st,
)

D_SAE = 32
ARCHS = ["standard", "topk", "jumprelu", "gated"]


@functools.cache
def dims(family: str) -> dict[str, Any]:
    """The tiny ``family`` model's TransformerLens config fields (``d_model``, ``d_mlp``,
    ``n_heads``, ``d_head`` …), read from its registered record alone."""
    return tl_fields(architecture(family).tl_config, tiny_config(family))


def sites(family: str) -> list[str]:
    # A site the architecture lacks is Unavailable in its map (Pythia runs attention and
    # MLP in parallel: there is no resid_mid).
    block = architecture(family).hook_map.block
    return [s for s in SITES if isinstance(block.get(s), Site)]


def d_in(family: str, site: str) -> int:
    return dims(family)["d_mlp" if site == "mlp.hook_post" else "d_model"]


def family_saes(family: str) -> st.SearchStrategy[sb.SAE]:
    return random_saes(sites(family), lambda site: d_in(family, site), ARCHS, D_SAE, k=6)


def pair(arch_models, family: str, backend) -> tuple[sb.Model, sb.Model]:
    """The backend under test and the HF reference, on the backend's device."""
    return arch_models(family, *backend), arch_models(family, "hf", backend.device)


@given(data=st.data(), tokens=tokens_st, error_term=st.booleans())
def test_splice_parity(arch_models, family, backend, data, tokens, error_term):
    model, hf = pair(arch_models, family, backend)
    sae = data.draw(family_saes(family)).to(backend.device)
    assume(clear_of_boundaries(hf, sae, tokens))
    assert_same_logprobs(model.run_with_saes(tokens, [sae], error_term),
                         hf.run_with_saes(tokens, [sae], error_term), backend.name)
    key = f"{sae.cfg.hook_name}.hook_sae_acts_post"
    (_, got), (_, ref) = (m.run_with_cache_with_saes(tokens, [sae], names=[sae.cfg.hook_name])
                          for m in (model, hf))
    assert_same_latents(got[key], ref[key], backend.name)


@given(data=st.data(), tokens=tokens_st, coef=st.floats(-5, 5),
       position=st.one_of(st.none(), st.integers(0, 1)))
def test_steer_parity(arch_models, family, backend, data, tokens, coef, position):
    model, hf = pair(arch_models, family, backend)
    site = data.draw(st.sampled_from(sites(family)))
    layer = data.draw(st.integers(0, 1))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    heads = (dims(family)["n_heads"], dims(family)["d_head"])
    shape = heads if site == "attn.hook_z" else (d_in(family, site),)
    steer = sb.Steer(f"blocks.{layer}.{site}", torch.randn(shape, generator=gen), coef,
                     positions=position)
    assert_same_logprobs(model.run_with_interventions(tokens, [steer]),
                         hf.run_with_interventions(tokens, [steer]), backend.name)


def test_every_cached_hook_is_canonical(arch_models, family, backend):
    """Cache keys are canonical TransformerLens names and values are in the canonical
    (processed) space on every backend: compared with compatibility-mode TransformerLens,
    hook by hook, and the clean log-probs with HF's."""
    model = arch_models(family, *backend)
    tokens = model.to_tokens("Hello world, hello model and SAE")
    ref_logits, ref = arch_models(family, "bridge-compat", backend.device).run_with_cache(tokens)
    logits, cache = model.run_with_cache(tokens)
    assert set(cache) - bridge_idle(cache) == set(ref) - bridge_idle(ref)
    for name in set(ref) & set(cache):
        torch.testing.assert_close(cache[name], ref[name], atol=5e-5, rtol=1e-4, msg=name)
    assert_same_logprobs(logits, ref_logits, backend.name)


def bridge_idle(names) -> set[str]:
    """The hooks among ``names`` that some TransformerBridge registers but never runs
    (``NEVER_RUN``: NeoX's ``hook_rot_q/k``); the other backends produce them."""
    idle = {rel for rels in NEVER_RUN.values() for rel in rels}
    return {n for n in names if n.split(".", 2)[-1] in idle}


@pytest.mark.backends("raw")  # only these compute HF's own (native) activations
def test_native_activations_agree_between_raw_backends(arch_models, family, backend):
    """HF through torch hooks, nnsight over HF, unprocessed HookedTransformer and the raw
    bridge compute the same native activations at every site (z from ``o_proj``'s input,
    ``mlp.hook_post`` from ``down_proj``'s, Gemma-2's post-norm outputs, NeoX's interleaved
    q/k/v …)."""
    model, hf = pair(arch_models, family, backend)
    tokens = hf.to_tokens("Layer norm reads the stream")
    assert model.space.name == "hf"
    seen: dict[str, dict[str, torch.Tensor]] = {}
    for name, m in (("model", model), ("hf", hf)):
        seen[name] = {}
        m.run_with_interventions(tokens, [Record(n, seen[name]) for n in m.hook_names()])
    assert set(seen["model"]) - bridge_idle(seen["model"]) == \
        set(seen["hf"]) - bridge_idle(seen["hf"])
    for name, value in seen["model"].items():
        torch.testing.assert_close(value, seen["hf"][name], atol=2e-5, rtol=1e-4,
                                   msg=f"{name} on {backend}")


