"""Interventions: small objects whose effect is a pure function of one activation.

Engines decide *where* and *when* to call :meth:`apply`; the objects themselves are
plain torch on plain tensors, so the same code runs under every backend. ``apply``
receives the site's activation in the model's native space and TransformerLens layout
(``[batch, pos, d]``, or ``[batch, pos, n_heads, d_head]`` for ``q/k/v/z``) and a
:class:`SiteContext` that converts to other activation spaces and records cache entries.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from saebridge.errors import SAEConfigError, ShapeError, SpaceConversionError, UnknownHookError
from saebridge.hookmap import split
from saebridge.hookmap.convert import Affine, RawStats
from saebridge.hookmap.site import Kind
from saebridge.hookmap.space import ActivationSpace
from saebridge.indexing import Positions, add_vector, put_head, select_positions

if TYPE_CHECKING:
    from saebridge.sae import SAE
    from saebridge.sae.transcoder import Transcoder

Tensor = torch.Tensor

SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
             "hook_sae_error", "hook_sae_output")
"""Cache keys an attached SAE adds under its hook name, spelled as SAELens spells them."""


@dataclass
class SiteContext:
    """What an intervention may ask of the engine at one site during one forward pass."""

    name: str
    kind: Kind
    """How processing changes this site (``resid``, ``write``, ``v``, ``ln*``, ``plain``)."""
    convert: Callable[[ActivationSpace, Tensor], Affine]
    """``convert(space, x)``: the affine map from the native space to ``space`` at this site."""
    record: Callable[[str, Tensor], None]
    """``record(key, value)``: store a cache entry (a no-op when nothing is cached)."""
    recording: bool = True
    """Whether :attr:`record` keeps anything. When it does not, an SAE splice skips the
    intermediates only a cache would hold (the dense ``[..., d_sae]`` latents)."""
    sparse_latents: bool = False
    """Whether :attr:`record` keeps SAE latents sparse and no pre-activations (a
    ``sparse=True`` cache): a splice then records the active latents alone."""
    raw_stats: RawStats | None = None
    """Constants of the model's unprocessed weights, where known (LayerNorm gains for
    transcoders that read a LayerNorm's output)."""


class Intervention(Protocol):
    """Anything with a canonical ``hook`` and a pure ``apply`` at that hook."""

    @property
    def hook(self) -> str: ...

    @property
    def writes(self) -> bool:
        """Whether ``apply`` may change the activation (reads are allowed at read-only hooks)."""
        ...

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor: ...


def _head_view(sae: SAE, x: Tensor) -> Tensor:
    """The part of ``x`` the SAE reads: one head when ``hook_head_index`` is set."""
    head = sae.cfg.hook_head_index
    if head is None:
        return x
    if x.dim() < 4 or not 0 <= head < x.shape[-2]:
        n_heads = x.shape[-2] if x.dim() >= 4 else "no"
        raise ShapeError(
            f"SAE with hook_head_index={head} at {sae.cfg.hook_name!r}: the site has {n_heads} "
            "heads. Use a head index in range, or an SAE for the whole site.")
    return x[..., head, :]


def _sae_dtype(sae: SAE, x: Tensor) -> Tensor:
    """``x`` on the SAE's device and dtype: the SAE computes in its own precision."""
    p = sae.W_dec
    return x.to(p.device, p.dtype)


def _check_width(sae: SAE, x: Tensor, name: str) -> None:
    d_in = sae.cfg.d_in
    width = x.shape[-1]
    flat = x.shape[-2] * x.shape[-1] if x.dim() >= 4 else width
    if d_in not in (width, flat):
        raise ShapeError(
            f"SAE d_in={d_in} does not fit hook {name!r}, whose activations have width {flat}"
            f"{f' ({x.shape[-2]} heads × {width})' if flat != width else ''}. Load the SAE made "
            "for this site and model, or set hook_head_index for a per-head SAE.")


@dataclass
class Splice:
    """Replace the activation at ``sae.cfg.hook_name`` by the SAE's reconstruction.

    With ``use_error_term=True`` the SAE's error is added back, so the model's output is
    unchanged while every SAE hook (latents, reconstruction, error) is still recorded.
    """

    sae: SAE
    use_error_term: bool = False
    writes: bool = True

    @property
    def hook(self) -> str:
        return self.sae.cfg.hook_name

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        _check_width(self.sae, _head_view(self.sae, x), ctx.name)
        to_sae = ctx.convert(self.sae.cfg.activation_space, x)
        x_full = to_sae.forward(x)
        x_sae = _sae_dtype(self.sae, _head_view(self.sae, x_full))
        recons = _reconstruct(self.sae, x_sae, ctx)
        error = x_sae - recons
        out = recons + error if self.use_error_term else recons
        for key, value in zip(SAE_HOOKS[3:], (recons, error, out), strict=True):
            ctx.record(f"{self.hook}.{key}", value)
        new = out.to(x.device, x.dtype)
        return to_sae.inverse(put_head(x_full, new, self.sae.cfg.hook_head_index))


