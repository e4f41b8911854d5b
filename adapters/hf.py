"""Raw Hugging Face models through torch forward hooks and pre-hooks.

Sites come from the architecture's hook map (data). Several canonical hooks can share a
module (``q/k/v`` are thirds of ``c_attn``'s output); they are applied in the map's order.
Every handle is removed in ``finally``, so a forward that raises leaves no hook behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from saebridge.adapters import derived
from saebridge.adapters.weights import WeightReader, lazy_raw_stats
from saebridge.backends import SiteFn
from saebridge.errors import UnknownHookError, UnsupportedArchitectureError
from saebridge.hookmap import hook_map, names, resolve, split
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.layout import LAYOUTS
from saebridge.hookmap.registry import architectures
from saebridge.hookmap.site import EAGER, HookMap, Kind, Site
from saebridge.hookmap.space import CANONICAL, HF
from saebridge.kernel.layout import Layout, Location, apply_at, gain_bias

Tensor = torch.Tensor


def hf_architecture(model: nn.Module) -> str:
    """The HF architecture name of ``model``: ``config.architectures[0]``, or its class name
    where the config lists none (a model built from a config, ``GPT2LMHeadModel(config)``,
    has ``architectures=None`` until it is saved and loaded).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> hf_architecture(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2)))
    'GPT2LMHeadModel'
    """
    listed = getattr(getattr(model, "config", None), "architectures", None)
    return str(listed[0]) if listed else type(model).__name__


class HFAdapter:
    """Adapter for a ``transformers`` causal LM whose architecture has a hook map."""

    backend = "hf"
    space = HF

    def __init__(self, model: nn.Module, tokenizer: Any | None = None) -> None:
        config = model.config
        arch = hf_architecture(model)
        self.model, self.tokenizer, self.map = model, tokenizer, known_map(arch)
        self.model_name: str | None = getattr(config, "_name_or_path", None) or None
        c = self.map.config
        self.n_layers = int(getattr(config, c["n_layers"]))
        self.n_heads = int(getattr(config, c["n_heads"]))
        # q/k/v/z split by d_head: grouped-query k/v have fewer heads than q.
        self.d_head = int(getattr(config, c.get("d_head", ""), None)
                          or getattr(config, c["d_model"]) // self.n_heads)
        self.map.check_config(config)
        refuse_bridged(model)
        self.d_vocab = int(getattr(config, c["d_vocab"]))
        modules = dict(model.named_modules())
        probe = next(s for s in self.map.block.values() if isinstance(s, Site)).at(0).module
        prefix = next((p for p in self.map.prefixes if p + probe in modules), None)
        if prefix is None:
            raise UnknownHookError(
                f"{type(model).__name__} has no module {probe!r} under any of the prefixes "
                f"{self.map.prefixes} of the {arch} hook map; the model's layout is not the "
                "one the map describes. Pass an unmodified transformers model.")
        self.prefix: str = prefix
        if self.map.norms_removed(modules, prefix):  # LayerNorm-free: nothing is centred
            self.map = self.map.without_norms()
        self._modules = modules
        self._stats: RawStats | None = None
        self.weights = WeightReader(model, modules)
        """Reads weights wherever accelerate put them (offloaded ones through its
        weights map), one at a time."""
        self.weights.check()
        self._norms: dict[str, Unnorm] = {}
        self._copies: dict[str, Tensor] = {}  # offloaded weights read for derived hooks

    @property
    def device(self) -> torch.device:
        """Where tokens go: the device the embedding computes on (a dispatched model's
        first device; ``meta`` for a model kept there to run remotely)."""
        found = self.weights.device(self.prefix + self.site("hook_embed").module)
        return found if found is not None else next(self.model.parameters()).device

    def device_of(self, name: str) -> torch.device:
        """The device hook ``name`` computes on (per layer in a dispatched model): load an
        SAE there to run it without copying activations (``sae.to(...)``)."""
        return self.weights.device(self.locate(name).path) or self.device

    def _eager(self) -> bool:
        return self._attn() == "eager"

    def _attn(self) -> str:
        return str(getattr(self.model.config, "_attn_implementation", "eager"))

    def _available(self, site: Site) -> bool:
        # Eager attention is switched to for the runs that read it (adapters/derived.py).
        return site.requires in (None, EAGER) or self._eager()

    def hook_names(self) -> list[str]:
        """Every hook a full cache holds; hooks TransformerLens runs only under a config
        flag (``Site.tl_flag``) are produced when asked for by name, as with the flag on."""
        sites = {n: resolve(self.map, n, self.n_layers) for n in names(self.map, self.n_layers)}
        return [n for n, s in sites.items() if s.tl_flag is None and self._available(s)]

    def site(self, name: str) -> Site:
        site = resolve(self.map, name, self.n_layers)
        if not self._available(site):
            raise UnknownHookError(
                f"hook {name!r} needs the model loaded with {site.requires}; this model uses "
                f"{self._attn()!r} attention. Reload it with "
                f"{site.requires} to read this hook.")
        return site

    def kind(self, name: str) -> Kind:
        return self.site(name).kind

    def writable(self, name: str) -> bool:
        return self.site(name).writable

    def raw_stats(self) -> RawStats | None:
        """Constants of the weights, each layer's computed on first use from that layer's
        weights alone, on its device (dispatched and offloaded models included)."""
        if self._stats is None and self.map.tl_weights is not None:
            blocks = [self.prefix + self.site(f"blocks.{i}.hook_resid_post").module
                      for i in range(self.n_layers)]
            embeds = [self.prefix + s.module for s in self.map.before_blocks.values()
                      if isinstance(s, Site)]
            self._stats = lazy_raw_stats(self.weights, self.map.tl_weights, self.n_heads,
                                         blocks, embeds)
        return self._stats

    def locate(self, name: str) -> Location:
        """Where hook ``name`` lives: the hook map's :class:`Site`, with the model's prefix
        and head sizes (raises UnknownHookError for names this model lacks)."""
        site, prefix = self.site(name), self.prefix
        layout, unnorm = LAYOUTS[site.layout], None
        if layout.unnorm is not None and self.weights.dispatched:
            # An offloaded norm's weights are back on meta when its output hook runs: undo
            # its gain and bias with copies read once through accelerate's weights map.
            layout, unnorm = Layout(), self._unnorm(prefix + site.module, layout.unnorm)
        if site.derive is not None:  # computed from this module's tensor, read-only
            path = prefix + site.module
            weight = partial(self._weight, path) if self.weights.dispatched else None
            unnorm = derived.converter(site, self._modules[path], self.n_heads,
                                       self._n_kv_heads(), self._value_offset(name), weight)
        return Location(prefix + site.module, site.io, site.index, site.arg, site.kwarg,
                        layout, self.n_heads, self.d_head,
                        None if site.residual_from is None else prefix + site.residual_from,
                        site.writable, unnorm)

    def _n_kv_heads(self) -> int:
        return int(getattr(self.model.config, "num_key_value_heads", None) or self.n_heads)

    def _value_offset(self, name: str) -> Callable[[], Tensor | float]:
        """What the canonical space removes from ``hook_z`` at ``name``'s layer (its
        ``hook_result`` is computed from ``hook_z`` in that space)."""
        layer = split(name)[0]

        def offset() -> Tensor | float:
            stats = self.raw_stats()
            return 0.0 if stats is None or layer is None else \
                stats.value_offset(layer, CANONICAL, self.n_heads)
        return offset

    def _attention_switch(self, edits: Mapping[str, SiteFn]) -> Any:
        """Eager attention for a run reading scores or patterns (restored afterwards)."""
        sites = {n: self.site(n) for n in edits}
        if not any(s.requires == EAGER for s in sites.values()):
            return contextlib.nullcontext()
        return derived.eager_attention(self.model, [
            self._modules[self.prefix + s.module] for s in sites.values()
            if s.derive in ("scores", "rot_q", "rot_k")])

    def _weight(self, path: str) -> Tensor:
        """``path``'s weight read once through accelerate's weights map (offloaded)."""
        key = path + ".weight"
        if key not in self._copies:
            self._copies[key] = self.weights[key]
        return self._copies[key]

    def _unnorm(self, path: str, kind: str) -> Unnorm:
        if path not in self._norms:
            bias = self.weights[path + ".bias"] if kind == "affine" else None
            self._norms[path] = Unnorm(*gain_bias(_Norm(self.weights[path + ".weight"], bias),
                                                  kind))
        return self._norms[path]

    call_kwargs: ClassVar[dict[str, Any]] = {"use_cache": False}
    """What every forward passes besides the tokens (no KV cache: one pass, every hook)."""

    def generate_call(self, tokens_BP: Tensor, n_new: int
                      ) -> tuple[Callable[..., Tensor], dict[str, Any]]:
        """The model's ``generate``, greedy, no KV cache, no stop at EOS, and its kwargs."""
        config: Any = self.model.generation_config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        model: Any = self.model
        return model.generate, dict(
            attention_mask=torch.ones_like(tokens_BP), max_new_tokens=n_new, do_sample=False,
            use_cache=False, eos_token_id=None, pad_token_id=pad or 0)

    def run(self, tokens_BP: Tensor, edits: Mapping[str, SiteFn]) -> Tensor:
        return self._hooked(edits, lambda: self.model(input_ids=tokens_BP, **self.call_kwargs
                                                      ).logits)

    def generate(self, tokens_BP: Tensor, edits_for: Callable[[Tensor], Mapping[str, SiteFn]],
                 max_new_tokens: int) -> Tensor:
        """Greedy tokens from the model's ``generate`` with the hooks in place (no KV cache,
        no stop at EOS); a pre-hook on the model plans each forward from its tokens."""
        current: dict[str, SiteFn] = dict(edits_for(tokens_BP))

        def plan(module: nn.Module, args: tuple, kwargs: dict) -> None:
            current.clear()
            current.update(edits_for(kwargs["input_ids"] if "input_ids" in kwargs else args[0]))

        call, kwargs = self.generate_call(tokens_BP, max_new_tokens)
        handle = self.model.register_forward_pre_hook(plan, with_kwargs=True, prepend=True)
        try:
            return self._hooked({name: _current(current, name) for name in current},
                                lambda: call(input_ids=tokens_BP, **kwargs))
        finally:
            handle.remove()

    def _hooked(self, edits: Mapping[str, SiteFn], call: Callable[[], Any]) -> Any:
        """``call()`` with ``edits`` hooked in; every hook is removed afterwards."""
        order = {n: i for i, n in enumerate(self._order())}
        groups: dict[tuple[str, str], list[tuple[Location, SiteFn]]] = {}
        for name in sorted(edits, key=order.__getitem__):
            loc = self.locate(name)
            groups.setdefault((loc.path, loc.side), []).append((loc, edits[name]))
        stash: dict[str, Tensor] = {}
        handles = []
        try:
            for (path, side), views in groups.items():
                mod = self._modules[path]
                if side == "output":
                    handles.append(mod.register_forward_hook(_output_hook(views, stash)))
                else:
                    handles.append(mod.register_forward_pre_hook(
                        _input_hook(views), with_kwargs=True))
            # Registered last so they see inputs after any edit at the same module.
            for path in {loc.residual for views in groups.values() for loc, _ in views
                         if loc.residual is not None}:
                handles.append(self._modules[path].register_forward_pre_hook(
                    _stash_input(path, stash), with_kwargs=True))
            with self._attention_switch(edits):
                return call()
        finally:
            for handle in handles:
                handle.remove()

    def _order(self) -> list[str]:
        """Every canonical name in execution order (edits at one module run in this order)."""
        return names(self.map, self.n_layers)


