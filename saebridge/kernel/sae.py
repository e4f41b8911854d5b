"""The SAE forward pass of every architecture, as functions over plain data.

An SAE is an :class:`SAEData`: a dict of its tensors by SAELens name and an
:class:`SAESpec` of the config fields the forward reads. :class:`saebridge.SAE` (and its
transcoder and block-diagonal subclasses) calls these functions with its own parameters;
the nnsight trace kernel calls them with the same data shipped to a server. This module
is the only copy of the math.

Followed: SAELens 6 (``sae_lens/saes/{sae,standard_sae,topk_sae,batchtopk_sae,
jumprelu_sae,gated_sae,transcoder}.py``). Orientations are SAELens's: ``W_enc [d_in,
d_sae]``, ``W_dec [d_sae, d_in]`` (``[d_sae, d_out]`` for transcoders). Block-diagonal
per-head SAEs store ``W_enc [n_heads, d_head, m]`` and ``W_dec [n_heads, m, d_head]``
(:mod:`saebridge.sae.blockdiag`); only the two linear maps and the decoder norms differ.
Shape suffixes: ``B`` leading (batch, position) dims, ``D`` d_in, ``F`` d_sae, ``R`` rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from saebridge.kernel.activations import (
    NormStats,
    SAEActivations,
    flatten_heads,
    jumprelu,
    normalize_in,
    normalize_out,
)
from saebridge.kernel.blocked import encode_sae
from saebridge.kernel.sparse import (
    SparseLatents,
    decode_sparse,
    needs_grad,
    topk_latents,
    try_decode,
)

Tensor = torch.Tensor


class SAESpec(NamedTuple):
    """The config fields an SAE forward reads (primitives only: it travels to servers)."""

    architecture: str
    d_in: int
    d_sae: int
    k: float | None
    hook_name: str
    hook_head_index: int | None
    is_hook_z: bool
    apply_b_dec_to_input: bool
    normalize_activations: str
    rescale_acts_by_decoder_norm: bool
    n_heads: int | None = None
    """Block-diagonal per-head weights over this many heads; None for a dense SAE."""
    spliced_heads: tuple[int, ...] | None = None
    """Block-diagonal SAEs: only these heads are replaced by their reconstruction."""
    d_out: int | None = None
    """Transcoders: the width of the predicted (output) site; None for an SAE."""
    hook_name_out: str | None = None
    """Transcoders: the canonical hook whose activation the decoder predicts."""


class SAEData(NamedTuple):
    """An SAE as plain data: its tensors by SAELens name, and its :class:`SAESpec`."""

    params: dict[str, Tensor]
    spec: SAESpec


class Encoded(NamedTuple):
    """The encoder side of one pass."""

    sae_input: Tensor
    """``hook_sae_input``: flattened to ``[..., d_in]``, in the SAE's dtype."""
    acts_pre: Tensor
    acts_post: Tensor
    stats: NormStats | None
    """What :func:`decode` needs to undo run-time normalisation."""
    latents: SparseLatents | None
    """TopK's active latents as ``topk`` found them, so the decoder need not search."""


class SparseForward(NamedTuple):
    """A pass that never built the dense ``[..., d_sae]`` latents."""

    sae_input: Tensor
    latents: SparseLatents
    recons: Tensor


def blocked_ok(sae: SAEData) -> bool:
    """Whether the blocked encoder (which reads ``W_enc`` as ``[d_in, d_sae]``) applies."""
    return sae.spec.n_heads is None


def decoder_norms(sae: SAEData) -> Tensor:
    """The norm of each latent's decoder direction, ``[d_sae]``."""
    return sae.params["W_dec"].norm(dim=-1).flatten()


def _rank_scale(sae: SAEData) -> Tensor | None:
    return decoder_norms(sae) if sae.spec.rescale_acts_by_decoder_norm else None


def enc_linear(sae: SAEData, x_BD: Tensor) -> Tensor:
    """``x @ W_enc`` without the bias (a fresh tensor: callers work in place)."""
    W_enc, heads = sae.params["W_enc"], sae.spec.n_heads
    if heads is None:
        return x_BD @ W_enc
    x_BHD = x_BD.unflatten(-1, (heads, W_enc.shape[1]))
    return torch.einsum("...hd,hdm->...hm", x_BHD, W_enc).flatten(-2)


def dec_linear(sae: SAEData, acts_BF: Tensor) -> Tensor:
    """``acts @ W_dec`` without the bias."""
    W_dec, heads = sae.params["W_dec"], sae.spec.n_heads
    if heads is None:
        return acts_BF @ W_dec
    acts_BHM = acts_BF.unflatten(-1, (heads, W_dec.shape[1]))
    return torch.einsum("...hm,hmd->...hd", acts_BHM, W_dec).flatten(-2)


def prepare(sae: SAEData, x: Tensor) -> tuple[Tensor, Tensor, NormStats | None]:
    """``(hook_sae_input, encoder input, norm stats)``: flattened, normalised, ``b_dec``
    subtracted."""
    p, s = sae
    sae_input_BD = flatten_heads(x.to(p["W_enc"].dtype), s.d_in, s.is_hook_z, s.hook_name)
    sae_in_BD, stats = normalize_in(s.normalize_activations, sae_input_BD)
    if s.apply_b_dec_to_input:
        sae_in_BD = sae_in_BD - p["b_dec"]
    return sae_input_BD, sae_in_BD, stats


