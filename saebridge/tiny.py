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


def _randomise(model: Any, seed: int, gain_centre: float) -> None:
    """Random norm gains around ``gain_centre`` (1 for ``w``, 0 for Gemma's ``1 + w``),
    kept away from zero so undoing a gain stays exact, and random biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(gain_centre - 0.5 + torch.rand(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def _tiny(config: Any, model_cls: Any, seed: int, gain_centre: float = 1.0) -> Any:
    config._attn_implementation = "eager"  # the only one that returns attn.hook_pattern
    torch.manual_seed(seed)
    model = model_cls(config)
    _randomise(model, seed, gain_centre)
    return model.eval()


def tiny_neox(seed: int = 0, tokenizer: Any | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """A random GPT-NeoX (Pythia layout: parallel residual, partial rotary, untied
    unembedding) ``(model, tokenizer)`` with random LayerNorm gains and biases."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = GPTNeoXConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "partial_rotary_factor": 0.25},
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "architectures": ["GPTNeoXForCausalLM"], **kwargs})
    return _tiny(config, GPTNeoXForCausalLM, seed), tokenizer


def tiny_llama(seed: int = 0, tokenizer: Any | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """A random Llama ``(model, tokenizer)`` with grouped-query attention (4 query heads, 2
    key/value heads), attention biases (as Qwen2 has) and random RMSNorm gains."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = LlamaConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 64, "attention_bias": True,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "architectures": ["LlamaForCausalLM"], **kwargs})
    return _tiny(config, LlamaForCausalLM, seed), tokenizer


def tiny_gemma2(seed: int = 0, tokenizer: Any | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """A random Gemma-2 ``(model, tokenizer)``: pre/post norms with random ``1 + w`` gains,
    a 4-token sliding window on alternate layers, soft caps low enough to bend the tiny
    model's scores and logits, and ``query_pre_attn_scalar`` ≠ ``head_dim``."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = Gemma2Config(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "max_position_embeddings": 64, "sliding_window": 4,
        "query_pre_attn_scalar": 24, "attn_logit_softcapping": 0.5,
        "final_logit_softcapping": 1.0, "pad_token_id": None,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "architectures": ["Gemma2ForCausalLM"], **kwargs})
    return _tiny(config, Gemma2ForCausalLM, seed, gain_centre=0.0), tokenizer


TINY: dict[str, Any] = {"gpt2": tiny_gpt2, "neox": tiny_neox, "llama": tiny_llama,
                        "gemma2": tiny_gemma2}
"""Builders of the tiny models by family name, each ``(seed=, tokenizer=) -> (model, tok)``."""


def save_tiny(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write the tiny model of ``family`` (a key of :data:`TINY`) and its tokenizer to ``path``.

    >>> # save_tiny("llama", "/tmp/tiny-llama")
    """
    path = Path(path)
    model, tokenizer = TINY[family](seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
