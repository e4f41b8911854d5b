"""Raw Hugging Face models through torch forward hooks and pre-hooks.

Sites come from the architecture's hook map (data). Several canonical hooks can share a
module (``q/k/v`` are thirds of ``c_attn``'s output); they are applied in the map's order.
Every handle is removed in ``finally``, so a forward that raises leaves no hook behind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from saebridge.backends import SiteFn
from saebridge.errors import UnknownHookError, UnsupportedArchitectureError
from saebridge.hookmap import hook_map, names, resolve
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.layout import LAYOUTS
from saebridge.hookmap.site import Kind, Site
from saebridge.hookmap.space import HF

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

    def _module(self, path: str) -> nn.Module:
        return self._modules[self.prefix + path]

    def run(self, tokens_BP: Tensor, edits: Mapping[str, SiteFn]) -> Tensor:
        return self._hooked(edits, lambda: self.model(input_ids=tokens_BP, use_cache=False).logits)

    def generate(self, tokens_BP: Tensor, edits_for: Callable[[Tensor], Mapping[str, SiteFn]],
                 max_new_tokens: int) -> Tensor:
        """Greedy tokens from the model's ``generate`` with the hooks in place (no KV cache,
        no stop at EOS); a pre-hook on the model plans each forward from its tokens."""
        current: dict[str, SiteFn] = dict(edits_for(tokens_BP))

        def plan(module: nn.Module, args: tuple, kwargs: dict) -> None:
            current.clear()
            current.update(edits_for(kwargs["input_ids"] if "input_ids" in kwargs else args[0]))

        config: Any = self.model.generation_config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        handle = self.model.register_forward_pre_hook(plan, with_kwargs=True, prepend=True)
        try:
            model: Any = self.model
            return self._hooked({name: _current(current, name) for name in current},
                                lambda: model.generate(
                                    input_ids=tokens_BP, attention_mask=torch.ones_like(tokens_BP),
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    use_cache=False, eos_token_id=None, pad_token_id=pad or 0))
        finally:
            handle.remove()

    def _hooked(self, edits: Mapping[str, SiteFn], call: Callable[[], Any]) -> Any:
        """``call()`` with ``edits`` hooked in; every hook is removed afterwards."""
        order = {n: i for i, n in enumerate(self._order())}
        groups: dict[tuple[str, str], list[tuple[str, Site]]] = {}
        for name in sorted(edits, key=order.__getitem__):
            site = self.site(name)
            groups.setdefault((site.module, site.io), []).append((name, site))
        stash: dict[str, Tensor] = {}
        handles = []
        try:
            for (module, io), group in groups.items():
                fns = [(n, s, edits[n]) for n, s in group]
                mod = self._module(module)
                if io == "output":
                    handles.append(mod.register_forward_hook(self._output_hook(fns, stash)))
                else:
                    handles.append(mod.register_forward_pre_hook(
                        self._input_hook(fns), with_kwargs=True))
            # Registered last so they see inputs after any edit at the same module.
            for path in {s.residual_from for g in groups.values() for _, s in g
                         if s.residual_from is not None}:
                handles.append(self._module(path).register_forward_pre_hook(
                    _stash_input(path, stash), with_kwargs=True))
            return call()
        finally:
            for handle in handles:
                handle.remove()

    def _order(self) -> list[str]:
        """Every canonical name in execution order (edits at one module run in this order)."""
        return names(self.map, self.n_layers)

    def _apply(self, t: Tensor, site: Site, fn: SiteFn, stash: dict[str, Tensor],
               module: nn.Module) -> Tensor:
        layout = LAYOUTS[site.layout]
        view = layout.read(t, self.n_heads, module, self.d_head)
        residual = stash[site.residual_from] if site.residual_from else None
        if residual is not None:
            view = view + residual
        new = fn(view)
        if new is view or not site.writable:
            return t
        if residual is not None:
            new = new - residual
        return layout.write(t, new, module)

    def _output_hook(self, fns: list[tuple[str, Site, SiteFn]], stash: dict[str, Tensor]):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            for _, site, fn in fns:
                if site.index is None:
                    output = self._apply(output, site, fn, stash, module)
                else:
                    items = list(output)
                    items[site.index] = self._apply(items[site.index], site, fn, stash, module)
                    output = type(output)(items) if isinstance(output, tuple) else items
            return output
        return hook

    def _input_hook(self, fns: list[tuple[str, Site, SiteFn]]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            for _, site, fn in fns:
                if len(args) > site.arg:
                    args = (*args[:site.arg], self._apply(args[site.arg], site, fn, {}, module),
                            *args[site.arg + 1:])
                else:
                    kwargs = {**kwargs, site.kwarg: self._apply(kwargs[site.kwarg], site, fn, {},
                                                               module)}
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
