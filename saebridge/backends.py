"""What an adapter provides, the registry :func:`wrap` picks adapters from, and ``wrap``.

The registry is keyed by backend name and matches objects by their class's module and
name, so building it imports no backend; an adapter module is imported only when an
object of its backend is wrapped, or when the core asks for one of a backend's entry
points by name (:func:`entry`). The core never imports ``saebridge.adapters`` itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from saebridge.engine import SiteFn
from saebridge.errors import (
    BackendNotInstalledError,
    RegistryError,
    UnsupportedArchitectureError,
    unknown,
)
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.site import Kind
from saebridge.hookmap.space import ActivationSpace
from saebridge.kernel.layout import Location


class Adapter(Protocol):
    """The one primitive a backend must provide: run with functions at canonical sites."""

    backend: str
    space: ActivationSpace
    """The activation space the model computes in."""
    tokenizer: Any | None
    d_vocab: int
    n_layers: int
    model_name: str | None
    """The model's name or path where the backend records one (for mismatch warnings)."""

    def hook_names(self) -> list[str]:
        """Canonical names this model provides, in execution order."""
        ...

    def kind(self, name: str) -> Kind:
        """How processing changes the site; raises UnknownHookError for unknown names."""
        ...

    def writable(self, name: str) -> bool: ...

    def locate(self, name: str) -> Location:
        """Where the hook lives: module path, side, element or argument, layout, whether it
        is writable (see :class:`saebridge.kernel.layout.Location`)."""
        ...

    call_kwargs: dict[str, Any]
    """What every forward passes to the model besides the tokens."""

    def generate_call(self, tokens_BP: torch.Tensor, n_new: int
                      ) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
        """What a greedy generation without a KV cache calls, and its keyword arguments."""
        ...

    def raw_stats(self) -> RawStats | None:
        """Constants of the unprocessed weights, or None where they are unknown."""
        ...

    @property
    def device(self) -> torch.device: ...

    def run(self, tokens_BP: torch.Tensor, edits: Mapping[str, SiteFn]) -> torch.Tensor:
        """Logits of a forward pass with ``edits`` applied; leaves no hook behind."""
        ...

    # Optional: ``generate(tokens_BP, edits_for, max_new_tokens) -> tokens`` decodes greedily
    # through the backend's own generation (no KV cache, no stop at EOS), applying
    # ``edits_for(tokens)`` in every forward; without it :meth:`Model.generate` loops over
    # ``run``. Optional: ``front``, a Model subclass :func:`saebridge.wrap` returns for it.
    # Optional: ``site_fns(edits) -> edits`` where edits at some hooks need the backend's
    # own arrangement (a TransformerBridge's hook_resid_mid: see Location.companion).


@dataclass(frozen=True)
class Backend:
    """A registered backend: how to recognise its objects and where its adapter lives."""

    name: str
    classes: tuple[str, ...]
    """``module.Class`` prefixes matched against the wrapped object's class hierarchy."""
    adapter: str
    """``module:callable`` building an Adapter from the object."""
    extra: str
    """The pip extra that installs the backend's package."""
    entries: Mapping[str, str] = field(default_factory=dict)
    """Name → ``module:callable``: what else the core may call in the backend's adapters
    (:func:`entry`), imported on demand."""


_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    """Add a backend; a name registered twice is refused."""
    if backend.name in _BACKENDS:
        raise RegistryError(f"backend {backend.name!r} is already registered; pick another name.")
    _BACKENDS[backend.name] = backend


def _class_paths(obj: object) -> list[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in type(obj).__mro__]


def find(obj: object) -> Backend:
    """The backend whose classes match ``obj``."""
    paths = _class_paths(obj)
    for backend in _BACKENDS.values():
        if any(p.startswith(prefix) for p in paths for prefix in backend.classes):
            return backend
    supported = "; ".join(f"{b.name}: {', '.join(b.classes)}" for b in _BACKENDS.values()
                          if b.classes)
    raise UnsupportedArchitectureError(
        f"cannot wrap an object of type {type(obj).__module__}.{type(obj).__qualname__}: no "
        f"backend handles it. Supported: {supported}. Pass one of these, pass "
        "hookmap={canonical name: sb.HookSpec(module path, ...)} for any nn.Module, or "
        "register a Backend.")


def _load(target: str, backend: Backend) -> Any:
    """The callable ``module:name`` names, importing its module; a missing package becomes
    a :class:`BackendNotInstalledError` that names the backend's pip extra."""
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackendNotInstalledError(
            f"the {backend.name} backend needs a package that is not installed ({err}). "
            f"Install it with: pip install 'saebridge[{backend.extra}]'") from err
    return getattr(module, attr)


