"""TransformerLens's ``cfg`` and weight attributes on every backend.

``model.cfg`` is a plain :class:`TLConfig` with ``HookedTransformerConfig``'s field names,
describing the model in the canonical space (TransformerLens-processed: a folded
LayerNorm is ``LNPre``). The weights (``W_U``, ``W_E``, ``W_pos``, ``W_Q`` …, stacked over
layers in TransformerLens's shapes, and per block as ``model.blocks[L].attn.W_O``) are
those of a processed ``HookedTransformer`` of the same model, so direct-logit attribution
gives TransformerLens's numbers: on a processed HookedTransformer (or a bridge in
compatibility mode) they are its own tensors; elsewhere TransformerLens's own processing
computes them once, on first use, from the model's weights
(:mod:`saebridge.adapters.tl_surface`; it needs the ``tl`` extra).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from saebridge.backends import entry
from saebridge.errors import UnknownHookError

Tensor = torch.Tensor


@dataclass
class TLConfig:
    """The model's TransformerLens config fields, in the canonical (processed) space."""

    n_layers: int
    d_model: int
    n_ctx: int
    d_head: int
    n_heads: int
    d_vocab: int
    d_mlp: int | None = None
    act_fn: str | None = None
    normalization_type: str | None = "LNPre"
    """``LNPre``/``RMSPre`` where the model has norms: their weights are folded."""
    model_name: str = "custom"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    eps: float = 1e-5
    d_vocab_out: int = -1
    n_key_value_heads: int | None = None
    positional_embedding_type: str = "standard"
    original_architecture: str | None = None
    attn_only: bool = False
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    final_rms: bool = False
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    default_prepend_bos: bool = True
    tokenizer_prepends_bos: bool = False
    use_attn_result: bool = False
    attn_scores_soft_cap: float = -1.0
    output_logits_soft_cap: float = -1.0
    use_normalization_before_and_after: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Every other field the backend's config had, by TransformerLens name."""

    @classmethod
    def from_fields(cls, fields: dict[str, Any], device: Any) -> TLConfig:
        """A config from TransformerLens field values (unprocessed or processed)."""
        own = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in fields.items() if k in own and v is not None}
        extra = {k: v for k, v in fields.items() if k not in own}
        cfg = cls(**values, extra=extra)
        norm = fields.get("normalization_type", "LN")
        cfg.normalization_type = norm + "Pre" if norm in ("LN", "RMS") else norm
        cfg.d_mlp = cfg.d_mlp if cfg.d_mlp is not None else 4 * cfg.d_model
        cfg.d_vocab_out = cfg.d_vocab if cfg.d_vocab_out in (-1, None) else cfg.d_vocab_out
        cfg.device, cfg.model_name = str(device), str(cfg.model_name or "custom")
        return cfg

    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"TLConfig has no field {name!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out.pop("extra"), **out}


class _Part:
    """One block's ``attn`` or ``mlp`` weights, by TransformerLens attribute name."""

    def __init__(self, model: TLWeights, prefix: str) -> None:
        self._model, self._prefix = model, prefix

    def __getattr__(self, name: str) -> Tensor:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._model._weight(f"{self._prefix}.{name}")
        except UnknownHookError as err:  # hasattr() asks with AttributeError
            raise AttributeError(str(err)) from err


class _Block:
    def __init__(self, model: TLWeights, layer: int) -> None:
        self.attn = _Part(model, f"blocks.{layer}.attn")
        self.mlp = _Part(model, f"blocks.{layer}.mlp")


