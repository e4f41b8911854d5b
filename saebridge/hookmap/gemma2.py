"""Gemma-2 (transformers 5 ``Gemma2ForCausalLM``): everything saebridge knows about it, as
data. :data:`ARCHITECTURE` bundles the hook map, the TransformerLens config table,
sparsify's module-path aliases and the tiny random model (see CONTRIBUTING.md).

Facts it encodes: every sublayer is wrapped in two RMSNorms, and what a sublayer adds to
the residual stream is the *post* norm's output: ``hook_attn_out`` is
``post_attention_layernorm``'s output and ``hook_mlp_out`` is
``post_feedforward_layernorm``'s, not ``self_attn``'s or ``mlp``'s (TransformerLens applies
``ln1_post``/``ln2_post`` before those hooks too). ``ln2`` is ``pre_feedforward_layernorm``.
Gemma's RMSNorm multiplies by ``1 + w`` (layout ``unscale+1``). In transformers 5
``embed_tokens`` is a ``Gemma2TextScaledWordEmbedding`` that already multiplies by
√d_model, so ``hook_embed`` is its output (TransformerLens folds the scale into ``W_E``);
the unembedding is tied to the *unscaled* embedding. Attention scores and final logits
are soft-capped (``tanh``), which is why TransformerLens refuses ``center_unembed`` here:
the cap is not invariant to adding a constant. Layers alternate sliding-window and
global attention. ``self_attn`` is called by keyword, as in Llama.

Activation spaces: RMSNorms only, so nothing is centred (``plain`` sites); processing
changes ``hook_v``/``hook_z`` by the value bias where there is one.
"""

from __future__ import annotations

from typing import Any

import torch

from saebridge.hookmap.alias_table import (
    ATTN_SIDES,
    BLOCK_SIDES,
    MLP_SIDES,
    AliasSite,
    AliasTable,
    B,
    Sides,
)
from saebridge.hookmap.architecture import Architecture, TinySpec
from saebridge.hookmap.llama import CONFIG, attention_sites, rms_tl_weights
from saebridge.hookmap.site import HookMap, Site, norm_scale, split_inputs
from saebridge.hookmap.tl_config import LLAMA_FIELDS


def tl_weights(sd: dict[str, torch.Tensor], n_heads: int) -> dict[str, torch.Tensor]:
    """Gemma-2 weights (HF ``state_dict``) in TransformerLens layout, unprocessed: norm
    gains ``1 + w``, ``W_E`` scaled by √d_model, post norms as ``ln1_post``/``ln2_post``.

    >>> # tl_weights(hf_model.state_dict(), hf_model.config.num_attention_heads)
    """
    return rms_tl_weights(sd, n_heads, gain_offset=1.0, post_norms=True, embed_scale=True)


BLOCK = "layers.{layer}"
ATTN = f"{BLOCK}.self_attn"

GEMMA2 = HookMap(
    architectures=("Gemma2ForCausalLM", "Gemma2Model"),
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
        "ln1.hook_normalized": Site(f"{BLOCK}.input_layernorm", "output", layout="unscale+1"),
        **attention_sites(ATTN),
        "ln1_post.hook_scale": norm_scale(f"{BLOCK}.post_attention_layernorm", "RMS"),
        "ln1_post.hook_normalized": Site(f"{BLOCK}.post_attention_layernorm", "output",
                                         layout="unscale+1"),
        "hook_attn_out": Site(f"{BLOCK}.post_attention_layernorm", "output"),
        "hook_resid_mid": Site(f"{BLOCK}.post_attention_layernorm", "output",
                               residual_from=BLOCK),
        "hook_mlp_in": Site(f"{BLOCK}.pre_feedforward_layernorm", "input",
                            tl_flag="use_hook_mlp_in"),
        "ln2.hook_scale": norm_scale(f"{BLOCK}.pre_feedforward_layernorm", "RMS"),
        "ln2.hook_normalized": Site(f"{BLOCK}.pre_feedforward_layernorm", "output",
                                    layout="unscale+1"),
        "mlp.hook_pre": Site(f"{BLOCK}.mlp.gate_proj", "output"),
        "mlp.hook_pre_linear": Site(f"{BLOCK}.mlp.up_proj", "output"),
        "mlp.hook_post": Site(f"{BLOCK}.mlp.down_proj", "input"),
        "ln2_post.hook_scale": norm_scale(f"{BLOCK}.post_feedforward_layernorm", "RMS"),
        "ln2_post.hook_normalized": Site(f"{BLOCK}.post_feedforward_layernorm", "output",
                                         layout="unscale+1"),
        "hook_mlp_out": Site(f"{BLOCK}.post_feedforward_layernorm", "output"),
        "hook_resid_post": Site(BLOCK, "output"),
    },
    after_blocks={
        "ln_final.hook_scale": norm_scale("norm", "RMS"),
        "ln_final.hook_normalized": Site("norm", "output", layout="unscale+1"),
    },
)

TL_CONFIG: dict[str, Any] = {
    **LLAMA_FIELDS,
    "act_fn": "hidden_activation",
    "n_key_value_heads": "num_key_value_heads",
    "attn_scale": lambda c: float(c.query_pre_attn_scalar) ** 0.5,
    "attn_scores_soft_cap": "attn_logit_softcapping",
    "output_logits_soft_cap": "final_logit_softcapping",
    "use_normalization_before_and_after": (True,),
}
"""TransformerLens config field ← HF config (see :mod:`saebridge.hookmap.tl_config`)."""

# sparsify names hookpoints relative to ``base_model``. What ``self_attn``/``mlp`` return is
# normed again before it is added, so no canonical hook holds it: ``hook_attn_out`` and
# ``hook_mlp_out`` are the outputs of the post norms. Both read their pre norm's output with
# its gain (``affine``).
NORMED = "its output is normed again (post_*_layernorm) before it reaches the residual stream"

SPARSIFY = AliasTable(
    family="sparsify", architectures=("Gemma2ForCausalLM",), hints=("gemma-2", "gemma2"),
    entries={
        "embed_tokens": Sides(AliasSite("hook_embed")),
        "layers.{layer}": BLOCK_SIDES,
        "layers.{layer}.self_attn": Sides(None, ATTN_SIDES.input, NORMED),
        "layers.{layer}.mlp": Sides(None, MLP_SIDES.input, NORMED),
        "layers.{layer}.post_attention_layernorm": Sides(AliasSite(B + "hook_attn_out")),
        "layers.{layer}.post_feedforward_layernorm": Sides(AliasSite(B + "hook_mlp_out"))})

ARCHITECTURE = Architecture(
    name="gemma2",
    hook_map=GEMMA2,
    tl_config=TL_CONFIG,
    tl_architectures=("Gemma2ForCausalLM",),
    aliases=(SPARSIFY,),
    # A 4-token sliding window on alternate layers, soft caps low enough to bend the tiny
    # model's scores and logits, and query_pre_attn_scalar != head_dim, so each is tested.
    tiny=TinySpec("Gemma2ForCausalLM", {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
        "max_position_embeddings": 64, "sliding_window": 4, "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 0.5, "final_logit_softcapping": 1.0, "pad_token_id": None},
        gain_centre=0.0),
)