def _reconstruct(sae: SAE, x_sae: Tensor, ctx: SiteContext) -> Tensor:
    """The SAE's reconstruction of ``x_sae``, recording ``hook_sae_input`` and the latents
    as ``ctx`` keeps them. Dense ``[..., d_sae]`` latents are built only for a cache that
    keeps them dense (or where the blocked encoder cannot run, see ``SAE.forward_sparse``)."""
    fast = None if ctx.recording and not ctx.sparse_latents else sae.forward_sparse(x_sae)
    if fast is None:
        acts = sae.run(x_sae)
        for key, value in zip(SAE_HOOKS[:3], acts[:3], strict=True):
            ctx.record(f"{sae.cfg.hook_name}.{key}", value)
        return acts.recons
    sae_input, latents, recons = fast
    if ctx.recording:
        ctx.record(f"{sae.cfg.hook_name}.hook_sae_input", sae_input)
        ctx.record(f"{sae.cfg.hook_name}.hook_sae_acts_post",
                   latents.to_sparse_coo(sae_input.shape[:-1]))
    return recons


@dataclass
class _LatentEdit(abc.ABC):
    """Shared machinery of :class:`Ablate` and :class:`Clamp`: edit latents, keep the error."""

    sae: SAE
    features: Sequence[int] | int
    positions: Positions = field(default=None, kw_only=True)
    writes: bool = field(default=True, kw_only=True)

    @property
    def hook(self) -> str:
        return self.sae.cfg.hook_name

    @abc.abstractmethod
    def _edit(self, acts: Tensor) -> Tensor:
        """The new values of the selected latents, given their current ones."""

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        _check_width(self.sae, _head_view(self.sae, x), ctx.name)
        to_sae = ctx.convert(self.sae.cfg.activation_space, x)
        x_full = to_sae.forward(x)
        x_sae = _sae_dtype(self.sae, _head_view(self.sae, x_full))
        acts = self.sae.encode(x_sae)
        edited = acts.clone()
        idx = (*select_positions(acts, self.positions), ...)
        features = [self.features] if isinstance(self.features, int) else list(self.features)
        sub = edited[idx]
        sub[..., features] = self._edit(sub[..., features])
        edited[idx] = sub
        # Only the named features change the output: x + decode(edited) - decode(acts).
        delta = self.sae.decode(edited) - self.sae.decode(acts)
        new = (x_sae + delta.reshape(x_sae.shape)).to(x.device, x.dtype)
        return to_sae.inverse(put_head(x_full, new, self.sae.cfg.hook_head_index))


@dataclass
class Ablate(_LatentEdit):
    """Set SAE latents ``features`` to zero (at ``positions``), keeping the SAE error."""

    def _edit(self, acts: Tensor) -> Tensor:
        return torch.zeros_like(acts)


@dataclass
class Clamp(_LatentEdit):
    """Set SAE latents ``features`` to ``value`` (at ``positions``), keeping the SAE error."""

    value: float = 0.0

    def _edit(self, acts: Tensor) -> Tensor:
        return torch.full_like(acts, self.value)


@dataclass
class Steer:
    """Add ``coef * vector`` to the activation at ``hook`` (at ``positions``).

    No space conversion is needed: at every site the activation spaces differ from the
    native one by a shift, and a shift does not change what adding a vector does. (At the
    residual stream the shift is the mean over d_model, and every reader of the stream
    is a LayerNorm that removes it; at ``hook_z`` it is the value bias, a constant.)
    """

    hook: str
    vector: Tensor
    coef: float = 1.0
    positions: Positions = None
    head_index: int | None = None
    writes: bool = field(default=True, init=False)

    @classmethod
    def from_sae(cls, sae: SAE, feature: int, coef: float = 1.0,
                 positions: Positions = None) -> Steer:
        """Steer along the decoder direction of one SAE feature, at the SAE's hook.

        >>> # model.run_with_interventions(tokens, [Steer.from_sae(sae, 12, coef=4.0)])
        """
        # A transcoder's latents write at its output site.
        hook = getattr(sae.cfg, "hook_name_out", sae.cfg.hook_name)
        return cls(hook=hook, vector=sae.decoder_direction(feature).detach(), coef=coef,
                   positions=positions, head_index=sae.cfg.hook_head_index)

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        return add_vector(x, self.vector, self.coef, self.positions, self.head_index,
                          self.hook)


