"""Converting activations between activation spaces, site by site.

Every conversion here is a shift ``x_dst = x_src + shift`` (:class:`Affine`; the
scale is kept for architectures whose spaces differ by more). Splicing converts native →
SAE space with it and writes back ``affine.inverse(output)``: the reconstruction plus
exactly what the SAE's space removed.

Most conversions need only the activation and a few constants of the *unprocessed*
weights (:class:`RawStats`). One does not: going from a centred residual stream back to
the raw one needs the raw stream's mean, which processing threw away. That mean is the
sum of the means of everything written into the stream, each a linear function of an
earlier activation (``hook_z`` for attention, ``mlp.hook_post`` for the MLP), so
:class:`RawMeanTracker` rebuilds it exactly from those sites during the same forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from saebridge.errors import SpaceConversionError
from saebridge.hookmap import split
from saebridge.hookmap.site import Kind
from saebridge.hookmap.space import ActivationSpace

Tensor = torch.Tensor

TRACKED_SITES = ("attn.hook_z", "mlp.hook_post")
"""Per-block sites a :class:`RawMeanTracker` must observe (after any edits there)."""


@dataclass
class RawStats:
    """Constants of a model's unprocessed weights that TransformerLens processing removes."""

    embed_mean_V: Tensor
    """Mean over d_model of each unprocessed embedding row."""
    pos_mean_P: Tensor
    """Mean over d_model of each positional embedding row."""
    b_V_LHd: Tensor
    """Value biases per layer and head."""
    ln1_b_W_V_LHd: Tensor
    """``ln1.b @ W_V``: the part of the value bias that ``fold_ln`` adds."""
    W_O_mean_LHd: Tensor
    """Mean over d_model of the unprocessed ``W_O``."""
    b_O_mean_L: Tensor
    W_out_mean_LM: Tensor
    """Mean over d_model of the unprocessed ``W_out``."""
    b_out_mean_L: Tensor

    @classmethod
    def from_tl_weights(cls, w: Mapping[str, Tensor]) -> RawStats:
        """Statistics from unprocessed weights in TransformerLens layout."""
        n_layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
        layers = range(n_layers)

        def stack(fn) -> Tensor:
            return torch.stack([fn(f"blocks.{i}.") for i in layers])

        with torch.no_grad():
            return cls(
                embed_mean_V=w["embed.W_E"].mean(-1),
                pos_mean_P=w["pos_embed.W_pos"].mean(-1),
                b_V_LHd=stack(lambda p: w[p + "attn.b_V"]),
                ln1_b_W_V_LHd=stack(
                    lambda p: torch.einsum("d,hde->he", w[p + "ln1.b"], w[p + "attn.W_V"])),
                W_O_mean_LHd=stack(lambda p: w[p + "attn.W_O"].mean(-1)),
                b_O_mean_L=stack(lambda p: w[p + "attn.b_O"].mean()),
                W_out_mean_LM=stack(lambda p: w[p + "mlp.W_out"].mean(-1)),
                b_out_mean_L=stack(lambda p: w[p + "mlp.b_out"].mean()),
            )

    def to(self, device: torch.device | str, dtype: torch.dtype) -> RawStats:
        return RawStats(**{f.name: getattr(self, f.name).to(device, dtype) for f in fields(self)})

    def value_offset(self, layer: int, space: ActivationSpace) -> Tensor | float:
        """What ``space`` removed from ``hook_v``/``hook_z`` at ``layer``, per head."""
        if not space.fold_value_biases:
            return 0.0
        off = self.b_V_LHd[layer]
        return off + self.ln1_b_W_V_LHd[layer] if space.fold_ln else off


@dataclass(frozen=True)
class Affine:
    """``x_dst = x_src * scale + shift``, broadcast over the activation."""

    shift: Tensor | float = 0.0
    scale: Tensor | float = 1.0

    @property
    def is_translation(self) -> bool:
        return isinstance(self.scale, float) and self.scale == 1.0

    def forward(self, x: Tensor) -> Tensor:
        return x + self.shift if self.is_translation else x * self.scale + self.shift

    def inverse(self, y: Tensor) -> Tensor:
        return y - self.shift if self.is_translation else (y - self.shift) / self.scale


