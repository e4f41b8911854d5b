"""Constants of a model's unprocessed weights that TransformerLens processing removes.

:class:`RawStats` holds what the activation-space conversions in
:mod:`saebridge.hookmap.convert` need: means of the embeddings and of the weights that
write into the residual stream, value biases, and LayerNorm affines. They are computed
per layer and only when first asked for (:meth:`RawStats.lazy`): a model dispatched over
several devices, or with layers offloaded to the CPU or disk by accelerate, is never
materialised; each layer's constants are computed from that layer's weights, on the
device that layer runs on, and kept (a few vectors per layer).

>>> import torch
>>> w = {"embed.W_E": torch.ones(5, 4), "blocks.0.attn.W_V": torch.ones(2, 4, 3),
...      "blocks.0.attn.b_V": torch.ones(2, 3), "blocks.0.attn.W_O": torch.ones(2, 3, 4),
...      "blocks.0.attn.b_O": torch.zeros(4), "blocks.0.mlp.W_out": torch.ones(8, 4),
...      "blocks.0.mlp.b_out": torch.zeros(4)}
>>> stats = RawStats.from_tl_weights(w)
>>> len(stats), stats.b_V_LKd[0].shape, stats.embed_mean_V.tolist()
(1, torch.Size([2, 3]), [1.0, 1.0, 1.0, 1.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from saebridge.errors import IndexOutOfRangeError
from saebridge.hookmap.space import ActivationSpace

Tensor = torch.Tensor
Weights = Mapping[str, Tensor]
Placement = torch.device | str | Callable[[int | None], torch.device | str] | None
"""Where :meth:`RawStats.to` puts constants: one device, a function of the layer (None:
the embeddings), or None to leave each where it was computed."""


class LayerStats(NamedTuple):
    """One layer's constants (``K`` key/value heads, ``H`` query heads)."""

    b_V_Kd: Tensor
    """Value biases per key/value head."""
    ln1_b_W_V_Kd: Tensor
    """``ln1.b @ W_V``: the part of the value bias that ``fold_ln`` adds."""
    W_O_mean_Hd: Tensor
    """Mean over d_model of the unprocessed ``W_O``."""
    b_O_mean: Tensor
    W_out_mean_M: Tensor
    """Mean over d_model of the unprocessed ``W_out``."""
    b_out_mean: Tensor
    ln1: tuple[Tensor, Tensor] | None
    """Unprocessed ``ln1`` gain and bias (an RMSNorm's bias is zero); None without norms
    (``fold_ln`` moves them into the next weights: transcoders reading a norm's output
    apply them)."""
    ln2: tuple[Tensor, Tensor] | None


class EmbedStats(NamedTuple):
    embed_mean_V: Tensor
    """Mean over d_model of each unprocessed embedding row."""
    pos_mean_P: Tensor | None
    """Mean over d_model of each positional embedding row; None for rotary models."""


def layer_stats(w: Weights, p: str = "") -> LayerStats:
    """A layer's constants from its unprocessed weights in TransformerLens layout, keys
    prefixed by ``p`` (``"blocks.3."``); grouped-query models keep k/v under
    ``_W_V``/``_b_V``, as TransformerLens does."""

    def get(name: str) -> Tensor:
        return w[p + name] if p + name in w else w[p + name.replace(".", "._", 1)]

    with torch.no_grad():
        W_V = get("attn.W_V")
        if p + "ln1.b" in w:
            ln1_b_W_V = torch.einsum("d,hde->he", w[p + "ln1.b"], W_V)
        else:  # RMSNorm or no norm: no bias to fold
            ln1_b_W_V = W_V.new_zeros(W_V.shape[0], W_V.shape[2])
        return LayerStats(
            b_V_Kd=get("attn.b_V").clone(), ln1_b_W_V_Kd=ln1_b_W_V,
            W_O_mean_Hd=w[p + "attn.W_O"].mean(-1), b_O_mean=w[p + "attn.b_O"].mean(),
            W_out_mean_M=w[p + "mlp.W_out"].mean(-1), b_out_mean=w[p + "mlp.b_out"].mean(),
            ln1=_ln(w, p + "ln1"), ln2=_ln(w, p + "ln2"))


def _ln(w: Weights, key: str) -> tuple[Tensor, Tensor] | None:
    gain = w.get(key + ".w")
    if gain is None:
        return None
    bias = w.get(key + ".b")
    return gain.clone(), bias.clone() if bias is not None else torch.zeros_like(gain)


def embed_stats(w: Weights) -> EmbedStats:
    """The embeddings' constants from unprocessed weights in TransformerLens layout."""
    with torch.no_grad():
        pos = w.get("pos_embed.W_pos")
        return EmbedStats(w["embed.W_E"].mean(-1), None if pos is None else pos.mean(-1))


class PerLayer:
    """One constant of every layer, indexed by layer (``stats.W_O_mean_LHd[3]``); each
    layer's value is computed on first use."""

    def __init__(self, stats: RawStats, field: str) -> None:
        self._stats, self._field = stats, field

    def __getitem__(self, layer: int) -> Tensor:
        return getattr(self._stats.layer(int(layer)), self._field)

    def __len__(self) -> int:
        return len(self._stats)

    def stack(self) -> Tensor:
        """Every layer's value in one tensor ``[n_layers, ...]`` (on the first layer's
        device): computes them all."""
        values = [self[i] for i in range(len(self))]
        return torch.stack([v.to(values[0].device) for v in values])


