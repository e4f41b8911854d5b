"""GPT-2 (transformers 5 ``GPT2LMHeadModel``): everything saebridge knows about it, as data.

:data:`ARCHITECTURE` bundles the hook map, the TransformerLens config table, sparsify's
module-path aliases and the tiny random model (see CONTRIBUTING.md).

Facts it encodes: ``GPT2Block`` returns a tensor (``hook_resid_post`` is the block's
output; ``output_hidden_states[-1]`` is after ``ln_f`` and is not it); ``hook_resid_mid``
has no module boundary (``ln_2``'s input is not the residual the block adds to), so it
is the attention output plus the block input; ``hook_z`` is the input of
``attn.c_proj`` split head-major into ``[n_heads, d_head]``; ``hook_pattern`` is the
second output of ``attn``, computed only by eager attention (the adapters switch to it for
a run that reads it, and compute ``hook_attn_scores`` there too); ``hook_result``,
``hook_attn_in``/``hook_q/k/v_input`` and ``ln*.hook_scale`` are computed from
``hook_z``, the block input and the LayerNorm inputs; ``hook_mlp_in`` is ``ln_2``'s input;
TransformerLens's
``ln*.hook_normalized`` is the LayerNorm output before its gain and bias, so it is read
off the HF LayerNorm's output with them undone.
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
    B,
    Sides,
)
from saebridge.hookmap.architecture import Architecture, TinySpec
from saebridge.hookmap.site import (
    EAGER,
    HookMap,
    Site,
    attention_extras,
    norm_scale,
    split_inputs,
)


def tl_weights(sd: dict[str, torch.Tensor], n_heads: int) -> dict[str, torch.Tensor]:
    """GPT-2 weights (HF ``state_dict`` keys, ``transformer.`` prefix optional) in
    TransformerLens layout, unprocessed. Pure tensor reshapes: no backend is imported.

    >>> # tl_weights(hf_model.state_dict(), hf_model.config.n_head)["blocks.0.attn.W_V"].shape
    """
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    d_model = sd["wte.weight"].shape[1]
    d_head = d_model // n_heads
    out = {"embed.W_E": sd["wte.weight"], "pos_embed.W_pos": sd["wpe.weight"]}
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    for layer in range(n_layers):
        hf, tl = f"h.{layer}.", f"blocks.{layer}."
        for ln, name in (("ln1", "ln_1"), ("ln2", "ln_2")):
            if hf + f"{name}.weight" in sd:  # absent when the LayerNorms were removed
                out[tl + f"{ln}.w"], out[tl + f"{ln}.b"] = sd[hf + f"{name}.weight"], \
                    sd[hf + f"{name}.bias"]
        w_qkv_D3D = sd[hf + "attn.c_attn.weight"]
        b_qkv_3D = sd[hf + "attn.c_attn.bias"]
        for i, name in enumerate("QKV"):
            w_DD = w_qkv_D3D[:, i * d_model:(i + 1) * d_model]
            out[tl + f"attn.W_{name}"] = w_DD.reshape(d_model, n_heads, d_head).permute(1, 0, 2)
            out[tl + f"attn.b_{name}"] = b_qkv_3D[i * d_model:(i + 1) * d_model].reshape(
                n_heads, d_head)
        out[tl + "attn.W_O"] = sd[hf + "attn.c_proj.weight"].reshape(n_heads, d_head, d_model)
        out[tl + "attn.b_O"] = sd[hf + "attn.c_proj.bias"]
        out[tl + "mlp.W_in"] = sd[hf + "mlp.c_fc.weight"]
        out[tl + "mlp.b_in"] = sd[hf + "mlp.c_fc.bias"]
        out[tl + "mlp.W_out"] = sd[hf + "mlp.c_proj.weight"]
        out[tl + "mlp.b_out"] = sd[hf + "mlp.c_proj.bias"]
    if "ln_f.weight" in sd:
        out["ln_final.w"], out["ln_final.b"] = sd["ln_f.weight"], sd["ln_f.bias"]
    unembed = sd.get("lm_head.weight", sd["wte.weight"])  # tied when absent
    out["unembed.W_U"] = unembed.T
    out["unembed.b_U"] = torch.zeros(unembed.shape[0], dtype=unembed.dtype, device=unembed.device)
    return out


BLOCK = "h.{layer}"
ATTN_EXTRAS = attention_extras(f"{BLOCK}.attn", f"{BLOCK}.attn.c_proj")

GPT2 = HookMap(
    architectures=("GPT2LMHeadModel", "GPT2Model"),
    config={"n_layers": "n_layer", "n_heads": "n_head", "d_model": "n_embd",
            "d_vocab": "vocab_size"},
    prefixes=("transformer.", ""),
    tl_weights=tl_weights,
    before_blocks={
        "hook_embed": Site("wte", "output", kind="write"),
        "hook_pos_embed": Site("wpe", "output", kind="write"),
    },
    block={
        "hook_resid_pre": Site(BLOCK, "input", kind="resid", kwarg="hidden_states"),
        **split_inputs(Site(BLOCK, "input", kind="resid", kwarg="hidden_states")),
        "ln1.hook_scale": norm_scale(f"{BLOCK}.ln_1", "LN"),
        "ln1.hook_normalized": Site(f"{BLOCK}.ln_1", "output", layout="unaffine", kind="normed"),
        "attn.hook_q": Site(f"{BLOCK}.attn.c_attn", "output", layout="qkv:0"),
        "attn.hook_k": Site(f"{BLOCK}.attn.c_attn", "output", layout="qkv:1"),
        "attn.hook_v": Site(f"{BLOCK}.attn.c_attn", "output", kind="v", layout="qkv:2"),
        "attn.hook_attn_scores": ATTN_EXTRAS["attn.hook_attn_scores"],
        "attn.hook_pattern": Site(f"{BLOCK}.attn", "output", index=1, writable=False,
                                  requires=EAGER),
        "attn.hook_z": Site(f"{BLOCK}.attn.c_proj", "input", kind="v", layout="heads"),
        "attn.hook_result": ATTN_EXTRAS["attn.hook_result"],
        "hook_attn_out": Site(f"{BLOCK}.attn", "output", kind="write", index=0),
        "hook_resid_mid": Site(f"{BLOCK}.attn", "output", kind="resid", index=0,
                               residual_from=BLOCK),
        "hook_mlp_in": Site(f"{BLOCK}.ln_2", "input", kind="resid", tl_flag="use_hook_mlp_in"),
        "ln2.hook_scale": norm_scale(f"{BLOCK}.ln_2", "LN"),
        "ln2.hook_normalized": Site(f"{BLOCK}.ln_2", "output", layout="unaffine", kind="normed"),
        "mlp.hook_pre": Site(f"{BLOCK}.mlp.c_fc", "output"),
        "mlp.hook_post": Site(f"{BLOCK}.mlp.c_proj", "input"),
        "hook_mlp_out": Site(f"{BLOCK}.mlp", "output", kind="write"),
        "hook_resid_post": Site(BLOCK, "output", kind="resid"),
    },
    after_blocks={
        "ln_final.hook_scale": norm_scale("ln_f", "LN"),
        "ln_final.hook_normalized": Site("ln_f", "output", layout="unaffine", kind="normed"),
    },
)

TL_CONFIG: dict[str, Any] = {
    "d_model": "n_embd", "n_heads": "n_head", "n_layers": "n_layer", "n_ctx": "n_positions",
    "d_vocab": "vocab_size", "act_fn": "activation_function", "eps": "layer_norm_epsilon",
    "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx",
    "d_head": lambda c: c.n_embd // c.n_head,
    "d_mlp": lambda c: getattr(c, "n_inner", None) or 4 * c.n_embd,
    "normalization_type": ("LN",), "positional_embedding_type": ("standard",),
    "default_prepend_bos": (True,),
}
"""TransformerLens config field ← HF config (see :mod:`saebridge.hookmap.tl_config`)."""

# sparsify names a hookpoint by its path under ``model.base_model`` (``h.5``, ``h.5.mlp``).
# ``attn`` and ``mlp`` read their LayerNorm's output with the gain and bias applied
# (``affine``), which no canonical hook holds directly; ``mlp.act`` is the GELU (``hook_pre``
# in, ``hook_post`` out); ``attn.c_proj``'s input is ``hook_z`` flattened; a LayerNorm's own
# output has no canonical hook.
LN_OUT = "its output is the LayerNorm output with gain and bias, which no canonical hook holds"

SPARSIFY = AliasTable(
    family="sparsify",
    architectures=("GPT2LMHeadModel", "GPT2Model"),
    entries={
        "wte": Sides(AliasSite("hook_embed"), None, "its input is token ids"),
        "wpe": Sides(AliasSite("hook_pos_embed"), None, "its input is positions"),
        "h.{layer}": BLOCK_SIDES,
        "h.{layer}.attn": ATTN_SIDES,
        "h.{layer}.attn.c_proj": Sides(AliasSite(B + "hook_attn_out"),
                                       AliasSite(B + "attn.hook_z")),
        "h.{layer}.mlp": MLP_SIDES,
        "h.{layer}.mlp.c_fc": Sides(AliasSite(B + "mlp.hook_pre"), MLP_SIDES.input),
        "h.{layer}.mlp.act": Sides(AliasSite(B + "mlp.hook_post"), AliasSite(B + "mlp.hook_pre")),
        "h.{layer}.mlp.c_proj": MLP_OUT_PROJ_SIDES,
        "h.{layer}.ln_1": Sides(None, AliasSite(B + "hook_resid_pre"), LN_OUT),
        "h.{layer}.ln_2": Sides(None, None, LN_OUT + "; its input (resid_pre + attn_out) "
                                "is hook_resid_mid, which has no module boundary"),
        "ln_f": Sides(None, None, LN_OUT),
    },
)

ARCHITECTURE = Architecture(
    name="gpt2",
    hook_map=GPT2,
    tl_config=TL_CONFIG,
    tl_architectures=("GPT2LMHeadModel",),
    aliases=(SPARSIFY,),
    tiny=TinySpec("GPT2LMHeadModel",
                  {"n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4},
                  norm_weights="ln_", gain_init="normal"),
)
