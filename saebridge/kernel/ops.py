"""Splice, latent edits, steering and transcoders as pure functions of one activation.

Each takes the activation at a site (the model's native space, TransformerLens layout:
``[batch, pos, d]`` or ``[batch, pos, n_heads, d_head]``), the SAE as data
(:class:`~saebridge.kernel.sae.SAEData`) and the site's :class:`~saebridge.kernel.spaces.Conv`
to the SAE's space, and returns the new activation and the records a cache may keep
(keys relative to the SAE's hook: ``hook_sae_input`` … ``hook_sae_output``, spelled as
SAELens spells them). :mod:`saebridge.interventions` calls them in local runs; the nnsight
trace kernel calls them on a server. ``mode`` says what is recorded: ``"none"`` (nothing:
a splice then never builds the dense latents), ``"dense"``, or ``"sparse"`` (the latents
as COO tensors where the blocked encoder found them without dense ones; the store keeps
latents sparse and drops pre-activations).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from saebridge.errors import DeviceError, ShapeError, UnknownHookError
from saebridge.kernel.indexing import Positions, put_head, select_positions
from saebridge.kernel.indexing import head as head_of
from saebridge.kernel.sae import (
    SAEData,
    decode,
    decode_linear,
    encode,
    finish,
    forward_sparse,
    prepare,
    run,
)
from saebridge.kernel.spaces import Conv, back, shift_for

# Names, not modules, are imported throughout the kernel: a module object referenced by
# shipped code would be pickled whole (its spec and loader import importlib machinery).

Tensor = torch.Tensor
Records = dict[str, Tensor]

SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
             "hook_sae_error", "hook_sae_output")
"""Cache keys an attached SAE adds under its hook name, spelled as SAELens spells them."""
MODES = ("none", "dense", "sparse")


class KernelSAE:
    """The kernel's forward over :class:`SAEData`, with the SAE module's method names: what
    the ops call unless given the module itself (whose subclasses may compute their own)."""

    def __init__(self, sae: SAEData) -> None:
        self.sae, self.stats = sae, None

    def run(self, x: Tensor) -> Any:
        return run(self.sae, x)

    def forward_sparse(self, x: Tensor) -> Any:
        return forward_sparse(self.sae, x)

    def encode(self, x: Tensor) -> Tensor:
        enc = encode(self.sae, x)
        self.stats = enc.stats  # kept for the next decode, as SAE.encode keeps them
        return enc.acts_post

    def decode(self, acts: Tensor) -> Tensor:
        return decode(self.sae, acts, self.stats)


class SAEView(NamedTuple):
    """An activation as an SAE reads it."""

    shift: Tensor | None
    """What the conversion to the SAE's space added (removed again on the way back)."""
    x_full: Tensor
    """The whole site in the SAE's space (every head)."""
    x_sae: Tensor
    """The part the SAE reads (one head when ``hook_head_index`` is set), in its dtype."""
    conv: Conv = Conv()
    """The conversion, for the way back (:func:`saebridge.kernel.spaces.back`)."""


def sae_view(sae: SAEData, x: Tensor, conv: Conv, name: str) -> SAEView:
    """``x`` converted to the SAE's space, checked against its width and head index."""
    s = sae.spec
    head = s.hook_head_index
    if head is not None and (x.dim() < 4 or not 0 <= head < x.shape[-2]):
        raise ShapeError(
            f"SAE with hook_head_index={head} at {name!r}: the site has "
            f"{x.shape[-2] if x.dim() >= 4 else 'no'} heads. Use a head index in range, or an "
            "SAE for the whole site.")
    width = head_of(x, head).shape[-1]
    flat = x.shape[-2] * x.shape[-1] if x.dim() >= 4 and head is None else width
    if s.d_in not in (width, flat):
        heads = f" ({x.shape[-2]} heads × {width})" if flat != width else ""
        raise ShapeError(
            f"SAE d_in={s.d_in} does not fit hook {name!r}, whose activations have width "
            f"{flat}{heads}. Load the SAE made for this site and model, or set "
            "hook_head_index for a per-head SAE.")
    w = sae.params["W_dec"]
    if w.is_meta:  # the SAE runs on its weights' device; meta holds no data
        raise DeviceError(
            f"SAE at {name!r} has its weights on the meta device (shapes, no data), so it "
            "cannot run. Load it onto a device of this machine: SAE.load(path, device=...), "
            "e.g. the device of its hook, model.adapter.device_of(hook_name).")
    shift = shift_for(conv, x)
    x_full = x if shift is None else x + shift
    return SAEView(shift, x_full, head_of(x_full, head).to(w.device, w.dtype), conv)


def write_back(sae: SAEData, x: Tensor, view: SAEView, new: Tensor) -> Tensor:
    """The site with the SAE's part replaced by ``new``, back in the model's space."""
    out = put_head(view.x_full, new.to(x.device, x.dtype), sae.spec.hook_head_index)
    return back(view.conv, out, view.shift)


