"""Canonical hook names against one hook map: split a name, list a map's names, resolve one.

A leaf (it knows no registry), so modules inside ``saebridge.hookmap`` and the kernel can
import it without importing every architecture.

>>> split("blocks.3.attn.hook_z")
(3, 'attn.hook_z')
"""

from __future__ import annotations

import re

from saebridge.errors import UnknownHookError, unknown
from saebridge.hookmap.site import HookMap, Site, Unavailable

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


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