def encode(sae: SAEData, x: Tensor) -> Encoded:
    """The encoder pass (SAELens 6 semantics for every architecture)."""
    p, s = sae
    sae_input_BD, sae_in_BD, stats = prepare(sae, x)
    if s.architecture == "gated":
        # One matmul for both paths: x @ (W_enc * exp(r_mag)) == (x @ W_enc) * exp(r_mag).
        lin_BF = enc_linear(sae, sae_in_BD)
        gate_BF = ((lin_BF + p["b_gate"]) > 0).to(sae_in_BD.dtype)
        pre_BF = lin_BF.mul_(p["r_mag"].exp()).add_(p["b_mag"])
        return Encoded(sae_input_BD, pre_BF, gate_BF * pre_BF.relu(), stats, None)
    # In place: enc_linear returns a fresh [..., d_sae] tensor, and allocating and first
    # touching another that size costs ~5 % of an SAE pass on CPU. Same values.
    pre_BF = enc_linear(sae, sae_in_BD).add_(p["b_enc"])
    scale_F = _rank_scale(sae)
    ranked_BF = pre_BF if scale_F is None else pre_BF * scale_F
    if s.architecture == "topk":
        post_BF, latents = topk_latents(ranked_BF, int(s.k))  # type: ignore[arg-type]
        return Encoded(sae_input_BD, pre_BF, post_BF, stats, latents)
    if s.architecture in ("jumprelu", "batchtopk"):
        return Encoded(sae_input_BD, pre_BF, jumprelu(ranked_BF, p["threshold"]), stats, None)
    return Encoded(sae_input_BD, pre_BF, ranked_BF.relu(), stats, None)


def decode_linear(sae: SAEData, acts_BF: Tensor, latents: SparseLatents | None = None
                  ) -> Tensor:
    """``acts @ W_dec + b_dec``, gathering only the active rows where that is exact."""
    p = sae.params
    scale_F = _rank_scale(sae)
    inv_F = None if scale_F is None else 1 / scale_F
    acts_BF = acts_BF.to(p["W_dec"].dtype)
    if blocked_ok(sae):  # a [d_sae, d_out] W_dec: sparse decode gathers its rows
        recons_BD = try_decode(acts_BF, p["W_dec"], latents, inv_F)
        if recons_BD is not None:
            return recons_BD + p["b_dec"]
    return dec_linear(sae, acts_BF if inv_F is None else acts_BF * inv_F) + p["b_dec"]


def decode(sae: SAEData, acts_BF: Tensor, stats: NormStats | None,
           latents: SparseLatents | None = None) -> Tensor:
    """The flat decode ``[..., d_in]`` (``d_out`` for transcoders, without the skip term),
    run-time normalisation undone."""
    return normalize_out(sae.spec.normalize_activations, decode_linear(sae, acts_BF, latents),
                         stats)


def finish(sae: SAEData, x: Tensor, sae_input_BD: Tensor, decoded_BD: Tensor,
           stats: NormStats | None) -> Tensor:
    """The reconstruction from ``latents @ W_dec + b_dec``: normalisation undone and back
    in the input's shape; a transcoder's prediction (with its skip term) stays flat; a
    block-diagonal SAE splicing some heads passes the others through."""
    p, s = sae
    if s.d_out is not None:
        skip = p.get("W_skip")
        return decoded_BD if skip is None else decoded_BD + sae_input_BD @ skip.T
    recons_BD = normalize_out(s.normalize_activations, decoded_BD, stats)
    if s.spliced_heads is not None:
        assert s.n_heads is not None  # only block-diagonal SAEs splice heads
        keep_H = torch.ones(s.n_heads, dtype=torch.bool, device=x.device)
        keep_H[list(s.spliced_heads)] = False
        x_BHD = sae_input_BD.unflatten(-1, (s.n_heads, -1))
        recons_BHD = recons_BD.reshape(x_BHD.shape).clone()
        recons_BHD[..., keep_H, :] = x_BHD[..., keep_H, :]
        recons_BD = recons_BHD.flatten(-2)
    return recons_BD.reshape(x.shape)


def run(sae: SAEData, x: Tensor) -> SAEActivations:
    """Every intermediate of one pass, named after SAELens's hook points."""
    enc = encode(sae, x)
    decoded_BD = decode_linear(sae, enc.acts_post, enc.latents)
    recons = finish(sae, x, enc.sae_input, decoded_BD, enc.stats)
    return SAEActivations(enc.sae_input, enc.acts_pre, enc.acts_post, recons)


def forward_sparse(sae: SAEData, x: Tensor) -> SparseForward | None:
    """A pass keeping only the active latents (the blocked encoder, then a gather decode),
    or None where the dense latents are needed: under autograd, for block-diagonal
    weights, and for latents denser than ``sparse.MAX_SPARSE_DENSITY``."""
    p, s = sae
    if not blocked_ok(sae) or needs_grad(x, *p.values()):
        return None
    scale_F = _rank_scale(sae)
    sae_input_BD, sae_in_BD, stats = prepare(sae, x)
    latents = encode_sae(sae_in_BD.reshape(-1, s.d_in), p, s.architecture, s.k, scale_F)
    if latents is None:
        return None
    decoded_RD = decode_sparse(latents, p["W_dec"], None if scale_F is None else
                               1 / scale_F).add_(p["b_dec"])
    decoded_BD = decoded_RD.reshape(*sae_input_BD.shape[:-1], decoded_RD.shape[-1])
    return SparseForward(sae_input_BD, latents, finish(sae, x, sae_input_BD, decoded_BD, stats))


def forward(sae: SAEData, x: Tensor) -> Tensor:
    """The reconstruction alone (``hook_sae_output`` without an error term)."""
    fast = forward_sparse(sae, x)
    return run(sae, x).recons if fast is None else fast.recons
