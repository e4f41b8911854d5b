"""Any ``nn.Module`` through a hook map the user supplies (no architecture registry needed).

The way OpenAI's Transformer Debugger wraps its own model in a ``ModelContext``: the user
names, for each canonical TransformerLens hook they want, the module and tensor that
carries it (:class:`~saebridge.hookmap.site.HookSpec`); the same torch-hook machinery as
the HF adapter applies edits there, and every hook is removed after each forward.

Here the module is the tiny GPT-2 seen as a plain ``nn.Module``:

>>> import saebridge as sb
>>> from saebridge.tiny import tiny_gpt2
>>> my_transformer, tokenizer = tiny_gpt2()
>>> model = sb.wrap(my_transformer, tokenizer=tokenizer, hookmap={
...     "blocks.0.hook_resid_pre": sb.HookSpec("transformer.h.0", io="input"),
...     "blocks.0.attn.hook_z": sb.HookSpec("transformer.h.0.attn.c_proj", io="input",
...                                         reshape=(4, 16)),
... })
>>> model.backend, model.hook_names()
('module', ['blocks.0.hook_resid_pre', 'blocks.0.attn.hook_z'])
>>> logits, cache = model.run_with_cache(model.to_tokens("Hello world"))
>>> cache["blocks.0.attn.hook_z"].shape  # [batch, pos, head, d_head]
torch.Size([1, 6, 4, 16])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from saebridge.adapters.hf import HFAdapter
from saebridge.backends import SiteFn
from saebridge.errors import (
    ArgumentTypeError,
    OptionError,
    ShapeError,
    UnknownHookError,
    unknown,
)
from saebridge.hookmap import canonical_names, split
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.site import HookSpec, Kind, Site
from saebridge.hookmap.space import HF

Tensor = torch.Tensor


class ModuleAdapter(HFAdapter):
    """Adapter for a home-made ``nn.Module`` with a user-supplied hook map.

    Args:
        model: the module; called as ``forward(model, tokens_BP)`` (default
            ``model(tokens_BP)``), returning logits, or an object with ``.logits``, or a
            tuple whose first element is the logits.
        hookmap: canonical TransformerLens name → :class:`HookSpec`.
        tokenizer: for text input (optional).
        d_vocab: vocabulary size (default: the first ``nn.Embedding``'s rows).
    """

    backend = "module"
    space = HF
    generate = None  # type: ignore[assignment]  # no model.generate(): the front loops run()

    def __init__(self, model: nn.Module, hookmap: Mapping[str, HookSpec],
                 tokenizer: Any | None = None, d_vocab: int | None = None,
                 forward: Callable[[nn.Module, Tensor], Any] | None = None) -> None:
        self.model, self.tokenizer, self.model_name = model, tokenizer, None
        self._modules = dict(model.named_modules())
        self.prefix = ""
        self._forward = forward or (lambda module, tokens: module(tokens))
        known = canonical_names()
        sites: dict[str, Site] = {}
        for name, spec in hookmap.items():
            if not isinstance(spec, HookSpec):
                raise ArgumentTypeError(f"hookmap[{name!r}] is a {type(spec).__name__}; pass a "
                                f"saebridge.HookSpec(path, io=..., index=..., reshape=...).")
            rel = split(name)[1]
            if rel not in known:
                raise UnknownHookError(unknown(
                    f"canonical hook name {name!r}: hook", rel, known,
                    "Keys are TransformerLens hook names: 'blocks.{L}.' and one of these "
                    "inside a block, e.g. 'blocks.0.hook_resid_pre', or 'hook_embed'."))
            if spec.path not in self._modules:
                raise UnknownHookError(unknown(
                    "module path", spec.path, [n for n in self._modules if n],
                    f"hookmap[{name!r}].path must name a submodule (model.named_modules())."))
            sites[name] = spec.to_site()
        self._sites = sites
        heads = {spec.reshape for spec in hookmap.values() if spec.reshape}
        d_heads = {d for _, d in heads}
        if len(d_heads) > 1:
            raise ShapeError(f"reshape specs {sorted(heads)} disagree on d_head; every "
                             "per-head site of one model splits into heads of one size.")
        self.d_head = d_heads.pop() if d_heads else 0
        self.n_heads = max((h for h, _ in heads), default=0)
        layers = [split(n)[0] for n in sites]
        self.n_layers = 1 + max((la for la in layers if la is not None), default=-1)
        if d_vocab is None:
            embed = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
            if embed is None:
                raise OptionError("cannot tell the vocabulary size of this module (it has no "
                                 "nn.Embedding); pass sb.wrap(model, hookmap=..., d_vocab=N).")
            d_vocab = embed.num_embeddings
        self.d_vocab = int(d_vocab)

    def hook_names(self) -> list[str]:
        return self._order()

    def _order(self) -> list[str]:
        def key(name: str) -> tuple[int, int]:
            layer = split(name)[0]
            # embeddings first, then blocks in order, then the rest (e.g. ln_final); a
            # block's sites keep the order the user listed them in.
            return (-1 if layer is None and "embed" in name else
                    layer if layer is not None else self.n_layers), order[name]

        order = {n: i for i, n in enumerate(self._sites)}
        return sorted(self._sites, key=key)

    def site(self, name: str) -> Site:
        if name not in self._sites:
            raise UnknownHookError(unknown(
                "hook", name, self._sites,
                "This model's hooks are the ones its hookmap names; add a HookSpec for it."))
        return self._sites[name]

    def kind(self, name: str) -> Kind:
        return self.site(name).kind

    def writable(self, name: str) -> bool:
        return self.site(name).writable

    def raw_stats(self) -> RawStats | None:
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def run(self, tokens_BP: Tensor, edits: Mapping[str, SiteFn]) -> Tensor:
        def call() -> Tensor:
            out = self._forward(self.model, tokens_BP)
            if hasattr(out, "logits"):
                return out.logits
            return out[0] if isinstance(out, tuple) else out
        return self._hooked(edits, call)
