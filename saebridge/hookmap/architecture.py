"""The record of one architecture: everything saebridge knows about it, in one place.

Each architecture file (``saebridge/hookmap/gpt2.py`` …) defines one ``ARCHITECTURE``:
its hook map, its TransformerLens config table, its alias tables and the tiny random
model the tests build. :mod:`saebridge.hookmap.registry` registers the files it lists.
Plain data: nothing here imports ``transformers`` or TransformerLens.

>>> spec = TinySpec("GPT2LMHeadModel", {"n_layer": 2})
>>> spec.gain_init, spec.norm_weights
('uniform', 'norm')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from saebridge.errors import RegistryError
from saebridge.hookmap.alias_table import AliasTable
from saebridge.hookmap.site import HookMap
from saebridge.hookmap.tl_config import TLConfigTable


@dataclass(frozen=True)
class TinySpec:
    """How :mod:`saebridge.tiny` builds a tiny random model of the architecture.

    The model's norm gains and linear biases are random: the default init (ones and
    zeros) would make TransformerLens processing invisible and hide bugs.
    """

    model_class: str
    """The ``transformers`` model class, by name (its ``config_class`` builds the config)."""
    config: Mapping[str, Any]
    """HF config keyword arguments; the vocabulary size, BOS/EOS ids and ``architectures``
    are filled in from the tokenizer and :attr:`model_class`."""
    norm_weights: str = "norm"
    """Substring of the parameter names of the norm gains (``"ln_"`` in GPT-2)."""
    gain_init: Literal["uniform", "normal"] = "uniform"
    """``uniform``: gains in ``gain_centre ± 0.5``, away from zero so undoing a gain stays
    exact; ``normal``: ``gain_centre + 0.3 · N(0, 1)`` (GPT-2's, the first tiny model:
    kept so its weights and every number measured on it stay the same)."""
    gain_centre: float = 1.0
    """1 for a norm that multiplies by ``w``; 0 for Gemma's, which multiplies by ``1 + w``."""


@dataclass(frozen=True)
class Architecture:
    """Everything about one architecture (one file of ``saebridge/hookmap``)."""

    name: str
    """Short key (``"gpt2"``): :func:`saebridge.tiny.tiny` and the tests use it."""
    hook_map: HookMap
    """Canonical hook → module site, for every HF architecture name it lists."""
    tl_config: TLConfigTable
    """HF config → ``HookedTransformerConfig`` fields (see :mod:`~saebridge.hookmap.tl_config`)."""
    tl_architectures: tuple[str, ...]
    """HF architecture names that ``from_hf`` converts with :attr:`tl_config` (the models
    with an LM head)."""
    tiny: TinySpec
    """The tiny random model of this architecture."""
    aliases: tuple[AliasTable, ...] = ()
    """Other families' names for this architecture's sites (sparsify's module paths)."""

    def __post_init__(self) -> None:
        listed = set(self.hook_map.architectures)
        stray = [a for a in (*self.tl_architectures, self.tiny.model_class) if a not in listed]
        if stray:
            raise RegistryError(
                f"architecture {self.name!r} names {stray} for its TransformerLens table or "
                f"tiny model, but its hook map covers only {sorted(listed)}. Add them to the "
                "hook map's architectures, or fix the names.")
