"""sparsify hookpoints of models whose blocks are ``layers.{L}`` (Llama/Mistral, GPT-NeoX,
Gemma-2), relative to ``base_model`` as sparsify names them, mapped to canonical hooks.

Facts encoded (from the hook maps beside this file): the block output is
``hook_resid_post``; Llama's ``self_attn`` and NeoX's ``attention`` output (element 0) is
``hook_attn_out`` and their ``mlp`` output is ``hook_mlp_out``, while in Gemma-2 those are
the outputs of ``post_attention_layernorm``/``post_feedforward_layernorm`` (what
``self_attn``/``mlp`` return is normed before it is added, and no canonical hook holds it).
The attention and MLP read their norm's output with its gain (``affine``: ``ln1``/``ln2``;
NeoX's LayerNorms also add a bias). ``mlp.down_proj``/``dense_4h_to_h`` read
``mlp.hook_post``.
"""

from __future__ import annotations

from saebridge.hookmap.aliases import AliasSite, AliasTable, Sides

B = "blocks.{layer}."
BLOCK = Sides(AliasSite(B + "hook_resid_post"), AliasSite(B + "hook_resid_pre"))
ATTN = Sides(AliasSite(B + "hook_attn_out"), AliasSite(B + "ln1.hook_normalized", "ln1"))
MLP = Sides(AliasSite(B + "hook_mlp_out"), AliasSite(B + "ln2.hook_normalized", "ln2"))
NORMED = "its output is normed again (post_*_layernorm) before it reaches the residual stream"

LLAMA = AliasTable(
    family="sparsify", architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    hints=("llama", "mistral", "smollm"),
    entries={"embed_tokens": Sides(AliasSite("hook_embed")), "layers.{layer}": BLOCK,
             "layers.{layer}.self_attn": ATTN, "layers.{layer}.mlp": MLP,
             "layers.{layer}.mlp.down_proj": Sides(AliasSite(B + "hook_mlp_out"),
                                                   AliasSite(B + "mlp.hook_post"))})

NEOX = AliasTable(
    family="sparsify", architectures=("GPTNeoXForCausalLM",), hints=("pythia", "neox"),
    entries={"embed_in": Sides(AliasSite("hook_embed")), "layers.{layer}": BLOCK,
             "layers.{layer}.attention": ATTN, "layers.{layer}.mlp": MLP,
             "layers.{layer}.mlp.dense_4h_to_h": Sides(AliasSite(B + "hook_mlp_out"),
                                                       AliasSite(B + "mlp.hook_post"))})

GEMMA2 = AliasTable(
    family="sparsify", architectures=("Gemma2ForCausalLM",), hints=("gemma-2", "gemma2"),
    entries={"embed_tokens": Sides(AliasSite("hook_embed")), "layers.{layer}": BLOCK,
             "layers.{layer}.self_attn": Sides(None, AliasSite(B + "ln1.hook_normalized",
                                                               "ln1"), NORMED),
             "layers.{layer}.mlp": Sides(None, AliasSite(B + "ln2.hook_normalized", "ln2"),
                                         NORMED),
             "layers.{layer}.post_attention_layernorm": Sides(AliasSite(B + "hook_attn_out")),
             "layers.{layer}.post_feedforward_layernorm": Sides(AliasSite(B + "hook_mlp_out"))})

TABLES = [LLAMA, NEOX, GEMMA2]
