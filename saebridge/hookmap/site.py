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

Kind = Literal["resid", "write", "v", "normed", "plain"]
"""How TransformerLens processing changes a site (see :mod:`saebridge.hookmap.convert`):
``resid`` and ``write`` are centred by ``center_writing_weights``; ``v`` loses the value
bias under ``fold_value_biases``; ``plain`` sites are the same in every space. ``normed``
is a LayerNorm's ``hook_normalized``: read the same in every space (taken before the gain
and bias), but ``fold_ln`` also centres the weights that read it, so a folded model drops
the mean of a value written there and an unfolded one keeps it.
Only LayerNorm models are centred: the residual and written sites of RMSNorm maps
(Llama, Gemma-2) and of LayerNorm-free models are ``plain``."""


EAGER = 'attn_implementation="eager"'
"""``requires`` of the attention pattern and scores: HF computes them only in its eager
attention, which the HF and nnsight adapters switch to for a run that reads them."""


NORM_LAYOUTS = ("unaffine", "unscale", "unscale+1")
"""Layouts that undo a norm's gain: their sites are norm outputs (``ln*.hook_normalized``)."""


def _removed(module: torch.nn.Module) -> bool:
    """A norm replaced by ``nn.Identity``. A LayerNorm with a huge ``eps`` (the gpt2_noLN
    recipe) no longer normalises but still subtracts the mean, so it is kept: for
    activation spaces it is a LayerNorm, and TransformerLens processing centres around it."""
    return isinstance(module, torch.nn.Identity)


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
    derive: str | None = None
    """No module boundary carries this value: it is computed (read-only) from the one this
    site names, by the :data:`DERIVATIONS` entry of this name."""
    tl_flag: str | None = None
    """The ``HookedTransformerConfig`` flag without which TransformerLens never runs this
    hook: left out of ``hook_names()`` (a full cache), as in TransformerLens with the flag
    off, and produced when asked for by name."""

    def at(self, layer: int | None) -> Site:
        """The site with ``{layer}`` filled in."""
        if layer is None:
            return self
        fill = str(layer)
        return replace(self, module=self.module.replace("{layer}", fill),
                       residual_from=None if self.residual_from is None
                       else self.residual_from.replace("{layer}", fill))


DERIVATIONS = {
    "heads": "the value repeated over the query heads ([batch, pos, n_heads, d_model])",
    "kv_heads": "the value repeated over the key/value heads ([batch, pos, n_kv, d_model])",
    "scale:LN": "the LayerNorm's scale sqrt(var(x) + eps) of its input x ([batch, pos, 1])",
    "scale:RMS": "the RMSNorm's scale sqrt(mean(x^2) + eps) of its input x ([batch, pos, 1])",
    "result": "each head's hook_z times its W_O, without b_O ([batch, pos, n_heads, d_model])",
    "scores": "q.k^T times the attention's scaling (soft-capped where the model caps), "
              "masked positions -inf ([batch, n_heads, q_pos, k_pos])",
    "rot_q": "the queries after the rotary embedding ([batch, pos, n_heads, d_head])",
    "rot_k": "the keys after the rotary embedding ([batch, pos, n_kv, d_head])",
}
"""How a :attr:`Site.derive` value is computed from the tensor its site names."""


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
        """Whether a model's hooked norms (of block 0 and the final one) were all removed
        (replaced by ``nn.Identity``; a huge-``eps`` LayerNorm is not removed)."""
        found = [modules[prefix + p.replace("{layer}", "0")] for p in self.norm_paths()
                 if prefix + p.replace("{layer}", "0") in modules]
        return bool(found) and all(_removed(m) for m in found)

    def without_norms(self) -> HookMap:
        """This map for a model whose norms were removed (``nn.Identity``).

        No norm is left to absorb a mean, so TransformerLens processing centres nothing:
        every residual and written site becomes ``plain`` (never centred, in any space),
        and the norms' ``hook_normalized`` sites do not exist.
        """
        def strip(table: dict[str, Site | Unavailable]) -> dict[str, Site | Unavailable]:
            out: dict[str, Site | Unavailable] = {}
            for name, site in table.items():
                if isinstance(site, Site) and (site.layout in NORM_LAYOUTS
                                               or (site.derive or "").startswith("scale")):
                    out[name] = Unavailable(
                        "this model's norms were removed (LayerNorm-free), so there is no "
                        "normalized activation or norm scale to hook; hook the residual "
                        "stream instead.")
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


def split_inputs(resid_pre: Site) -> dict[str, Site]:
    """``hook_attn_in`` and ``hook_q/k/v_input``: the block input (``resid_pre``, the site
    given) repeated over the heads, read-only (one HF norm feeds q, k and v), run by
    TransformerLens only under ``use_attn_in`` / ``use_split_qkv_input``."""
    return {
        "hook_attn_in": replace(resid_pre, derive="heads", writable=False,
                                tl_flag="use_attn_in"),
        **{f"hook_{x}_input": replace(resid_pre, derive="heads" if x == "q" else "kv_heads",
                                      writable=False, tl_flag="use_split_qkv_input")
           for x in "qkv"},
    }


def norm_scale(norm: str, kind: str) -> Site:
    """``ln*.hook_scale`` of the norm at module path ``norm`` (``kind`` ``LN`` or ``RMS``),
    computed from its input."""
    return Site(norm, "input", derive=f"scale:{kind}", writable=False)


def rotary_sites(attn: str) -> dict[str, Site]:
    """``hook_rot_q``/``hook_rot_k`` of a rotary attention module: the q and k its eager
    attention is given (recorded there, as the scores are)."""
    return {f"attn.hook_rot_{x}": Site(attn, "output", index=1, derive=f"rot_{x}",
                                       writable=False, requires=EAGER) for x in "qk"}


def attention_extras(attn: str, out_proj: str, kind: Kind = "write") -> dict[str, Site]:
    """``hook_attn_scores`` (computed in the eager attention the adapter switches to; the
    attention module's second output is the pattern) and ``hook_result`` (each head's
    ``hook_z``, the input of ``out_proj``, times its ``W_O``; ``kind`` ``write`` where
    processing centres ``W_O``, ``plain`` in RMSNorm maps)."""
    return {
        "attn.hook_attn_scores": Site(attn, "output", index=1, derive="scores",
                                      writable=False, requires=EAGER),
        "attn.hook_result": Site(out_proj, "input", kind=kind, layout="heads",
                                 derive="result", writable=False, tl_flag="use_attn_result"),
    }


def flag_off(site: Site, cfg: Any) -> str | None:
    """The TransformerLens config flag ``site`` needs when ``cfg`` (a ``HookedTransformer``
    or ``TransformerBridge`` config) has it off; None when the hook runs."""
    return site.tl_flag if site.tl_flag and not getattr(cfg, site.tl_flag, False) else None


def flag_message(name: str, flag: str) -> str:
    """Why a TransformerLens model does not run hook ``name``, and how to turn it on."""
    return (f"hook {name!r} runs in TransformerLens only with cfg.{flag}=True, and this "
            f"model has it off. Call model.set_{flag}(True) on the HookedTransformer or "
            "TransformerBridge (then wrap it again), or read the hook on the Hugging Face "
            "model, where saebridge computes it.")
