"""nnsight models: ``LanguageModel``/``TransformersModel``/``NNsight`` over a Hugging Face model,
and ``NNsight`` over a TransformerLens ``HookedTransformer`` (:class:`UnifiedTransformer`,
the role of the class nnsight removed in 0.4, lives in :mod:`.nnsight_tl`) or
``TransformerBridge``.

Every run is an nnsight trace. Facts of nnsight 0.8 it is built on: the body of a
``with model.trace(...)`` runs from its source in a worker, interleaved with the forward;
``.output``/``.inputs`` are the real values (a module output may be a tuple: GPT-2's
attention returns one); a location must be requested in the order the model reaches it
(else ``OutOfOrderError``), so the sites of a run are visited in the order a probe forward
(on fake tensors, no compute) found; a location reached several times per forward
(TransformerLens calls ``ln1`` three times) or once per generated token is visited at each
occurrence through ``tracer.iter``. The site data comes from the wrapped model's own
adapter (the HF hook map, or TransformerLens hook points, which are modules and so
envoys: a bridge's aliases resolve to its own hook-point modules, with their shape
conversions); the code that runs inside the trace is :mod:`.nnsight_remote`, and
:mod:`.nnsight_plan` compiles interventions to it for remote runs and ``sb.splice``.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import torch
from nnsight import save

from saebridge.adapters.nnsight_remote import forward, generate
from saebridge.adapters.nnsight_tl import UnifiedTransformer
from saebridge.backends import SiteFn, build
from saebridge.errors import UnknownHookError, UnsupportedArchitectureError
from saebridge.generate import greedy
from saebridge.hookmap import split
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.layout import LAYOUTS, Layout
from saebridge.hookmap.site import Kind

Tensor = torch.Tensor
Visits = list[tuple[str, str, int, list, str | None]]

_PROBES: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str], tuple[int, int]]] = (
    weakref.WeakKeyDictionary())
_LAYOUT_FIELDS = ("part", "heads", "interleaved", "unnorm")
FLAVOURS = {"hf": "hf", "transformer_lens": "tl", "transformer_bridge": "bridge"}
"""The wrapped model's backend → the nnsight adapter's flavour (``backend`` nnsight-…)."""


def _is(obj: object, class_path: str) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" == class_path for c in type(obj).__mro__)


class NNsightAdapter:
    """Adapter for an nnsight envoy over an HF model or a HookedTransformer.

    ``remote`` (``True``, ``"local"``, an NDIF host URL, or an nnsight ``Backend``) makes
    :func:`saebridge.wrap` return a front whose runs execute as remote requests (see
    :mod:`saebridge.adapters.nnsight_plan`).
    """

    def __init__(self, envoy: Any, tokenizer: Any | None = None,
                 remote: bool | str | Any = False) -> None:
        self.envoy = envoy
        if tokenizer is None:
            tokenizer = getattr(envoy, "tokenizer", None)
        self.inner = build(envoy._module, tokenizer=tokenizer)
        if self.inner.backend not in FLAVOURS:
            raise UnsupportedArchitectureError(
                f"nnsight over a {self.inner.backend} model is not supported; wrap a Hugging "
                "Face model, a HookedTransformer or a TransformerBridge in nnsight, or pass the "
                "model itself.")
        self.flavour = FLAVOURS[self.inner.backend]
        self.backend = f"nnsight-{self.flavour}"
        self.space, self.tokenizer = self.inner.space, self.inner.tokenizer
        self.d_vocab, self.n_layers = self.inner.d_vocab, self.inner.n_layers
        self.model_name = self.inner.model_name
        self.remote = remote
        if remote is not False:
            from saebridge.adapters.nnsight_plan import RemoteModel

            self.front = RemoteModel
        self._when = _probe(envoy, self.flavour, self.inner.device)
        self._paths = {id(module): path for path, module in envoy._module.named_modules()}

    # ---- the Adapter protocol ---------------------------------------------------------

    @property
    def device(self) -> torch.device:
        device = self.inner.device
        # A model kept on the meta device runs remotely; its tokens stay here.
        return torch.device("cpu") if device.type == "meta" else device

    def hook_names(self) -> list[str]:
        return [n for n in self.inner.hook_names() if self.location(n)[:2] in self._when]

    def kind(self, name: str) -> Kind:
        return self.inner.kind(name)

    def writable(self, name: str) -> bool:
        return self.inner.writable(name)

    def raw_stats(self) -> RawStats | None:
        return self.inner.raw_stats()

    def run(self, tokens_BP: Tensor, edits: Mapping[str, SiteFn]) -> Tensor:
        visits, envoy = self.visits(self.site_fns(edits)), self.envoy
        with envoy.trace(tokens_BP, **self.forward_kwargs()) as tracer:
            logits = save(forward(tracer, envoy, visits))
        return logits

    def generate(self, tokens_BP: Tensor, edits_for: Callable[[Tensor], Mapping[str, SiteFn]],
                 max_new_tokens: int) -> Tensor:
        """Greedy tokens ``[batch, pos + max_new_tokens]`` from the model's own ``generate``
        (no KV cache, no stop at EOS); ``edits_for(tokens)`` gives each forward's edits."""
        def plan(tokens: Tensor) -> Visits:
            return self.visits(self.site_fns(edits_for(tokens)))

        plan(tokens_BP)  # unknown hooks fail before the run
        envoy = self.envoy
        call, kwargs = self.generate_call(tokens_BP, max_new_tokens)
        with envoy.trace(tokens_BP, fn=call, **kwargs) as tracer:
            tracked = save(generate(tracer, envoy, plan, tokens_BP, max_new_tokens))
            result = save(tracer.result)
        return check_generated(result, tracked)

    # ---- sites --------------------------------------------------------------------------

    def location(self, name: str) -> tuple[str, str, tuple]:
        """``(envoy path, io, view)`` of a canonical hook; the view is a kernel view less fn."""
        if self.flavour != "hf":  # TransformerLens hook points are modules: their output
            self.inner.kind(name)  # unknown names fail with the nearest ones listed
            path = name if self.flavour == "tl" else self._paths[id(
                self.envoy._module.hook_dict[name])]  # a bridge's aliases resolve to modules
            return path, "output", (None, 0, None, (None, False, False, None, 0, None), None,
                                    self.inner.writable(name))
        inner: Any = self.inner  # an HFAdapter: its hook map's Site data, not its hooks
        site, prefix = inner.site(name), inner.prefix
        residual = None if site.residual_from is None else prefix + site.residual_from
        layout = kernel_layout(LAYOUTS[site.layout], inner.n_heads, inner.d_head)
        return (prefix + site.module, site.io,
                (site.index, site.arg, site.kwarg, layout, residual, site.writable))

    def visits(self, fns: Mapping[str, Any]) -> Visits:
        """The locations of ``fns``' hooks in execution order, each with its views."""
        rank = {n: i for i, n in enumerate(self.inner.hook_names())}
        groups: dict[tuple[str, str], list] = {}
        stashed: set[str] = set()
        for name in sorted(fns, key=lambda n: rank.get(n, -1)):
            path, io, view = self.location(name)
            self._check_reached(name, path, io)
            groups.setdefault((path, io), []).append((*view, fns[name]))
            if view[4] is not None:
                stashed.add(view[4])
        for path in stashed:
            groups.setdefault((path, "input"), [])
        order = sorted(groups, key=lambda loc: self._when[loc][0])
        return [(path, io, self._when[(path, io)][1], groups[(path, io)],
                 "hidden_states" if io == "input" and path in stashed else None)
                for path, io in order]

    def site_fns(self, edits: Mapping[str, SiteFn]) -> Mapping[str, SiteFn]:
        """What runs at each hook: as given, except that a bridge's ``hook_resid_mid`` (the
        input of ``ln2``, not the residual the block adds to) carries an edit on to the block
        output, as its own adapter does."""
        if self.flavour != "bridge":
            return edits
        from saebridge.adapters.tl_bridge import _resid_mid_writer, _resid_post_fixer

        hooks = self.envoy._module.hook_dict
        # A bridge hook point's own conversion (e.g. z flat -> [heads, d_head]) applies when
        # TransformerLens runs hooks on it; nnsight sees the module's raw output.
        fns = {name: _converted(fn, hooks[name].hook_conversion)
               if hooks[name].hook_conversion is not None else fn for name, fn in edits.items()}
        deltas = dict[int, Tensor]()
        for name in [n for n in fns if split(n)[1] == "hook_resid_mid"]:
            layer = int(split(name)[0] or 0)
            fns[name] = _resid_mid_writer(fns[name], deltas, layer)
            post = f"blocks.{layer}.hook_resid_post"
            fns[post] = _resid_post_fixer(fns.get(post), deltas, layer)
        return fns

    def _check_reached(self, name: str, path: str, io: str) -> None:
        if (path, io) not in self._when:
            raise UnknownHookError(
                f"hook {name!r} ({path or 'the model'} {io}) is never reached in a forward "
                f"of this {self.backend} model. Pick a hook from model.hook_names().")

    # ---- how the model is called ------------------------------------------------------------

    def forward_kwargs(self) -> dict[str, Any]:
        return {"use_cache": False} if self.flavour == "hf" else {}

    def generate_call(self, tokens_BP: Tensor, n_new: int
                      ) -> tuple[Callable[..., Tensor], dict[str, Any]]:
        """What a traced generation calls: greedy, no KV cache, no stop at EOS. HF: nnsight's
        or the model's ``generate``; TransformerLens: :func:`saebridge.generate.greedy`,
        since its own ``generate`` embeds tokens outside ``hook_embed``."""
        module = self.envoy._module
        if self.flavour != "hf":
            def call(tokens: Tensor, max_new_tokens: int) -> Tensor:
                return greedy(module, tokens, max_new_tokens)
            return call, {"max_new_tokens": n_new}
        config = module.generation_config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        kwargs: dict[str, Any] = dict(max_new_tokens=n_new, do_sample=False, use_cache=False,
                                      eos_token_id=None, pad_token_id=pad or 0)
        if _is(self.envoy, "nnsight.modeling.transformers.TransformersModel"):
            # Its own generate, as `with lm.generate(...)` runs it (a remote request then
            # names nnsight's method, not transformers').
            return inspect.unwrap(type(self.envoy).generate).__get__(self.envoy), kwargs
        kwargs["attention_mask"] = torch.ones_like(tokens_BP)  # a plain NNsight passes it on
        return module.generate, kwargs


