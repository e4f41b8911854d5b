"""saebridge: one SAE interface for every tracer.

Load a sparse autoencoder once and splice, steer, ablate and cache it with the same code
on TransformerLens, nnsight or raw Hugging Face models, with hook names and activation
spaces mapped between them.

>>> import saebridge as sb
>>> from saebridge.tiny import tiny_gpt2
>>> hf_model, tokenizer = tiny_gpt2()
>>> model = sb.wrap(hf_model, tokenizer=tokenizer)
>>> sae = sb.SAE.random("topk", 64, 256, "blocks.0.hook_resid_post", k=8)
>>> tokens = model.to_tokens("Hello world")
>>> logits = model.run_with_saes(tokens, saes=[sae])
>>> logits.shape == model(tokens).shape
True
"""

from __future__ import annotations

from saebridge import errors
from saebridge import formats as formats  # importing it fills SAE.load/SAE.save's slot
from saebridge.backends import build as build
from saebridge.backends import wrap
from saebridge.cache import ActivationShards, cache_activations
from saebridge.errors import SAEBridgeError
from saebridge.formats.info import SAEInfo, inspect
from saebridge.hookmap.site import HookSpec
from saebridge.hookmap.space import ActivationSpace
from saebridge.in_trace import prepare, prepare_splice, prepare_steer, splice, steer
from saebridge.interventions import Ablate, Clamp, Splice, Steer
from saebridge.latent_stats import LatentStats, load_stats
from saebridge.latents import cache_latents, show_latent
from saebridge.model import ActivationCache, Model
from saebridge.sae import SAE, SAEConfig
from saebridge.sae.foreign import as_sae
from saebridge.trace import Trace, trace
from saebridge.validation import Report, validate

__version__ = "0.1.0"

__all__ = ["SAE", "Ablate", "ActivationCache", "ActivationShards", "ActivationSpace", "Clamp",
           "HookSpec", "LatentStats", "Model", "Report", "SAEBridgeError", "SAEConfig",
           "SAEInfo", "Splice", "Steer", "Trace", "as_sae", "cache_activations", "cache_latents",
           "errors", "inspect", "load_stats", "prepare", "prepare_splice", "prepare_steer",
           "show_latent", "splice", "steer", "trace", "validate", "wrap"]
