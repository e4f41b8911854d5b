"""GPT-NeoX (Pythia; transformers 5 ``GPTNeoXForCausalLM``): everything saebridge knows
about it, as data: :data:`ARCHITECTURE` bundles the hook map, the TransformerLens config
table, sparsify's module-path aliases and the tiny random model (see CONTRIBUTING.md).

Facts it encodes: attention and MLP run in parallel off the same block input
(``use_parallel_residual=True``, as in every Pythia), so ``hook_resid_mid`` does not
exist; ``query_key_value`` packs q/k/v interleaved per head (``[h0: q k v | h1: …]``,
``view(…, n_heads, 3 * d_head)`` then ``chunk(3)``), not in thirds as GPT-2's ``c_attn``;
positions are rotary (no ``hook_pos_embed``); ``hook_q``/``hook_k`` are before the
rotation, as in TransformerLens; ``GPTNeoXLayer`` returns a tensor. Norms are LayerNorms,
so TransformerLens processing centres the residual stream as for GPT-2.
"""

from __future__ import annotations

from typing import Any

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
    Unavailable,
    attention_extras,
    norm_scale,
    rotary_sites,
    split_inputs,
)
from saebridge.hookmap.tl_config import ROTARY, d_head, rope


def tl_weights(sd: dict[str, torch.Tensor], n_heads: int) -> dict[str, torch.Tensor]:
    """GPT-NeoX weights (HF ``state_dict`` keys, ``gpt_neox.`` prefix optional) in
    TransformerLens layout, unprocessed. Pure tensor reshapes: no backend is imported.

    >>> # tl_weights(hf_model.state_dict(), hf_model.config.num_attention_heads)
    """
    sd = {k.removeprefix("gpt_neox."): v for k, v in sd.items()}
    out = {"embed.W_E": sd["embed_in.weight"]}
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for layer in range(n_layers):
        hf, tl = f"layers.{layer}.", f"blocks.{layer}."
        for ln, name in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
            if hf + f"{name}.weight" in sd:  # absent when the LayerNorms were removed
                out[tl + f"{ln}.w"], out[tl + f"{ln}.b"] = sd[hf + f"{name}.weight"], \
                    sd[hf + f"{name}.bias"]
        # Rows are (head, q/k/v, d_head): interleaved per head.
        w_H3ED = sd[hf + "attention.query_key_value.weight"].unflatten(0, (n_heads, 3, -1))
        b_H3E = sd[hf + "attention.query_key_value.bias"].unflatten(0, (n_heads, 3, -1))
        for i, name in enumerate("QKV"):
            out[tl + f"attn.W_{name}"] = w_H3ED[:, i].transpose(1, 2)  # [head, d_model, d_head]
            out[tl + f"attn.b_{name}"] = b_H3E[:, i]
        w_o_DM = sd[hf + "attention.dense.weight"]
        out[tl + "attn.W_O"] = w_o_DM.T.unflatten(0, (n_heads, -1))
        out[tl + "attn.b_O"] = sd[hf + "attention.dense.bias"]
        out[tl + "mlp.W_in"] = sd[hf + "mlp.dense_h_to_4h.weight"].T
        out[tl + "mlp.b_in"] = sd[hf + "mlp.dense_h_to_4h.bias"]
        out[tl + "mlp.W_out"] = sd[hf + "mlp.dense_4h_to_h.weight"].T
        out[tl + "mlp.b_out"] = sd[hf + "mlp.dense_4h_to_h.bias"]
    if "final_layer_norm.weight" in sd:
        out["ln_final.w"], out["ln_final.b"] = sd["final_layer_norm.weight"], \
            sd["final_layer_norm.bias"]
    unembed = sd.get("lm_head.weight", sd.get("embed_out.weight", sd["embed_in.weight"]))
    out["unembed.W_U"] = unembed.T
    out["unembed.b_U"] = torch.zeros(unembed.shape[0], dtype=unembed.dtype, device=unembed.device)
    return out


BLOCK = "layers.{layer}"
ATTN_EXTRAS = attention_extras(f"{BLOCK}.attention", f"{BLOCK}.attention.dense")