def _converted(fn: SiteFn, conversion: Any) -> SiteFn:
    def site(x: Tensor) -> Tensor:
        view = conversion.convert(x)
        new = fn(view)
        return x if new is view else conversion.revert(new)
    return site


def kernel_layout(layout: Layout, n_heads: int, d_head: int | None) -> tuple:
    """A hook-map layout as the kernel's ``(part, heads, interleaved, unnorm, n_heads,
    d_head)``; refuses a layout with fields the kernel does not know."""
    names = tuple(f.name for f in fields(layout))
    if names != _LAYOUT_FIELDS:
        raise UnsupportedArchitectureError(
            f"the nnsight adapter knows layouts with fields {_LAYOUT_FIELDS}; this hook map's "
            f"layout has {names}. Teach saebridge.adapters.nnsight_remote the new reshape.")
    return (layout.part, layout.heads, layout.interleaved, layout.unnorm, n_heads, d_head)


def check_generated(result: Tensor, tracked: Tensor) -> Tensor:
    if not torch.equal(result.to(tracked.device), tracked):
        raise RuntimeError(
            "the model's generate chose other tokens than the greedy argmax of its logits, so "
            "interventions were planned for the wrong tokens; its generation config applies "
            "logits processors (repetition penalty, forced or suppressed tokens). Reset them "
            "in model.generation_config to generate with interventions.")
    return result


