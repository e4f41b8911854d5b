"""Activation spaces: which TransformerLens weight processing produced an activation.

A TransformerLens model loaded with default processing does not see the raw Hugging
Face activations. Each processing flag changes some sites in a known way:

- ``center_writing_weights``: the residual stream and everything written into it
  (embeddings, ``hook_attn_out``, ``hook_mlp_out``) is mean-centred over d_model.
- ``fold_value_biases``: ``hook_v``/``hook_z`` lack the value bias ``b_V`` (and, with
  ``fold_ln``, ``ln1.b @ W_V``); it moved into ``b_O``.
- ``fold_ln``: ``ln*.hook_normalized`` lacks the LayerNorm gain and bias.
- ``center_unembed``: logits are shifted by their per-position mean over the vocab.

A space is the set of flags in force. ``hf`` and ``tl-unprocessed`` are both "no flags"
(TransformerLens without processing computes the same activations as HF);
``tl-processed`` is TransformerLens's ``from_pretrained`` default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from saebridge.errors import SAEConfigError, unknown

FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


@dataclass(frozen=True)
class ActivationSpace:
    """The TransformerLens processing flags that shaped a set of activations."""

    fold_ln: bool = False
    """LayerNorm gains/biases folded into the next linear layer."""
    center_writing_weights: bool = False
    """Weights writing to the residual stream centred over d_model."""
    center_unembed: bool = False
    """Unembedding centred over the vocabulary."""
    fold_value_biases: bool = False
    """Value biases folded into the attention output bias."""

    @property
    def name(self) -> str:
        """``hf`` for no processing, ``tl-processed`` for all of it, else the flags."""
        for name, space in NAMED_SPACES.items():
            if space == self and name != "tl-unprocessed":
                return name
        on = [f for f in FLAGS if getattr(self, f)]
        return "tl(" + ",".join(on) + ")"

    def to_dict(self) -> dict[str, bool]:
        return asdict(self)

    @classmethod
    def parse(cls, value: ActivationSpace | str | Mapping[str, Any] | None) -> ActivationSpace:
        """A space from a name, a flag mapping, or ``None`` (TransformerLens defaults).

        A mapping is read as SAELens reads ``model_from_pretrained_kwargs``: its
        ``load_model`` calls ``from_pretrained_no_processing(**kwargs)``, so flags it does
        not mention are off. ``None`` (the key absent, as in SAEs trained before SAELens
        recorded it) means TransformerLens's ``from_pretrained`` defaults: all on.

        >>> ActivationSpace.parse("hf").center_writing_weights
        False
        >>> ActivationSpace.parse({"fold_ln": True}).center_writing_weights
        False
        >>> ActivationSpace.parse(None).name
        'tl-processed'
        """
        if isinstance(value, ActivationSpace):
            return value
        if value is None:
            return TL_PROCESSED
        if isinstance(value, str):
            if value in NAMED_SPACES:
                return NAMED_SPACES[value]
            raise SAEConfigError(
                unknown("activation space", value, NAMED_SPACES,
                        "Pass one of these names or a mapping of TransformerLens processing flags.")
            )
        if isinstance(value, Mapping):
            flags = {f: False for f in FLAGS}
            for key, flag in value.items():
                if key in FLAGS:
                    if not isinstance(flag, bool):
                        raise SAEConfigError(
                            f"activation space flag {key!r} must be a bool, got {flag!r} "
                            f"({type(flag).__name__}). Write true or false."
                        )
                    flags[key] = flag
            return cls(**flags)
        raise SAEConfigError(
            f"cannot read an activation space from {value!r} ({type(value).__name__}). "
            f"Pass a name ({', '.join(NAMED_SPACES)}), a mapping of flags, or None."
        )


HF = ActivationSpace()
TL_PROCESSED = ActivationSpace(True, True, True, True)
NAMED_SPACES: dict[str, ActivationSpace] = {
    "hf": HF,
    "tl-unprocessed": HF,
    "tl-processed": TL_PROCESSED,
}
CANONICAL = TL_PROCESSED
"""The space cache values are reported in: every backend can reach it exactly from its own."""


def in_force(space: ActivationSpace, *, norm: str | None, softcap: bool = False
             ) -> ActivationSpace:
    """The flags of ``space`` that actually change a model with norms of type ``norm``.

    TransformerLens drops the rest, and so does every conversion here (verified against
    ``ProcessWeights.process_weights`` and ``HookedTransformer.from_pretrained``):

    - ``fold_ln`` needs a norm to fold (``LN``/``RMS``; ``None`` for LayerNorm-free models).
    - ``center_writing_weights`` needs a LayerNorm: only its mean subtraction makes
      centring invisible downstream. RMSNorm models and models without norms are never
      centred, so nothing may be centred for them.
    - ``center_unembed`` is refused under a logit soft cap (Gemma-2): ``tanh`` is not
      invariant to adding a constant.

    >>> in_force(TL_PROCESSED, norm="RMS").center_writing_weights
    False
    >>> in_force(TL_PROCESSED, norm="LN", softcap=True).name
    'tl(fold_ln,center_writing_weights,fold_value_biases)'
    """
    layernorm = norm in ("LN", "LNPre")
    return ActivationSpace(
        fold_ln=space.fold_ln and norm is not None,
        center_writing_weights=space.center_writing_weights and layernorm,
        center_unembed=space.center_unembed and not softcap,
        fold_value_biases=space.fold_value_biases,
    )
