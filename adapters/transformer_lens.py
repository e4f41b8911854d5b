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

from saebridge.backends import SiteFn
from saebridge.errors import BackendNotInstalledError, UnsupportedArchitectureError, unknown
from saebridge.hookmap import hook_map, names, resolve
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.site import Kind
from saebridge.hookmap.space import HF, ActivationSpace, in_force

try:  # TransformerLens 4 removed HookedTransformer; saebridge must still import there.
    from transformer_lens import HookedTransformer
    from transformer_lens.config import HookedTransformerConfig
except ImportError:
    HookedTransformer = HookedTransformerConfig = None  # type: ignore[misc,assignment]

Tensor = torch.Tensor


def _rope(c: Any, key: str, default: float) -> float:
    params = getattr(c, "rope_parameters", None) or {}
    return float(params.get(key, getattr(c, key, None) or default))


def _d_head(c: Any) -> int:
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def _local(c: Any) -> list[str] | None:
    """TransformerLens attention types from transformers 5's ``layer_types``."""
    types = getattr(c, "layer_types", None) or []
    local = ["local" if t == "sliding_attention" else "global" for t in types]
    return local if "local" in local else None


_ROTARY: dict[str, Any] = {
    "positional_embedding_type": ("rotary",), "rotary_adjacent_pairs": (False,),
    "rotary_base": lambda c: _rope(c, "rope_theta", 10000.0),
}
_LLAMA: dict[str, Any] = {
    **_ROTARY,
    "d_model": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers",
    "n_ctx": "max_position_embeddings", "d_vocab": "vocab_size", "d_mlp": "intermediate_size",
    "eps": "rms_norm_eps", "act_fn": "hidden_act", "d_head": _d_head, "rotary_dim": _d_head,
    "n_key_value_heads": lambda c: None if c.num_key_value_heads == c.num_attention_heads
    else c.num_key_value_heads,
    "use_local_attn": lambda c: _local(c) is not None, "attn_types": _local,
    "window_size": lambda c: getattr(c, "sliding_window", None) if _local(c) else None,
    "normalization_type": ("RMS",), "final_rms": (True,), "gated_mlp": (True,),
}
# TransformerLens config field -> HF config attribute, constant (1-tuple) or function of the
# HF config, per architecture. TL 3.9's own converter breaks on transformers 5's configs
# (and looks names up on the hub), hence these tables.
TL_CONFIG: dict[str, dict[str, Any]] = {
    "GPT2LMHeadModel": {
        "d_model": "n_embd", "n_heads": "n_head", "n_layers": "n_layer", "n_ctx": "n_positions",
        "d_vocab": "vocab_size", "act_fn": "activation_function", "eps": "layer_norm_epsilon",
        "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx",
        "d_head": lambda c: c.n_embd // c.n_head,
        "d_mlp": lambda c: getattr(c, "n_inner", None) or 4 * c.n_embd,
        "normalization_type": ("LN",), "positional_embedding_type": ("standard",),
        "default_prepend_bos": (True,),
    },
    "GPTNeoXForCausalLM": {
        **_ROTARY,
        "d_model": "hidden_size", "n_heads": "num_attention_heads",
        "n_layers": "num_hidden_layers", "n_ctx": "max_position_embeddings",
        "d_vocab": "vocab_size", "d_mlp": "intermediate_size", "eps": "layer_norm_eps",
        "act_fn": "hidden_act", "parallel_attn_mlp": "use_parallel_residual", "d_head": _d_head,
        "rotary_dim": lambda c: round(_rope(c, "partial_rotary_factor", 1.0) * _d_head(c)),
        "normalization_type": ("LN",), "default_prepend_bos": (False,),
    },
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Gemma2ForCausalLM": {
        **_LLAMA,
        "act_fn": "hidden_activation",
        "n_key_value_heads": "num_key_value_heads",
        "attn_scale": lambda c: float(c.query_pre_attn_scalar) ** 0.5,
        "attn_scores_soft_cap": "attn_logit_softcapping",
        "output_logits_soft_cap": "final_logit_softcapping",
        "use_normalization_before_and_after": (True,),
    },
}
SPACE_ATTR = "saebridge_space"
STATS_ATTR = "saebridge_raw_stats"
PRINT_ATTR = "saebridge_fingerprint"


