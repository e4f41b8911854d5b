"""Canonical hook names (TransformerLens's) and the per-architecture records.

One file per architecture (``gpt2.py``, ``neox.py``, ``llama.py``, ``gemma2.py``) holds
everything about it as an :class:`Architecture`; :mod:`~saebridge.hookmap.registry` lists
the files and registers them (CONTRIBUTING.md says how to add one).

>>> from saebridge.hookmap import hook_map
>>> hook_map("GPT2LMHeadModel").block["attn.hook_z"].module
'h.{layer}.attn.c_proj'
"""

from __future__ import annotations

from saebridge.hookmap.architecture import Architecture, TinySpec
from saebridge.hookmap.lookup import names, resolve, split
from saebridge.hookmap.registry import (
    architecture,
    architecture_of,
    architectures,
    canonical_names,
    hook_map,
    register,
    register_architecture,
)
from saebridge.hookmap.site import HookMap, HookSpec, Kind, Site, Unavailable

__all__ = ["Architecture", "HookMap", "HookSpec", "Kind", "Site", "TinySpec", "Unavailable",
           "architecture", "architecture_of", "architectures", "canonical_names", "hook_map",
           "names", "register", "register_architecture", "resolve", "split"]
