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

import torch

from saebridge.errors import SpaceConversionError
from saebridge.hookmap.lookup import split
from saebridge.hookmap.rawstats import RawStats  # re-exported
from saebridge.hookmap.site import Kind
from saebridge.hookmap.space import ActivationSpace
from saebridge.kernel.spaces import IDENTITY, Conv

Tensor = torch.Tensor

TRACKED_SITES = ("attn.hook_z", "mlp.hook_post")
"""Per-block sites a :class:`RawMeanTracker` must observe (after any edits there)."""


class RawMeanTracker:
    """Rebuilds the unprocessed residual stream's mean inside a centred (processed) model.

    Observes ``hook_z`` and ``mlp.hook_post`` of every block, after any edits there, and
    answers the raw mean (``[batch, pos]``) of any residual or written site.
    """

    def __init__(self, stats: RawStats, native: ActivationSpace, tokens_BP: Tensor,
                 mlp_after_attn: bool = True) -> None:
        self.stats, self.native = stats, native
        self.mlp_in = "hook_resid_mid" if mlp_after_attn else "hook_resid_pre"
        """Whose value ``hook_mlp_in`` is: a parallel block's MLP reads the block input."""
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
                                + s.b_O_mean_L[layer]).to(self.embed_BP.device)
        elif rel == "mlp.hook_post":
            # Kept on one device: a model split over devices has layers on several.
            self.mlp[layer] = (x @ s.W_out_mean_LM[layer] + s.b_out_mean_L[layer]).to(
                self.embed_BP.device)

    def mean(self, name: str) -> Tensor:
        """Raw mean over d_model at a ``resid``/``write`` site, shape ``[batch, pos]``."""
        layer, rel = split(name)
        rel = self.mlp_in if rel == "hook_mlp_in" else rel
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


EDITS = "edits:"
"""Prefix of the per-forward sums of what edits wrote (see :func:`edit_keys`)."""


def stream_key(name: str, kind: Kind) -> str:
    """The key of the stream a ``resid``/``write`` site's value lives in: the written site
    itself (``hook_attn_out``), else the residual stream. A centring read there adds back
    the mean edits wrote under it."""
    return EDITS + (name if kind == "write" else "resid")


def edit_keys(name: str, kind: Kind) -> tuple[str, ...]:
    """The streams an edit at hook ``name`` writes into, as keys of a run's state under which
    :func:`saebridge.kernel.spaces.track` sums the mean it wrote: the residual stream (and,
    at a written site such as ``hook_attn_out``, that site itself); none elsewhere (the
    writers of a centred model are mean-free whatever their inputs). ``hook_mlp_in`` is the
    MLP's own copy of the stream (TransformerLens's ``use_hook_mlp_in``), read through a
    norm: an edit there writes into nothing."""
    if name.endswith("hook_mlp_in"):
        return ()
    if kind == "resid":
        return (stream_key(name, kind),)
    if kind == "write":
        return (stream_key(name, kind), EDITS + "resid")
    return ()


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
            if src.center_writing_weights:
                return IDENTITY
            # What the centred model holds here: its writers are mean-free, but edits keep
            # the mean they wrote (as in SAELens on a processed TransformerLens model).
            return Conv(center=True, acc=stream_key(name, kind))
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
    if kind == "normed" and dst.fold_ln and not src.fold_ln:
        # A folded model reads a LayerNorm's output through centred weights: what is
        # written there counts without its mean. The reverse (an unfolded SAE writing into
        # a folded model) cannot keep the mean at this site: the engine refuses those
        # writes (saebridge.engine.check); reads are the same in both spaces.
        return Conv(center_writes=True)
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
