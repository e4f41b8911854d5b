"""Activation-space conversions as constants.

Between activation spaces every site differs by a shift: ``x_dst = x_src + shift``
(:mod:`saebridge.hookmap.convert` says which shift, from the model's weights). A
:class:`Conv` is that rule as data: nothing, the mean over d_model (a centred space is
reached by removing it), or a constant tensor (the value biases at ``hook_v``/``hook_z``;
the tracked raw mean of a centred stream, computed for one forward). Splicing converts
native -> SAE space, and writes back the reconstruction minus the same shift: exactly
what the SAE's space removed is restored.
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


IDENTITY = Conv()
CENTER = Conv(center=True)


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


def forward(conv: Conv, x: Tensor) -> Tensor:
    """``x`` in the converted space."""
    shift = shift_for(conv, x)
    return x if shift is None else x + shift