def reconstruct(impl: Any, x_sae: Tensor, mode: str) -> tuple[Tensor, Records]:
    """The reconstruction of ``x_sae`` by ``impl`` (:class:`KernelSAE`, or an SAE module)
    and the encoder records ``mode`` keeps. Dense ``[..., d_sae]`` latents are built only
    for a dense record (or where the blocked encoder cannot run, see
    :func:`saebridge.kernel.sae.forward_sparse`)."""
    fast = None if mode == "dense" else impl.forward_sparse(x_sae)
    if fast is None:
        acts = impl.run(x_sae)
        if mode == "none":
            return acts.recons, {}
        # A sparse store drops the pre-activations and keeps the latents as COO itself.
        return acts.recons, dict(zip(SAE_HOOKS[:3], acts[:3], strict=True))
    if mode == "none":
        return fast.recons, {}
    return fast.recons, {"hook_sae_input": fast.sae_input, "hook_sae_acts_post":
                         fast.latents.to_sparse_coo(fast.sae_input.shape[:-1])}


def _per_position(bypass: Tensor, like: Tensor) -> Tensor:
    """A ``[batch, pos]`` mask broadcast over the rest of ``like``'s dimensions."""
    return bypass.reshape(*bypass.shape, *([1] * (like.dim() - bypass.dim()))).to(like.device)


def _outputs(recons: Tensor, x_sae: Tensor, use_error_term: bool, records: Records,
             bypass: Tensor | None = None) -> Tensor:
    """The SAE's output (and its records); at ``bypass`` positions the input itself with a
    zero error, as SAELens's ``exclude_special_tokens`` leaves them."""
    error = x_sae - recons
    out = recons + error if use_error_term else recons
    error, out = _bypass_records(error, out, x_sae, bypass)
    flat = records.get("hook_sae_input")
    # SAELens records a hook_z SAE's reconstruction flat, [..., d_in] like its input.
    kept = recons.flatten(-2) if flat is not None and recons.dim() == flat.dim() + 1 else recons
    records.update(zip(SAE_HOOKS[3:], (kept, error, out), strict=True))
    return out


def _bypass_records(error: Tensor, out: Tensor, x_sae: Tensor, bypass: Tensor | None
                    ) -> tuple[Tensor, Tensor]:
    """``error`` and ``out`` with, at the ``bypass`` positions, a zero error and the input
    itself as the output (SAELens's ``exclude_special_tokens``)."""
    if bypass is None:
        return error, out
    mask = _per_position(bypass, x_sae)
    return torch.where(mask, torch.zeros_like(error), error), torch.where(mask, x_sae, out)


def _bypassed(x: Tensor, new: Tensor, bypass: Tensor | None) -> Tensor:
    """``new``, with ``x`` itself (bit for bit) at the ``bypass`` positions."""
    return new if bypass is None else torch.where(_per_position(bypass, new), x, new)


def splice(sae: SAEData, x: Tensor, conv: Conv, use_error_term: bool, mode: str,
           name: str, impl: Any = None, bypass: Tensor | None = None
           ) -> tuple[Tensor, Records]:
    """Replace the SAE's part of ``x`` by its reconstruction (plus its error with
    ``use_error_term``: the output is then unchanged, and everything still recorded).
    ``impl`` computes the SAE (default: the kernel's :class:`KernelSAE`); ``bypass``
    (``[batch, pos]`` bool) marks positions left as they are (special tokens)."""
    view = sae_view(sae, x, conv, name)
    recons, records = reconstruct(impl or KernelSAE(sae), view.x_sae, mode)
    out = _outputs(recons, view.x_sae, use_error_term, records, bypass)
    new = _bypassed(x, write_back(sae, x, view, out), bypass)
    return new, records if mode != "none" else {}


