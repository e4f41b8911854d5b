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
from contextlib import nullcontext
from typing import Any

import torch
from nnsight import save

from saebridge.adapters.nnsight_remote import View, Visit, forward, generate
from saebridge.adapters.nnsight_tl import UnifiedTransformer
from saebridge.adapters.weights import align_hooks
from saebridge.backends import SiteFn, build
from saebridge.errors import (
    BackendError,
    DeviceError,
    UnknownHookError,
    UnsupportedArchitectureError,
)
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.site import Kind
from saebridge.kernel.layout import Location

Tensor = torch.Tensor
When = tuple[int, int, tuple[int, ...]]

_PROBES: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str], When]] = (
    weakref.WeakKeyDictionary())
NAMES = {"hf": "nnsight-hf", "transformer_lens": "nnsight-tl",
         "transformer_bridge": "nnsight-bridge"}
"""The wrapped model's backend → this adapter's backend name."""


def is_a(obj: object, class_path: str) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" == class_path for c in type(obj).__mro__)


class NNsightAdapter:
    """Adapter for an nnsight envoy over an HF model or a HookedTransformer.

    ``remote`` (``True``, ``"local"``, an NDIF host URL, or an nnsight ``Backend``) makes
    :func:`saebridge.wrap` return a front whose runs execute as remote requests (the
    registry builds it with :func:`saebridge.adapters.nnsight_plan.adapter_for`).
    """

    def __init__(self, envoy: Any, tokenizer: Any | None = None,
                 remote: bool | str | Any = False) -> None:
        self.envoy = envoy
        if tokenizer is None:
            tokenizer = getattr(envoy, "tokenizer", None)
        self.inner = build(envoy._module, tokenizer=tokenizer)
        if self.inner.backend not in NAMES:
            raise UnsupportedArchitectureError(
                f"nnsight over a {self.inner.backend} model is not supported; wrap a Hugging "
                "Face model, a HookedTransformer or a TransformerBridge in nnsight, or pass the "
                "model itself.")
        self.backend = NAMES[self.inner.backend]
        self.space, self.tokenizer = self.inner.space, self.inner.tokenizer
        self.d_vocab, self.n_layers = self.inner.d_vocab, self.inner.n_layers
        self.model_name = self.inner.model_name
        self.remote = remote  # not False: nnsight_plan.adapter_for gives it a remote front
        refuse_offloaded_first(envoy._module)
        self._when = _probe(envoy, self.inner.call_kwargs, self.inner.device)

    # ---- the Adapter protocol ---------------------------------------------------------

    @property
    def device(self) -> torch.device:
        device = self.inner.device
        # A model kept on the meta device runs remotely; its tokens stay here.
        return torch.device("cpu") if device.type == "meta" else device

    def device_of(self, name: str) -> torch.device:
        """The device hook ``name`` computes on (the wrapped model's adapter says)."""
        found = getattr(self.inner, "device_of", None)
        return found(name) if found is not None else self.device

    def hook_names(self) -> list[str]:
        return [n for n in self.inner.hook_names() if self._reached(self.locate(n))
                and not (self.remote and self._local_only(n))]

    def _local_only(self, name: str) -> bool:
        """Whether only a local run produces hook ``name``: one computed here (remote runs
        carry no code), or one that needs eager attention the server's model lacks (only a
        local run switches to it)."""
        find = getattr(self.inner, "site", None)
        if find is None:  # TransformerLens: its hooks are all modules
            return False
        site, eager = find(name), getattr(self.inner, "_eager", lambda: True)()
        return site.derive is not None or (site.requires is not None and not eager)

    def kind(self, name: str) -> Kind:
        return self.inner.kind(name)

    def writable(self, name: str) -> bool:
        return self.inner.writable(name)

    def raw_stats(self) -> RawStats | None:
        return self.inner.raw_stats()

    def run(self, tokens_BP: Tensor, edits: Mapping[str, SiteFn]) -> Tensor:
        visits, envoy = self.visits(self.site_fns(edits)), self.envoy
        with self._attention_switch(edits), \
                envoy.trace(tokens_BP, **self.inner.call_kwargs) as tracer:
            logits = save(forward(tracer, envoy, visits))
        return logits

    def _attention_switch(self, edits: Mapping[str, SiteFn]) -> Any:
        """The wrapped HF model's eager attention for a run reading scores or patterns."""
        switch = getattr(self.inner, "_attention_switch", None)
        return nullcontext() if switch is None else switch(edits)

    def generate(self, tokens_BP: Tensor, edits_for: Callable[[Tensor], Mapping[str, SiteFn]],
                 max_new_tokens: int) -> Tensor:
        """Greedy tokens ``[batch, pos + max_new_tokens]`` from the model's own ``generate``
        (no KV cache, no stop at EOS); ``edits_for(tokens)`` gives each forward's edits."""
        def plan(tokens: Tensor) -> list[Visit]:
            return self.visits(self.site_fns(edits_for(tokens)))

        plan(tokens_BP)  # unknown hooks fail before the run
        envoy = self.envoy
        call, kwargs = self.generate_call(tokens_BP, max_new_tokens)
        with self._attention_switch(edits_for(tokens_BP)), \
                envoy.trace(tokens_BP, fn=call, **kwargs) as tracer:
            tracked = save(generate(tracer, envoy, plan, tokens_BP, max_new_tokens))
            result = save(tracer.result)
        return check_generated(result, tracked)

    # ---- sites --------------------------------------------------------------------------

    def locate(self, name: str) -> Location:
        """Where hook ``name`` lives, as the wrapped model's own adapter says: envoy paths
        are module paths (TransformerLens hook points are modules, so envoys too)."""
        return self.inner.locate(name)

    def site_fns(self, edits: Mapping[str, SiteFn]) -> Mapping[str, SiteFn]:
        """What runs at each hook: ``edits``, as the wrapped model's adapter arranges them
        (a bridge carries a ``hook_resid_mid`` edit on to ``hook_resid_post``)."""
        arrange = getattr(self.inner, "site_fns", None)
        return edits if arrange is None else arrange(edits)

    def visits(self, fns: Mapping[str, Any]) -> list[Visit]:
        """The locations of ``fns``' hooks in execution order, each with its views."""
        rank = {n: i for i, n in enumerate(self.inner.hook_names())}
        groups: dict[tuple[str, str], list[View]] = {}
        stashed: set[str] = set()
        for name in sorted(fns, key=lambda n: rank.get(n, -1)):
            loc = self.locate(name)
            if not self._reached(loc):
                raise UnknownHookError(
                    f"hook {name!r} ({loc.path or 'the model'} {loc.side}) is never reached in "
                    f"a forward of this {self.backend} model. Pick a hook from "
                    "model.hook_names().")
            groups.setdefault((loc.path, loc.side), []).append(View(loc, fns[name]))
            if loc.residual is not None:
                stashed.add(loc.residual)
        for path in stashed:
            groups.setdefault((path, "input"), [])
        order = sorted(groups, key=lambda where: self._when[where][0])
        return [Visit(path, side, self._when[(path, side)][1], groups[(path, side)],
                      "hidden_states" if side == "input" and path in stashed else None,
                      self._when[(path, side)][2])
                for path, side in order]

    def _reached(self, loc: Location) -> bool:
        return (loc.path, loc.side) in self._when

    # ---- how the model is called ------------------------------------------------------------

    def generate_call(self, tokens_BP: Tensor, n_new: int
                      ) -> tuple[Callable[..., Tensor], dict[str, Any]]:
        """What a traced generation calls: greedy, no KV cache, no stop at EOS (the wrapped
        model's adapter says how); an nnsight ``LanguageModel`` runs its own ``generate``, as
        ``with lm.generate(...)`` does (a remote request then names nnsight's method)."""
        call, kwargs = self.inner.generate_call(tokens_BP, n_new)
        if is_a(self.envoy, "nnsight.modeling.transformers.TransformersModel"):
            kwargs.pop("attention_mask", None)
            call = inspect.unwrap(type(self.envoy).generate).__get__(self.envoy)
        return call, kwargs