class RawStats:
    """Constants of a model's unprocessed weights that TransformerLens processing removes.

    Value-bias statistics are per key/value head (``K`` heads: fewer than the query
    heads under grouped-query attention); :meth:`value_offset` repeats them per query
    head for ``hook_z``, as the model does. Models without learned positions, LayerNorm
    biases or value biases have zeros there.

    Built from a function giving one layer's constants and one giving the embeddings'
    (:meth:`lazy`), each called once, on first use.
    """

    def __init__(self, n_layers: int, layer: Callable[[int], LayerStats],
                 embed: Callable[[], EmbedStats]) -> None:
        self.n_layers = n_layers
        self._layer_fn, self._embed_fn = layer, embed
        self._layers: dict[int, LayerStats] = {}
        self._embed: EmbedStats | None = None

    @classmethod
    def lazy(cls, n_layers: int, layer_weights: Callable[[int], Weights],
             embed_weights: Callable[[], Weights]) -> RawStats:
        """Constants computed on first use from ``layer_weights(i)`` (layer ``i``'s
        unprocessed weights in TransformerLens layout, without the ``blocks.{i}.``
        prefix) and ``embed_weights()`` (``embed.W_E``, ``pos_embed.W_pos``)."""
        return cls(n_layers, lambda i: layer_stats(layer_weights(i)),
                   lambda: embed_stats(embed_weights()))

    @classmethod
    def from_tl_weights(cls, w: Weights) -> RawStats:
        """Statistics from unprocessed weights in TransformerLens layout, all computed now
        (so ``w`` is not kept alive)."""
        n_layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
        layers = [layer_stats(w, f"blocks.{i}.") for i in range(n_layers)]
        embed = embed_stats(w)
        stats = cls(n_layers, layers.__getitem__, lambda: embed)
        stats._layers, stats._embed = dict(enumerate(layers)), embed
        return stats

    def __len__(self) -> int:
        return self.n_layers

    def layer(self, layer: int) -> LayerStats:
        """Layer ``layer``'s constants (computed on first use)."""
        if not 0 <= layer < self.n_layers:
            raise IndexOutOfRangeError(f"layer {layer} out of range: the model has "
                                       f"{self.n_layers}.")
        found = self._layers.get(layer)
        if found is None:
            found = self._layers[layer] = self._layer_fn(layer)
        return found

    def embed(self) -> EmbedStats:
        if self._embed is None:
            self._embed = self._embed_fn()
        return self._embed

    @property
    def embed_mean_V(self) -> Tensor:
        return self.embed().embed_mean_V

    @property
    def pos_mean_P(self) -> Tensor | None:
        return self.embed().pos_mean_P

    b_V_LKd = property(lambda self: PerLayer(self, "b_V_Kd"))
    ln1_b_W_V_LKd = property(lambda self: PerLayer(self, "ln1_b_W_V_Kd"))
    W_O_mean_LHd = property(lambda self: PerLayer(self, "W_O_mean_Hd"))
    b_O_mean_L = property(lambda self: PerLayer(self, "b_O_mean"))
    W_out_mean_LM = property(lambda self: PerLayer(self, "W_out_mean_M"))
    b_out_mean_L = property(lambda self: PerLayer(self, "b_out_mean"))

    def ln_affine(self, layer: int, ln: str) -> tuple[Tensor, Tensor] | None:
        """The unprocessed gain and bias of LayerNorm ``ln`` (``ln1``/``ln2``) at ``layer``."""
        return getattr(self.layer(layer), ln)

    def to(self, device: Placement, dtype: torch.dtype | None = None) -> RawStats:
        """The same constants on ``device`` (or per layer: see :data:`Placement`) in
        ``dtype``, moved as each is first used; this object's computed values are shared."""
        def place(layer: int | None) -> torch.device | str | None:
            return device(layer) if callable(device) else device

        def move(t: Tensor, layer: int | None) -> Tensor:
            return t.to(place(layer) or t.device, dtype or t.dtype)

        def moved_layer(i: int) -> LayerStats:
            s = self.layer(i)

            def pair(p: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
                return None if p is None else (move(p[0], i), move(p[1], i))

            return s._replace(**{f: move(getattr(s, f), i) for f in s._fields[:6]},
                              ln1=pair(s.ln1), ln2=pair(s.ln2))

        def moved_embed() -> EmbedStats:
            e = self.embed()
            return EmbedStats(move(e.embed_mean_V, None),
                              None if e.pos_mean_P is None else move(e.pos_mean_P, None))

        return RawStats(self.n_layers, moved_layer, moved_embed)

    def value_offset(self, layer: int, space: ActivationSpace, n_heads: int | None = None
                     ) -> Tensor | float:
        """What ``space`` removed from ``hook_v``/``hook_z`` at ``layer``, per head: per
        key/value head, or repeated to ``n_heads`` query heads (for ``hook_z``)."""
        if not space.fold_value_biases:
            return 0.0
        s = self.layer(layer)
        off = s.b_V_Kd + s.ln1_b_W_V_Kd if space.fold_ln else s.b_V_Kd
        if n_heads is not None and n_heads != off.shape[0]:
            off = off.repeat_interleave(n_heads // off.shape[0], dim=0)
        return off
