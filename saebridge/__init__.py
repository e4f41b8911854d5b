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
from saebridge.errors import SAEBridgeError
from saebridge.hookmap.space import ActivationSpace
from saebridge.interventions import Ablate, Clamp, Splice, Steer
from saebridge.model import ActivationCache, Model
from saebridge.sae import SAE, SAEConfig
from saebridge.validation import Report, validate

__version__ = "0.1.0"


def wrap(obj: Any, **kwargs: Any) -> Model:
    """Wrap a model of any supported backend in the common front.

    Args:
        obj: a ``transformers`` causal LM or a TransformerLens ``HookedTransformer``.
        **kwargs: passed to the backend's adapter (``tokenizer=`` for HF models).

    >>> # model = sb.wrap(hf_model, tokenizer=tokenizer); model.backend  -> 'hf'
    """
    if isinstance(obj, Model):
        return obj
    return Model(build(obj, **kwargs))


__all__ = ["SAE", "Ablate", "ActivationCache", "ActivationSpace", "Clamp", "Model",
           "Report", "SAEBridgeError", "SAEConfig", "Splice", "Steer", "errors", "validate",
           "wrap"]
