"""Converting activations between activation spaces, site by site.

Every conversion here is a shift ``x_dst = x_src + shift``, returned as the kernel's
:class:`~saebridge.kernel.spaces.Conv`. Splicing converts native → SAE space with it and
writes back the output minus the same shift: the reconstruction plus exactly what the
SAE's space removed.

Most conversions need only the activation and a few constants of the *unprocessed*
weights (:class:`RawStats`). One does not: going from a centred residual stream back to
the raw one needs the raw stream's mean, which processing threw away. That mean is the
sum of the means of everything written into the stream, each a linear function of an
earlier activation (``hook_z`` for attention, ``mlp.hook_post`` for the MLP), so
:class:`RawMeanTracker` rebuilds it exactly from those sites during the same forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from saebridge.errors import SpaceConversionError
from saebridge.hookmap.lookup import split
from saebridge.hookmap.site import Kind
from saebridge.hookmap.space import ActivationSpace
from saebridge.kernel.spaces import CENTER, IDENTITY, Conv

Tensor = torch.Tensor

TRACKED_SITES = ("attn.hook_z", "mlp.hook_post")
"""Per-block sites a :class:`RawMeanTracker` must observe (after any edits there)."""


@dataclass
class RawStats:
    """Constants of a model's unprocessed weights that TransformerLens processing removes.

    Value-bias statistics are per key/value head (``K`` heads: fewer than the query
    heads under grouped-query attention); :meth:`value_offset` repeats them per query
    head for ``hook_z``, as the model does. Models without learned positions, LayerNorm
    biases or value biases have zeros there.
    """

    embed_mean_V: Tensor
    """Mean over d_model of each unprocessed embedding row."""
    pos_mean_P: Tensor | None
    """Mean over d_model of each positional embedding row; None for rotary models."""
    b_V_LKd: Tensor
    """Value biases per layer and key/value head."""
    ln1_b_W_V_LKd: Tensor
    """``ln1.b @ W_V``: the part of the value bias that ``fold_ln`` adds."""
    W_O_mean_LHd: Tensor
    """Mean over d_model of the unprocessed ``W_O``."""
    b_O_mean_L: Tensor
    W_out_mean_LM: Tensor
    """Mean over d_model of the unprocessed ``W_out``."""
    b_out_mean_L: Tensor
    ln1_w_LD: Tensor | None = None
    """Unprocessed ``ln1`` gain per layer (``fold_ln`` moves it into the next weights), for
    transcoders reading a LayerNorm's output; None without LayerNorms."""
    ln1_b_LD: Tensor | None = None
    ln2_w_LD: Tensor | None = None
    ln2_b_LD: Tensor | None = None

    @classmethod
    def from_tl_weights(cls, w: Mapping[str, Tensor]) -> RawStats:
        """Statistics from unprocessed weights in TransformerLens layout (grouped-query
        models keep k/v under ``_W_V``/``_b_V``, as TransformerLens does)."""
        n_layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
        layers = range(n_layers)

        def stack(fn) -> Tensor:
            return torch.stack([fn(f"blocks.{i}.") for i in layers])

        def get(p: str, name: str) -> Tensor:
            return w[p + name] if p + name in w else w[p + name.replace(".", "._", 1)]

        def ln1_b_W_V(p: str) -> Tensor:
            W_V = get(p, "attn.W_V")
            if p + "ln1.b" not in w:  # RMSNorm or no norm: no bias to fold
                return W_V.new_zeros(W_V.shape[0], W_V.shape[2])
            return torch.einsum("d,hde->he", w[p + "ln1.b"], W_V)

        with torch.no_grad():
            return cls(
                embed_mean_V=w["embed.W_E"].mean(-1),
                pos_mean_P=w["pos_embed.W_pos"].mean(-1) if "pos_embed.W_pos" in w else None,
                b_V_LKd=stack(lambda p: get(p, "attn.b_V")),
                ln1_b_W_V_LKd=stack(ln1_b_W_V),
                W_O_mean_LHd=stack(lambda p: w[p + "attn.W_O"].mean(-1)),
                b_O_mean_L=stack(lambda p: w[p + "attn.b_O"].mean()),
                W_out_mean_LM=stack(lambda p: w[p + "mlp.W_out"].mean(-1)),
                b_out_mean_L=stack(lambda p: w[p + "mlp.b_out"].mean()),
                ln1_w_LD=_stack_ln(w, n_layers, "ln1", "w"),
                ln1_b_LD=_stack_ln(w, n_layers, "ln1", "b"),
                ln2_w_LD=_stack_ln(w, n_layers, "ln2", "w"),
                ln2_b_LD=_stack_ln(w, n_layers, "ln2", "b"),
            )

    def ln_affine(self, layer: int, ln: str) -> tuple[Tensor, Tensor] | None:
        """The unprocessed gain and bias of LayerNorm ``ln`` (``ln1``/``ln2``) at ``layer``."""
        w, b = getattr(self, f"{ln}_w_LD"), getattr(self, f"{ln}_b_LD")
        return None if w is None or b is None else (w[layer], b[layer])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> RawStats:
        moved: dict[str, Any] = {f.name: None if getattr(self, f.name) is None
                                 else getattr(self, f.name).to(device, dtype)
                                 for f in fields(self)}
        return replace(self, **moved)

    def value_offset(self, layer: int, space: ActivationSpace, n_heads: int | None = None
                     ) -> Tensor | float:
        """What ``space`` removed from ``hook_v``/``hook_z`` at ``layer``, per head: per
        key/value head, or repeated to ``n_heads`` query heads (for ``hook_z``)."""
        if not space.fold_value_biases:
            return 0.0
        off = self.b_V_LKd[layer]
        off = off + self.ln1_b_W_V_LKd[layer] if space.fold_ln else off
        if n_heads is not None and n_heads != off.shape[0]:
            off = off.repeat_interleave(n_heads // off.shape[0], dim=0)
        return off


def _stack_ln(w: Mapping[str, Tensor], n_layers: int, ln: str, wb: str) -> Tensor | None:
    """A LayerNorm's gain (``wb="w"``) or bias per layer; an RMSNorm's bias is zero."""
    gains = [w.get(f"blocks.{i}.{ln}.w") for i in range(n_layers)]
    if any(g is None for g in gains):
        return None
    if wb == "w":
        return torch.stack(gains)  # type: ignore[arg-type]
    return torch.stack([w.get(f"blocks.{i}.{ln}.b", torch.zeros_like(g))  # type: ignore[arg-type]
                        for i, g in enumerate(gains)])


class RawMeanTracker:
    """Rebuilds the unprocessed residual stream's mean inside a centred (processed) model.

    Observes ``hook_z`` and ``mlp.hook_post`` of every block, after any edits there, and
    answers the raw mean (``[batch, pos]``) of any residual or written site.
    """

    def __init__(self, stats: RawStats, native: ActivationSpace, tokens_BP: Tensor) -> None:
        self.stats, self.native = stats, native
        n_pos = tokens_BP.shape[1]
        self.embed_BP = stats.embed_mean_V[tokens_BP]
        self.pos_P = (stats.pos_mean_P[:n_pos] if stats.pos_mean_P is not None
                      else torch.zeros_like(self.embed_BP[0]))
        self.attn: dict[int, Tensor] = {}
        self.mlp: dict[int, Tensor] = {}

    def observe(self, name: str, x: Tensor) -> None:
        layer, rel = split(name)
        s, layer = self.stats, int(layer or 0)  # only per-block TRACKED_SITES come here
        if rel == "attn.hook_z":
            z_raw = x + s.value_offset(layer, self.native, x.shape[-2])
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
    stats: RawStats | None,
    tracker: RawMeanTracker | None = None,
) -> Conv:
    """The conversion of the activation at hook ``name`` from space ``src`` to ``dst``.

    Raises:
        SpaceConversionError: the conversion needs constants of the unprocessed weights
            (``stats``, or the raw mean a ``tracker`` rebuilds) that this model cannot provide.
    """
    layer, _ = split(name)
    if kind in ("resid", "write"):
        if dst.center_writing_weights:
            # A centred space is centred by definition, also after an upstream edit wrote a
            # non-centred vector into a centred stream; centring is idempotent otherwise.
            return CENTER
        if not src.center_writing_weights:
            return IDENTITY
        if tracker is None:
            raise _missing(name, src, dst)
        # A pure shift: writes go back as ``y - mean``, which keeps "raw = native + tracked
        # mean" true downstream, whatever was written.
        return Conv(shift=tracker.mean(name).unsqueeze(-1))
    if kind == "v":
        if _value_terms(src) == _value_terms(dst):  # the same bias removed on both sides
            return IDENTITY
        if stats is None or layer is None:
            raise _missing(name, src, dst)
        # Per key/value head; shift_for repeats it to the site's query heads (GQA).
        shift = stats.value_offset(layer, src) - stats.value_offset(layer, dst)
        return Conv(shift=shift) if isinstance(shift, Tensor) else IDENTITY
    return IDENTITY


def _value_terms(space: ActivationSpace) -> tuple[bool, bool]:
    """Which value-bias terms a space removed from ``hook_v``/``hook_z``: ``b_V``, and
    ``ln1.b @ W_V`` (folded into the value bias by ``fold_ln``)."""
    return space.fold_value_biases, space.fold_value_biases and space.fold_ln


def _missing(name: str, src: ActivationSpace, dst: ActivationSpace) -> SpaceConversionError:
    return SpaceConversionError(
        f"cannot convert {name!r} from activation space {src.name!r} to {dst.name!r}: the "
        "model's weights were processed and the constants needed to undo that are unknown. "
        "Build the TransformerLens model with saebridge.adapters.transformer_lens.from_hf() "
        "or the TransformerBridge with saebridge.adapters.tl_bridge.bridge_from_hf() (both "
        "record them), wrap an unprocessed model, or use an SAE trained in the model's "
        "own space."
    )