NEOX = HookMap(
    architectures=("GPTNeoXForCausalLM", "GPTNeoXModel"),
    config={"n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "d_model": "hidden_size", "d_vocab": "vocab_size"},
    prefixes=("gpt_neox.", ""),
    tl_weights=tl_weights,
    config_requires={"use_parallel_residual": True},
    before_blocks={
        "hook_embed": Site("embed_in", "output", kind="write"),
        "hook_pos_embed": Unavailable("GPT-NeoX uses rotary position embeddings: no "
                                      "position vector is added to the residual stream."),
    },
    block={
        "hook_resid_pre": Site(BLOCK, "input", kind="resid", kwarg="hidden_states"),
        **split_inputs(Site(BLOCK, "input", kind="resid", kwarg="hidden_states")),
        "ln1.hook_scale": norm_scale(f"{BLOCK}.input_layernorm", "LN"),
        "ln1.hook_normalized": Site(f"{BLOCK}.input_layernorm", "output", layout="unaffine",
                                    kind="normed"),
        "attn.hook_q": Site(f"{BLOCK}.attention.query_key_value", "output",
                            layout="qkv-interleaved:0"),
        "attn.hook_k": Site(f"{BLOCK}.attention.query_key_value", "output",
                            layout="qkv-interleaved:1"),
        "attn.hook_v": Site(f"{BLOCK}.attention.query_key_value", "output", kind="v",
                            layout="qkv-interleaved:2"),
        **rotary_sites(f"{BLOCK}.attention"),
        "attn.hook_attn_scores": ATTN_EXTRAS["attn.hook_attn_scores"],
        "attn.hook_pattern": Site(f"{BLOCK}.attention", "output", index=1, writable=False,
                                  requires=EAGER),
        "attn.hook_z": Site(f"{BLOCK}.attention.dense", "input", kind="v", layout="heads"),
        "attn.hook_result": ATTN_EXTRAS["attn.hook_result"],
        "hook_attn_out": Site(f"{BLOCK}.attention", "output", kind="write", index=0),
        "hook_resid_mid": Unavailable(
            "GPT-NeoX (Pythia) runs attention and MLP in parallel on the block input "
            "(use_parallel_residual=True), so no residual stream exists between them. Use "
            "hook_resid_pre (what both read) or hook_resid_post."),
        # Parallel residual: the MLP's input is the block input, under its own norm.
        "hook_mlp_in": Site(f"{BLOCK}.post_attention_layernorm", "input", kind="resid",
                            tl_flag="use_hook_mlp_in"),
        "ln2.hook_scale": norm_scale(f"{BLOCK}.post_attention_layernorm", "LN"),
        "ln2.hook_normalized": Site(f"{BLOCK}.post_attention_layernorm", "output",
                                    layout="unaffine", kind="normed"),
        "mlp.hook_pre": Site(f"{BLOCK}.mlp.dense_h_to_4h", "output"),
        "mlp.hook_post": Site(f"{BLOCK}.mlp.dense_4h_to_h", "input"),
        "hook_mlp_out": Site(f"{BLOCK}.mlp", "output", kind="write"),
        "hook_resid_post": Site(BLOCK, "output", kind="resid"),
    },
    after_blocks={
        "ln_final.hook_scale": norm_scale("final_layer_norm", "LN"),
        "ln_final.hook_normalized": Site("final_layer_norm", "output", layout="unaffine",
                                         kind="normed"),
    },
)

TL_CONFIG: dict[str, Any] = {
    **ROTARY,
    "d_model": "hidden_size", "n_heads": "num_attention_heads",
    "n_layers": "num_hidden_layers", "n_ctx": "max_position_embeddings",
    "d_vocab": "vocab_size", "d_mlp": "intermediate_size", "eps": "layer_norm_eps",
    "act_fn": "hidden_act", "parallel_attn_mlp": "use_parallel_residual", "d_head": d_head,
    "rotary_dim": lambda c: round(rope(c, "partial_rotary_factor", 1.0) * d_head(c)),
    "normalization_type": ("LN",), "default_prepend_bos": (False,),
}
"""TransformerLens config field ← HF config (see :mod:`saebridge.hookmap.tl_config`)."""

# sparsify names hookpoints relative to ``base_model``: the block output is
# ``hook_resid_post``; ``attention``'s output (element 0) is ``hook_attn_out`` and ``mlp``'s
# ``hook_mlp_out``; both read their LayerNorm's output with its gain and bias (``affine``).
SPARSIFY = AliasTable(
    family="sparsify", architectures=("GPTNeoXForCausalLM",), hints=("pythia", "neox"),
    entries={
        "embed_in": Sides(AliasSite("hook_embed")),
        "layers.{layer}": BLOCK_SIDES,
        "layers.{layer}.attention": ATTN_SIDES,
        "layers.{layer}.mlp": MLP_SIDES,
        "layers.{layer}.mlp.dense_4h_to_h": MLP_OUT_PROJ_SIDES})

ARCHITECTURE = Architecture(
    name="neox",
    hook_map=NEOX,
    tl_config=TL_CONFIG,
    tl_architectures=("GPTNeoXForCausalLM",),
    aliases=(SPARSIFY,),
    # Pythia's layout: parallel residual, partial rotary, untied unembedding.
    tiny=TinySpec("GPTNeoXForCausalLM", {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 256, "max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "partial_rotary_factor": 0.25}}),
)
