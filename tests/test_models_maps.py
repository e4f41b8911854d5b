"""Hook maps of every registered architecture (GPT-2, GPT-NeoX, Llama with Mistral and
Qwen2, Gemma-2): every site resolves on a model built from its architecture file alone, the
architecture facts the maps encode hold in the installed transformers, and the sites
TransformerLens processing changes are the ones each map's kinds say."""

from __future__ import annotations

import pytest
import torch

import saebridge as sb
from saebridge.errors import UnknownHookError, UnsupportedArchitectureError
from saebridge.hookmap import hook_map, names, resolve
from saebridge.hookmap.registry import architecture_of, architectures
from saebridge.hookmap.tl_config import tl_fields
from saebridge.testing import Record
from saebridge.tiny import tiny_gemma2, tiny_llama, tiny_neox, tiny_of, tiny_tokenizer

tla = pytest.importorskip("saebridge.adapters.transformer_lens")
needs_hooked = pytest.mark.skipif(tla.HookedTransformer is None,
                                  reason="TransformerLens 4.x has no HookedTransformer")

TOK = tiny_tokenizer()


def from_config(arch: str):
    """A random model of the HF architecture ``arch`` from a config alone (no checkpoint,
    no hub): the tiny spec of the architecture file whose hook map lists it."""
    return tiny_of(arch, tokenizer=TOK)[0]


CONFIG_ARCHS = [name for arch in architectures() for name in arch.tl_architectures]
"""Every HF architecture name a registered file converts to TransformerLens."""


@pytest.mark.parametrize("arch", CONFIG_ARCHS)
def test_every_site_resolves_on_a_config_built_model(arch):
    model = from_config(arch)
    hmap = hook_map(arch)
    wrapped = sb.wrap(model)
    # Hooks TransformerLens runs only under a cfg flag are left out of a full cache.
    assert wrapped.hook_names() == [n for n in names(hmap, 2)
                                     if resolve(hmap, n, 2).tl_flag is None]
    modules = dict(model.named_modules())
    prefix = wrapped.adapter.prefix
    for name in names(hmap, 2):
        site = wrapped.adapter.site(name)
        assert prefix + site.module in modules, (name, site.module)
    tokens = torch.randint(1, 384, (2, 7), generator=torch.Generator().manual_seed(0))
    logits, cache = wrapped.run_with_cache(tokens)
    torch.testing.assert_close(logits, model(tokens).logits)
    assert set(cache) == set(wrapped.hook_names())
    cfg = tl_fields(architecture_of(arch).tl_config, model.config)
    n_heads, d_head = cfg["n_heads"], cfg["d_head"]
    n_kv = cfg.get("n_key_value_heads") or n_heads  # grouped-query attention: fewer k/v heads
    assert cache["blocks.1.attn.hook_z"].shape == (2, 7, n_heads, d_head)
    assert cache["blocks.1.attn.hook_v"].shape == (2, 7, n_kv, d_head)
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, n_heads, 7, 7)


