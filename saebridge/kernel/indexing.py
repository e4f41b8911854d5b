"""Index helpers and the steering edit, shared by the interventions and the nnsight trace
kernel.

Only torch is imported, so the kernel (:mod:`saebridge.adapters.nnsight_remote`) can ship
this module by value to a server without saebridge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saebridge.errors import ShapeError

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


def add_vector(x: Tensor, vector: Tensor, coef: float, positions: Positions,
               index: int | None, hook: str) -> Tensor:
    """``x`` with ``coef * vector`` added at ``positions`` (of head ``index``), as
    :class:`saebridge.Steer` applies it; ``vector`` is the site's width per position (a
    flat vector also fits a ``[n_heads, d_head]`` site).

    >>> add_vector(torch.zeros(1, 3, 2), torch.ones(2), 2.0, [1], None, "h")[0].tolist()
    [[0.0, 0.0], [2.0, 2.0], [0.0, 0.0]]
    """
    target = head(x, index)
    vec = vector.to(x.device, x.dtype)
    if vec.numel() != target.shape[-1] and vec.numel() == target[0, 0].numel():
        vec = vec.reshape(target.shape[2:])
    elif vec.shape[-1:] != target.shape[-1:]:
        raise ShapeError(
            f"steering vector of shape {tuple(vector.shape)} does not fit hook {hook!r}, whose "
            f"activations are {tuple(target.shape[2:])} per position. Pass a vector of the "
            "site's width.")
    out = x.clone()
    head(out, index)[select_positions(x, positions)] += coef * vec
    return out
