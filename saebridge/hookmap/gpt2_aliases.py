"""GPT-2 (``GPT2LMHeadModel``) module paths as sparsify names them, mapped to canonical hooks.

sparsify names a hookpoint by its path under ``model.base_model`` (``h.5``, ``h.5.mlp``).
An SAE there reads the module's output; a transcoder reads its input and predicts its
output. Facts encoded: ``attn`` and ``mlp`` read their LayerNorm's output with the gain and
bias applied (``affine``), which no canonical hook holds directly; ``mlp.act`` is the GELU
(``hook_pre`` in, ``hook_post`` out); ``attn.c_proj``'s input is ``hook_z`` flattened; a
LayerNorm's own output has no canonical hook.
"""

from __future__ import annotations

from saebridge.hookmap.aliases import AliasSite, AliasTable, Sides

B = "blocks.{layer}."
LN_OUT = "its output is the LayerNorm output with gain and bias, which no canonical hook holds"

SPARSIFY_GPT2 = AliasTable(
    family="sparsify",
    architectures=("GPT2LMHeadModel", "GPT2Model"),
    entries={
        "wte": Sides(AliasSite("hook_embed"), None, "its input is token ids"),
        "wpe": Sides(AliasSite("hook_pos_embed"), None, "its input is positions"),
        "h.{layer}": Sides(AliasSite(B + "hook_resid_post"), AliasSite(B + "hook_resid_pre")),
        "h.{layer}.attn": Sides(AliasSite(B + "hook_attn_out"),
                                AliasSite(B + "ln1.hook_normalized", affine="ln1")),
        "h.{layer}.attn.c_proj": Sides(AliasSite(B + "hook_attn_out"),
                                       AliasSite(B + "attn.hook_z")),
        "h.{layer}.mlp": Sides(AliasSite(B + "hook_mlp_out"),
                               AliasSite(B + "ln2.hook_normalized", affine="ln2")),
        "h.{layer}.mlp.c_fc": Sides(AliasSite(B + "mlp.hook_pre"),
                                    AliasSite(B + "ln2.hook_normalized", affine="ln2")),
        "h.{layer}.mlp.act": Sides(AliasSite(B + "mlp.hook_post"), AliasSite(B + "mlp.hook_pre")),
        "h.{layer}.mlp.c_proj": Sides(AliasSite(B + "hook_mlp_out"),
                                      AliasSite(B + "mlp.hook_post")),
        "h.{layer}.ln_1": Sides(None, AliasSite(B + "hook_resid_pre"), LN_OUT),
        "h.{layer}.ln_2": Sides(None, None, LN_OUT + "; its input (resid_pre + attn_out) "
                                "is hook_resid_mid, which has no module boundary"),
        "ln_f": Sides(None, None, LN_OUT),
    },
)

TABLES = [SPARSIFY_GPT2]
