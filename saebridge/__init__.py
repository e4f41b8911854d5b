"""saebridge: one SAE interface for every tracer.

Load a sparse autoencoder once and splice, steer, ablate and cache it with the same code
on TransformerLens, nnsight or raw Hugging Face models, with hook names and activation
spaces mapped between them.

>>> import saebridge as sb
>>> # model = sb.wrap(hf_model, tokenizer=tok); sae = sb.SAE.load("path/to/sae")
>>> # logits = model.run_with_saes(tokens, saes=[sae])
"""

from __future__ import annotations

from typing import Any

from saebridge import errors
from saebridge.backends import build
from saebridge.cache import ActivationShards, cache_activations
from saebridge.errors import SAEBridgeError
from saebridge.formats.info import SAEInfo, inspect
from saebridge.hookmap.site import HookSpec
from saebridge.hookmap.space import ActivationSpace
from saebridge.interventions import Ablate, Clamp, Splice, Steer
from saebridge.model import ActivationCache, Model
from saebridge.sae import SAE, SAEConfig
from saebridge.trace import Trace, prepare_splice, prepare_steer, splice, steer, trace
from saebridge.validation import Report, validate

__version__ = "0.1.0"


def wrap(obj: Any, **kwargs: Any) -> Model:
    """Wrap a model of any supported backend in the common front.

    Args:
        obj: a ``transformers`` causal LM, a TransformerLens ``HookedTransformer`` or
            ``TransformerBridge``, or an nnsight ``LanguageModel``/``NNsight`` over either.
        **kwargs: passed to the backend's adapter (``tokenizer=`` for HF models;
            ``hookmap={canonical name: HookSpec(...)}`` for any other ``nn.Module``;
            ``remote=True | "local" | backend`` for nnsight models: every run a remote request).

    >>> # model = sb.wrap(hf_model, tokenizer=tokenizer); model.backend  -> 'hf'
    """
    if isinstance(obj, Model):
        return obj
    adapter = build(obj, **kwargs)
    # An adapter may need its own front (nnsight with remote=: runs compiled to data).
    front: type[Model] = getattr(adapter, "front", Model)
    return front(adapter)


__all__ = ["SAE", "Ablate", "ActivationCache", "ActivationShards", "ActivationSpace", "Clamp",
           "HookSpec", "Model", "Report", "SAEBridgeError", "SAEConfig", "SAEInfo", "Splice",
           "Steer", "Trace", "cache_activations", "errors", "inspect", "prepare_splice",
           "prepare_steer", "splice", "steer", "trace",
           "validate", "wrap"]