def fingerprint(model: Any) -> tuple:
    """What processing in place changes: the norm type and sums of the weights that
    folding and centring rewrite. A recorded space is trusted only while it matches."""
    with torch.no_grad():
        sums = tuple(float(t.double().sum()) for t in (model.W_E, model.W_U, model.b_V))
    return (model.cfg.normalization_type, *sums)


def require_hooked_transformer() -> None:
    """Raise a clear error where this TransformerLens has no ``HookedTransformer`` (4.x).

    Raises:
        BackendNotInstalledError: naming the installed TransformerLens version.
    """
    if HookedTransformer is None:
        from importlib.metadata import version

        raise BackendNotInstalledError(
            f"TransformerLens {version('transformer-lens')} is installed, and it has no "
            "HookedTransformer (removed in TransformerLens 4.0). Use a TransformerBridge: "
            "saebridge.adapters.tl_bridge.bridge_from_hf(hf_model), with "
            "compatibility_mode=True for HookedTransformer's processed numerics; or install "
            "'transformer-lens<4' for HookedTransformer.")


def tl_config(hf_config: Any) -> Any:
    """A ``HookedTransformerConfig`` equivalent to an HF config (no hub access)."""
    require_hooked_transformer()
    arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
    if arch not in TL_CONFIG:
        raise UnsupportedArchitectureError(unknown(
            "architecture for from_hf", arch, TL_CONFIG,
            "Add its field table to saebridge.adapters.transformer_lens.TL_CONFIG."))
    fields = {k: v[0] if isinstance(v, tuple) else v(hf_config) if callable(v)
              else getattr(hf_config, v) for k, v in TL_CONFIG[arch].items()}
    fields["model_name"] = getattr(hf_config, "_name_or_path", "") or "custom"
    return HookedTransformerConfig(original_architecture=arch, **fields)


def from_hf(hf_model: Any, *, fold_ln: bool = True, center_writing_weights: bool = True,
            center_unembed: bool = True, fold_value_biases: bool = True,
            tokenizer: Any | None = None, device: str | torch.device | None = None,
            dtype: torch.dtype | None = None) -> Any:
    """Build a HookedTransformer from an in-memory HF model, with no hub access.

    The HF model is never modified: weights are copied before processing. The processing
    flags in force and the constants needed to undo them are recorded on the returned
    model, so SAEs trained in any activation space can be spliced into it. As in
    TransformerLens's ``from_pretrained``, flags that cannot apply are dropped: centring
    needs LayerNorm (RMSNorm models are never centred) and ``center_unembed`` is refused
    under a logit soft cap (Gemma-2), which is not invariant to a constant shift.

    Supported: the architectures of :data:`TL_CONFIG` (GPT-2, GPT-NeoX, Llama, Mistral,
    Qwen2, Gemma-2). Under TransformerLens 4.x, which has no HookedTransformer, this raises
    :class:`~saebridge.errors.BackendNotInstalledError` naming the version.

    >>> # tl = from_hf(hf_model, tokenizer=tok)                       # processed, as TL's default
    >>> # raw = from_hf(hf_model, fold_ln=False, center_writing_weights=False,
    >>> #               center_unembed=False, fold_value_biases=False)
    """
    from saebridge.adapters.hf import refuse_bridged

    refuse_bridged(hf_model)
    arch = hf_model.config.architectures[0]
    cfg = tl_config(hf_model.config)
    hmap = hook_map(arch)
    hmap.check_config(hf_model.config)
    param = next(hf_model.parameters())
    cfg.dtype = dtype or param.dtype
    cfg.device = str(device or param.device)
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    weights = hmap.tl_weights(sd, cfg.n_heads)  # type: ignore[misc]
    modules = dict(hf_model.named_modules())
    if any(hmap.norms_removed(modules, prefix) for prefix in hmap.prefixes):
        # Without norms, a huge-eps LayerNorm's bias is part of the value bias.
        weights = _remove_norms(weights, cfg)
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
    space = in_force(ActivationSpace(fold_ln, center_writing_weights, center_unembed,
                                     fold_value_biases),
                     norm=cfg.normalization_type, softcap=cfg.output_logits_soft_cap > 0)
    model.load_and_process_state_dict(
        {k: v.to(cfg.device, cfg.dtype) for k, v in weights.items()}, **space.to_dict())
    setattr(model, SPACE_ATTR, space)
    setattr(model, STATS_ATTR, stats)
    setattr(model, PRINT_ATTR, fingerprint(model))
    return model.eval()


