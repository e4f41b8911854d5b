"""Raw Hugging Face models through torch forward hooks and pre-hooks.

Sites come from the architecture's hook map (data). Several canonical hooks can share a
module (``q/k/v`` are thirds of ``c_attn``'s output); they are applied in the map's order.
Every handle is removed in ``finally``, so a forward that raises leaves no hook behind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from saebridge.backends import SiteFn
from saebridge.errors import UnknownHookError, UnsupportedArchitectureError
from saebridge.hookmap import hook_map, names, resolve
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.layout import LAYOUTS
from saebridge.hookmap.site import Kind, Site
from saebridge.hookmap.space import HF
from saebridge.kernel.layout import Location, apply_at

Tensor = torch.Tensor


class HFAdapter:
    """Adapter for a ``transformers`` causal LM whose architecture has a hook map."""

    backend = "hf"
    space = HF

    def __init__(self, model: nn.Module, tokenizer: Any | None = None) -> None:
        config = model.config
        arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        self.model, self.tokenizer, self.map = model, tokenizer, hook_map(arch)
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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _eager(self) -> bool:
        return self._attn() == "eager"

    def _attn(self) -> str:
        return str(getattr(self.model.config, "_attn_implementation", "eager"))

    def _available(self, site: Site) -> bool:
        return site.requires is None or self._eager()

    def hook_names(self) -> list[str]:
        return [n for n in names(self.map, self.n_layers)
                if self._available(resolve(self.map, n, self.n_layers))]

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
        if self._stats is None and self.map.tl_weights is not None:
            sd = {k: v.detach() for k, v in self.model.state_dict().items()}
            self._stats = RawStats.from_tl_weights(self.map.tl_weights(sd, self.n_heads))
        return self._stats

    def locate(self, name: str) -> Location:
        """Where hook ``name`` lives: the hook map's :class:`Site`, with the model's prefix
        and head sizes (raises UnknownHookError for names this model lacks)."""
        site, prefix = self.site(name), self.prefix
        return Location(prefix + site.module, site.io, site.index, site.arg, site.kwarg,
                        LAYOUTS[site.layout], self.n_heads, self.d_head,
                        None if site.residual_from is None else prefix + site.residual_from,
                        site.writable)

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


def _current(current: dict[str, SiteFn], name: str) -> SiteFn:
    return lambda x: current[name](x)


def _stash_input(path: str, stash: dict[str, Tensor]):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        stash[path] = args[0] if args else kwargs["hidden_states"]
    return hook
