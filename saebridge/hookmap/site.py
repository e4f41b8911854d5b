"""The data a hook map is made of: where a canonical hook lives in a Hugging Face model.

A :class:`Site` says which module, which side of it (input or output), which tuple
element or argument, and how to reshape the tensor into TransformerLens's layout.
Adapters read these records; no architecture is handled by a branch in code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from saebridge.errors import UnsupportedArchitectureError

Kind = Literal["resid", "write", "v", "plain"]
"""How TransformerLens processing changes a site (see :mod:`saebridge.hookmap.convert`):
``resid`` and ``write`` are centred by ``center_writing_weights``; ``v`` loses the value
bias under ``fold_value_biases``; ``plain`` sites are the same in every space (``fold_ln``
changes no hook: ``hook_normalized`` is taken before the gain and bias in every space).
Only LayerNorm models are centred: the residual and written sites of RMSNorm maps
(Llama, Gemma-2) and of LayerNorm-free models are ``plain``."""


NORM_LAYOUTS = ("unaffine", "unscale", "unscale+1")
"""Layouts that undo a norm's gain: their sites are norm outputs (``ln*.hook_normalized``)."""


NORM_FREE_EPS = 1e10
"""A norm with at least this ``eps`` no longer normalises: ``sqrt(var + eps)`` is
``sqrt(eps)`` to within ``var / 2eps`` (≤ 5e-7 relative for a stream variance ≤ 1e4)."""


def _removed(module: torch.nn.Module) -> bool:
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 0.0
    return isinstance(module, torch.nn.Identity) or float(eps) >= NORM_FREE_EPS


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
    ``d_model`` and ``d_vocab`` (and ``d_head`` where it is not ``d_model // n_heads``).
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
    config_requires: dict[str, Any] = field(default_factory=dict)
    """HF config values the map assumes (e.g. GPT-NeoX's ``use_parallel_residual=True``);
    a model with other values is refused rather than hooked in the wrong places."""

    def norm_paths(self) -> list[str]:
        """Module paths (``{layer}`` left in) of the norms whose outputs this map hooks."""
        return [s.module for t in (self.before_blocks, self.block, self.after_blocks)
                for s in t.values() if isinstance(s, Site) and s.layout in NORM_LAYOUTS]

    def norms_removed(self, modules: Mapping[str, torch.nn.Module], prefix: str = "") -> bool:
        """Whether a model's hooked norms (of block 0 and the final one) were all removed:
        replaced by ``nn.Identity``, or given an ``eps`` ≥ :data:`NORM_FREE_EPS`, which turns
        a LayerNorm into the affine map ``(x - mean) * w / sqrt(eps) + b``."""
        found = [modules[prefix + p.replace("{layer}", "0")] for p in self.norm_paths()
                 if prefix + p.replace("{layer}", "0") in modules]
        return bool(found) and all(_removed(m) for m in found)

    def without_norms(self) -> HookMap:
        """This map for a model whose norms were removed (``nn.Identity``, or LayerNorms
        turned into affine maps by a huge ``eps``, as in apollo-research/gpt2_noLN).

        No norm is left to absorb a mean, so TransformerLens processing centres nothing:
        every residual and written site becomes ``plain`` (never centred, in any space),
        and the norms' ``hook_normalized`` sites do not exist.
        """
        def strip(table: dict[str, Site | Unavailable]) -> dict[str, Site | Unavailable]:
            out: dict[str, Site | Unavailable] = {}
            for name, site in table.items():
                if isinstance(site, Site) and site.layout in NORM_LAYOUTS:
                    out[name] = Unavailable(
                        "this model's norms were removed (LayerNorm-free), so there is no "
                        "normalized activation to hook; hook the residual stream instead.")
                elif isinstance(site, Site) and site.kind in ("resid", "write"):
                    out[name] = replace(site, kind="plain")
                else:
                    out[name] = site
            return out

        return replace(self, before_blocks=strip(self.before_blocks), block=strip(self.block),
                       after_blocks=strip(self.after_blocks))

    def check_config(self, config: Any) -> None:
        """Refuse a config whose values differ from :attr:`config_requires`.

        Raises:
            UnsupportedArchitectureError: naming the attribute, its value and the one needed.
        """
        for attr, want in self.config_requires.items():
            got = getattr(config, attr, want)
            if got != want:
                raise UnsupportedArchitectureError(
                    f"the {self.architectures[0]} hook map assumes config.{attr}={want!r}, but "
                    f"this model has {got!r}, so its hooks would sit in the wrong places. "
                    "Register a hook map for this variant (saebridge.hookmap.register) or "
                    "pass sb.wrap(model, hookmap={...}).")


@dataclass(frozen=True)
class HookSpec:
    """Where one canonical hook lives in a home-made ``nn.Module`` (any model at all).

    ``path`` is the dotted module name (as in ``model.named_modules()``); ``io`` the side
    read: the output (element ``index`` of a tuple output) or positional argument ``arg``
    of the input (keyword ``kwarg`` when the caller passes it by name). ``reshape``
    ``(n_heads, d_head)`` splits the last dimension into heads, as TransformerLens's
    ``hook_q/k/v/z`` are. ``kind`` says how TransformerLens processing would change the
    site; a home-made model is never processed, so ``plain`` (the default) is right
    unless the model itself computes in a processed space.

    >>> HookSpec("blocks.0.attn.proj", io="input", reshape=(4, 16)).to_site().layout
    'heads'
    """

    path: str
    io: Literal["input", "output"] = "output"
    index: int | None = None
    reshape: tuple[int, int] | None = None
    arg: int = 0
    kwarg: str | None = None
    kind: Kind = "plain"
    writable: bool = True

    def to_site(self) -> Site:
        return Site(self.path, self.io, kind=self.kind, index=self.index, arg=self.arg,
                    kwarg=self.kwarg, layout="heads" if self.reshape else "flat",
                    writable=self.writable)
