"""The pieces of an SAE forward pass that are plain functions of tensors.

Each follows SAELens 6 (``sae_lens/saes/*.py`` at 6.49) operation for operation, so results
agree bit for bit where the arithmetic order allows. Shape suffixes: ``B`` any leading
(batch, position) dims, ``D`` = d_in, ``F`` = d_sae.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from saebridge.errors import SAEConfigError, ShapeError

Tensor = torch.Tensor

LAYER_NORM_EPS = 1e-5
"""SAELens's ``run_time_activation_ln_in`` epsilon (added to the std on the way in only)."""


class SAEActivations(NamedTuple):
    """Every intermediate of one SAE pass, named after SAELens's hook points."""

    sae_input: Tensor
    """``hook_sae_input``: the input in the SAE's dtype, flattened to ``[..., d_in]`` (hook_z
    SAEs), before normalisation and before ``b_dec`` is subtracted."""
    acts_pre: Tensor
    """``hook_sae_acts_pre``: ``[..., d_sae]`` encoder pre-activations (gated: the magnitude
    path; topk/batchtopk: before rescaling by decoder norms)."""
    acts_post: Tensor
    """``hook_sae_acts_post``: ``[..., d_sae]`` latents, what :meth:`SAE.encode` returns."""
    recons: Tensor
    """The reconstruction in the input's space and shape, what :meth:`SAE.forward` returns.
    Equal to SAELens's ``hook_sae_recons`` unless normalize_activations is
    ``constant_norm_rescale``/``layer_norm`` (SAELens hooks it before undoing the
    normalisation) or the input was per-head hook_z (SAELens hooks it flat); it is always
    SAELens's ``hook_sae_output`` without an error term."""


class NormStats(NamedTuple):
    """Per-token statistics of the input, needed to undo run-time normalisation in decode."""

    shift_B1: Tensor | None
    """layer_norm: the mean removed on the way in; None for constant_norm_rescale."""
    scale_B1: Tensor
    """layer_norm: the (unbiased) std; constant_norm_rescale: ``sqrt(d_in) / ||x||``."""


def normalize_in(mode: str, x_BD: Tensor) -> tuple[Tensor, NormStats | None]:
    """Apply run-time input normalisation; return the statistics decode needs to undo it.

    ``expected_average_only_in`` is the identity here, as in SAELens 6: its scaling factor
    is not stored with the SAE but folded into the weights (see
    :meth:`SAE.fold_activation_norm_scaling_factor`).
    """
    if mode == "constant_norm_rescale":
        coeff_B1 = (x_BD.shape[-1] ** 0.5) / x_BD.norm(dim=-1, keepdim=True)
        return x_BD * coeff_B1, NormStats(None, coeff_B1)
    if mode == "layer_norm":
        mu_B1 = x_BD.mean(dim=-1, keepdim=True)
        x_BD = x_BD - mu_B1
        std_B1 = x_BD.std(dim=-1, keepdim=True)
        return x_BD / (std_B1 + LAYER_NORM_EPS), NormStats(mu_B1, std_B1)
    return x_BD, None


def normalize_out(mode: str, y_BD: Tensor, stats: NormStats | None) -> Tensor:
    """Undo :func:`normalize_in` on a reconstruction."""
    if mode not in ("constant_norm_rescale", "layer_norm"):
        return y_BD
    if stats is None:
        raise SAEConfigError(
            f"decode() of an SAE with normalize_activations={mode!r} needs the statistics of "
            "the input its latents came from. Call encode() on that input first, or use "
            "forward()/run(), which keep them together.")
    if stats.scale_B1.shape[:-1] != y_BD.shape[:-1]:
        raise ShapeError(
            f"latents of leading shape {tuple(y_BD.shape[:-1])} cannot be decoded with the "
            f"normalisation statistics of the last encode(), of leading shape "
            f"{tuple(stats.scale_B1.shape[:-1])}. Decode latents of the last encoded input, "
            "or use forward()/run().")
    if mode == "constant_norm_rescale":
        return y_BD / stats.scale_B1
    shift_B1 = stats.shift_B1 if stats.shift_B1 is not None else 0.0
    return y_BD * stats.scale_B1 + shift_B1


def jumprelu(pre_BF: Tensor, threshold_F: Tensor) -> Tensor:
    """``relu(pre)`` where ``pre > threshold`` (strictly), else 0 (SAELens ``JumpReLUSAE``).

    SAELens compares against ``threshold.relu()``; with the ReLU in front this equals
    comparing against the raw threshold, and we keep SAELens's form.
    """
    mask_BF = (pre_BF > threshold_F.relu()).to(pre_BF.dtype)
    return pre_BF.relu() * mask_BF


def flatten_heads(x: Tensor, d_in: int, hook_z: bool, hook_name: str) -> Tensor:
    """``x`` as ``[..., d_in]``: hook_z SAEs also accept ``[..., n_heads, d_head]``."""
    if x.shape[-1:] == (d_in,):
        return x
    if hook_z and x.dim() >= 2 and x.shape[-2] * x.shape[-1] == d_in:
        return x.flatten(-2)
    heads = " or [..., n_heads, d_head] with n_heads * d_head == d_in" if hook_z else ""
    raise ShapeError(
        f"SAE at {hook_name!r} with d_in={d_in} got input of shape {tuple(x.shape)}; it takes "
        f"[..., {d_in}]{heads}. Pass activations of the SAE's own hook.")