@needs_hooked
@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Qwen2ForCausalLM"])
def test_offline_conversion_of_the_llama_layout_family(arch):
    """Mistral and Qwen2 reuse the Llama map and TL_CONFIG table."""
    from saebridge.adapters.transformer_lens import from_hf

    model = from_config(arch)
    tokens = torch.randint(1, 384, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = model(tokens).logits.log_softmax(-1)
    for flags in ({}, {"fold_ln": False, "center_writing_weights": False,
                       "center_unembed": False, "fold_value_biases": False}):
        tl = from_hf(model, **flags)
        assert (tl(tokens).log_softmax(-1) - ref).abs().max() < 1e-4


def test_neox_has_no_resid_mid_and_says_why(arch_models):
    model = arch_models("neox", "hf")
    assert not any(n.endswith("hook_resid_mid") for n in model.hook_names())
    with pytest.raises(UnknownHookError, match="in parallel"):
        model.run_with_cache(model.to_tokens("Hello"), names=["blocks.0.hook_resid_mid"])


def test_neox_sequential_variant_is_refused_not_misplaced():
    model, _ = tiny_neox(use_parallel_residual=False, tokenizer=tiny_tokenizer())
    with pytest.raises(UnsupportedArchitectureError, match="use_parallel_residual"):
        sb.wrap(model)


def test_neox_packs_qkv_interleaved_per_head(arch_models):
    """``query_key_value``'s output is ``[h0: q k v | h1: q k v | …]``: GPT-2's thirds would
    read a mix of q, k and v."""
    model = arch_models("neox", "hf")
    hf = model.adapter.model
    tokens = model.to_tokens("Hello world")
    qkv: dict[str, torch.Tensor] = {}
    attn = hf.gpt_neox.layers[0].attention
    handle = attn.query_key_value.register_forward_hook(
        lambda m, a, out: qkv.setdefault("out", out))
    try:
        _, cache = model.run_with_cache(tokens, names=["blocks.0.attn.hook_q"])
    finally:
        handle.remove()
    out_BPHtE = qkv["out"].unflatten(-1, (4, 3, 16))
    torch.testing.assert_close(cache["blocks.0.attn.hook_q"], out_BPHtE[..., 0, :])
    thirds = qkv["out"].chunk(3, dim=-1)[0].unflatten(-1, (4, 16))
    assert (thirds - cache["blocks.0.attn.hook_q"]).abs().max() > 1e-2


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gemma2])
def test_self_attn_is_called_by_keyword(builder):
    """A pre-hook without ``with_kwargs=True`` would see no hidden states at all."""
    model, _ = builder(tokenizer=tiny_tokenizer())
    seen: dict[str, object] = {}

    def pre(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, set(kwargs)

    handle = model.model.layers[0].self_attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        model(torch.tensor([[1, 2, 3]]))
    finally:
        handle.remove()
    assert seen["args"] == () and "hidden_states" in seen["kwargs"]  # type: ignore[operator]


def test_llama_mlp_post_is_the_down_proj_input_not_act_fn(arch_models):
    model = arch_models("llama", "hf")
    mlp = model.adapter.model.model.layers[1].mlp
    grabbed: dict[str, torch.Tensor] = {}
    handles = [mlp.act_fn.register_forward_hook(lambda m, a, o: grabbed.setdefault("act", o)),
               mlp.up_proj.register_forward_hook(lambda m, a, o: grabbed.setdefault("up", o))]
    try:
        _, cache = model.run_with_cache(model.to_tokens("Hello world"),
                                        names=["blocks.1.mlp.hook_post"])
    finally:
        for h in handles:
            h.remove()
    post = cache["blocks.1.mlp.hook_post"]
    torch.testing.assert_close(post, grabbed["act"] * grabbed["up"])
    assert (post - grabbed["act"]).abs().max() > 1e-2  # act_fn alone is silu(gate)


def test_gemma2_attn_out_is_the_post_norm_output(arch_models):
    model = arch_models("gemma2", "hf")
    layer = model.adapter.model.model.layers[0]
    out: dict[str, torch.Tensor] = {}
    def keep(module, args, output) -> None:  # returns None: the output stays as it is
        out["attn"] = output[0]

    handle = layer.self_attn.register_forward_hook(keep)
    try:
        _, cache = model.run_with_cache(model.to_tokens("Hello world"),
                                        names=["blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"])
    finally:
        handle.remove()
    attn_out = cache["blocks.0.hook_attn_out"]
    normed = layer.post_attention_layernorm(out["attn"])
    torch.testing.assert_close(attn_out, normed)
    assert (attn_out - out["attn"]).abs().max() > 1e-2


def test_gemma2_embedding_is_already_scaled_in_transformers_5(arch_models):
    model = arch_models("gemma2", "hf")
    hf = model.adapter.model
    tokens = model.to_tokens("Hello world")
    _, cache = model.run_with_cache(tokens, names=["hook_embed"])
    weight = hf.model.embed_tokens.weight
    torch.testing.assert_close(cache["hook_embed"], weight[tokens] * 64**0.5)
    # …and the unembedding is tied to the unscaled rows.
    assert hf.lm_head.weight.data_ptr() == weight.data_ptr()


# Sites whose native value TransformerLens's default processing changes, per family (the
# ``resid``/``write``/``v`` kinds of each map). LayerNorm models are centred; RMSNorm
# models are not (center_writing_weights is skipped for them), so only value biases
# move there, and Gemma-2 has none: processing changes none of its hooks.
CHANGED_BY_PROCESSING = {
    "gpt2": {"hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid",
             "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_v",
             "attn.hook_z"},
    "neox": {"hook_embed", "hook_resid_pre", "hook_resid_post", "hook_attn_out",
             "hook_mlp_out", "attn.hook_v", "attn.hook_z"},
    "llama": {"attn.hook_v", "attn.hook_z"},
    "gemma2": set(),
}


def test_the_sites_processing_changes_are_the_documented_ones(arch_models, family):
    if family not in CHANGED_BY_PROCESSING:
        pytest.fail(f"say which sites TransformerLens processing changes in {family!r}: add "
                    "them to CHANGED_BY_PROCESSING in this file")
    hf, compat = arch_models(family, "hf"), arch_models(family, "bridge-compat")
    tokens = hf.to_tokens("Sparse autoencoders find features")
    native: dict[str, dict[str, torch.Tensor]] = {}
    for key, model in (("hf", hf), ("processed", compat)):
        native[key] = {}
        model.run_with_interventions(tokens, [Record(n, native[key]) for n in model.hook_names()])
    changed = {n.split(".", 2)[-1] if n.startswith("blocks.") else n
               for n in native["hf"] if n in native["processed"]  # NeoX bridge: no rot_q/k
               and (native["hf"][n] - native["processed"][n]).abs().max() > 1e-4}
    assert changed == CHANGED_BY_PROCESSING[family]
    kinds = {n: hf.adapter.kind(n) for n in hf.hook_names()}
    assert {n.split(".", 2)[-1] if n.startswith("blocks.") else n
            for n, k in kinds.items() if k != "plain"} >= changed
    assert all(k == "plain" for n, k in kinds.items() if family in ("llama", "gemma2")
               and not n.endswith(("hook_v", "hook_z")))


@needs_hooked
def test_tl_never_centres_an_rmsnorm_model(arch_models):
    """Checked against TransformerLens itself: asked to centre writing weights, it leaves
    an RMSNorm model's residual stream alone, and from_hf records that."""
    from saebridge.adapters.transformer_lens import from_hf

    hf = arch_models("llama", "hf").adapter.model
    tl = from_hf(hf)
    assert not tl.saebridge_space.center_writing_weights
    tl.load_and_process_state_dict(
        {k: v for k, v in from_hf(hf, fold_ln=False, center_writing_weights=False,
                                  center_unembed=False,
                                  fold_value_biases=False).state_dict().items()},
        fold_ln=False, center_writing_weights=True, center_unembed=False,
        fold_value_biases=False)
    assert tl.W_E.mean(-1).abs().max() > 1e-3


@needs_hooked
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hooked_transformer_processed_in_place_is_detected(arch_models, family):
    """from_hf recorded an unprocessed model; process_weights_() then rewrote it in place.
    The stale record is noticed, the space re-read from the weights, and raw-space SAEs
    still splice exactly (the recorded raw constants stay valid)."""
    from saebridge.adapters.transformer_lens import from_hf

    hf = arch_models(family, "hf")
    tl = from_hf(hf.adapter.model, fold_ln=False, center_writing_weights=False,
                 center_unembed=False, fold_value_biases=False)
    tl.process_weights_()
    model = sb.wrap(tl)
    assert model.space.fold_ln and model.space.fold_value_biases
    assert model.space.center_writing_weights == (family == "gpt2")
    tokens = hf.to_tokens("Hello world hello")
    sae = sb.SAE.random("standard", 64, 32, "blocks.1.hook_resid_post", seed=1,
                        activation_space="hf")
    got = model.run_with_saes(tokens, [sae]).log_softmax(-1)
    assert (got - hf.run_with_saes(tokens, [sae]).log_softmax(-1)).abs().max() <= 1e-4


@needs_hooked
def test_gemma2_center_unembed_is_refused_because_of_the_soft_cap(arch_models):
    from saebridge.adapters.transformer_lens import from_hf

    hf = arch_models("gemma2", "hf").adapter.model
    tokens = torch.randint(1, 384, (1, 8), generator=torch.Generator().manual_seed(3))
    ref = hf(tokens).logits.log_softmax(-1)
    tl = from_hf(hf)
    assert not tl.saebridge_space.center_unembed
    assert (tl(tokens).log_softmax(-1) - ref).abs().max() < 1e-4
    forced = from_hf(hf, fold_ln=False, center_writing_weights=False, center_unembed=False,
                     fold_value_biases=False)
    forced.load_and_process_state_dict(dict(forced.state_dict()), fold_ln=False,
                                       center_writing_weights=False, center_unembed=True,
                                       fold_value_biases=False)
    assert (forced(tokens).log_softmax(-1) - ref).abs().max() > 1e-3


@needs_hooked
@pytest.mark.parametrize("family", ["neox", "llama", "gemma2"])
def test_tl_weights_equal_transformer_lens_own_converter(arch_models, family):
    """saebridge's pure-reshape conversion equals TransformerLens's converter (which needs
    the HF model object and knows Llama without biases only, hence a bias-free Llama)."""
    from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformer_lens.pretrained.weight_conversions.neox import convert_neox_weights

    from saebridge.adapters.transformer_lens import tl_config

    hf = arch_models(family, "hf").adapter.model
    if family == "llama":
        hf, _ = tiny_llama(tokenizer=tiny_tokenizer(), attention_bias=False)
    convert = {"neox": convert_neox_weights, "llama": convert_llama_weights,
               "gemma2": convert_gemma_weights}[family]
    cfg = tl_config(hf.config)
    theirs = convert(hf, cfg)
    ours = hook_map(hf.config.architectures[0]).tl_weights(  # type: ignore[misc]
        hf.state_dict(), cfg.n_heads)
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key].float(), value.float(), msg=key)


