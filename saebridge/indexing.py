"""Index helpers shared by the interventions and the nnsight trace kernel.

Only torch is imported, so the kernel (:mod:`saebridge.adapters.nnsight_remote`) can ship
this module by value to a server without saebridge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor
Positions = int | Sequence[int] | slice | None


def select_positions(x: Tensor, positions: Positions) -> tuple[slice | Tensor, ...]:
    """Index selecting ``positions`` (dim 1) of an activation; every position when None.

    >>> x = torch.zeros(2, 5, 3)
    >>> x[select_positions(x, [1, 3])].shape, x[select_positions(x, 4)].shape
    (torch.Size([2, 2, 3]), torch.Size([2, 1, 3]))
    """
    if positions is None:
        return (slice(None),)
    if isinstance(positions, int):
        positions = [positions]
    if isinstance(positions, slice):
        return (slice(None), positions)
    return (slice(None), torch.as_tensor(list(positions), device=x.device))


def head(x: Tensor, index: int | None) -> Tensor:
    """Head ``index`` of a ``[..., n_heads, d_head]`` activation (all of ``x`` when None)."""
    return x if index is None else x[..., index, :]


def put_head(x: Tensor, new: Tensor, index: int | None) -> Tensor:
    """``x`` with head ``index`` replaced by ``new`` (``new`` itself when None); ``x`` is
    left unchanged."""
    if index is None:
        return new
    out = x.clone()
    out[..., index, :] = new
    return out
