"""TransformerLens ``HookedTransformer`` through its hook points, and an offline converter.

Canonical names are TransformerLens's own, so the adapter maps nothing; it only knows the
model's activation space. :func:`from_hf` records that space and the constants of the
unprocessed weights on the model it builds; for any other model the space is read off
the weights (:func:`detect_space`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens.config import HookedTransformerConfig

from saebridge.backends import SiteFn
from saebridge.errors import UnsupportedArchitectureError, unknown
from saebridge.hookmap import hook_map, names, resolve
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.site import Kind
from saebridge.hookmap.space import HF, ActivationSpace

Tensor = torch.Tensor

# TransformerLens config field -> HF config attribute (or a constant), per architecture.
# TL 3.9's own converter breaks on transformers 5's GPT2Config, hence this table.
TL_CONFIG: dict[str, dict[str, Any]] = {
    "GPT2LMHeadModel": {
        "d_model": "n_embd", "n_heads": "n_head", "n_layers": "n_layer", "n_ctx": "n_positions",
        "d_vocab": "vocab_size", "act_fn": "activation_function", "eps": "layer_norm_epsilon",
        "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx",
        "normalization_type": ("LN",), "positional_embedding_type": ("standard",),
        "default_prepend_bos": (True,),
    },
}
SPACE_ATTR = "saebridge_space"
STATS_ATTR = "saebridge_raw_stats"


def tl_config(hf_config: Any) -> HookedTransformerConfig:
    """A ``HookedTransformerConfig`` equivalent to an HF config (no hub access)."""
    arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
    if arch not in TL_CONFIG:
        raise UnsupportedArchitectureError(unknown(
            "architecture for from_hf", arch, TL_CONFIG,
            "Add its field table to saebridge.adapters.transformer_lens.TL_CONFIG."))
    fields = {k: v[0] if isinstance(v, tuple) else getattr(hf_config, v)
              for k, v in TL_CONFIG[arch].items()}
    fields["d_head"] = fields["d_model"] // fields["n_heads"]
    fields["d_mlp"] = getattr(hf_config, "n_inner", None) or 4 * fields["d_model"]
    fields["model_name"] = getattr(hf_config, "_name_or_path", "") or "custom"
    return HookedTransformerConfig(original_architecture=arch, **fields)


def from_hf(hf_model: Any, *, fold_ln: bool = True, center_writing_weights: bool = True,
            center_unembed: bool = True, fold_value_biases: bool = True,
            tokenizer: Any | None = None, device: str | torch.device | None = None,
            dtype: torch.dtype | None = None) -> HookedTransformer:
    """Build a HookedTransformer from an in-memory HF model, with no hub access.

    The HF model is never modified: weights are copied before processing. The processing
    flags and the constants needed to undo them are recorded on the returned model, so
    SAEs trained in any activation space can be spliced into it.

    >>> # tl = from_hf(hf_model, tokenizer=tok)                       # processed, as TL's default
    >>> # raw = from_hf(hf_model, fold_ln=False, center_writing_weights=False,
    >>> #               center_unembed=False, fold_value_biases=False)
    """
    arch = hf_model.config.architectures[0]
    cfg = tl_config(hf_model.config)
    param = next(hf_model.parameters())
    cfg.dtype = dtype or param.dtype
    cfg.device = str(device or param.device)
    hmap = hook_map(arch)
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    weights = hmap.tl_weights(sd, cfg.n_heads)  # type: ignore[misc]
    stats = RawStats.from_tl_weights(weights)
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=True)
    if tokenizer is not None:
        # Not set_tokenizer(): it reloads the tokenizer by name_or_path, which may be a hub id
        # (and fails for an in-memory one). The BOS policy is applied by TL's to_tokens.
        if tokenizer.pad_token is None:  # TL's to_tokens pads; the user's tokenizer stays as is
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.pad_token = tokenizer.eos_token
        model.tokenizer = tokenizer
        model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
    model.load_and_process_state_dict(
        {k: v.to(cfg.device, cfg.dtype) for k, v in weights.items()}, fold_ln=fold_ln,
        center_writing_weights=center_writing_weights, center_unembed=center_unembed,
        fold_value_biases=fold_value_biases)
    space = ActivationSpace(fold_ln, center_writing_weights, center_unembed, fold_value_biases)
    setattr(model, SPACE_ATTR, space)
    setattr(model, STATS_ATTR, stats)
    return model.eval()


def detect_space(model: HookedTransformer) -> ActivationSpace:
    """The processing a HookedTransformer went through, read off its weights.

    ``fold_ln`` leaves ``LNPre`` norms; centring leaves rows with zero mean; folding the
    value biases leaves ``b_V`` all zero.
    """
    recorded = getattr(model, SPACE_ATTR, None)
    if recorded is not None:
        return recorded
    sd = model.state_dict()
    layers = range(model.cfg.n_layers)

    def centred(t: Tensor) -> bool:
        return bool(t.mean(-1).abs().max() <= 1e-5 * t.abs().max().clamp_min(1e-12))

    return ActivationSpace(
        fold_ln=model.cfg.normalization_type in ("LNPre", "RMSPre"),
        center_writing_weights=centred(sd["embed.W_E"])
        and all(centred(sd[f"blocks.{i}.mlp.W_out"]) for i in layers),
        center_unembed=centred(sd["unembed.W_U"]),
        fold_value_biases=all(bool((sd[f"blocks.{i}.attn.b_V"] == 0).all()) for i in layers),
    )


class TLAdapter:
    """Adapter for a TransformerLens ``HookedTransformer``."""

    backend = "transformer_lens"

    def __init__(self, model: HookedTransformer, tokenizer: Any | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.map = hook_map(model.cfg.original_architecture or "?")
        self.n_layers, self.d_vocab = model.cfg.n_layers, model.cfg.d_vocab
        self.model_name: str | None = None if model.cfg.model_name == "custom" \
            else model.cfg.model_name
        self.space = detect_space(model)
        self._names = [n for n in names(self.map, self.n_layers) if n in model.hook_dict]

    @property
    def device(self) -> torch.device:
        return self.model.W_E.device

    def hook_names(self) -> list[str]:
        return list(self._names)

    def kind(self, name: str) -> Kind:
        return resolve(self.map, name, self.n_layers).kind

    def writable(self, name: str) -> bool:
        return True

    def raw_stats(self) -> RawStats | None:
        stats = getattr(self.model, STATS_ATTR, None)
        if stats is None and self.space == HF:
            stats = RawStats.from_tl_weights(self.model.state_dict())
            setattr(self.model, STATS_ATTR, stats)
        if stats is None:
            return None
        return stats.to(self.device, self.model.cfg.dtype)

    def run(self, tokens_BP: Tensor, edits: Mapping[str, SiteFn]) -> Tensor:
        def hook(fn: SiteFn):
            def tl_hook(x: Tensor, hook: Any) -> Tensor:
                return fn(x)
            return tl_hook

        # run_with_hooks removes its hooks in a finally, also when a hook raises.
        return self.model.run_with_hooks(
            tokens_BP, return_type="logits",
            fwd_hooks=[(name, hook(fn)) for name, fn in edits.items()])
