"""What an adapter provides, and the registry ``sb.wrap`` picks adapters from.

The registry is keyed by backend name and matches objects by their class's module and
name, so building it imports no backend; an adapter module is imported only when an
object of its backend is wrapped.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from saebridge.errors import (
    BackendNotInstalledError,
    RegistryError,
    UnsupportedArchitectureError,
)
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.site import Kind
from saebridge.hookmap.space import ActivationSpace

SiteFn = Callable[[torch.Tensor], torch.Tensor]
"""Called with a site's activation (native space, TransformerLens layout); returns the
value the model goes on with (the same object when unchanged)."""


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


def build(obj: object, **kwargs: Any) -> Adapter:
    """An adapter for ``obj``, importing the backend's adapter module on demand."""
    # A user-supplied hook map makes any nn.Module wrappable, whatever its class.
    backend = _BACKENDS["module"] if "hookmap" in kwargs else find(obj)
    module_name, attr = backend.adapter.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackendNotInstalledError(
            f"the {backend.name} backend needs a package that is not installed ({err}). "
            f"Install it with: pip install 'saebridge[{backend.extra}]'") from err
    return getattr(module, attr)(obj, **kwargs)


register(Backend("transformer_lens", ("transformer_lens.HookedTransformer.HookedTransformer",),
                 "saebridge.adapters.transformer_lens:TLAdapter", "tl"))
register(Backend("transformer_bridge",
                 ("transformer_lens.model_bridge.bridge.TransformerBridge",  # TL 3.x
                  "transformer_lens.model_bridge.transformer_bridge.TransformerBridge"),  # 4.x
                 "saebridge.adapters.tl_bridge:BridgeAdapter", "tl"))
register(Backend("module", (), "saebridge.adapters.module:ModuleAdapter", "hf"))  # hookmap=
register(Backend("hf", ("transformers.modeling_utils.PreTrainedModel",),
                 "saebridge.adapters.hf:HFAdapter", "hf"))
register(Backend("nnsight", ("nnsight.intervention.envoy.Envoy",),  # NNsight, LanguageModel, …
                 "saebridge.adapters.nnsight:adapter_for", "nnsight"))
