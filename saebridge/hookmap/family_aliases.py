"""Site names that two families use for every architecture, mapped to canonical hooks.

OpenAI's sparse_autoencoder / Transformer Debugger locations (their README's own table to
TransformerLens names) and dictionary_learning's submodule names (``resid_post_layer_3``
in its trainers' configs; ``resid_3``, ``attn_3``, ``mlp_3``, ``embed`` as the folder names
of the pythia-70m dictionaries). Names carry the layer as ``.{layer}`` (OpenAI: location
and layer come from the published path ``{location}{version}/autoencoders/{layer}.pt``).
"""

from __future__ import annotations

from saebridge.hookmap.alias_table import AliasSite, AliasTable, B, Sides


def _out(name: str) -> Sides:
    return Sides(AliasSite(name))


OPENAI = AliasTable(
    family="openai",
    architectures=("*",),
    entries={
        "mlp_post_act.{layer}": _out(B + "mlp.hook_post"),
        "resid_delta_attn.{layer}": _out(B + "hook_attn_out"),
        "resid_post_attn.{layer}": _out(B + "hook_resid_mid"),
        "resid_delta_mlp.{layer}": _out(B + "hook_mlp_out"),
        "resid_post_mlp.{layer}": _out(B + "hook_resid_post"),
    },
)

DICTIONARY_LEARNING = AliasTable(
    family="dictionary_learning",
    architectures=("*",),
    entries={
        "resid_post_layer_{layer}": _out(B + "hook_resid_post"),
        "resid_pre_layer_{layer}": _out(B + "hook_resid_pre"),
        "attn_out_layer_{layer}": _out(B + "hook_attn_out"),
        "mlp_out_layer_{layer}": _out(B + "hook_mlp_out"),
        "resid_{layer}": _out(B + "hook_resid_post"),
        "attn_{layer}": _out(B + "hook_attn_out"),
        "mlp_{layer}": _out(B + "hook_mlp_out"),
        "embed": _out("hook_embed"),
    },
)

TABLES = (OPENAI, DICTIONARY_LEARNING)
