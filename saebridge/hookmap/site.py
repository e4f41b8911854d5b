"""The data a hook map is made of: where a canonical hook lives in a Hugging Face model.

A :class:`Site` says which module, which side of it (input or output), which tuple
element or argument, and how to reshape the tensor into TransformerLens's layout.
Adapters read these records; no architecture is handled by a branch in code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

Kind = Literal["resid", "write", "v", "plain"]
"""How TransformerLens processing changes a site (see :mod:`saebridge.hookmap.convert`):
``resid`` and ``write`` are centred by ``center_writing_weights``; ``v`` loses the value
bias under ``fold_value_biases``; ``plain`` sites are the same in every space (``fold_ln``
changes no hook: ``hook_normalized`` is taken before the gain and bias in every space)."""


@dataclass(frozen=True)
class Site:
    """Where one canonical hook lives in a Hugging Face module tree.

    ``module`` may contain ``{layer}``. ``io="input"`` reads positional argument ``arg``
    (or keyword ``kwarg`` when the caller passes it by name); ``io="output"`` reads the
    output, or element ``index`` of a tuple output.
    """

    module: str
    io: Literal["input", "output"]
    kind: Kind = "plain"
    index: int | None = None
    """Tuple element of the output, ``None`` when the output is a tensor."""
    arg: int = 0
    kwarg: str | None = None
    layout: str = "flat"
    """Name of a reshape in :data:`saebridge.hookmap.layout.LAYOUTS` (``heads``, ``qkv:0``, …)."""
    residual_from: str | None = None
    """No module boundary holds this value: it is this output plus the input of the named
    module (the residual branch), and writes go back as value minus that input."""
    writable: bool = True
    requires: str | None = None
    """A model setting the site needs, named in the error when it is missing."""

    def at(self, layer: int | None) -> Site:
        """The site with ``{layer}`` filled in."""
        if layer is None:
            return self
        fill = str(layer)
        return Site(
            module=self.module.replace("{layer}", fill),
            io=self.io,
            kind=self.kind,
            index=self.index,
            arg=self.arg,
            kwarg=self.kwarg,
            layout=self.layout,
            residual_from=None if self.residual_from is None
            else self.residual_from.replace("{layer}", fill),
            writable=self.writable,
            requires=self.requires,
        )


@dataclass(frozen=True)
class Unavailable:
    """A canonical hook that this architecture does not have, and why."""

    reason: str


@dataclass(frozen=True)
class HookMap:
    """Canonical TransformerLens hook names → :class:`Site`, for one architecture.

    ``block`` entries are relative to ``blocks.{layer}.`` and listed in execution order.
    ``config`` names the HF config attributes holding ``n_layers``, ``n_heads``,
    ``d_model`` and ``d_vocab``.
    """

    architectures: tuple[str, ...]
    config: dict[str, str]
    before_blocks: dict[str, Site | Unavailable]
    block: dict[str, Site | Unavailable]
    after_blocks: dict[str, Site | Unavailable]
    prefixes: tuple[str, ...] = field(default=("",))
    """Module-path prefixes tried in order (e.g. ``transformer.`` for an LM-head model)."""
    tl_weights: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]] | None = None
    """HF ``state_dict`` and ``n_heads`` → unprocessed weights in TransformerLens layout."""