def _output_hook(views: list[tuple[Location, SiteFn]], stash: dict[str, Tensor]):
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        for loc, fn in views:
            items = list(output) if loc.index is not None else [output]
            residual = stash[loc.residual] if loc.residual is not None else None
            new = apply_at(loc, items[loc.index or 0], fn, residual, module)
            if new is None:
                continue
            if loc.index is None:
                output = new
            else:
                items[loc.index] = new
                output = type(output)(items) if isinstance(output, tuple) else items
        return output
    return hook


def _input_hook(views: list[tuple[Location, SiteFn]]):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for loc, fn in views:
            positional = len(args) > loc.arg
            t = args[loc.arg] if positional else kwargs[loc.kwarg]  # type: ignore[index]
            new = apply_at(loc, t, fn, None, module)
            if new is None:
                continue
            if positional:
                args = (*args[:loc.arg], new, *args[loc.arg + 1:])
            else:
                kwargs = {**kwargs, loc.kwarg: new}  # type: ignore[dict-item]
        return args, kwargs
    return hook


def known_map(arch: str) -> HookMap:
    """The hook map of HF architecture ``arch``.

    Raises:
        UnsupportedArchitectureError: listing every supported architecture and the two ways
            to use another one (a custom hook map for this model, or a registered one).
    """
    try:
        return hook_map(arch)
    except UnsupportedArchitectureError as err:
        supported = sorted({a for arch_ in architectures() for a in arch_.hook_map.architectures})
        raise UnsupportedArchitectureError(
            f"saebridge has no hook map for architecture {arch!r}. Supported: "
            f"{', '.join(supported)}. For another architecture pass a custom hook map for "
            "this model: sb.wrap(model, hookmap={'blocks.0.hook_resid_post': "
            "sb.HookSpec('model.layers.0', io='output'), ...}), naming each canonical hook "
            "you use; or register a full one with saebridge.hookmap.register() "
            "(CONTRIBUTING.md: adding an architecture).") from err


