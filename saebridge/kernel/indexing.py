"""Index helpers and the steering edit, shared by the interventions and the nnsight trace
kernel.

Only torch is imported, so the kernel (:mod:`saebridge.adapters.nnsight_remote`) can ship
this module by value to a server without saebridge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from saebridge.errors import ArgumentTypeError, IndexOutOfRangeError, ShapeError

Tensor = torch.Tensor
Positions = int | Sequence[int] | slice | None

INDEX_RULES = ("indices are non-negative integers (never bools or floats, never counted from "
               "the end)")


def as_index(value: Any, what: str) -> int:
    """``value`` as a non-negative Python int: an int or a one-element integer tensor; a bool,
    a float (``1.7``, or even ``1.0``) or a negative index is refused.

    >>> as_index(torch.tensor(3), "feature")
    3
    """
    integral = not isinstance(value, bool | float) and hasattr(type(value), "__index__")
    if isinstance(value, Tensor):
        integral = value.numel() == 1 and not (value.dtype.is_floating_point
                                               or value.dtype == torch.bool)
    if not integral:
        raise ArgumentTypeError(f"{what} must be an integer, got {value!r} "
                                f"({type(value).__name__}); {INDEX_RULES}.")
    index = int(value.__index__())  # no `operator`: NDIF's import allow-list lacks it
    if index < 0:
        raise IndexOutOfRangeError(
            f"{what} {index} is negative; {INDEX_RULES}. Pass the index itself (for the last "
            "of n, n - 1).")
    return index


def check_features(features: Any, d_sae: int, hook: str) -> list[int]:
    """``features`` (an index, a non-empty sequence or a 1-D tensor of them) as a new list
    of ints in ``[0, d_sae)`` for the SAE at ``hook``.

    >>> check_features(torch.tensor([3, 1]), 8, "blocks.0.hook_resid_pre")
    [3, 1]
    """
    if isinstance(features, Tensor) and features.dim() == 1:
        features = list(features.unbind())
    items = features if isinstance(features, Sequence) and not isinstance(features, str) \
        else [features]
    if not items:
        raise IndexOutOfRangeError("no features given, so the edit would change nothing. "
                                   "Pass at least one latent index.")
    out = [as_index(f, "feature") for f in items]
    if max(out) >= d_sae:
        raise IndexOutOfRangeError(f"feature {max(out)} is out of range for the SAE at "
                                   f"{hook!r}, which has d_sae={d_sae} latents (valid: 0 to "
                                   f"{d_sae - 1}).")
    return out


def check_number(value: Any, what: str) -> None:
    """Refuse anything but a real number (a one-element tensor will do) for ``what``."""
    if isinstance(value, bool) or not isinstance(value, int | float | Tensor) or (
            isinstance(value, Tensor) and value.numel() != 1):
        raise ArgumentTypeError(f"{what} must be a number, got {value!r} "
                                f"({type(value).__name__}).")


def check_vector(vector: Any) -> Tensor:
    """A steering vector checked and copied (detached, contiguous): a floating-point
    ``[d]`` or ``[n_heads, d_head]`` tensor, one position's activation (see
    :func:`add_vector`)."""
    if not isinstance(vector, Tensor) or not vector.is_floating_point():
        raise ArgumentTypeError(f"a steering vector must be a floating-point tensor, got "
                                f"{type(vector).__name__} {getattr(vector, 'dtype', '')}.")
    if vector.dim() not in (1, 2):
        raise ShapeError(
            f"steering vector of shape {tuple(vector.shape)}: a steering vector is one "
            "position's activation ([d], or [n_heads, d_head] at a per-head site), added at "
            "every selected position. Use one Steer per position for different vectors.")
    return vector.detach().clone(memory_format=torch.contiguous_format)


def check_positions(positions: Any) -> Positions:
    """``positions`` checked and copied as plain data: None (every position), a
    non-negative int, a non-empty sequence of them, or a slice whose start and stop are
    non-negative ints or None and whose step is a positive int or None.

    >>> check_positions(torch.tensor([0, 2])), check_positions(slice(1, None))
    ([0, 2], slice(1, None, None))
    """
    if positions is None:
        return None
    if isinstance(positions, slice):
        for part in ("start", "stop"):
            if getattr(positions, part) is not None:
                as_index(getattr(positions, part), f"positions slice {part}")
        if positions.step is not None and as_index(positions.step, "positions slice step") < 1:
            raise IndexOutOfRangeError(f"positions {positions} has step 0; use a step >= 1.")
        return positions
    if isinstance(positions, Tensor) and positions.dim() == 1:
        positions = list(positions.unbind())
    if isinstance(positions, str | bytes) or not isinstance(positions, Sequence):
        return as_index(positions, "position")
    if not positions:
        raise IndexOutOfRangeError("positions is empty, so the edit would change nothing. "
                                   "Pass None for every position.")
    return [as_index(p, "position") for p in positions]


def select_positions(x: Tensor, positions: Positions) -> tuple[slice | Tensor, ...]:
    """Index selecting ``positions`` (dim 1) of an activation; every position when None.
    Positions must exist: an int or list entry below the number of positions, a slice
    selecting at least one (its stop may pass the end, as in Python).

    >>> x = torch.zeros(2, 5, 3)
    >>> x[select_positions(x, [1, 3])].shape, x[select_positions(x, 4)].shape
    (torch.Size([2, 2, 3]), torch.Size([2, 1, 3]))
    """
    positions = check_positions(positions)
    if positions is None:
        return (slice(None),)
    n_pos = x.shape[1] if x.dim() > 1 else 0
    if isinstance(positions, slice):
        if not range(n_pos)[positions]:
            raise IndexOutOfRangeError(
                f"positions {positions} selects none of the input's {n_pos} positions, so the "
                "edit would do nothing. Pass positions that exist in every run it is used in.")
        return (slice(None), positions)
    if isinstance(positions, int):
        positions = [positions]
    if max(positions) >= n_pos:
        raise IndexOutOfRangeError(
            f"position {max(positions)} is out of range for an input of {n_pos} positions "
            f"(valid: 0 to {n_pos - 1}). Pass positions that exist in every run it is used in.")
    return (slice(None), torch.as_tensor(positions, device=x.device))


def _check_head(x: Tensor, index: int) -> None:
    if x.dim() < 4:
        raise ShapeError(f"head index {index} given for activations of shape "
                         f"{tuple(x.shape)}, which have no heads (a per-head site is "
                         "[batch, pos, n_heads, d_head]). Drop the head index, or use a "
                         "per-head hook such as attn.hook_z.")
    if not 0 <= index < x.shape[-2]:
        raise IndexOutOfRangeError(f"head index {index} is out of range for a site with "
                                   f"{x.shape[-2]} heads (valid: 0 to {x.shape[-2] - 1}).")


def head(x: Tensor, index: int | None) -> Tensor:
    """Head ``index`` of a ``[batch, pos, n_heads, d_head]`` activation (all of ``x`` when
    None)."""
    if index is None:
        return x
    _check_head(x, index)
    return x[..., index, :]


def put_head(x: Tensor, new: Tensor, index: int | None) -> Tensor:
    """``x`` with head ``index`` replaced by ``new`` (``new`` itself when None); ``x`` is
    left unchanged."""
    if index is None:
        return new
    _check_head(x, index)
    out = x.clone()
    out[..., index, :] = new
    return out


def add_vector(x: Tensor, vector: Tensor, coef: float, positions: Positions,
               index: int | None, hook: str) -> Tensor:
    """``x`` with ``coef * vector`` added at ``positions`` (of head ``index``), as
    :class:`saebridge.Steer` applies it. ``vector`` is one position's activation: the
    site's shape per position (``[d]``; ``[n_heads, d_head]`` at a per-head site, which also
    takes it flat); the same vector is added at every selected position. Any other shape
    (``[pos, d]`` included) is refused rather than broadcast.

    >>> add_vector(torch.zeros(1, 3, 2), torch.ones(2), 2.0, [1], None, "h")[0].tolist()
    [[0.0, 0.0], [2.0, 2.0], [0.0, 0.0]]
    """
    target = head(x, index)
    per_position = tuple(target.shape[2:])
    vec = vector.to(x.device, x.dtype)
    if tuple(vec.shape) == (target[0, 0].numel(),) and len(per_position) > 1:
        vec = vec.reshape(per_position)
    elif tuple(vec.shape) != per_position:
        raise ShapeError(
            f"steering vector of shape {tuple(vector.shape)} does not fit hook {hook!r}, whose "
            f"activations are {per_position} per position. A steering vector is one "
            "position's activation, added at every selected position; to add different "
            "vectors at different positions, use one Steer per position.")
    out = x.clone()
    head(out, index)[select_positions(x, positions)] += coef * vec
    return out