def _probe(envoy: Any, flavour: str, device: torch.device
           ) -> dict[tuple[str, str], tuple[int, int]]:
    """``(path, io) -> (first event index, events per forward)`` from one forward on fake
    tensors (nothing computed, works on a meta model), cached per wrapped module."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = envoy._module
    if module in _PROBES:
        return _PROBES[module]
    events: list[tuple[str, str]] = []
    handles = []
    interleaver = envoy.interleaver
    interleaving = interleaver.interleaving
    try:
        for path, sub in module.named_modules():
            handles.append(sub.register_forward_pre_hook(
                lambda *_, p=path: events.append((p, "input"))))
            handles.append(sub.register_forward_hook(
                lambda *_, p=path: events.append((p, "output"))))
        interleaver.interleaving = False  # a probe inside a user's trace is not part of it
        with FakeTensorMode(allow_non_fake_inputs=True):
            tokens = torch.zeros(1, 2, dtype=torch.long, device=device)
            if flavour == "hf":
                module(input_ids=tokens, use_cache=False)
            else:
                module(tokens)
    finally:
        interleaver.interleaving = interleaving
        for handle in handles:
            handle.remove()
    when: dict[tuple[str, str], tuple[int, int]] = {}
    for i, event in enumerate(events):
        first, count = when.get(event, (i, 0))
        when[event] = (first, count + 1)
    _PROBES[module] = when
    return when


def adapter_for(obj: Any, **kwargs: Any) -> NNsightAdapter:
    """The registry's entry point: an adapter for an nnsight envoy."""
    return NNsightAdapter(obj, **kwargs)


__all__ = ["NNsightAdapter", "UnifiedTransformer", "adapter_for"]
