"""Gemma-2 hook map (transformers 5 ``Gemma2ForCausalLM``), kept as data.

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

import torch

from saebridge.hookmap.llama import CONFIG, attention_sites, rms_tl_weights
from saebridge.hookmap.site import HookMap, Site


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
        "ln1.hook_normalized": Site(f"{BLOCK}.input_layernorm", "output", layout="unscale+1"),
        **attention_sites(ATTN),
        "ln1_post.hook_normalized": Site(f"{BLOCK}.post_attention_layernorm", "output",
                                         layout="unscale+1"),
        "hook_attn_out": Site(f"{BLOCK}.post_attention_layernorm", "output"),
        "hook_resid_mid": Site(f"{BLOCK}.post_attention_layernorm", "output",
                               residual_from=BLOCK),
        "ln2.hook_normalized": Site(f"{BLOCK}.pre_feedforward_layernorm", "output",
                                    layout="unscale+1"),
        "mlp.hook_pre": Site(f"{BLOCK}.mlp.gate_proj", "output"),
        "mlp.hook_pre_linear": Site(f"{BLOCK}.mlp.up_proj", "output"),
        "mlp.hook_post": Site(f"{BLOCK}.mlp.down_proj", "input"),
        "ln2_post.hook_normalized": Site(f"{BLOCK}.post_feedforward_layernorm", "output",
                                         layout="unscale+1"),
        "hook_mlp_out": Site(f"{BLOCK}.post_feedforward_layernorm", "output"),
        "hook_resid_post": Site(BLOCK, "output"),
    },
    after_blocks={
        "ln_final.hook_normalized": Site("norm", "output", layout="unscale+1"),
    },
)