def splice_hooked(sae: SAEData, x: Tensor, conv: Conv, use_error_term: bool, name: str,
                  hooks: dict[str, list[Any]], impl: Any = None, bypass: Tensor | None = None
                  ) -> tuple[Tensor, Records]:
    """:func:`splice` with functions at the SAE's own hook points, where SAELens's
    ``HookedSAETransformer`` fires them: ``hooks[key]`` (``key`` in :data:`SAE_HOOKS`) are
    called in turn with the value there and return what goes on. ``hook_sae_input`` feeds
    the encoder; ``hook_sae_acts_post`` the decoder (an edit of the latents reaches the
    model); with ``use_error_term`` the error is that of the unhooked reconstruction of the
    original input (SAELens's ``_SAEWrapper``), then ``hook_sae_error``; ``hook_sae_output``
    is what is written back. ``hook_sae_acts_pre`` is read-only: the latents come from the
    encoder's own pre-activations."""
    view = sae_view(sae, x, conv, name)
    impl = impl or KernelSAE(sae)

    def at(key: str, value: Tensor) -> Tensor:
        for fn in hooks.get(key, ()):
            value = fn(value)
        return value

    x0 = view.x_sae  # a hook_z SAE reads [..., n_heads, d_head]; its hooks see it flat
    xf = x0.flatten(-2) if x0.dim() == 4 else x0
    x_in = at("hook_sae_input", xf)
    acts = impl.run(x_in)
    at("hook_sae_acts_pre", acts.acts_pre.clone())
    recons = acts.recons.reshape(xf.shape)
    post = acts.acts_post
    if "hook_sae_acts_post" in hooks:
        post = at("hook_sae_acts_post", post.clone())
        impl.encode(x_in)  # the input's norm statistics, for this decode
        recons = impl.decode(post).reshape(xf.shape)
    recons = at("hook_sae_recons", recons)
    out = recons.reshape(x0.shape)  # error and output per head, as SAELens
    error = x0 - out
    if use_error_term:
        clean = acts.recons if x_in is xf else impl.run(xf).recons
        error = at("hook_sae_error", x0 - clean.reshape(x0.shape))
        out = out + error
    error, out = _bypass_records(error, out, x0, bypass)
    out = at("hook_sae_output", out)
    records = dict(zip(SAE_HOOKS, (x_in, acts.acts_pre, post, recons, error, out), strict=True))
    return _bypassed(x, write_back(sae, x, view, out), bypass), records


def edit_latents(sae: SAEData, x: Tensor, conv: Conv, features: list[int],
                 positions: Positions, value: float | None, name: str, impl: Any = None
                 ) -> Tensor:
    """Set latents ``features`` (at ``positions``) to ``value`` (None: zero), keeping the
    SAE's error: only the named latents change the output,
    ``x + decode(edited) - decode(acts)``."""
    view = sae_view(sae, x, conv, name)
    impl = impl or KernelSAE(sae)
    acts = impl.encode(view.x_sae)
    edited = acts.clone()
    idx = (*select_positions(acts, positions), ...)
    sub = edited[idx]
    chosen = sub[..., features]
    sub[..., features] = torch.zeros_like(chosen) if value is None else torch.full_like(
        chosen, value)
    edited[idx] = sub
    delta = impl.decode(edited) - impl.decode(acts)
    return write_back(sae, x, view, view.x_sae + delta.reshape(view.x_sae.shape))


def latent_delta(sae: SAEData, sae_input: Tensor, before: Tensor, after: Tensor) -> Tensor:
    """What a pass's output changes by when its latents go from ``before`` to ``after``
    (dense, of the pass whose ``hook_sae_input`` was ``sae_input``): ``recons(after) -
    recons(before)``, flat ``[..., d_in]`` (``d_out`` for a transcoder). The error term is
    the input's, so this is the change with or without ``use_error_term``; heads a
    block-diagonal SAE passes through, and a transcoder's skip term, do not change."""
    _, _, stats = prepare(sae, sae_input)
    sae_input = sae_input.to(sae.params["W_dec"].dtype)
    return (finish(sae, sae_input, sae_input, decode_linear(sae, after), stats)
            - finish(sae, sae_input, sae_input, decode_linear(sae, before), stats))


def transcoder_read(sae: SAEData, x: Tensor, conv: Conv,
                    gain_bias: tuple[Tensor, Tensor] | None, mode: str, name: str,
                    impl: Any = None) -> tuple[Tensor, Records]:
    """A transcoder's prediction of its output site from its input site ``x`` (left
    unchanged); ``gain_bias`` is the LayerNorm affine its input has applied, if any."""
    x_sae = sae_view(sae, x, conv, name).x_sae
    if gain_bias is not None:
        x_sae = x_sae * gain_bias[0].to(x_sae) + gain_bias[1].to(x_sae)
    return reconstruct(impl or KernelSAE(sae), x_sae, mode)


def transcoder_write(sae: SAEData, y: Tensor, conv: Conv, prediction: Tensor | None,
                     use_error_term: bool, name: str, bypass: Tensor | None = None
                     ) -> tuple[Tensor, Records]:
    """The output site ``y`` replaced by the prediction made at the input site (left as
    it is at ``bypass`` positions)."""
    s = sae.spec
    if prediction is None:
        raise UnknownHookError(
            f"transcoder output site {name!r} ran before its input site {s.hook_name!r}, so "
            "there is no prediction to write. A transcoder must read a site that runs "
            "earlier than the one it writes.")
    shift = shift_for(conv, y)
    y_full = y if shift is None else y + shift
    y_sae = y_full.to(prediction.device, prediction.dtype)
    if y_sae.numel() != prediction.numel():
        raise ShapeError(
            f"transcoder predicts {tuple(prediction.shape)} but its output site {name!r} "
            f"holds {tuple(y_sae.shape)}. Load the transcoder made for this model and site.")
    records: Records = {}
    out = _outputs(prediction.reshape(y_sae.shape), y_sae, use_error_term, records, bypass)
    new = out.to(y.device, y.dtype)
    return _bypassed(y, back(conv, new, shift), bypass), records