def refuse_offloaded_first(module: torch.nn.Module) -> None:
    """Refuse a dispatched model whose first parameter accelerate offloaded: nnsight moves a
    trace's inputs to that parameter's device, which is then ``meta``.

    Raises:
        DeviceError: naming the parameter and what to keep on a device.
    """
    name, first = next(module.named_parameters(), (None, None))
    if first is None or not first.is_meta or not any(align_hooks(m) for m in module.modules()):
        return
    raise DeviceError(
        f"nnsight moves a trace's inputs to the device of the model's first parameter, "
        f"{name!r}, which accelerate offloaded (it is on meta between forwards), so no "
        "trace of this model can run. Keep the input embeddings on a device in the "
        f"device_map (e.g. {{{name.rpartition('.')[0]!r}: 0}} or torch.device('cpu'); "
        "device_map='auto' does), offloading later layers only; or wrap the HF model "
        "itself (sb.wrap(hf_model)).")


def check_generated(result: Tensor, tracked: Tensor) -> Tensor:
    if not torch.equal(result.to(tracked.device), tracked):
        raise BackendError(
            "the model's generate chose other tokens than the greedy argmax of its logits, so "
            "interventions were planned for the wrong tokens; its generation config applies "
            "logits processors (repetition penalty, forced or suppressed tokens). Reset them "
            "in model.generation_config to generate with interventions.")
    return result


def _probe(envoy: Any, call_kwargs: Mapping[str, Any], device: torch.device
           ) -> dict[tuple[str, str], When]:
    """``(path, io) -> (first event index, events per forward, every event index)`` from
    one forward on fake tensors (nothing computed, works on a meta model; a real one for a
    model dispatched by accelerate), cached per wrapped module."""
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
        # accelerate's offload hooks cannot load weights under fake tensors: a dispatched
        # model is probed by a real forward of two tokens (once per model).
        fake = nullcontext() if any(align_hooks(m) for m in module.modules()) \
            else FakeTensorMode(allow_non_fake_inputs=True)
        with fake, torch.no_grad():
            tokens = torch.zeros(1, 2, dtype=torch.long, device=device)
            module(tokens, **call_kwargs)
    finally:
        interleaver.interleaving = interleaving
        for handle in handles:
            handle.remove()
    when: dict[tuple[str, str], tuple[int, int]] = {}
    for i, event in enumerate(events):
        first, count, at = when.get(event, (i, 0, ()))
        when[event] = (first, count + 1, (*at, i))
    _PROBES[module] = when
    return when


__all__ = ["NNsightAdapter", "UnifiedTransformer"]