def refuse_bridged(model: nn.Module) -> None:
    """Refuse an HF model that a TransformerLens ``TransformerBridge`` was built around.

    Building a bridge replaces the model's modules in place with bridge components (GPT-2's
    ``c_attn`` becomes separate q/k/v), and ``enable_compatibility_mode()`` then rewrites
    its weights in place (LayerNorm folded, writing weights centred), so its hooks and
    numbers are no longer the HF model's.

    Raises:
        UnsupportedArchitectureError: naming the replaced module and what to do instead.
    """
    for name, module in model.named_modules():
        if type(module).__module__.startswith("transformer_lens.model_bridge"):
            raise UnsupportedArchitectureError(
                f"this {type(model).__name__} was processed in place by a TransformerLens "
                f"TransformerBridge: its module {name!r} is now a "
                f"{type(module).__name__}, and if enable_compatibility_mode() ran, its "
                "weights were folded and centred too, so it no longer computes the HF "
                "model's activations. Wrap the bridge instead (sb.wrap(bridge)), or reload "
                "the HF model; build bridges with saebridge.adapters.tl_bridge.bridge_from_hf"
                "(hf_model), which works on a copy.")


class _Norm(NamedTuple):
    weight: Tensor
    bias: Tensor | None


class Unnorm(NamedTuple):
    """Undoes a norm's gain and bias (a :class:`Location`'s ``convert``): what the
    ``unnorm`` layouts do, with the weights held here instead of read off the module."""

    gain: Tensor | float
    bias: Tensor | float

    def convert(self, x: Tensor) -> Tensor:
        return (x - self.bias) / self.gain

    def revert(self, x: Tensor) -> Tensor:
        return x * self.gain + self.bias


def _current(current: dict[str, SiteFn], name: str) -> SiteFn:
    return lambda x: current[name](x)


def _stash_input(path: str, stash: dict[str, Tensor]):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        stash[path] = args[0] if args else kwargs["hidden_states"]
    return hook