class TLWeights:
    """Mixin of :class:`saebridge.Model`: ``cfg``, the weights and ``blocks`` views."""

    _adapter: Any

    @property
    def cfg(self) -> TLConfig:
        """The model's config with TransformerLens's field names (canonical space)."""
        if "_tl_cfg" not in self.__dict__:
            fields = entry("transformer_lens", "config_fields")(self._adapter)
            self.__dict__["_tl_cfg"] = TLConfig.from_fields(fields, self._adapter.device)
        cfg = self.__dict__["_tl_cfg"]
        cfg.device = str(self._adapter.device)  # where the model is now
        return cfg

    def tl_state_dict(self) -> dict[str, Tensor]:
        """The weights a TransformerLens-processed ``HookedTransformer`` of this model holds,
        by its names (computed once; see the module docstring)."""
        if "_tl_weights" not in self.__dict__:
            self.__dict__["_tl_weights"] = entry("transformer_lens", "canonical_weights")(
                self._adapter)
        return self.__dict__["_tl_weights"]

    def _weight(self, key: str) -> Tensor:
        w = self.tl_state_dict()
        if key in w:
            return w[key]
        layer, _, name = key.rpartition(".")
        grouped = f"{layer}._{name}"  # grouped-query k/v, repeated per query head
        if grouped in w:
            return w[grouped].repeat_interleave(self.cfg.n_heads // w[grouped].shape[0], 0)
        raise UnknownHookError(
            f"this {self.cfg.original_architecture} model has no weight {key!r} (TransformerLens "
            f"name); it has {sorted(w)[:8]}…. Models with rotary positions have no W_pos, "
            "ungated MLPs no W_gate.")

    def _stacked(self, part: str, name: str) -> Tensor:
        return torch.stack([self._weight(f"blocks.{i}.{part}.{name}")
                            for i in range(self.cfg.n_layers)])

    @property
    def blocks(self) -> list[_Block]:
        """Per block: ``attn`` and ``mlp`` weights, read on access (``blocks[0].attn.W_O``)."""
        return [_Block(self, i) for i in range(self.cfg.n_layers)]

    W_E = property(lambda self: self._weight("embed.W_E"), doc="[d_vocab, d_model]")
    W_pos = property(lambda self: self._weight("pos_embed.W_pos"), doc="[n_ctx, d_model]")
    W_U = property(lambda self: self._weight("unembed.W_U"), doc="[d_model, d_vocab]")
    b_U = property(lambda self: self._weight("unembed.b_U"), doc="[d_vocab]")
    W_Q = property(lambda self: self._stacked("attn", "W_Q"), doc="[layer, head, d_model, d_head]")
    W_K = property(lambda self: self._stacked("attn", "W_K"), doc="[layer, head, d_model, d_head]")
    W_V = property(lambda self: self._stacked("attn", "W_V"), doc="[layer, head, d_model, d_head]")
    W_O = property(lambda self: self._stacked("attn", "W_O"), doc="[layer, head, d_head, d_model]")
    b_Q = property(lambda self: self._stacked("attn", "b_Q"), doc="[layer, head, d_head]")
    b_K = property(lambda self: self._stacked("attn", "b_K"), doc="[layer, head, d_head]")
    b_V = property(lambda self: self._stacked("attn", "b_V"), doc="[layer, head, d_head]")
    b_O = property(lambda self: self._stacked("attn", "b_O"), doc="[layer, d_model]")
    W_in = property(lambda self: self._stacked("mlp", "W_in"), doc="[layer, d_model, d_mlp]")
    W_gate = property(lambda self: self._stacked("mlp", "W_gate"), doc="[layer, d_model, d_mlp]")
    W_out = property(lambda self: self._stacked("mlp", "W_out"), doc="[layer, d_mlp, d_model]")
    b_in = property(lambda self: self._stacked("mlp", "b_in"), doc="[layer, d_mlp]")
    b_out = property(lambda self: self._stacked("mlp", "b_out"), doc="[layer, d_model]")

    @property
    def W_E_pos(self) -> Tensor:
        """``W_E`` and ``W_pos`` concatenated ``[d_vocab + n_ctx, d_model]``."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    def tokens_to_residual_directions(self, tokens: Any) -> Tensor:
        """The unembedding direction of each token ``[..., d_model]`` (``W_U[:, token]``):
        a string is one token, an int or tensor token ids."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)  # type: ignore[attr-defined]
        if isinstance(tokens, int) or (isinstance(tokens, Tensor) and tokens.numel() == 1):
            return self.W_U[:, int(tokens)]
        ids = torch.as_tensor(tokens, device=self.W_U.device)
        return self.W_U[:, ids].movedim(0, -1)
