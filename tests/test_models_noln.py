"""LayerNorm-free models, two kinds.

apollo-research/gpt2_noLN's recipe (LayerNorm gains ×1e6 with eps 1e12, saved and reloaded
with ``save_pretrained``/``from_pretrained``): each LayerNorm is the affine map
``(x - mean) * w + b``. It no longer normalises but still subtracts the mean, so for
activation spaces it is a LayerNorm: TransformerLens processing (default, and the model
card's ``fold_ln=True, center_unembed=False``) centres the residual stream, and saebridge's
canonical values are TransformerLens's own, on every backend.

LayerNorms replaced by ``nn.Identity`` are removed: nothing absorbs a mean, processing
centres nothing, and TransformerLens runs with ``normalization_type=None``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import saebridge as sb
from saebridge.errors import UnknownHookError
from saebridge.tiny import tiny_gpt2, tiny_tokenizer
from saebridge.tolerance import logprob_atol

tla = pytest.importorskip("saebridge.adapters.transformer_lens")
pytestmark = pytest.mark.skipif(tla.HookedTransformer is None,
                                reason="TransformerLens 4.x has no HookedTransformer")
TOK = tiny_tokenizer()
TOL = logprob_atol(torch.float32)
UNPROCESSED = dict(fold_ln=False, center_writing_weights=False, center_unembed=False,
                   fold_value_biases=False)


@pytest.fixture(scope="module")
def eps_style(tmp_path_factory):
    """gpt2_noLN's recipe, written to disk and loaded back as a user would load it."""
    from transformers import AutoModelForCausalLM

    model, _ = tiny_gpt2(tokenizer=TOK)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.mul_(1e6)
    model.config.layer_norm_epsilon = 1e12
    path = tmp_path_factory.mktemp("gpt2-noLN")
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def identity_style():
    model, _ = tiny_gpt2(tokenizer=TOK)
    for block in model.transformer.h:
        block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
    model.transformer.ln_f = nn.Identity()
    return model


@pytest.fixture
def noln(identity_style):
    """A model whose norms were removed (the norm-free tests below)."""
    return identity_style


def backends(hf) -> dict[str, sb.Model]:
    return {"hf": sb.wrap(hf, tokenizer=TOK),
            "tl-processed": sb.wrap(tla.from_hf(hf), tokenizer=TOK),
            "tl-unprocessed": sb.wrap(tla.from_hf(hf, **UNPROCESSED), tokenizer=TOK)}


def test_the_eps_recipe_really_removes_the_normalisation(eps_style):
    """Scaling the stream no longer rescales what the LayerNorm outputs, as it would if it
    normalised: LN(2x) - b = 2 (LN(x) - b)."""
    ln = eps_style.transformer.h[0].ln_1
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ln(2 * x) - ln.bias, 2 * (ln(x) - ln.bias), rtol=1e-5, atol=1e-5)


def test_tl_has_normalization_removed_and_equal_logits(noln):
    tokens = torch.randint(1, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = noln(tokens).logits
    for flags in ({}, UNPROCESSED):
        tl = tla.from_hf(noln, **flags)
        assert tl.cfg.normalization_type is None
        assert not any("ln" in k for k in tl.state_dict())
        logits = tl(tokens)
        assert (logits.log_softmax(-1) - ref.log_softmax(-1)).abs().max() <= TOL
        if not flags:  # center_unembed: logits minus their vocab mean, nothing else
            torch.testing.assert_close(logits, ref - ref.mean(-1, keepdim=True),
                                       atol=1e-4, rtol=1e-4)


def test_nothing_is_silently_centred(noln):
    """No LayerNorm absorbs a mean: processing centres nothing (the space says so), the
    residual sites are plain, and an SAE labelled tl-processed sees the raw, uncentred
    stream, the same on every backend."""
    models = backends(noln)
    for name, model in models.items():
        assert not model.space.center_writing_weights and not model.space.fold_ln, name
        assert model.adapter.kind("blocks.1.hook_resid_post") == "plain"
    sae = sb.SAE.random("standard", 64, 32, "blocks.1.hook_resid_post", seed=2,
                        activation_space="tl-processed")
    tokens = models["hf"].to_tokens("Hello world, hello model")
    inputs = {n: m.run_with_cache_with_saes(tokens, [sae], names=[])[1]
              for n, m in models.items()}
    key = "blocks.1.hook_resid_post.hook_sae_input"
    assert inputs["hf"][key].mean(-1).abs().max() > 1e-2  # not centred
    out = {n: m.run_with_saes(tokens, [sae]).log_softmax(-1) for n, m in models.items()}
    for name in models:
        torch.testing.assert_close(inputs[name][key], inputs["hf"][key], atol=1e-4, rtol=1e-4)
        assert (out[name] - out["hf"]).abs().max() <= TOL, name


def test_caches_agree_and_norm_hooks_do_not_exist(noln):
    models = backends(noln)
    tokens = models["hf"].to_tokens("Layer norm reads the stream")
    caches = {n: m.run_with_cache(tokens)[1] for n, m in models.items()}
    for name, cache in caches.items():
        assert set(cache) == set(caches["hf"]), name
        assert not any("hook_normalized" in k for k in cache)
        for key, value in cache.items():
            torch.testing.assert_close(value, caches["hf"][key], atol=1e-4, rtol=1e-4,
                                       msg=f"{key} on {name}")
    with pytest.raises(UnknownHookError, match="norms were removed"):
        models["hf"].run_with_cache(tokens, names=["blocks.0.ln1.hook_normalized"])


def test_nnsight_over_the_same_weights(noln):
    """nnsight (``NNsight`` and ``LanguageModel`` over the HF model) agrees with HF and with
    TransformerLens with normalization removed, and centres nothing either."""
    nnsight = pytest.importorskip("nnsight")
    models = backends(noln)
    sae = sb.SAE.random("topk", 64, 32, "blocks.0.hook_resid_post", k=4, seed=5,
                        activation_space="tl-processed")
    tokens = models["hf"].to_tokens("Sparse autoencoders find features")
    want = models["tl-processed"].run_with_saes(tokens, [sae]).log_softmax(-1)
    for wrapped in (nnsight.NNsight(noln), nnsight.LanguageModel(noln, tokenizer=TOK)):
        model = sb.wrap(wrapped, tokenizer=TOK)
        assert model.adapter.kind("blocks.0.hook_resid_post") == "plain"
        got = model.run_with_saes(tokens, [sae]).log_softmax(-1)
        assert (got - want).abs().max() <= TOL


def test_transformer_bridge_refuses_a_norm_free_model(noln):
    """TransformerBridge cannot wrap norms replaced by nn.Identity (its NormalizationBridge
    needs a norm weight): a clear refusal naming what works instead, not an AttributeError."""
    from saebridge.adapters.tl_bridge import bridge_from_hf
    from saebridge.errors import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match="from_hf"):
        bridge_from_hf(noln)