def build(obj: object, **kwargs: Any) -> Adapter:
    """An adapter for ``obj``, importing the backend's adapter module on demand."""
    # A user-supplied hook map makes any nn.Module wrappable, whatever its class.
    backend = _BACKENDS["module"] if "hookmap" in kwargs else find(obj)
    adapter: Adapter = _load(backend.adapter, backend)(obj, **kwargs)
    return adapter


def entry(backend: str, name: str) -> Any:
    """The callable ``name`` of ``backend``'s adapters (see :attr:`Backend.entries`),
    imported on demand: how the core reaches into an adapter without importing it.

    ``entry("transformer_lens", "from_hf")`` is
    :func:`saebridge.adapters.transformer_lens.from_hf`; a name it lacks is refused
    before anything is imported:

    >>> from saebridge import backends
    >>> backends.entry("transformer_lens", "from_pretrained")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    saebridge.errors.UnsupportedArchitectureError: unknown transformer_lens entry point ...

    Raises:
        UnsupportedArchitectureError: an unknown backend or entry name.
        BackendNotInstalledError: the backend's package is not installed.
    """
    if backend not in _BACKENDS:
        raise UnsupportedArchitectureError(unknown(
            "backend", backend, _BACKENDS, "Register one with saebridge.backends.register."))
    found = _BACKENDS[backend]
    add_one = "Add it to the backend's Backend(entries={name: 'module:callable'})."
    if not found.entries:
        raise UnsupportedArchitectureError(
            f"unknown {backend} entry point {name!r}: the {backend} backend has none. {add_one}")
    if name not in found.entries:
        raise UnsupportedArchitectureError(unknown(f"{backend} entry point", name,
                                                   found.entries, add_one))
    return _load(found.entries[name], found)


_FRONT = "saebridge.model:Model"
"""The front :func:`wrap` returns, named by string like the adapters: ``saebridge.model``
names this module's :class:`Adapter` in its annotations, so importing it here would close
a cycle."""


def wrap(obj: Any, **kwargs: Any) -> Any:
    """Wrap a model of any supported backend in the common front (a :class:`saebridge.Model`).

    Args:
        obj: a ``transformers`` causal LM, a TransformerLens ``HookedTransformer`` or
            ``TransformerBridge``, or an nnsight ``LanguageModel``/``NNsight`` over either.
        **kwargs: passed to the backend's adapter (``tokenizer=`` for HF models;
            ``hookmap={canonical name: HookSpec(...)}`` for any other ``nn.Module``;
            ``remote=True | "local" | backend`` for nnsight models: every run a remote request).

    >>> import saebridge as sb
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf_model, tokenizer = tiny_gpt2()
    >>> model = sb.wrap(hf_model, tokenizer=tokenizer)
    >>> model.backend, sb.wrap(model) is model
    ('hf', True)
    """
    module_name, attr = _FRONT.split(":")
    model_cls = getattr(importlib.import_module(module_name), attr)
    if isinstance(obj, model_cls):
        return obj
    adapter = build(obj, **kwargs)
    # An adapter may need its own front (nnsight with remote=: runs compiled to data).
    return getattr(adapter, "front", model_cls)(adapter)


register(Backend("transformer_lens", ("transformer_lens.HookedTransformer.HookedTransformer",),
                 "saebridge.adapters.transformer_lens:TLAdapter", "tl",
                 {"from_hf": "saebridge.adapters.transformer_lens:from_hf",
                  # TransformerLens's model surface on every backend (saebridge.tl_weights)
                  **{f: f"saebridge.adapters.tl_surface:{f}"
                     for f in ("config_fields", "canonical_weights")}}))
register(Backend("transformer_bridge",
                 ("transformer_lens.model_bridge.bridge.TransformerBridge",  # TL 3.x
                  "transformer_lens.model_bridge.transformer_bridge.TransformerBridge"),  # 4.x
                 "saebridge.adapters.tl_bridge:BridgeAdapter", "tl",
                 {"bridge_from_hf": "saebridge.adapters.tl_bridge:bridge_from_hf"}))
register(Backend("module", (), "saebridge.adapters.module:ModuleAdapter", "hf"))  # hookmap=
register(Backend("hf", ("transformers.modeling_utils.PreTrainedModel",),
                 "saebridge.adapters.hf:HFAdapter", "hf"))
register(Backend("nnsight", ("nnsight.intervention.envoy.Envoy",),  # NNsight, LanguageModel, …
                 "saebridge.adapters.nnsight_plan:adapter_for", "nnsight",
                 {"UnifiedTransformer": "saebridge.adapters.nnsight_tl:UnifiedTransformer",
                  "splice": "saebridge.adapters.nnsight_latents:splice",
                  **{f: f"saebridge.adapters.nnsight_plan:{f}"
                     for f in ("steer", "prepare", "prepare_splice",
                               "prepare_steer")}}))
