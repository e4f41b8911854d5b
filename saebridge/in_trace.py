"""Splicing and steering inside your own nnsight trace, here or remotely.

:func:`splice` and :func:`steer` run inside a ``with lm.trace(...)`` block of an nnsight
model; in a trace that runs remotely, :func:`prepare_splice`, :func:`prepare_steer` and
:func:`prepare` compile the interventions beforehand, so the body names only data (see
``docs/remote.md``). The nnsight adapter does the work (``saebridge.adapters.nnsight_plan``).
"""

from __future__ import annotations

from typing import Any

import torch

from saebridge.backends import entry
from saebridge.kernel.indexing import Positions
from saebridge.sae import SAE

Tensor = torch.Tensor


def splice(model: Any, sae: SAE, use_error_term: bool = False) -> Tensor:
    """Splice ``sae`` in at its hook from inside your own nnsight trace; its latents
    (``hook_sae_acts_post``), real and saveable.

    ``model`` is the nnsight model being traced (``LanguageModel``, ``NNsight`` over an HF
    model or a HookedTransformer, :class:`~saebridge.adapters.nnsight.UnifiedTransformer`).
    Call it where the model has not yet reached the SAE's hook. The latents are
    editable, dictionary_learning's idiom: an in-place edit (``latents[..., f] = 0``) made
    before the body reads anything later in the model reaches the model, as SAELens's
    ``hook_sae_acts_post`` hook would (``saebridge.adapters.nnsight_latents``). In a trace
    that runs remotely, prepare it beforehand with :func:`prepare_splice`: a remote body may
    not name ``saebridge`` or an SAE module (its latents are then a record of the run).

    >>> import saebridge as sb
    >>> from nnsight import LanguageModel
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf, tok = tiny_gpt2()
    >>> lm = LanguageModel(hf, tokenizer=tok)
    >>> sae = sb.SAE.random("topk", 64, 256, "blocks.1.hook_resid_pre", k=8)
    >>> tokens = sb.wrap(lm).to_tokens("Hello world")
    >>> with lm.trace(tokens):
    ...     latents = sb.splice(lm, sae, use_error_term=False).save()
    ...     logits = lm.output.logits.save()
    >>> latents.shape[-1], torch.allclose(logits, sb.wrap(lm).run_with_saes(tokens, [sae]),
    ...                                   atol=1e-5)
    (256, True)
    >>> with lm.trace(tokens):
    ...     latents = sb.splice(lm, sae)
    ...     latents[..., latents[0, -1].argmax()] = 0.0  # reaches the model
    ...     edited = lm.output.logits.save()
    >>> torch.allclose(edited, logits, atol=1e-3)
    False
    """
    return entry("nnsight", "splice")(model, sae, use_error_term)


def steer(model: Any, hook: str, vector: Tensor, coef: float = 1.0,
          positions: Positions = None) -> None:
    """Add ``coef * vector`` at canonical ``hook`` (at ``positions``) from inside your own
    nnsight trace of ``model`` (see :func:`splice`).

    >>> import saebridge as sb
    >>> from nnsight import LanguageModel
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf, tok = tiny_gpt2()
    >>> lm = LanguageModel(hf, tokenizer=tok)
    >>> sae = sb.SAE.random("topk", 64, 256, "blocks.1.hook_resid_pre", k=8)
    >>> tokens = sb.wrap(lm).to_tokens("Hello world")
    >>> with lm.trace(tokens):
    ...     sb.steer(lm, "blocks.1.hook_resid_pre", sae.W_dec[12], coef=4.0)
    ...     logits = lm.output.logits.save()
    >>> steered = sb.wrap(lm).run_with_interventions(
    ...     tokens, [sb.Steer("blocks.1.hook_resid_pre", sae.W_dec[12], 4.0)])
    >>> torch.equal(logits, steered)
    True
    """
    entry("nnsight", "steer")(model, hook, vector, coef, positions)


def prepare_splice(model: Any, sae: SAE, use_error_term: bool = False) -> Any:
    """:func:`splice` compiled to data beforehand, for a trace that runs remotely: the
    body then names only the result (the server has no saebridge and no SAE module).

    >>> import saebridge as sb
    >>> from nnsight import LanguageModel
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf, tok = tiny_gpt2()
    >>> lm = LanguageModel(hf, tokenizer=tok)
    >>> sae = sb.SAE.random("topk", 64, 256, "blocks.1.hook_resid_pre", k=8)
    >>> splicer = sb.prepare_splice(lm, sae)
    >>> with lm.trace("Hello world", remote="local"):  # remote=True sends it to NDIF
    ...     latents = splicer(lm).save()
    >>> latents.shape[-1]
    256
    """
    return entry("nnsight", "prepare_splice")(model, sae, use_error_term)


def prepare(model: Any, interventions: list[Any]) -> Any:
    """Several interventions (Splice, Steer, Ablate, Clamp) compiled together for your own
    (remote) nnsight trace; calling the result in the trace returns their records. Compile
    together what must see each other's edits: a splice downstream of a steer then sees
    the mean the steer wrote, as in a run (separately prepared ones each see their own).
    ``both = sb.prepare(lm, [sb.Steer(hook, v, 4.0), sb.Splice(sae)])``, then in the trace
    ``records = both(lm).save()``; ``records[f"{sae.cfg.hook_name}.hook_sae_acts_post"]``
    are the latents (``tests/test_remote.py`` runs it remotely).
    """
    return entry("nnsight", "prepare")(model, interventions)


def prepare_steer(model: Any, hook: str, vector: Tensor, coef: float = 1.0,
                  positions: Positions = None) -> Any:
    """:func:`steer` compiled to data beforehand (one copied vector), for a remote trace.

    >>> import saebridge as sb
    >>> from nnsight import LanguageModel
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf, tok = tiny_gpt2()
    >>> lm = LanguageModel(hf, tokenizer=tok)
    >>> sae = sb.SAE.random("topk", 64, 256, "blocks.1.hook_resid_pre", k=8)
    >>> steerer = sb.prepare_steer(lm, "blocks.1.hook_resid_post", sae.W_dec[12], 8.0)
    >>> with lm.trace("Hello world", remote="local"):  # remote=True sends it to NDIF
    ...     steerer(lm)
    ...     logits = lm.output.logits.save()
    >>> logits.shape[-1] == hf.config.vocab_size
    True
    """
    return entry("nnsight", "prepare_steer")(model, hook, vector, coef, positions)