# ---- the gpt2_noLN recipe: centring-only LayerNorms are LayerNorms ------------------------

MODEL_CARD = dict(fold_ln=True, center_unembed=False)
"""How the gpt2_noLN model card loads it into TransformerLens."""


def test_the_recipe_still_subtracts_the_mean(eps_style):
    ln = eps_style.transformer.h[0].ln_1
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ln(x + 5.0), ln(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loading", [{}, MODEL_CARD], ids=["default", "model-card"])
def test_caches_are_transformer_lens_own(eps_style, loading):
    """TransformerLens centres this model's residual stream; saebridge's canonical caches on
    HF, nnsight and TransformerLens itself are TransformerLens's own numbers."""
    nnsight = pytest.importorskip("nnsight")
    tl = tla.from_hf(eps_style, **loading)
    assert tl.cfg.normalization_type == "LNPre"
    tokens = torch.randint(1, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    _, want = tl.run_with_cache(tokens)
    assert want["blocks.1.hook_resid_mid"].mean(-1).abs().max() < 1e-5  # centred
    for model in (sb.wrap(eps_style, tokenizer=TOK), sb.wrap(tl, tokenizer=TOK),
                  sb.wrap(nnsight.NNsight(eps_style), tokenizer=TOK)):
        assert model.adapter.kind("blocks.1.hook_resid_post") == "resid"
        _, cache = model.run_with_cache(tokens)
        assert set(cache) <= set(want)
        for key, value in cache.items():
            torch.testing.assert_close(value, want[key], atol=1e-4, rtol=1e-4,
                                       msg=f"{key} on {model.backend}")
        assert (model(tokens).log_softmax(-1) - eps_style(tokens).logits.log_softmax(-1)
                ).abs().max() <= TOL


@pytest.mark.parametrize("loading", [{}, MODEL_CARD], ids=["default", "model-card"])
def test_splices_equal_saelens(eps_style, loading):
    """SAEs trained on the processed model spliced into HF, TransformerLens, nnsight and
    both bridges give what SAELens gives on the processed TransformerLens model."""
    from saebridge.adapters.tl_bridge import bridge_from_hf
    from tests.oracle import Composition, reference, tl_model

    saes = [sb.SAE.random("standard", 64, 32, "blocks.0.hook_resid_post", seed=3,
                          activation_space="tl-processed"),
            sb.SAE.random("topk", 64, 32, "blocks.1.hook_mlp_out", seed=4, k=4,
                          activation_space="tl-processed")]
    tokens = torch.randint(1, 384, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = tl_model(eps_style, TOK, "tl-processed")
    want = reference(ref, Composition(saes=saes), tokens)
    models = [sb.wrap(eps_style, tokenizer=TOK), sb.wrap(tla.from_hf(eps_style, **loading)),
              sb.wrap(bridge_from_hf(eps_style, tokenizer=TOK)),
              sb.wrap(bridge_from_hf(eps_style, tokenizer=TOK, compatibility_mode=True))]
    for model in models:
        got = model.run_with_saes(tokens, saes)
        gap = (got.log_softmax(-1) - want.log_softmax(-1)).abs().max()
        assert gap <= TOL, f"{model.backend} ({model.space.name}): {gap:.2e}"
