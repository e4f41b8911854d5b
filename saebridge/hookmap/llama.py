"""Llama (transformers 5 ``LlamaForCausalLM``; Mistral and Qwen2 share the module layout
and use this file too): everything saebridge knows about it, as data. :data:`ARCHITECTURE`
bundles the hook map, the TransformerLens config table, sparsify's module-path aliases and
the tiny random model (see CONTRIBUTING.md).

Facts it encodes: the decoder layer calls ``self_attn(hidden_states=…)`` by keyword (a
pre-hook on the attention must read ``kwargs``; the adapters use ``with_kwargs=True``);
q/k/v are separate projections, k/v with ``num_key_value_heads`` heads (grouped-query
attention); ``hook_q``/``hook_k`` are before the rotary rotation, as in TransformerLens;
``mlp.hook_pre`` is ``gate_proj``'s output and ``mlp.hook_pre_linear`` ``up_proj``'s;
``mlp.hook_post`` is the *input* of ``down_proj`` — no module boundary holds
``silu(gate) * up`` (``act_fn`` returns ``silu(gate)`` only); ``hook_resid_mid`` is the
attention output plus the layer input, since a pre-hook on ``post_attention_layernorm``
would not reach the residual the layer adds to.

Activation spaces: the norms are RMSNorms, which do not subtract a mean, so
TransformerLens's ``center_writing_weights`` is skipped (``ProcessWeights.process_weights``
centres only ``LN``/``LNPre`` models) and no residual or written site is centred:
they are ``plain`` here. Processing changes ``hook_v``/``hook_z`` by the value bias
(Qwen2 and ``attention_bias=True`` Llamas have one) and the logits by their vocab mean.
"""

from __future__ import annotations

import torch

from saebridge.hookmap.alias_table import (
    ATTN_SIDES,
    BLOCK_SIDES,
    MLP_OUT_PROJ_SIDES,
    MLP_SIDES,
    AliasSite,
    AliasTable,
    Sides,
)
from saebridge.hookmap.architecture import Architecture, TinySpec
from saebridge.hookmap.site import (
    EAGER,
    HookMap,
    Site,
    attention_extras,
    norm_scale,
    rotary_sites,
    split_inputs,
)
from saebridge.hookmap.tl_config import LLAMA_FIELDS

Tensor = torch.Tensor


def rms_tl_weights(sd: dict[str, Tensor], n_heads: int, *, gain_offset: float = 0.0,
                   post_norms: bool = False, embed_scale: bool = False) -> dict[str, Tensor]:
    """Llama-layout weights in TransformerLens layout, unprocessed (pure reshapes).

    ``gain_offset`` is added to every norm weight (Gemma's RMSNorm multiplies by
    ``1 + w``); ``post_norms`` adds Gemma-2's ``ln1_post``/``ln2_post``; ``embed_scale``
    multiplies ``W_E`` by √d_model, as Gemma's embedding does. Grouped-query k/v use
    TransformerLens's ``_W_K``/``_W_V`` keys.
    """
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    emb_VD = sd["embed_tokens.weight"]
    d_model = emb_VD.shape[1]
    out = {"embed.W_E": emb_VD * d_model**0.5 if embed_scale else emb_VD}
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))

    def norm(key: str) -> Tensor:
        return sd[key + ".weight"] + gain_offset

    for layer in range(n_layers):
        hf, tl = f"layers.{layer}.", f"blocks.{layer}."
        q_ED = sd[hf + "self_attn.q_proj.weight"]
        d_head = q_ED.shape[0] // n_heads
        n_kv = sd[hf + "self_attn.k_proj.weight"].shape[0] // d_head
        gqa = "_" if n_kv != n_heads else ""
        out[tl + "ln1.w"] = norm(hf + "input_layernorm")
        if post_norms:
            out[tl + "ln1_post.w"] = norm(hf + "post_attention_layernorm")
            out[tl + "ln2.w"] = norm(hf + "pre_feedforward_layernorm")
            out[tl + "ln2_post.w"] = norm(hf + "post_feedforward_layernorm")
        else:
            out[tl + "ln2.w"] = norm(hf + "post_attention_layernorm")
        for name, heads, key in (("Q", n_heads, ""), ("K", n_kv, gqa), ("V", n_kv, gqa)):
            w_ED = sd[hf + f"self_attn.{name.lower()}_proj.weight"]
            out[tl + f"attn.{key}W_{name}"] = w_ED.T.unflatten(1, (heads, d_head)).transpose(0, 1)
            bias = sd.get(hf + f"self_attn.{name.lower()}_proj.bias")
            out[tl + f"attn.{key}b_{name}"] = (
                bias.unflatten(0, (heads, d_head)) if bias is not None
                else w_ED.new_zeros(heads, d_head))
        w_o_DE = sd[hf + "self_attn.o_proj.weight"]
        out[tl + "attn.W_O"] = w_o_DE.T.unflatten(0, (n_heads, d_head))
        out[tl + "attn.b_O"] = sd.get(hf + "self_attn.o_proj.bias", w_o_DE.new_zeros(d_model))
        up_MD = sd[hf + "mlp.up_proj.weight"]
        out[tl + "mlp.W_in"] = up_MD.T
        out[tl + "mlp.W_gate"] = sd[hf + "mlp.gate_proj.weight"].T
        out[tl + "mlp.b_in"] = sd.get(hf + "mlp.up_proj.bias", up_MD.new_zeros(up_MD.shape[0]))
        out[tl + "mlp.W_out"] = sd[hf + "mlp.down_proj.weight"].T
        out[tl + "mlp.b_out"] = sd.get(hf + "mlp.down_proj.bias", up_MD.new_zeros(d_model))
    out["ln_final.w"] = norm("norm")
    unembed = sd.get("lm_head.weight", emb_VD)  # tied when absent
    out["unembed.W_U"] = unembed.T
    out["unembed.b_U"] = unembed.new_zeros(unembed.shape[0])
    return out


