"""Interventions: small objects whose effect is a pure function of one activation.

Engines decide *where* and *when* to call :meth:`apply`; the objects themselves are
plain torch on plain tensors, so the same code runs under every backend. ``apply``
receives the site's activation in the model's native space and TransformerLens layout
(``[batch, pos, d]``, or ``[batch, pos, n_heads, d_head]`` for ``q/k/v/z``) and a
:class:`SiteContext` that converts to other activation spaces and records cache entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from saebridge.errors import ShapeError
from saebridge.hookmap.convert import Affine
from saebridge.hookmap.site import Kind
from saebridge.hookmap.space import ActivationSpace

if TYPE_CHECKING:
    from saebridge.sae import SAE

Tensor = torch.Tensor
Positions = int | Sequence[int] | slice | None

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


class Intervention(Protocol):
    """Anything with a canonical ``hook`` and a pure ``apply`` at that hook."""

    @property
    def hook(self) -> str: ...

    @property
    def writes(self) -> bool:
        """Whether ``apply`` may change the activation (reads are allowed at read-only hooks)."""
        ...

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor: ...


def _select(x: Tensor, positions: Positions) -> tuple[slice | Tensor | list[int], ...]:
    """Index selecting ``positions`` (dim 1) of an activation; every position when None."""
    if positions is None:
        return (slice(None),)
    if isinstance(positions, int):
        positions = [positions]
    if isinstance(positions, slice):
        return (slice(None), positions)
    return (slice(None), torch.as_tensor(list(positions), device=x.device))


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


def _put_head(sae: SAE, x: Tensor, new: Tensor) -> Tensor:
    head = sae.cfg.hook_head_index
    if head is None:
        return new
    out = x.clone()
    out[..., head, :] = new
    return out


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
        acts = self.sae.run(x_sae)
        error = x_sae - acts.recons
        out = acts.recons + error if self.use_error_term else acts.recons
        for key, value in zip(SAE_HOOKS, (*acts, error, out), strict=True):
            ctx.record(f"{self.hook}.{key}", value)
        return to_sae.inverse(_put_head(self.sae, x_full, out.to(x.device, x.dtype)))


@dataclass
class _LatentEdit:
    """Shared machinery of :class:`Ablate` and :class:`Clamp`: edit latents, keep the error."""

    sae: SAE
    features: Sequence[int] | int
    positions: Positions = field(default=None, kw_only=True)
    writes: bool = field(default=True, kw_only=True)

    @property
    def hook(self) -> str:
        return self.sae.cfg.hook_name

    def _edit(self, acts: Tensor) -> Tensor:
        raise NotImplementedError

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        _check_width(self.sae, _head_view(self.sae, x), ctx.name)
        to_sae = ctx.convert(self.sae.cfg.activation_space, x)
        x_full = to_sae.forward(x)
        x_sae = _sae_dtype(self.sae, _head_view(self.sae, x_full))
        acts = self.sae.encode(x_sae)
        edited = acts.clone()
        idx = (*_select(acts, self.positions), ...)
        features = [self.features] if isinstance(self.features, int) else list(self.features)
        sub = edited[idx]
        sub[..., features] = self._edit(sub[..., features])
        edited[idx] = sub
        # Only the named features change the output: x + decode(edited) - decode(acts).
        delta = self.sae.decode(edited) - self.sae.decode(acts)
        new = (x_sae + delta.reshape(x_sae.shape)).to(x.device, x.dtype)
        return to_sae.inverse(_put_head(self.sae, x_full, new))


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
        return cls(hook=sae.cfg.hook_name, vector=sae.W_dec[feature].detach(), coef=coef,
                   positions=positions, head_index=sae.cfg.hook_head_index)

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        target = x[..., self.head_index, :] if self.head_index is not None else x
        vec = self.vector.to(x.device, x.dtype)
        if vec.numel() != target.shape[-1] and vec.numel() == target[0, 0].numel():
            vec = vec.reshape(target.shape[2:])
        elif vec.shape[-1:] != target.shape[-1:]:
            raise ShapeError(
                f"steering vector of shape {tuple(self.vector.shape)} does not fit hook "
                f"{self.hook!r}, whose activations are {tuple(target.shape[2:])} per position. "
                "Pass a vector of the site's width.")
        out = x.clone()
        view = out[..., self.head_index, :] if self.head_index is not None else out
        view[_select(x, self.positions)] += self.coef * vec
        return out


@dataclass
class _Observe:
    """Internal read-only intervention: hands the final activation at a site to a callback."""

    hook: str
    callback: Callable[[str, Tensor], None]
    writes: bool = False

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        self.callback(self.hook, x)
        return x
