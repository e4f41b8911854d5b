"""Blocked encoding: an SAE's active latents without its dense ``[tokens, d_sae]`` latents.

A splice that keeps none of the SAE's intermediates needs only the active latents, and the
decoder rows they pick (:mod:`saebridge.kernel.sparse`). A dense encode writes a fresh
``[tokens, d_sae]`` pre-activation tensor — 48 MiB for 512 tokens of a 24576-latent SAE —
and then reads it again for the activation function, for the search for non-zeros and (TopK)
for the scatter into dense latents. Here the encoder runs one block of latents at a time
into one small buffer that stays in cache: ``x @ W_enc[:, block]``, the bias, the
activation and the search for the active latents all touch it while it is hot, and only the
active entries leave the block. TopK takes the first block's ``k`` largest per row, and
from later blocks only the entries above the smallest of those (:class:`_TopK`): the global
top ``k`` is always among the candidates.

The active latents come out in :class:`~saebridge.kernel.sparse.SparseLatents` order (ascending
latent index per token), with the values the dense path computes: the per-block arithmetic
is the dense path's, operation for operation, so latents and reconstructions agree with
:meth:`SAE.run` up to the matmul's own blocking (bit for bit where the BLAS computes a column
block as it computes the whole; in any case within the dtype's rounding). Exactly tied TopK
pre-activations may pick another of the tied latents than one ``topk`` call over the row.

Only torch is imported, so the nnsight remote kernel can ship this module by value.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from saebridge.kernel.sparse import (
    MAX_SPARSE_DENSITY,
    SparseLatents,
    from_topk,
    is_sparse_enough,
    offsets,
)

Tensor = torch.Tensor

BLOCK_ELEMENTS = 1 << 19
"""Entries of one block's pre-activations on CPU: 2 MiB in fp32, inside a core's L2/L3
share. At 512 tokens × 24576 latents one fresh dense matmul output costs ~10-15 % more
than blocks of 512-2048 latents (``benchmarks/profile_splice.py``, docs/benchmarks.md)."""

MIN_BLOCK = 256
"""Fewest latents per block: narrower matmuls lose more to their own overhead."""


def block_size(n_rows: int, d_sae: int, device: torch.device) -> int:
    """Latents per block. One block on accelerators: their caching allocators make a fresh
    output cheap, and every block's search for non-zeros would wait on the device."""
    if device.type != "cpu":
        return d_sae
    return min(d_sae, max(MIN_BLOCK, BLOCK_ELEMENTS // max(n_rows, 1)))


def encode_sae(x_RD: Tensor, params: Mapping[str, Tensor], architecture: str,
               k: float | None, rank_scale_F: Tensor | None = None, block: int | None = None
               ) -> SparseLatents | None:
    """:func:`encode_active` of an SAE given its parameters by their SAELens names
    (``W_enc``, ``b_enc`` or ``b_gate``/``b_mag``/``r_mag``, ``threshold``), as both
    :class:`saebridge.SAE` and the nnsight trace kernel hold them."""
    gated = architecture == "gated"
    return encode_active(
        x_RD, params["W_enc"], params["b_gate" if gated else "b_enc"], architecture,
        k=None if k is None else int(k), threshold_F=params.get("threshold"),
        rank_scale_F=rank_scale_F, mag_scale_F=params["r_mag"].exp() if gated else None,
        b_mag_F=params.get("b_mag"), block=block)


def encode_active(x_RD: Tensor, W_enc_DF: Tensor, b_F: Tensor, architecture: str, *,
                  k: int | None = None, threshold_F: Tensor | None = None,
                  rank_scale_F: Tensor | None = None, mag_scale_F: Tensor | None = None,
                  b_mag_F: Tensor | None = None, max_density: float = MAX_SPARSE_DENSITY,
                  block: int | None = None) -> SparseLatents | None:
    """The active latents of the rows of ``x_RD`` (already normalised, ``b_dec`` subtracted),
    or None as soon as they are denser than ``max_density`` (decode those densely).

    ``b_F`` is ``b_enc`` (``b_gate`` for gated SAEs, magnitude path ``(x @ W_enc) *
    mag_scale + b_mag``); ``rank_scale_F`` scales the pre-activations before the activation
    (``rescale_acts_by_decoder_norm``); ``threshold_F`` is JumpReLU's; ``block`` overrides
    :func:`block_size`. NaN is active, as on the dense path: a NaN row never becomes b_dec.
    """
    R, F = x_RD.shape[0], W_enc_DF.shape[1]
    if R * F == 0:
        return None  # nothing to search; the dense path handles empty shapes
    top = None
    if architecture == "topk":
        assert k is not None
        if not is_sparse_enough(min(k, F) * R, R * F, max_density):
            return None
        top = _TopK(R, min(k, F))
    step = block or block_size(R, F, x_RD.device)
    buffer = x_RD.new_empty(R * min(step, F))
    mag_buffer = torch.empty_like(buffer) if architecture == "gated" else None
    found: list[tuple[Tensor, Tensor, Tensor]] = []  # per block: rows, latents, values
    nnz, budget = 0, max_density * R * F
    for start in range(0, F, step):
        stop = min(start + step, F)
        pre_RC = torch.mm(x_RD, W_enc_DF[:, start:stop],
                          out=buffer[:R * (stop - start)].view(R, stop - start))
        if architecture == "gated":
            assert mag_buffer is not None and mag_scale_F is not None and b_mag_F is not None
            gate_RC = pre_RC > -b_F[start:stop]  # (x @ W_enc + b_gate) > 0, without the add
            ranked_RC = torch.mul(pre_RC, mag_scale_F[start:stop],
                                  out=mag_buffer[:pre_RC.numel()].view_as(pre_RC))
            ranked_RC.add_(b_mag_F[start:stop])
            active_RC = gate_RC.logical_and_(ranked_RC > 0).logical_or_(ranked_RC.isnan())
        else:
            ranked_RC = pre_RC.add_(b_F[start:stop])
            if rank_scale_F is not None:
                ranked_RC.mul_(rank_scale_F[start:stop])
            if top is not None:
                top.add(ranked_RC, start)
                continue
            floor = threshold_F[start:stop].relu() if threshold_F is not None else 0.0
            active_RC = (ranked_RC > floor).logical_or_(ranked_RC.isnan())
        rows_Z, cols_Z = active_RC.nonzero().unbind(1)
        nnz += rows_Z.numel()
        if nnz > budget:
            return None
        values_Z = ranked_RC[rows_Z, cols_Z]
        found.append((rows_Z, cols_Z.add_(start), values_Z))
    if top is not None:
        return top.latents(F)
    rows_Z, cols_Z, values_Z = (torch.cat(parts) for parts in zip(*found, strict=True))
    # Blocks run in ascending latent order and each is row-major, so a stable sort by row
    # gives every row's latents in ascending order.
    rows_Z, order_Z = torch.sort(rows_Z, stable=True)
    return SparseLatents(offsets(rows_Z, R), cols_Z[order_Z], values_Z[order_Z], F)


class _TopK:
    """The ``k`` largest entries of each row over the blocks seen so far.

    The first block's ``topk`` sets a floor per row, its ``k``-th largest value (NaN ranked
    highest, as ``topk`` ranks it), which the row's final ``k``-th largest can only exceed;
    later blocks hand on just the entries above the floor (a compare in cache instead of a
    ``topk`` per block, which costs torch several times more over narrow rows). Once those
    outnumber the kept ones four to one they are merged in and the floor rises.
    """

    def __init__(self, n_rows: int, k: int) -> None:
        self.n_rows, self.k = n_rows, k
        self.values_RK: Tensor | None = None
        self.indices_RK: Tensor | None = None
        self.floor_R1: Tensor | None = None
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self.n_pending = 0

    def add(self, ranked_RC: Tensor, start: int) -> None:
        if self.values_RK is None:
            self._keep(*torch.topk(ranked_RC, min(self.k, ranked_RC.shape[1]), dim=-1,
                                   sorted=False), offset=start)
            return
        assert self.floor_R1 is not None
        above_RC = (ranked_RC > self.floor_R1).logical_or_(ranked_RC.isnan())
        rows_Z, cols_Z = above_RC.nonzero().unbind(1)
        values_Z = ranked_RC[rows_Z, cols_Z]
        self.pending.append((rows_Z, cols_Z.add_(start), values_Z))
        self.n_pending += rows_Z.numel()
        if self.n_pending > 4 * self.k * self.n_rows:
            self._merge()

    def latents(self, d_sae: int) -> SparseLatents:
        self._merge()
        assert self.values_RK is not None and self.indices_RK is not None
        return from_topk(self.values_RK.relu(), self.indices_RK, d_sae)

    def _keep(self, values_RK: Tensor, indices_RK: Tensor, offset: int = 0) -> None:
        if values_RK.shape[1] < self.k:  # a first block narrower than k: pad, no floor yet
            pad = self.k - values_RK.shape[1]
            values_RK = torch.cat([values_RK, values_RK.new_full((self.n_rows, pad),
                                                                 -torch.inf)], dim=1)
            indices_RK = torch.cat([indices_RK, indices_RK.new_zeros(self.n_rows, pad)], dim=1)
        self.values_RK, self.indices_RK = values_RK, indices_RK.add_(offset)
        # torch.topk ranks NaN above everything: so does the floor (all NaN: only NaN passes).
        ranked_RK = values_RK.masked_fill(values_RK.isnan(), torch.inf)
        self.floor_R1 = ranked_RK.amin(dim=-1, keepdim=True)

    def _merge(self) -> None:
        if not self.pending:
            return
        assert self.values_RK is not None and self.indices_RK is not None
        rows_Z, cols_Z, values_Z = (torch.cat(parts) for parts in zip(*self.pending,
                                                                       strict=True))
        self.pending, self.n_pending = [], 0
        rows_Z, order_Z = torch.sort(rows_Z, stable=True)
        crow_R1 = offsets(rows_Z, self.n_rows)
        slot_Z = self.k + torch.arange(rows_Z.numel(), device=rows_Z.device) - crow_R1[rows_Z]
        width = self.k + int(crow_R1.diff().max())
        values_RW = self.values_RK.new_full((self.n_rows, width), -torch.inf)
        indices_RW = self.indices_RK.new_zeros(self.n_rows, width)
        values_RW[:, :self.k] = self.values_RK
        indices_RW[:, :self.k] = self.indices_RK
        values_RW[rows_Z, slot_Z] = values_Z[order_Z]
        indices_RW[rows_Z, slot_Z] = cols_Z[order_Z]
        values_RK, pick_RK = torch.topk(values_RW, self.k, dim=-1, sorted=False)
        self._keep(values_RK, indices_RW.gather(-1, pick_RK))
