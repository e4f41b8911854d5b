"""Sparse decoding: reconstructions from the active latents alone.

A decode is a sum over latents of ``value * W_dec[latent]``, but only a few latents are
non-zero (TopK: at most ``k`` per token; ReLU, JumpReLU and gated SAEs: their L0, typically
tens out of tens of thousands). A dense ``acts @ W_dec`` multiplies every one of the
``d_sae`` columns anyway. Here the active latents are held as CSR rows
(:class:`SparseLatents`) and decoded with ``embedding_bag``, which gathers only their
decoder rows: ``O(nnz * d_in)`` work instead of ``O(n_tokens * d_sae * d_in)``.

The sparse path is taken only where it gives the dense result up to summation order:

* the latents' density is at most :data:`MAX_SPARSE_DENSITY` (above it a dense matmul wins:
  see ``benchmarks/bench_decode.py``);
* autograd does not need the latents' gradient: a dense decode gives every latent, even an
  inactive one, the gradient ``W_dec @ grad``, which a sparse decode cannot.

:meth:`SAE.run` (from TopK's indices, without searching for them), :meth:`SAE.decode`
(from a dense latent tensor) and the blocked encoder behind :meth:`SAE.forward`
(:mod:`saebridge.kernel.blocked`, which never builds the dense latents) all build the same
entries in the same order (ascending latent index per token, zeros dropped), so
``forward(x)`` and ``decode(encode(x))`` agree to the encoder matmul's rounding (bit for
bit when it fits one block).

>>> import torch
>>> W_dec = torch.randn(1000, 8)
>>> acts = torch.zeros(3, 1000); acts[0, 7] = 2.0; acts[2, 999] = -1.0
>>> lat = from_dense(acts)
>>> torch.allclose(decode_sparse(lat, W_dec), acts @ W_dec)
True
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

MAX_SPARSE_DENSITY = 1 / 32
"""Largest fraction of non-zero latents decoded sparsely. On a 2-core CPU
(``benchmarks/bench_decode.py``, d_sae 24576) decoding from a dense tensor sparsely, search
for the non-zeros included, breaks even with the dense matmul at 8-12 % density; the
threshold leaves a margin for machines whose matmul is relatively faster. A TopK k=32 SAE
with d_sae 24576 is at 0.13 %, a trained ReLU SAE typically at 0.1-1 %."""


class SparseLatents(NamedTuple):
    """Non-zero latents of ``n_rows`` tokens in CSR form, each row sorted by latent index.

    Row ``i``'s latents are ``col_Z[crow_R1[i]:crow_R1[i + 1]]`` with values ``values_Z``
    at the same positions. Leading (batch, position) dimensions are flattened into rows.
    """

    crow_R1: Tensor
    """Row offsets, shape ``[n_rows + 1]``, int64, starting at 0."""
    col_Z: Tensor
    """Latent index of each entry, shape ``[nnz]``, int64."""
    values_Z: Tensor
    """Value of each entry, shape ``[nnz]``, in the latents' dtype."""
    d_sae: int
    """Number of latents (the width of the dense tensor these stand for)."""

    @property
    def n_rows(self) -> int:
        return self.crow_R1.numel() - 1

    @property
    def nnz(self) -> int:
        return self.col_Z.numel()

    def rows_Z(self) -> Tensor:
        """The row of each entry, shape ``[nnz]``."""
        counts_R = self.crow_R1.diff()
        return torch.repeat_interleave(
            torch.arange(self.n_rows, device=self.col_Z.device), counts_R)

    def to_dense(self) -> Tensor:
        """The dense ``[n_rows, d_sae]`` latents these stand for."""
        out_RF = self.values_Z.new_zeros(self.n_rows, self.d_sae)
        out_RF[self.rows_Z(), self.col_Z] = self.values_Z
        return out_RF

    def to_sparse_coo(self, lead_shape: tuple[int, ...] | torch.Size) -> Tensor:
        """A coalesced sparse COO tensor of shape ``[*lead_shape, d_sae]``."""
        lead = tuple(lead_shape)
        rows_Z = self.rows_Z()
        coords = [*torch.unravel_index(rows_Z, lead), self.col_Z] if lead else [self.col_Z]
        indices = torch.stack(coords) if coords else rows_Z.new_zeros(0, self.nnz)
        return torch.sparse_coo_tensor(indices, self.values_Z, (*lead, self.d_sae),
                                       is_coalesced=True, check_invariants=False)


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd will differentiate through any of ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def is_sparse_enough(nnz: int, numel: int, max_density: float = MAX_SPARSE_DENSITY) -> bool:
    """The one rule that picks the sparse decode, shared by every path into it."""
    return numel > 0 and nnz <= max_density * numel


