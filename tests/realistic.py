"""Random models at a realistic scale for the slow parity profile: 12-layer GPT-2-small-
and Llama-shaped, with the unembedding scaled so the logits spread like a trained model's
(standard deviation :data:`LOGIT_STD`; the tiny models' logits stay within about ±0.3, which
hides numerical drift). Imported as ``tests.realistic``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saebridge.tiny import tiny

LOGIT_STD = 2.5
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2-small": ("gpt2", {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024,
                            "vocab_size": 50257, "tie_word_embeddings": False}),
    "llama-small": ("llama", {"num_hidden_layers": 12, "hidden_size": 768,
                              "num_attention_heads": 12, "num_key_value_heads": 4,
                              "head_dim": 64, "intermediate_size": 2048,
                              "max_position_embeddings": 1024, "vocab_size": 32000,
                              "tie_word_embeddings": False}),
}
"""Name → (architecture, HF config overrides of its tiny spec): the full sizes (GPT-2 small:
163M parameters with an untied unembedding)."""
REDUCED: dict[str, dict[str, Any]] = {
    "gpt2-small": {"n_embd": 384, "n_head": 6, "vocab_size": 8192},
    "llama-small": {"hidden_size": 384, "num_attention_heads": 6, "num_key_value_heads": 2,
                    "intermediate_size": 1024, "vocab_size": 8192},
}
"""What the default (``reduced``) size changes: 12 layers still, half GPT-2 small's width
(6 heads of 64), a vocabulary of 8192; about 28M parameters, so both models in fp32 and
bf16 fit in about ten minutes on two CPU cores (the full GPT-2-small size took 8.7 minutes
for its fp32 run alone)."""


def realistic(name: str, seed: int = 0, size: str = "reduced") -> tuple[Any, Any, float]:
    """``(model, tokenizer, logit std)``: the random model ``name`` of :data:`SHAPES` (at
    ``size`` ``"full"`` or ``"reduced"``: :data:`REDUCED`) with its unembedding scaled to
    logits of standard deviation :data:`LOGIT_STD` on random tokens."""
    family, overrides = SHAPES[name]
    if size == "reduced":
        overrides = {**overrides, **REDUCED[name]}
    model, tokenizer = tiny(family, seed, **overrides)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=gen)
    with torch.no_grad():
        std = float(model(tokens).logits.std())
        model.get_output_embeddings().weight.mul_(LOGIT_STD / std)
        std = float(model(tokens).logits.std())
    return model, tokenizer, std


def save_realistic(name: str, path: str | Path, seed: int = 0, size: str = "reduced"
                   ) -> tuple[Path, Any, float]:
    """Write :func:`realistic` with ``save_pretrained``; the folder, the config and the
    logit std."""
    path = Path(path)
    model, tokenizer, std = realistic(name, seed, size)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model.config, std