class RawMeanTracker:
    """Rebuilds the unprocessed residual stream's mean inside a centred (processed) model.

    Observes ``hook_z`` and ``mlp.hook_post`` of every block, after any edits there, and
    answers the raw mean (``[batch, pos]``) of any residual or written site.
    """

    def __init__(self, stats: RawStats, native: ActivationSpace, tokens_BP: Tensor) -> None:
        self.stats, self.native = stats, native
        n_pos = tokens_BP.shape[1]
        self.embed_BP = stats.embed_mean_V[tokens_BP]
        self.pos_P = stats.pos_mean_P[:n_pos]
        self.attn: dict[int, Tensor] = {}
        self.mlp: dict[int, Tensor] = {}

    def observe(self, name: str, x: Tensor) -> None:
        layer, rel = split(name)
        s, layer = self.stats, int(layer or 0)  # only per-block TRACKED_SITES come here
        if rel == "attn.hook_z":
            z_raw = x + s.value_offset(layer, self.native)
            self.attn[layer] = (torch.einsum("bphd,hd->bp", z_raw, s.W_O_mean_LHd[layer])
                                + s.b_O_mean_L[layer])
        elif rel == "mlp.hook_post":
            self.mlp[layer] = x @ s.W_out_mean_LM[layer] + s.b_out_mean_L[layer]

    def mean(self, name: str) -> Tensor:
        """Raw mean over d_model at a ``resid``/``write`` site, shape ``[batch, pos]``."""
        layer, rel = split(name)
        if rel == "hook_embed":
            return self.embed_BP
        if rel == "hook_pos_embed":
            return self.pos_P.expand_as(self.embed_BP)
        layer = int(layer or 0)  # every other resid/write site lives in a block
        total = self.embed_BP + self.pos_P
        for i in range(layer):
            total = total + self.attn[i] + self.mlp[i]
        if rel == "hook_attn_out":
            return self.attn[layer]
        if rel == "hook_mlp_out":
            return self.mlp[layer]
        if rel in ("hook_resid_mid", "hook_resid_post"):
            total = total + self.attn[layer]
        if rel == "hook_resid_post":
            total = total + self.mlp[layer]
        return total


def needs_tracker(kind: Kind, src: ActivationSpace, dst: ActivationSpace) -> bool:
    """Whether converting ``src`` → ``dst`` at a site of ``kind`` needs the raw mean."""
    return kind in ("resid", "write") and src.center_writing_weights \
        and not dst.center_writing_weights


def conversion(
    name: str,
    kind: Kind,
    src: ActivationSpace,
    dst: ActivationSpace,
    x: Tensor,
    stats: RawStats | None,
    tracker: RawMeanTracker | None = None,
) -> Affine:
    """The affine map taking activation ``x`` at hook ``name`` from space ``src`` to ``dst``.

    Raises:
        SpaceConversionError: the conversion needs constants of the unprocessed weights
            (``stats``) that this model cannot provide.
    """
    layer, _ = split(name)
    if kind in ("resid", "write"):
        if dst.center_writing_weights:
            # A centred space is centred by definition, also after an upstream edit wrote a
            # non-centred vector into a centred stream; centring is idempotent otherwise.
            return Affine(shift=-x.mean(-1, keepdim=True))
        if not src.center_writing_weights:
            return Affine()
        if tracker is None:
            raise _missing(name, src, dst)
        # A pure shift: writes go back as ``y - mean``, which keeps "raw = native + tracked
        # mean" true downstream, whatever was written.
        return Affine(shift=tracker.mean(name).unsqueeze(-1))
    if kind == "v":
        if not (src.fold_value_biases or dst.fold_value_biases):
            return Affine()
        if stats is None or layer is None:
            raise _missing(name, src, dst)
        return Affine(shift=stats.value_offset(layer, src) - stats.value_offset(layer, dst))
    return Affine()


def _missing(name: str, src: ActivationSpace, dst: ActivationSpace) -> SpaceConversionError:
    return SpaceConversionError(
        f"cannot convert {name!r} from activation space {src.name!r} to {dst.name!r}: the "
        "model's weights were processed and the constants needed to undo that are unknown. "
        "Build the TransformerLens model with saebridge.adapters.transformer_lens.from_hf() "
        "(it records them), wrap an unprocessed model, or use an SAE trained in the model's "
        "own space."
    )
