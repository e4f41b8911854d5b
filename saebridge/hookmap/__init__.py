"""Canonical hook names (TransformerLens's) and per-architecture hook maps.

>>> from saebridge.hookmap import hook_map
>>> hook_map("GPT2LMHeadModel").block["attn.hook_z"].module
'h.{layer}.attn.c_proj'
"""

from __future__ import annotations

import re

from saebridge.errors import RegistryError, UnknownHookError, UnsupportedArchitectureError, unknown
from saebridge.hookmap.gemma2 import GEMMA2
from saebridge.hookmap.gpt2 import GPT2
from saebridge.hookmap.llama import LLAMA
from saebridge.hookmap.neox import NEOX
from saebridge.hookmap.site import HookMap, HookSpec, Kind, Site, Unavailable

_MAPS: dict[str, HookMap] = {}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def register(hmap: HookMap) -> None:
    """Register a hook map under each architecture name it lists (duplicates refused)."""
    for arch in hmap.architectures:
        if arch in _MAPS:
            raise RegistryError(
                f"architecture {arch!r} already has a hook map; registering a second one would "
                "silently change where hooks go. Use a new architecture name or edit the "
                "existing map."
            )
    for arch in hmap.architectures:
        _MAPS[arch] = hmap


def hook_map(architecture: str) -> HookMap:
    """The hook map for an HF architecture name (``config.architectures[0]``)."""
    if architecture not in _MAPS:
        raise UnsupportedArchitectureError(unknown(
            "architecture", architecture, _MAPS,
            "Add a hook map for it: a HookMap data file registered with "
            "saebridge.hookmap.register()."))
    return _MAPS[architecture]


def split(name: str) -> tuple[int | None, str]:
    """``"blocks.3.attn.hook_z"`` → ``(3, "attn.hook_z")``; global names give ``(None, name)``."""
    match = _BLOCK_RE.match(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def names(hmap: HookMap, n_layers: int) -> list[str]:
    """Every available canonical name, in execution order."""
    out = [n for n, s in hmap.before_blocks.items() if isinstance(s, Site)]
    for layer in range(n_layers):
        out += [f"blocks.{layer}.{n}" for n, s in hmap.block.items() if isinstance(s, Site)]
    out += [n for n, s in hmap.after_blocks.items() if isinstance(s, Site)]
    return out


def canonical_names() -> set[str]:
    """Every hook name (relative to ``blocks.{L}.`` inside blocks) some registered map
    defines or marks unavailable: the vocabulary user-supplied hook maps draw from."""
    return {rel for hmap in _MAPS.values()
            for table in (hmap.before_blocks, hmap.block, hmap.after_blocks) for rel in table}


def resolve(hmap: HookMap, name: str, n_layers: int) -> Site:
    """The :class:`Site` of a canonical name, with its layer filled in.

    Raises:
        UnknownHookError: the name is not a hook of this model; the nearest names are listed,
            and for a site the architecture lacks, the reason it lacks it.
    """
    layer, rel = split(name)
    table = hmap.block if layer is not None else {**hmap.before_blocks, **hmap.after_blocks}
    entry = table.get(rel)
    if isinstance(entry, Unavailable):
        raise UnknownHookError(f"hook {name!r} does not exist in {hmap.architectures[0]}: "
                               f"{entry.reason}")
    if entry is None or (layer is not None and not 0 <= layer < n_layers):
        raise UnknownHookError(unknown(
            "hook", name, names(hmap, n_layers),
            f"Hook names are TransformerLens's; blocks run from 0 to {n_layers - 1}."))
    return entry.at(layer)


for _map in (GPT2, NEOX, LLAMA, GEMMA2):
    register(_map)

__all__ = ["HookMap", "HookSpec", "Kind", "Site", "Unavailable", "canonical_names",
           "hook_map", "names", "register", "resolve", "split"]