def tl_weights(sd: dict[str, Tensor], n_heads: int) -> dict[str, Tensor]:
    """Llama/Mistral/Qwen2 weights (HF ``state_dict``) in TransformerLens layout.

    >>> # tl_weights(hf_model.state_dict(), hf_model.config.num_attention_heads)
    """
    return rms_tl_weights(sd, n_heads)


BLOCK = "layers.{layer}"
ATTN = f"{BLOCK}.self_attn"


CONFIG = {"n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
          "d_model": "hidden_size", "d_vocab": "vocab_size", "d_head": "head_dim"}
"""Llama-family config attribute names (Gemma-2 shares them)."""


def attention_sites(attn: str) -> dict[str, Site]:
    """q/k/v/scores/pattern/z/result of a Llama-style attention module (separate q/k/v/o
    projections; k/v may have fewer heads, split by ``d_head``); Gemma-2 shares it."""
    extras = attention_extras(attn, f"{attn}.o_proj", kind="plain")
    return {
        "attn.hook_q": Site(f"{attn}.q_proj", "output", layout="heads"),
        "attn.hook_k": Site(f"{attn}.k_proj", "output", layout="heads"),
        "attn.hook_v": Site(f"{attn}.v_proj", "output", kind="v", layout="heads"),
        **rotary_sites(attn),
        "attn.hook_attn_scores": extras["attn.hook_attn_scores"],
        "attn.hook_pattern": Site(attn, "output", index=1, writable=False, requires=EAGER),
        "attn.hook_z": Site(f"{attn}.o_proj", "input", kind="v", layout="heads"),
        "attn.hook_result": extras["attn.hook_result"],
    }


LLAMA = HookMap(
    architectures=("LlamaForCausalLM", "LlamaModel", "MistralForCausalLM", "MistralModel",
                   "Qwen2ForCausalLM", "Qwen2Model"),
    config=CONFIG,
    prefixes=("model.", ""),
    tl_weights=tl_weights,
    before_blocks={
        "hook_embed": Site("embed_tokens", "output"),
    },
    block={
        "hook_resid_pre": Site(BLOCK, "input", kwarg="hidden_states"),
        **split_inputs(Site(BLOCK, "input", kwarg="hidden_states")),
        "ln1.hook_scale": norm_scale(f"{BLOCK}.input_layernorm", "RMS"),
        "ln1.hook_normalized": Site(f"{BLOCK}.input_layernorm", "output", layout="unscale"),
        **attention_sites(ATTN),
        "hook_attn_out": Site(ATTN, "output", index=0),
        "hook_resid_mid": Site(ATTN, "output", index=0, residual_from=BLOCK),
        "hook_mlp_in": Site(f"{BLOCK}.post_attention_layernorm", "input",
                            tl_flag="use_hook_mlp_in"),
        "ln2.hook_scale": norm_scale(f"{BLOCK}.post_attention_layernorm", "RMS"),
        "ln2.hook_normalized": Site(f"{BLOCK}.post_attention_layernorm", "output",
                                    layout="unscale"),
        "mlp.hook_pre": Site(f"{BLOCK}.mlp.gate_proj", "output"),
        "mlp.hook_pre_linear": Site(f"{BLOCK}.mlp.up_proj", "output"),
        "mlp.hook_post": Site(f"{BLOCK}.mlp.down_proj", "input"),
        "hook_mlp_out": Site(f"{BLOCK}.mlp", "output"),
        "hook_resid_post": Site(BLOCK, "output"),
    },
    after_blocks={
        "ln_final.hook_scale": norm_scale("norm", "RMS"),
        "ln_final.hook_normalized": Site("norm", "output", layout="unscale"),
    },
)

# sparsify names hookpoints relative to ``base_model``: the block output is
# ``hook_resid_post``; ``self_attn``'s output (element 0) is ``hook_attn_out`` and ``mlp``'s
# ``hook_mlp_out``; both read their RMSNorm's output with its gain (``affine``);
# ``mlp.down_proj`` reads ``mlp.hook_post``.
SPARSIFY = AliasTable(
    family="sparsify", architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    hints=("llama", "mistral", "smollm"),
    entries={
        "embed_tokens": Sides(AliasSite("hook_embed")),
        "layers.{layer}": BLOCK_SIDES,
        "layers.{layer}.self_attn": ATTN_SIDES,
        "layers.{layer}.mlp": MLP_SIDES,
        "layers.{layer}.mlp.down_proj": MLP_OUT_PROJ_SIDES})

ARCHITECTURE = Architecture(
    name="llama",
    hook_map=LLAMA,
    tl_config=LLAMA_FIELDS,
    tl_architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    aliases=(SPARSIFY,),
    # Grouped-query attention (4 query heads, 2 key/value heads) and attention biases (as
    # Qwen2 has), so the value-bias folding and the GQA key layout are exercised.
    tiny=TinySpec("LlamaForCausalLM", {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64,
        "attention_bias": True}),
)