def _remove_norms(weights: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """Weights of a LayerNorm-free model for a TransformerLens model without norms
    (``normalization_type=None``; ``cfg`` is switched to it).

    Norms replaced by ``nn.Identity`` left no weights. A LayerNorm with a huge ``eps``
    computes ``(x - mean) * w / sqrt(eps) + b``: that affine map is folded into the
    layers reading it (TransformerLens's ``fold_layer_norm`` with the gain divided by
    ``sqrt(eps)``), and centring the reading weights does the mean subtraction, so the
    residual stream itself is left as it is.
    """
    from transformer_lens.weight_processing import ProcessWeights

    is_norm = (".ln1.", ".ln2.", "ln_final.")
    if any(k.startswith("ln_final.") or ".ln1." in k for k in weights):
        weights = {k: v / cfg.eps**0.5 if any(n in k for n in is_norm) and k.endswith(".w")
                   else v for k, v in weights.items()}
        weights = ProcessWeights.fold_layer_norm(weights, cfg, fold_biases=True,
                                                 center_weights=True)
    cfg.normalization_type = None
    return {k: v for k, v in weights.items() if not any(n in k for n in is_norm)}


def detect_space(model: Any) -> ActivationSpace:
    """The processing a HookedTransformer went through: as :func:`from_hf` recorded it,
    unless the weights were processed in place since; else read off its weights.

    ``fold_ln`` leaves ``LNPre``/``RMSPre`` norms; centring leaves rows with zero mean;
    folding the value biases leaves ``b_V`` all zero.
    """
    recorded = getattr(model, SPACE_ATTR, None)
    if recorded is not None and getattr(model, PRINT_ATTR, None) == fingerprint(model):
        return recorded
    # Never recorded, or processed in place since (e.g. process_weights_()): read it off.
    sd = model.state_dict()
    layers = range(model.cfg.n_layers)

    def centred(t: Tensor) -> bool:
        return bool(t.mean(-1).abs().max() <= 1e-5 * t.abs().max().clamp_min(1e-12))

    return ActivationSpace(
        fold_ln=model.cfg.normalization_type in ("LNPre", "RMSPre"),
        center_writing_weights=centred(sd["embed.W_E"])
        and all(centred(sd[f"blocks.{i}.mlp.W_out"]) for i in layers),
        center_unembed=centred(sd["unembed.W_U"]),
        fold_value_biases=all(bool((model.blocks[i].attn.b_V == 0).all()) for i in layers),
    )


class TLAdapter:
    """Adapter for a TransformerLens ``HookedTransformer``."""

    backend = "transformer_lens"

    def __init__(self, model: Any, tokenizer: Any | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.map = hook_map(model.cfg.original_architecture or "?")
        if model.cfg.normalization_type is None:  # LayerNorm-free: nothing is centred
            self.map = self.map.without_norms()
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
