"""Other families' names for sites, resolved to canonical (TransformerLens) hook names.

Each family names sites its own way: sparsify by Hugging Face module path relative to the
base model (``h.5.mlp``), with an SAE reading the module's output and a transcoder reading
its input and predicting its output; OpenAI by location (``resid_delta_mlp``);
dictionary_learning by submodule name (``resid_post_layer_3``). An :class:`AliasTable`
holds one family's names for one set of architectures as data; :func:`resolve` finds a
name in every table of its family, so the lookup itself knows no architecture.

>>> resolve("sparsify", "h.3.mlp").output.name
'blocks.3.hook_mlp_out'
>>> resolve("sparsify", "h.3.mlp").input.affine
'ln2'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from saebridge.errors import RegistryError, UnknownHookError, unknown


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


_TABLES: dict[str, list[AliasTable]] = {}


def register(table: AliasTable) -> None:
    """Add a table; a second table for the same family and architectures is refused."""
    for other in _TABLES.get(table.family, []):
        if set(other.architectures) & set(table.architectures):
            raise RegistryError(
                f"{table.family} aliases for {other.architectures} are already registered; "
                "a second table would make names ambiguous. Extend the existing table.")
    _TABLES.setdefault(table.family, []).append(table)


def resolve(family: str, name: str, model_name: str | None = None) -> Sides:
    """The canonical sites a ``family`` name stands for; ``model_name`` (when known) picks
    between architectures that read the name differently.

    Raises:
        UnknownHookError: no table of the family knows the name (the nearest names are
            listed), or tables for different architectures read it differently.
    """
    tables = _TABLES.get(family, [])
    found = {table.architectures: hit for table in tables if (hit := table.match(name))}
    distinct = set(found.values())
    if len(distinct) > 1 and model_name:
        hinted = {t.architectures for t in tables
                  if any(h in model_name.lower() for h in t.hints)}
        found = {arch: hit for arch, hit in found.items() if arch in hinted} or found
        distinct = set(found.values())
    if len(distinct) == 1:
        return distinct.pop()
    if distinct:
        readings = "; ".join(f"{'/'.join(arch)}: {sides.output.name if sides.output else '-'}"
                             for arch, sides in found.items())
        raise UnknownHookError(
            f"{family} name {name!r} means different sites in different architectures "
            f"({readings}), and the model is {model_name or 'not named'}. Pass hook_name= to "
            "say which canonical hook it is.")
    valid = [p for table in tables for p in table.entries]
    raise UnknownHookError(unknown(
        f"{family} site name", name, valid,
        "Pass hook_name= with the canonical (TransformerLens) hook name, or add the name "
        "to an alias table (saebridge.hookmap.aliases.register)."))


def _register_builtin() -> None:
    from saebridge.hookmap import family_aliases, gpt2_aliases, layers_aliases

    for table in (*gpt2_aliases.TABLES, *layers_aliases.TABLES, *family_aliases.TABLES):
        register(table)


_register_builtin()
