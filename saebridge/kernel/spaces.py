"""Activation-space conversions as constants.

Between activation spaces every site differs by a shift: ``x_dst = x_src + shift``
(:mod:`saebridge.hookmap.convert` says which shift, from the model's weights). A
:class:`Conv` is that rule as data: nothing, the mean over d_model (a centred space is
reached by removing it), or a constant tensor (the value biases at ``hook_v``/``hook_z``;
the tracked raw mean of a centred stream, computed for one forward). Splicing converts
native -> SAE space, and writes back the reconstruction minus the same shift: exactly
what the SAE's space removed is restored.

Going from a raw residual stream to a centred one is not a plain centring once something
upstream was edited: in a centred (TransformerLens-processed) model every *writer* is
mean-free, but an edit (a reconstruction, a steering vector) writes its own mean into the
stream, and the processed model keeps it. So the centred value is ``centre(x)`` plus the
mean over d_model that the run's edits wrote so far: a conversion with ``acc`` names that
per-forward sum, which :func:`track` keeps after every edit and :func:`resolve` adds back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

Tensor = torch.Tensor


class Conv(NamedTuple):
    """``x_dst = x_src + shift``: ``center`` removes the mean over the last dimension;
    ``shift`` is a constant, broadcast (per key/value head at ``v`` sites: repeated to
    the site's heads); both unset is the identity.

    >>> x = torch.tensor([[1.0, 3.0]])
    >>> shift_for(Conv(center=True), x), shift_for(Conv(), x) is None
    (tensor([[-2.]]), True)
    """

    center: bool = False
    shift: Tensor | None = None
    acc: str | None = None
    """With ``center``: the key, in a run's state, of the mean that edits wrote into this
    stream so far (``[batch, pos, 1]``), added back after centring (see :func:`resolve`)."""
    center_writes: bool = False
    """Writes go back mean-free (:func:`back`): the converted space's model drops a
    written value's mean (``fold_ln`` centres the weights reading a LayerNorm's output)."""


IDENTITY = Conv()
CENTER = Conv(center=True)


def resolve(conv: Conv, x: Tensor, state: dict) -> Conv:
    """``conv`` at ``x`` for this forward: a centring that keeps what the run's edits wrote
    (``state[conv.acc]``) becomes a plain shift; any other conversion is returned as is.

    >>> x, state = torch.tensor([[1.0, 3.0]]), {"e": torch.tensor([[0.5]])}
    >>> resolve(Conv(center=True, acc="e"), x, state).shift
    tensor([[-1.5000]])
    """
    if conv.acc is None:
        return conv
    shift = -x.mean(-1, keepdim=True)
    written = state.get(conv.acc)
    if written is None:
        return Conv(shift=shift)
    # [batch, pos, 1]; a site repeating the stream over heads ([batch, pos, heads, d]) has
    # the same value in each head.
    written = written.reshape(*written.shape[:-1], *[1] * (x.dim() - written.dim()), 1)
    return Conv(shift=shift + written.to(shift))


def track(state: dict, keys: tuple[str, ...], old: Tensor, new: Tensor) -> None:
    """After an edit at a residual-stream site (``old`` -> ``new``): add the mean over
    d_model it wrote to each of the streams ``keys`` (the residual stream, and the written
    site itself for ``hook_attn_out``-like sites)."""
    if new is old or not keys:
        return
    delta = new.mean(-1, keepdim=True) - old.mean(-1, keepdim=True)
    for key in keys:
        state[key] = delta if key not in state else state[key] + delta


def shift_for(conv: Conv, x: Tensor) -> Tensor | None:
    """The shift taking ``x`` from the model's space to the converted one (None: none)."""
    if conv.center:
        return -x.mean(-1, keepdim=True)
    shift = conv.shift
    if shift is None:
        return None
    if x.dim() >= 4 and shift.dim() >= 2 and shift.shape[-2] != x.shape[-2]:
        shift = shift.repeat_interleave(x.shape[-2] // shift.shape[-2], dim=-2)  # GQA
    return shift.to(x.device, x.dtype) if isinstance(shift, Tensor) else shift


def back(conv: Conv, new: Tensor, shift: Tensor | None) -> Tensor:
    """``new`` (in the converted space) back in the model's: minus the ``shift`` its read
    added; with ``center_writes``, minus its mean over the last dimension too.

    >>> back(Conv(center_writes=True), torch.tensor([[1.0, 3.0]]), None)
    tensor([[-1.,  1.]])
    """
    out = new if shift is None else new - shift
    return out - out.mean(-1, keepdim=True) if conv.center_writes else out


def forward(conv: Conv, x: Tensor) -> Tensor:
    """``x`` in the converted space."""
    shift = shift_for(conv, x)
    return x if shift is None else x + shift
