"""The built-in tiny model: a seeded random GPT-2 and a tokenizer trained on the spot.

Nothing is downloaded. LayerNorm gains/biases and every linear bias are random (the
default init of ones and zeros would make TransformerLens processing invisible and hide
bugs), so the activation spaces really differ. Needs the ``hf`` extra (transformers).

>>> # model, tokenizer = tiny_gpt2()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Sparse autoencoders find features in "
    "the residual stream of a transformer. A feature is a direction; a latent is its "
    "activation. Researchers splice an SAE into a model, steer along a decoder row, "
    "ablate a latent and cache activations. Layer norm, attention heads, MLP neurons and "
    "the unembedding each read and write the stream. Hello world, hello model, hello SAE."
)
BOS = "<|endoftext|>"


def tiny_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer trained on :data:`CORPUS`, with GPT-2's BOS/EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS,
                                   unk_token=BOS)


def tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
              n_positions: int = 64, tokenizer: Any | None = None) -> tuple[Any, Any]:
    """A random GPT-2 ``(model, tokenizer)`` in eval mode with eager attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, architectures=["GPT2LMHeadModel"])
    # Eager attention: the only implementation that returns attn.hook_pattern.
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
            elif "ln_" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
    return model.eval(), tokenizer


def save_tiny_gpt2(path: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """Write :func:`tiny_gpt2` with ``save_pretrained`` (model and tokenizer) to ``path``."""
    path = Path(path)
    model, tokenizer = tiny_gpt2(seed=seed, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