@dataclass
class _Observe:
    """Internal read-only intervention: hands the final activation at a site to a callback."""

    hook: str
    callback: Callable[[str, Tensor], None]
    writes: bool = False

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        self.callback(self.hook, x)
        return x


# ---- transcoders: read one site, write another ------------------------------------------

@dataclass
class _TranscoderState:
    """What the read half of a transcoder splice hands to the write half, per forward."""

    prediction: Tensor | None = None


@dataclass
class _TranscoderRead:
    """Encodes the transcoder's input site and keeps the prediction; changes nothing."""

    sae: Transcoder
    state: _TranscoderState
    writes: bool = False

    @property
    def hook(self) -> str:
        return self.sae.cfg.hook_name

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        _check_width(self.sae, _head_view(self.sae, x), ctx.name)
        x_sae = _sae_dtype(self.sae, _head_view(self.sae, ctx.convert(
            self.sae.cfg.activation_space, x).forward(x)))
        affine = self.sae.cfg.input_affine
        if affine is not None:
            layer = split(ctx.name)[0]
            gain_bias = ctx.raw_stats.ln_affine(int(layer or 0), affine) \
                if ctx.raw_stats is not None else None
            if gain_bias is None:
                raise SpaceConversionError(
                    f"transcoder at {ctx.name!r} reads the output of {affine} with its gain and "
                    "bias, but this model's unprocessed LayerNorm weights are unknown. Build the "
                    "model with saebridge.adapters.transformer_lens.from_hf(), or wrap an "
                    "unprocessed one.")
            x_sae = x_sae * gain_bias[0].to(x_sae) + gain_bias[1].to(x_sae)
        self.state.prediction = _reconstruct(self.sae, x_sae, ctx)
        return x


@dataclass
class _TranscoderWrite:
    """Replaces the transcoder's output site with the prediction made from its input."""

    sae: Transcoder
    state: _TranscoderState
    use_error_term: bool = False
    writes: bool = True

    @property
    def hook(self) -> str:
        return self.sae.cfg.hook_name_out

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        prediction = self.state.prediction
        if prediction is None:
            raise UnknownHookError(
                f"transcoder output site {self.hook!r} ran before its input site "
                f"{self.sae.cfg.hook_name!r}, so there is no prediction to write. A transcoder "
                "must read a site that runs earlier than the one it writes.")
        to_sae = ctx.convert(self.sae.cfg.activation_space, x)
        y_full = to_sae.forward(x)
        y_sae = y_full.to(prediction.device, prediction.dtype)
        if y_sae.numel() != prediction.numel():
            raise ShapeError(
                f"transcoder predicts {tuple(prediction.shape)} but its output site "
                f"{self.hook!r} holds {tuple(y_sae.shape)}. Load the transcoder made for this "
                "model and site.")
        pred = prediction.reshape(y_sae.shape)
        error = y_sae - pred
        out = pred + error if self.use_error_term else pred
        for key, value in zip(SAE_HOOKS[3:], (pred, error, out), strict=True):
            ctx.record(f"{self.sae.cfg.hook_name}.{key}", value)
        self.state.prediction = None  # one prediction per forward pass
        return to_sae.inverse(out.to(x.device, x.dtype))


def expand(ops: Sequence[Intervention]) -> list[Intervention]:
    """Interventions as the engine applies them: a :class:`Splice` of a transcoder becomes
    a read at its input site and a write at its output site, sharing one state.

    Raises:
        SAEConfigError: a latent edit (Ablate/Clamp) of a transcoder, which is not supported.
    """
    from saebridge.sae.transcoder import Transcoder as TranscoderClass

    out: list[Intervention] = []
    for op in ops:
        sae = getattr(op, "sae", None)
        if not isinstance(sae, TranscoderClass):
            out.append(op)
        elif isinstance(op, Splice):
            state = _TranscoderState()
            out += [_TranscoderRead(sae, state), _TranscoderWrite(sae, state, op.use_error_term)]
        else:
            raise SAEConfigError(
                f"{type(op).__name__} of a transcoder is not supported: its latents are read at "
                f"{sae.cfg.hook_name!r} but written at {sae.cfg.hook_name_out!r}. Splice it, or "
                "steer its output site with Steer.from_sae().")
    return out