def from_dense(acts_BF: Tensor, max_density: float = MAX_SPARSE_DENSITY
               ) -> SparseLatents | None:
    """The non-zero entries of ``acts_BF`` (``[..., d_sae]``), or None when denser than
    ``max_density``: one counting pass decides before any index is materialised."""
    d_sae = acts_BF.shape[-1]
    acts_RF = acts_BF.reshape(-1, d_sae)
    if not is_sparse_enough(int(torch.count_nonzero(acts_RF)), acts_RF.numel(), max_density):
        return None
    rows_Z, col_Z = acts_RF.nonzero().unbind(1)  # row-major: rows ascending, cols sorted
    return SparseLatents(offsets(rows_Z, acts_RF.shape[0]), col_Z, acts_RF[rows_Z, col_Z],
                         d_sae)


def from_topk(values_BK: Tensor, indices_BK: Tensor, d_sae: int) -> SparseLatents:
    """TopK's ``(values, indices)`` as :class:`SparseLatents`: sorted per row, zeros dropped
    (the same entries :func:`from_dense` finds in the scattered dense latents)."""
    k = values_BK.shape[-1]
    indices_RK, order_RK = indices_BK.reshape(-1, k).sort(dim=-1)
    values_RK = values_BK.reshape(-1, k).gather(-1, order_RK)
    keep_RK = values_RK != 0
    if bool(keep_RK.all()):  # the usual case: k active latents in every row
        crow_R1 = torch.arange(0, values_RK.numel() + 1, k, device=values_RK.device)
        return SparseLatents(crow_R1, indices_RK.flatten(), values_RK.flatten(), d_sae)
    crow_R1 = values_RK.new_zeros(values_RK.shape[0] + 1, dtype=torch.long)
    torch.cumsum(keep_RK.sum(-1), 0, out=crow_R1[1:])
    return SparseLatents(crow_R1, indices_RK[keep_RK], values_RK[keep_RK], d_sae)


def decode_sparse(latents: SparseLatents, W_dec_FD: Tensor,
                  scale_F: Tensor | None = None) -> Tensor:
    """``dense_latents @ W_dec`` as ``[n_rows, d_in]``, gathering only the active rows.

    ``scale_F`` multiplies each latent's value first (TopK's division by decoder norms).
    """
    values_Z = latents.values_Z.to(W_dec_FD.dtype)
    if scale_F is not None:
        values_Z = values_Z * scale_F[latents.col_Z]
    return F.embedding_bag(latents.col_Z, W_dec_FD, latents.crow_R1, mode="sum",
                           per_sample_weights=values_Z, include_last_offset=True)


def topk_latents(ranked_BF: Tensor, k: int) -> tuple[Tensor, SparseLatents]:
    """TopK's dense latents (``k`` largest entries per row, ReLU'd, the rest zero, as SAELens's
    ``TopK``) and the same latents as :class:`SparseLatents`, from one ``topk`` call."""
    values_BK, indices_BK = torch.topk(ranked_BF, k=k, dim=-1, sorted=False)
    values_BK = values_BK.relu()
    acts_BF = torch.zeros_like(ranked_BF).scatter_(-1, indices_BK, values_BK)
    return acts_BF, from_topk(values_BK, indices_BK, ranked_BF.shape[-1])


def try_decode(acts_BF: Tensor, W_dec_FD: Tensor, latents: SparseLatents | None = None,
               scale_F: Tensor | None = None) -> Tensor | None:
    """``(acts * scale) @ W_dec`` as ``[..., d_in]`` from the active latents only, or None
    where a dense decode is needed: the latents are too dense, or autograd needs their
    gradient.

    ``latents``, when given, must be ``acts_BF``'s non-zero entries (as :func:`topk_latents`
    returns them); otherwise they are searched for in ``acts_BF``.
    """
    if needs_grad(acts_BF):
        return None
    if latents is None:
        latents = from_dense(acts_BF)
    elif not is_sparse_enough(latents.nnz, acts_BF.numel()):
        latents = None
    if latents is None:
        return None
    recons_RD = decode_sparse(latents, W_dec_FD, scale_F)
    return recons_RD.reshape(*acts_BF.shape[:-1], W_dec_FD.shape[-1])


def offsets(rows_Z: Tensor, n_rows: int) -> Tensor:
    """CSR row offsets ``[n_rows + 1]`` of entries whose (ascending) rows are ``rows_Z``."""
    crow_R1 = rows_Z.new_zeros(n_rows + 1)
    torch.cumsum(torch.bincount(rows_Z, minlength=n_rows), 0, out=crow_R1[1:])
    return crow_R1
