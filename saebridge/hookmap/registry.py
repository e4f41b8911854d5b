"""The one registry of architectures, keyed by name strings.

:data:`BUILTIN` lists the architecture files; each defines ``ARCHITECTURE``
(:class:`~saebridge.hookmap.architecture.Architecture`), and registering it registers its
hook map (under every HF architecture name it lists), its TransformerLens config table and
its alias tables. Adding an architecture is one new file and one name in :data:`BUILTIN`
(CONTRIBUTING.md). Registries refuse duplicates and answer an unknown key with the
nearest names and how to add one.

>>> architecture("llama").hook_map is hook_map("MistralForCausalLM")
True
>>> [a.name for a in architectures()]
['gpt2', 'neox', 'llama', 'gemma2']
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from saebridge.errors import RegistryError, UnsupportedArchitectureError, unknown
from saebridge.hookmap.alias_table import AliasTable
from saebridge.hookmap.architecture import Architecture
from saebridge.hookmap.family_aliases import TABLES as FAMILY_TABLES
from saebridge.hookmap.site import HookMap
from saebridge.hookmap.tl_config import TLConfigTable

BUILTIN = ("gpt2", "neox", "llama", "gemma2")
"""Architecture files (modules of ``saebridge.hookmap``), registered in this order."""

HOW_TO_ADD = ("Add an architecture file saebridge/hookmap/<arch>.py defining ARCHITECTURE "
              "and its name in saebridge.hookmap.registry.BUILTIN (see CONTRIBUTING.md).")

_ARCHITECTURES: dict[str, Architecture] = {}
_MAPS: dict[str, HookMap] = {}
_TL: dict[str, TLConfigTable] = {}
_ALIASES: dict[str, list[AliasTable]] = {}

TL_CONFIGS: Mapping[str, TLConfigTable] = MappingProxyType(_TL)
"""HF architecture name → TransformerLens config table: a live, read-only view."""


def _refuse(kind: str, keys: Iterable[str], taken: Mapping[str, object], why: str) -> None:
    clash = sorted(k for k in keys if k in taken)
    if clash:
        raise RegistryError(f"{kind} {clash} already registered; {why}")


def _alias_clash(table: AliasTable) -> None:
    for other in _ALIASES.get(table.family, []):
        if set(other.architectures) & set(table.architectures):
            raise RegistryError(
                f"{table.family} aliases for {other.architectures} are already registered; "
                "a second table would make names ambiguous. Extend the existing table.")


def register_architecture(arch: Architecture) -> None:
    """Register everything about one architecture; refused whole if any part is taken."""
    _refuse("architecture", [arch.name], _ARCHITECTURES,
            "pick another name or edit the existing file.")
    _refuse("hook map for", arch.hook_map.architectures, _MAPS,
            "a second map would silently change where hooks go. Edit the existing map.")
    _refuse("TransformerLens config for", arch.tl_architectures, _TL,
            "edit the existing architecture's table.")
    for table in arch.aliases:
        _alias_clash(table)
    register(arch.hook_map)
    _TL.update(dict.fromkeys(arch.tl_architectures, arch.tl_config))
    for table in arch.aliases:
        register_aliases(table)
    _ARCHITECTURES[arch.name] = arch


def register(hmap: HookMap) -> None:
    """Register a hook map alone under each architecture name it lists (duplicates refused)."""
    _refuse("architecture", hmap.architectures, _MAPS,
            "it already has a hook map, and registering a second one would silently change "
            "where hooks go. Use a new architecture name or edit the existing map.")
    _MAPS.update(dict.fromkeys(hmap.architectures, hmap))


def register_aliases(table: AliasTable) -> None:
    """Add an alias table; a second table for the same family and architectures is refused."""
    _alias_clash(table)
    _ALIASES.setdefault(table.family, []).append(table)


def architectures() -> tuple[Architecture, ...]:
    """Every registered architecture record, in registration order."""
    return tuple(_ARCHITECTURES.values())


def architecture(name: str) -> Architecture:
    """The record registered as ``name`` (``"gpt2"``, ``"llama"`` …).

    Raises:
        UnsupportedArchitectureError: listing the nearest registered names.
    """
    if name not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(unknown("architecture", name, _ARCHITECTURES,
                                                   HOW_TO_ADD))
    return _ARCHITECTURES[name]


def architecture_of(hf_architecture: str) -> Architecture:
    """The record whose hook map lists an HF architecture name (``MistralForCausalLM``)."""
    for arch in _ARCHITECTURES.values():
        if hf_architecture in arch.hook_map.architectures:
            return arch
    raise UnsupportedArchitectureError(unknown(
        "architecture", hf_architecture,
        [n for a in _ARCHITECTURES.values() for n in a.hook_map.architectures], HOW_TO_ADD))


def hook_map(hf_architecture: str) -> HookMap:
    """The hook map for an HF architecture name (``config.architectures[0]``)."""
    if hf_architecture not in _MAPS:
        raise UnsupportedArchitectureError(unknown(
            "architecture", hf_architecture, _MAPS,
            HOW_TO_ADD + " A hook map alone can be registered with "
            "saebridge.hookmap.register()."))
    return _MAPS[hf_architecture]


def tl_table(hf_architecture: str) -> TLConfigTable:
    """The TransformerLens config table of an HF architecture name."""
    if hf_architecture not in _TL:
        raise UnsupportedArchitectureError(unknown(
            "architecture for from_hf", hf_architecture, _TL,
            HOW_TO_ADD + " Its tl_config table says how to build the HookedTransformerConfig."))
    return _TL[hf_architecture]


def alias_tables(family: str) -> tuple[AliasTable, ...]:
    """Every alias table of a family (``"sparsify"``), in registration order."""
    return tuple(_ALIASES.get(family, ()))


def canonical_names() -> set[str]:
    """Every hook name (relative to ``blocks.{L}.`` inside blocks) some registered map
    defines or marks unavailable: the vocabulary user-supplied hook maps draw from."""
    return {rel for hmap in _MAPS.values()
            for table in (hmap.before_blocks, hmap.block, hmap.after_blocks) for rel in table}


def _register_builtin() -> None:
    # By module name, so that adding an architecture is one line here; the files import
    # only leaf modules, never this one, so no import cycle can form.
    for module in BUILTIN:
        register_architecture(importlib.import_module(f"saebridge.hookmap.{module}").ARCHITECTURE)
    for table in FAMILY_TABLES:
        register_aliases(table)


_register_builtin()
