"""Latents only: a data set's SAE latents and their statistics, without model activations.

>>> import tempfile, saebridge as sb
>>> from saebridge.tiny import tiny_gpt2
>>> hf_model, tokenizer = tiny_gpt2()
>>> model = sb.wrap(hf_model, tokenizer=tokenizer)
>>> sae = sb.SAE.random("topk", 64, 256, "blocks.0.hook_resid_post", k=8)
>>> texts = ["The quick brown fox jumps over the lazy dog."] * 8
>>> with tempfile.TemporaryDirectory() as out_dir:
...     shards = cache_latents(model, texts, [sae], out_dir=out_dir, context_size=16)
...     stats = sb.load_stats(out_dir)["blocks.0.hook_resid_post"]
...     text = show_latent(out_dir, "blocks.0.hook_resid_post", 3, tokenizer)
>>> int(stats.n_tokens) == len(shards), text.startswith("latent 3: fires on")
(True, True)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from saebridge.cache import ActivationShards, cache_activations
from saebridge.errors import DatasetError
from saebridge.latent_stats import load_stats
from saebridge.sae import SAE


def cache_latents(model: Any, data: Iterable[Any], saes: Sequence[SAE], *,
                  out_dir: str | os.PathLike[str], latent_stats: bool | int = True,
                  **options: Any) -> ActivationShards:
    """:func:`saebridge.cache_activations` of ``saes``' latents alone (no hook's
    activations), with their statistics (``latent_stats``: True or a top-k count) unless
    ``latent_stats=False``; ``options`` as there (``context_size``, ``batch_size``, …).
    The forward stops after the last SAE's block."""
    return cache_activations(model, data, hooks=(), saes=saes, out_dir=out_dir,
                             latent_stats=latent_stats, **options)


def show_latent(out_dir: str | os.PathLike[str], hook: str, latent: int, tokenizer: Any,
                width: int = 12) -> str:
    """Latent ``latent`` of the SAE at ``hook``: its frequency, max and top windows as text
    (the peak token in «»), from a finished run's statistics in ``out_dir``."""
    stats = load_stats(out_dir)
    if hook not in stats:
        raise DatasetError(f"{out_dir} has statistics for {sorted(stats)}, not {hook!r}. Pass "
                           "one of those hooks.")
    return stats[hook].show(latent, tokenizer, width)
