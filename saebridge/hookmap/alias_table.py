"""Alias tables as data: one family's names for sites, mapped to canonical hooks.

Each family names sites its own way: sparsify by Hugging Face module path relative to the
base model (``h.5.mlp``), with an SAE reading the module's output and a transcoder reading
its input and predicting its output; OpenAI by location (``resid_delta_mlp``);
dictionary_learning by submodule name (``resid_post_layer_3``). An :class:`AliasTable`
holds one family's names for one set of architectures. This module is a leaf (the
architecture files import it); the lookup over every table is
:func:`saebridge.hookmap.aliases.resolve`.

>>> table = AliasTable("sparsify", ("GPT2LMHeadModel",),
...                    {"h.{layer}": Sides(AliasSite("blocks.{layer}.hook_resid_post"))})
>>> table.match("h.3").output.name
'blocks.3.hook_resid_post'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

B = "blocks.{layer}."
"""Prefix of a per-block canonical hook in a table entry (``{layer}`` is filled in)."""


@dataclass(frozen=True)
class AliasSite:
    """One side of an aliased site: a canonical hook, maybe with a LayerNorm's affine on top.

    ``affine="ln2"`` means the family's tensor is that LayerNorm's *output* (gain and bias
    applied), while the canonical ``ln2.hook_normalized`` is taken before them: the value
    is ``hook_normalized * ln2.w + ln2.b`` of the unprocessed weights.
    """

    name: str
    affine: str | None = None


@dataclass(frozen=True)
class Sides:
    """What a family's name means on each side (``None``: that side has no canonical hook)."""

    output: AliasSite | None
    input: AliasSite | None = None
    why_not: str = ""
    """Why a missing side is missing, for the error message."""

    def at(self, layer: int | None) -> Sides:
        def fill(site: AliasSite | None) -> AliasSite | None:
            if site is None or layer is None:
                return site
            return AliasSite(site.name.replace("{layer}", str(layer)), site.affine)
        return Sides(fill(self.output), fill(self.input), self.why_not)


# The sides sparsify's module names have in every architecture (module paths differ):
BLOCK_SIDES = Sides(AliasSite(B + "hook_resid_post"), AliasSite(B + "hook_resid_pre"))
"""A block reads the residual stream and writes it back."""
ATTN_SIDES = Sides(AliasSite(B + "hook_attn_out"), AliasSite(B + "ln1.hook_normalized", "ln1"))
"""The attention module: reads ``ln1``'s output (gain and bias applied), writes attn_out."""
MLP_SIDES = Sides(AliasSite(B + "hook_mlp_out"), AliasSite(B + "ln2.hook_normalized", "ln2"))
"""The MLP module: reads ``ln2``'s output (gain and bias applied), writes mlp_out."""
MLP_OUT_PROJ_SIDES = Sides(AliasSite(B + "hook_mlp_out"), AliasSite(B + "mlp.hook_post"))
"""The MLP's output projection: reads ``mlp.hook_post``, writes mlp_out."""


@dataclass(frozen=True)
class AliasTable:
    """One family's site names for some architectures: pattern (``{layer}`` for the block
    index) → :class:`Sides`."""

    family: str
    architectures: tuple[str, ...]
    entries: dict[str, Sides]
    hints: tuple[str, ...] = ()
    """Lower-case substrings of model names trained with these architectures (``llama``,
    ``pythia``), used to choose between tables that read a name differently."""
    _compiled: list[tuple[re.Pattern[str], str]] = field(default_factory=list, compare=False,
                                                         repr=False)

    def __post_init__(self) -> None:
        for pattern in self.entries:
            regex = re.escape(pattern).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
            self._compiled.append((re.compile(f"^{regex}$"), pattern))

    def match(self, name: str) -> Sides | None:
        for regex, pattern in self._compiled:
            found = regex.match(name)
            if found:
                layer = found.groupdict().get("layer")
                return self.entries[pattern].at(None if layer is None else int(layer))
        return None
