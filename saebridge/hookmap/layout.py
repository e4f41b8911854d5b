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
    """Split ``qkv`` thirds (``part`` 0/1/2, or ``None`` for the whole tensor), then heads;
    or undo the hooked LayerNorm's gain and bias (``unaffine``): TransformerLens's
    ``hook_normalized`` is ``(x - mean) / scale`` before ``w`` and ``b`` in every space,
    while an HF LayerNorm's output has them applied."""

    part: int | None = None
    heads: bool = False
    unaffine: bool = False

    def read(self, t: Tensor, n_heads: int, module: torch.nn.Module) -> Tensor:
        if self.unaffine:
            return (t - _param(module, "bias")) / _param(module, "weight")
        if self.part is not None:
            t = t.chunk(3, dim=-1)[self.part]
        return t.unflatten(-1, (n_heads, -1)) if self.heads else t

    def write(self, t: Tensor, new: Tensor, module: torch.nn.Module) -> Tensor:
        if self.unaffine:
            return new * _param(module, "weight") + _param(module, "bias")
        new = new.flatten(-2) if self.heads else new
        if self.part is None:
            return new
        parts = list(t.chunk(3, dim=-1))
        parts[self.part] = new
        return torch.cat(parts, dim=-1)


def _param(module: torch.nn.Module, name: str) -> Tensor:
    value = getattr(module, name)
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(module).__name__} has no tensor {name!r} to undo")
    return value


LAYOUTS: dict[str, Layout] = {
    "flat": Layout(),
    "heads": Layout(heads=True),
    "unaffine": Layout(unaffine=True),
    **{f"qkv:{i}": Layout(part=i, heads=True) for i in range(3)},
}
