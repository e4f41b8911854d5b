"""Other families' names for sites, resolved to canonical (TransformerLens) hook names.

Each family names sites its own way: sparsify by Hugging Face module path relative to the
base model (``h.5.mlp``), with an SAE reading the module's output and a transcoder reading
its input and predicting its output; OpenAI by location (``resid_delta_mlp``);
dictionary_learning by submodule name (``resid_post_layer_3``). The tables are data
(:mod:`~saebridge.hookmap.alias_table`), held by each architecture's file or, for names
every architecture shares, by :mod:`~saebridge.hookmap.family_aliases`; :func:`resolve`
finds a name in every registered table of its family, so the lookup itself knows no
architecture.

>>> resolve("sparsify", "h.3.mlp").output.name
'blocks.3.hook_mlp_out'
>>> resolve("sparsify", "h.3.mlp").input.affine
'ln2'
"""

from __future__ import annotations

from saebridge.errors import UnknownHookError, unknown
from saebridge.hookmap.alias_table import AliasSite, AliasTable, Sides
from saebridge.hookmap.registry import alias_tables
from saebridge.hookmap.registry import register_aliases as register


def resolve(family: str, name: str, model_name: str | None = None) -> Sides:
    """The canonical sites a ``family`` name stands for; ``model_name`` (when known) picks
    between architectures that read the name differently.

    Raises:
        UnknownHookError: no table of the family knows the name (the nearest names are
            listed), or tables for different architectures read it differently.
    """
    tables = alias_tables(family)
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


__all__ = ["AliasSite", "AliasTable", "Sides", "register", "resolve"]
