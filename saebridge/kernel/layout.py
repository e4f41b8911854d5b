"""Reshapes between a native tensor and TransformerLens's layout of the same hook.

A :class:`Layout` reads a canonical view out of the tensor a module boundary carries and
writes an edited view back into it. Hook maps name layouts
(:data:`saebridge.hookmap.layout.LAYOUTS`); the torch-hook adapters and the nnsight trace
kernel both apply them with :func:`read` and :func:`write`. ``norm`` is whatever holds the
hooked norm's ``weight``/``bias``: the module itself, or its nnsight envoy on a server.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

Tensor = torch.Tensor


class Layout(NamedTuple):
    """How a canonical view sits in a native tensor.

    ``part`` selects one of q/k/v from a fused projection: GPT-2's ``c_attn`` concatenates
    them (``[q | k | v]``), GPT-NeoX's ``query_key_value`` interleaves them per head
    (``[h0: q k v | h1: q k v | …]``, ``interleaved=True``). ``heads`` splits the last
    dimension into ``[heads, d_head]`` (by ``d_head`` when the caller knows it, which
    grouped-query k/v with fewer heads need). ``unnorm`` undoes a hooked norm's gain
    (and bias): TransformerLens's ``hook_normalized`` is taken before them in every space,
    while an HF norm's output has them applied. ``"affine"`` is LayerNorm's ``w, b``;
    ``"scale"`` is RMSNorm's ``w``; ``"scale+1"`` is Gemma's RMSNorm gain ``1 + w``.

    >>> t = torch.arange(12.0).reshape(1, 12)
    >>> read(Layout(part=1, heads=True), t, n_heads=2).tolist()
    [[[4.0, 5.0], [6.0, 7.0]]]
    """

    part: int | None = None
    heads: bool = False
    interleaved: bool = False
    unnorm: str | None = None


def read(layout: Layout, t: Tensor, n_heads: int, d_head: int | None = None,
         norm: Any = None) -> Tensor:
    """The canonical view of ``t``."""
    if layout.unnorm is not None:
        gain, bias = gain_bias(norm, layout.unnorm)
        return (t - bias) / gain
    if layout.interleaved:
        return t.unflatten(-1, (n_heads, 3, -1))[..., layout.part, :]
    if layout.part is not None:
        t = t.chunk(3, dim=-1)[layout.part]
    if not layout.heads:
        return t
    return t.unflatten(-1, (-1, d_head) if d_head else (n_heads, -1))


def write(layout: Layout, t: Tensor, new: Tensor, norm: Any = None) -> Tensor:
    """``t`` with its canonical view replaced by ``new``."""
    if layout.unnorm is not None:
        gain, bias = gain_bias(norm, layout.unnorm)
        return new * gain + bias
    if layout.interleaved:
        parts = list(t.unflatten(-1, (new.shape[-2], 3, -1)).unbind(-2))
        parts[layout.part] = new  # type: ignore[index]
        return torch.stack(parts, dim=-2).flatten(-3)
    new = new.flatten(-2) if layout.heads else new
    if layout.part is None:
        return new
    parts = list(t.chunk(3, dim=-1))
    parts[layout.part] = new
    return torch.cat(parts, dim=-1)


def gain_bias(norm: Any, kind: str) -> tuple[Any, Any]:
    """The gain and bias a norm applies after normalising (``kind`` as :attr:`Layout.unnorm`)."""
    weight = norm.weight
    if kind == "affine":
        return weight, norm.bias
    return (1.0 + weight, 0.0) if kind == "scale+1" else (weight, 0.0)


class Location(NamedTuple):
    """Where a canonical hook lives in a module tree (what an adapter's ``locate`` says).

    The hook's value is the ``side`` (``"input"``/``"output"``) of the module at ``path``
    (``""`` is the root): element ``index`` of a tuple output, or positional argument
    ``arg`` of the input (keyword ``kwarg`` when passed by name), read through ``layout``
    with ``n_heads``/``d_head``. ``residual`` names a module whose input is added to the
    value (no boundary holds TransformerLens's ``hook_resid_mid`` in GPT-2: it is the
    attention output plus the block input); writes go back minus it. ``convert`` is a
    backend's own reshape object (``convert(x)``/``revert(x)``: a TransformerBridge hook
    point's ``hook_conversion``), code that cannot travel to a server. ``companion`` names
    a later hook an edit here must also reach (a bridge's ``hook_resid_mid``), which only
    the backend's own runs arrange.
    """

    path: str
    side: str = "output"
    index: int | None = None
    arg: int = 0
    kwarg: str | None = None
    layout: Layout = Layout()
    n_heads: int = 0
    d_head: int | None = None
    residual: str | None = None
    writable: bool = True
    convert: Any = None
    companion: str | None = None


def apply_at(loc: Location, t: Tensor, fn: Any, residual: Tensor | None, norm: Any
             ) -> Tensor | None:
    """Run ``fn`` on the canonical view of ``t`` (the tensor ``loc`` names); the new ``t``,
    or None when ``fn`` left the view unchanged (or the hook is read-only)."""
    view = read(loc.layout, t, loc.n_heads, loc.d_head, norm)
    if loc.convert is not None:
        view = loc.convert.convert(view)
    if residual is not None:
        view = view + residual
    new = fn(view)
    if new is view or not loc.writable:
        return None
    if residual is not None:
        new = new - residual
    if loc.convert is not None:
        new = loc.convert.revert(new)
    return write(loc.layout, t, new, norm)
