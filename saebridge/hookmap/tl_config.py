"""TransformerLens config tables: HF config → ``HookedTransformerConfig`` fields, as data.

A table maps each TransformerLens config field to where its value comes from in the HF
config: an attribute name (``"n_embd"``), a constant (a 1-tuple, ``("LN",)``) or a
function of the HF config. Each architecture file holds its own table; the shared pieces
(rotary positions, the Llama layout) live here. TransformerLens 3.9's own converter breaks
on transformers 5's configs (and looks names up on the hub), hence these tables. Nothing
here imports TransformerLens: :func:`tl_fields` gives the keyword arguments, and
``saebridge.adapters.transformer_lens.tl_config`` builds the config from them.

>>> from types import SimpleNamespace
>>> tl_fields({"d_model": "n_embd", "normalization_type": ("LN",),
...            "d_mlp": lambda c: 4 * c.n_embd}, SimpleNamespace(n_embd=8))
{'d_model': 8, 'normalization_type': 'LN', 'd_mlp': 32}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

TLConfigTable = Mapping[str, "str | tuple[Any] | Callable[[Any], Any]"]
"""TransformerLens field → HF attribute name, constant (1-tuple) or function of the config."""


def tl_fields(table: TLConfigTable, hf_config: Any) -> dict[str, Any]:
    """The ``HookedTransformerConfig`` keyword arguments ``table`` gives for ``hf_config``."""
    return {k: v[0] if isinstance(v, tuple) else v(hf_config) if callable(v)
            else getattr(hf_config, v) for k, v in table.items()}


def rope(c: Any, key: str, default: float) -> float:
    """A rotary parameter: transformers 5 keeps them in ``rope_parameters``, 4 on the config."""
    params = getattr(c, "rope_parameters", None) or {}
    return float(params.get(key, getattr(c, key, None) or default))


def d_head(c: Any) -> int:
    """``head_dim`` where the config sets it (Gemma-2's is not ``d_model // n_heads``)."""
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def local_attention(c: Any) -> list[str] | None:
    """TransformerLens attention types from transformers 5's ``layer_types``."""
    types = getattr(c, "layer_types", None) or []
    local = ["local" if t == "sliding_attention" else "global" for t in types]
    return local if "local" in local else None


ROTARY: dict[str, Any] = {
    "positional_embedding_type": ("rotary",), "rotary_adjacent_pairs": (False,),
    "rotary_base": lambda c: rope(c, "rope_theta", 10000.0),
}
"""Fields of every rotary model (GPT-NeoX, the Llama layout)."""

LLAMA_FIELDS: dict[str, Any] = {
    **ROTARY,
    "d_model": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers",
    "n_ctx": "max_position_embeddings", "d_vocab": "vocab_size", "d_mlp": "intermediate_size",
    "eps": "rms_norm_eps", "act_fn": "hidden_act", "d_head": d_head, "rotary_dim": d_head,
    "n_key_value_heads": lambda c: None if c.num_key_value_heads == c.num_attention_heads
    else c.num_key_value_heads,
    "use_local_attn": lambda c: local_attention(c) is not None, "attn_types": local_attention,
    "window_size": lambda c: getattr(c, "sliding_window", None) if local_attention(c) else None,
    "normalization_type": ("RMS",), "final_rms": (True,), "gated_mlp": (True,),
}
"""The Llama layout's fields (Mistral and Qwen2 use them as they are; Gemma-2 extends them)."""
