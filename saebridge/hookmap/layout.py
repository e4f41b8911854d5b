"""Reshapes between a Hugging Face tensor and TransformerLens's layout of the same hook.

Each layout reads a canonical view out of the native tensor and writes an edited
canonical view back into it. Hook maps name layouts; adapters apply them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Layout:
    """How a canonical view sits in a native tensor.

    ``part`` selects one of q/k/v from a fused projection: GPT-2's ``c_attn`` concatenates
    them (``[q | k | v]``), GPT-NeoX's ``query_key_value`` interleaves them per head
    (``[h0: q k v | h1: q k v | …]``, ``interleaved=True``). ``heads`` splits the last
    dimension into ``[heads, d_head]`` (by ``d_head`` when the caller knows it, which
    grouped-query k/v with fewer heads need). ``unnorm`` undoes a hooked norm's gain
    (and bias): TransformerLens's ``hook_normalized`` is taken before them in every space,
    while an HF norm's output has them applied. ``"affine"`` is LayerNorm's ``w, b``;
    ``"scale"`` is RMSNorm's ``w``; ``"scale+1"`` is Gemma's RMSNorm gain ``1 + w``.
    """

    part: int | None = None
    heads: bool = False
    interleaved: bool = False
    unnorm: str | None = None

    def read(self, t: Tensor, n_heads: int, module: torch.nn.Module,
             d_head: int | None = None) -> Tensor:
        if self.unnorm is not None:
            gain, bias = _gain_bias(module, self.unnorm)
            return (t - bias) / gain
        if self.interleaved:
            return t.unflatten(-1, (n_heads, 3, -1))[..., self.part, :]
        if self.part is not None:
            t = t.chunk(3, dim=-1)[self.part]
        if not self.heads:
            return t
        return t.unflatten(-1, (-1, d_head) if d_head else (n_heads, -1))

    def write(self, t: Tensor, new: Tensor, module: torch.nn.Module) -> Tensor:
        if self.unnorm is not None:
            gain, bias = _gain_bias(module, self.unnorm)
            return new * gain + bias
        if self.interleaved:
            parts = list(t.unflatten(-1, (new.shape[-2], 3, -1)).unbind(-2))
            parts[self.part] = new  # type: ignore[index]
            return torch.stack(parts, dim=-2).flatten(-3)
        new = new.flatten(-2) if self.heads else new
        if self.part is None:
            return new
        parts = list(t.chunk(3, dim=-1))
        parts[self.part] = new
        return torch.cat(parts, dim=-1)


def _gain_bias(module: torch.nn.Module, kind: str) -> tuple[Tensor, Tensor | float]:
    weight = _param(module, "weight")
    if kind == "affine":
        return weight, _param(module, "bias")
    return (1.0 + weight, 0.0) if kind == "scale+1" else (weight, 0.0)


def _param(module: torch.nn.Module, name: str) -> Tensor:
    value = getattr(module, name)
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(module).__name__} has no tensor {name!r} to undo")
    return value


LAYOUTS: dict[str, Layout] = {
    "flat": Layout(),
    "heads": Layout(heads=True),
    "unaffine": Layout(unnorm="affine"),
    "unscale": Layout(unnorm="scale"),
    "unscale+1": Layout(unnorm="scale+1"),
    **{f"qkv:{i}": Layout(part=i, heads=True) for i in range(3)},
    **{f"qkv-interleaved:{i}": Layout(part=i, heads=True, interleaved=True) for i in range(3)},
}
