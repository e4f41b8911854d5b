"""The built-in tiny models: seeded random models of every registered architecture, and a
tokenizer trained on the spot.

Nothing is downloaded. Each architecture's file says how its tiny model looks (a
:class:`~saebridge.hookmap.architecture.TinySpec`: config and model class by name); this
module builds it. Norm gains and every linear bias are random (the default init of ones
and zeros would make TransformerLens processing invisible and hide bugs), so the
activation spaces really differ. Needs the ``hf`` extra (transformers).

>>> model, tokenizer = tiny("llama", seed=0)
>>> model.config.architectures, model.config.num_key_value_heads
(['LlamaForCausalLM'], 2)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from saebridge.hookmap.architecture import TinySpec
from saebridge.hookmap.registry import architecture, architecture_of

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


def tiny_config(name: str, tokenizer: Any | None = None, *, model_class: str | None = None,
                **overrides: Any) -> Any:
    """The HF config of the tiny ``name`` model (a registered architecture's short name).

    ``model_class`` builds a sibling architecture of the same file instead (Mistral or
    Qwen2 from the Llama spec); ``overrides`` replace config values.

    >>> tiny_config("gemma2").head_dim
    16
    """
    import transformers

    spec = architecture(name).tiny
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    model_class = model_class or spec.model_class
    config_cls = getattr(transformers, model_class).config_class
    config = config_cls(**{
        "vocab_size": len(tokenizer), **copy.deepcopy(dict(spec.config)),
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "architectures": [model_class], **overrides})
    # Eager attention: the only implementation that returns attn.hook_pattern.
    config._attn_implementation = "eager"
    return config


def _randomise(model: Any, spec: TinySpec, seed: int) -> None:
    """Random norm gains (as :attr:`TinySpec.gain_init` says) and random biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if spec.norm_weights in name and name.endswith("weight"):
                if spec.gain_init == "uniform":
                    param.copy_(spec.gain_centre - 0.5 + torch.rand(param.shape, generator=gen))
                else:
                    param.copy_(spec.gain_centre + 0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def tiny(name: str, seed: int = 0, tokenizer: Any | None = None, *,
         model_class: str | None = None, **overrides: Any) -> tuple[Any, Any]:
    """A random ``(model, tokenizer)`` of a registered architecture, in eval mode with
    eager attention: the same ``seed`` always gives the same weights.

    Args:
        name: the architecture's short name (``"gpt2"``, ``"neox"``, ``"llama"``, ``"gemma2"``).
        seed: seeds the init and the random norm gains and biases.
        tokenizer: defaults to a fresh :func:`tiny_tokenizer`.
        model_class: a sibling architecture of the same file (``"Qwen2ForCausalLM"``).
        **overrides: HF config values to change (``use_parallel_residual=False``).

    Raises:
        UnsupportedArchitectureError: ``name`` is not registered (nearest names listed).
    """
    import transformers

    spec = architecture(name).tiny
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = tiny_config(name, tokenizer, model_class=model_class, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class or spec.model_class)(config)
    _randomise(model, spec, seed)
    return model.eval(), tokenizer


def tiny_of(hf_architecture: str, seed: int = 0, tokenizer: Any | None = None,
            **overrides: Any) -> tuple[Any, Any]:
    """:func:`tiny` by HF architecture name (``"MistralForCausalLM"``), from the spec of
    the architecture file whose hook map lists it."""
    return tiny(architecture_of(hf_architecture).name, seed, tokenizer,
                model_class=hf_architecture, **overrides)


def tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
              n_positions: int = 64, tokenizer: Any | None = None) -> tuple[Any, Any]:
    """A random GPT-2 ``(model, tokenizer)`` in eval mode with eager attention."""
    return tiny("gpt2", seed, tokenizer, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                n_positions=n_positions)


def tiny_neox(seed: int = 0, tokenizer: Any | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """A random GPT-NeoX (Pythia layout: parallel residual, partial rotary, untied
    unembedding) ``(model, tokenizer)`` with random LayerNorm gains and biases."""
    return tiny("neox", seed, tokenizer, **kwargs)


def tiny_llama(seed: int = 0, tokenizer: Any | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """A random Llama ``(model, tokenizer)`` with grouped-query attention (4 query heads, 2
    key/value heads), attention biases (as Qwen2 has) and random RMSNorm gains."""
    return tiny("llama", seed, tokenizer, **kwargs)


def tiny_gemma2(seed: int = 0, tokenizer: Any | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """A random Gemma-2 ``(model, tokenizer)``: pre/post norms with random ``1 + w`` gains,
    a 4-token sliding window on alternate layers, soft caps low enough to bend the tiny
    model's scores and logits, and ``query_pre_attn_scalar`` ≠ ``head_dim``."""
    return tiny("gemma2", seed, tokenizer, **kwargs)


def save_tiny(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write the tiny model of a registered architecture (``"llama"``) and its tokenizer
    to ``path`` with ``save_pretrained``.

    >>> import tempfile
    >>> save_tiny("gpt2", tempfile.mkdtemp()).joinpath("config.json").exists()
    True
    """
    path = Path(path)
    model, tokenizer = tiny(family, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_gpt2(path: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """Write :func:`tiny_gpt2` with ``save_pretrained`` (model and tokenizer) to ``path``."""
    path = Path(path)
    model, tokenizer = tiny_gpt2(seed=seed, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
