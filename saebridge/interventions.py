"""Interventions: small objects whose effect is a pure function of one activation.

Engines decide *where* and *when* to call :meth:`apply`; the math is the kernel's
(:mod:`saebridge.kernel.ops`), plain torch on plain tensors, so the same code runs under
every backend. ``apply`` receives the site's activation in the model's native space and
TransformerLens layout (``[batch, pos, d]``, or ``[batch, pos, n_heads, d_head]`` for
``q/k/v/z``) and a :class:`SiteContext` that converts to other activation spaces and
records cache entries. ``step`` compiles the same intervention to data
(:mod:`saebridge.kernel.steps`) for a run inside an nnsight trace, locally or remotely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from saebridge.errors import SAEConfigError, SpaceConversionError
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.lookup import split
from saebridge.hookmap.site import Kind
from saebridge.hookmap.space import ActivationSpace
from saebridge.kernel import ops
from saebridge.kernel import steps as S
from saebridge.kernel.indexing import Positions, add_vector
from saebridge.kernel.ops import SAE_HOOKS
from saebridge.kernel.sae import SAEData
from saebridge.kernel.spaces import Conv

if TYPE_CHECKING:
    from saebridge.sae.model import SAE
    from saebridge.sae.transcoder import Transcoder

Tensor = torch.Tensor


@dataclass
class SiteContext:
    """What an intervention may ask of the engine at one site during one forward pass."""

    name: str
    kind: Kind
    """How processing changes this site (``resid``, ``write``, ``v``, ``plain``)."""
    convert: Callable[[ActivationSpace, Tensor], Conv]
    """``convert(space, x)``: the conversion from the native space to ``space`` at this site."""
    record: Callable[[str, Tensor], None]
    """``record(key, value)``: store a cache entry (a no-op when nothing is cached)."""
    mode: str = "dense"
    """What :attr:`record` keeps (:data:`saebridge.kernel.ops.MODES`): ``"none"`` (an SAE
    splice then skips the dense ``[..., d_sae]`` latents), ``"dense"``, or ``"sparse"``
    (latents as COO, no pre-activations)."""
    raw_stats: RawStats | None = None
    """Constants of the model's unprocessed weights, where known (LayerNorm gains for
    transcoders that read a LayerNorm's output)."""
    state: dict[str, Any] = field(default_factory=dict)
    """Per-forward state shared by the sites of one run (a transcoder's prediction)."""

    @property
    def recording(self) -> bool:
        return self.mode != "none"


class StepCompiler(Protocol):
    """What :meth:`Intervention.step` asks of the engine compiling a run to data."""

    mode: str

    def sae(self, sae: SAE) -> SAEData:
        """The SAE as data, each SAE once however many steps use it."""
        ...

    def conv(self, name: str, space: ActivationSpace) -> Conv:
        """The conversion at ``name`` to ``space`` as a constant (or a clear refusal)."""
        ...

    def gain_bias(self, name: str, affine: str) -> tuple[Tensor, Tensor]:
        """The unprocessed gain and bias of LayerNorm ``affine`` in ``name``'s block."""
        ...


class Intervention(Protocol):
    """Anything with a canonical ``hook`` and a pure ``apply`` at that hook (and, to run
    inside an nnsight trace or remotely, ``step``: the same as data)."""

    @property
    def hook(self) -> str: ...

    @property
    def writes(self) -> bool:
        """Whether ``apply`` may change the activation (reads are allowed at read-only hooks)."""
        ...

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor: ...


def _keep(ctx: SiteContext, hook: str, records: dict[str, Tensor]) -> None:
    for key, value in records.items():
        ctx.record(f"{hook}.{key}", value)


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
        conv = ctx.convert(self.sae.cfg.activation_space, x)
        new, records = ops.splice(self.sae.data(), x, conv, self.use_error_term, ctx.mode,
                                  ctx.name, impl=self.sae)
        _keep(ctx, self.hook, records)
        return new

    def step(self, c: StepCompiler) -> S.SpliceStep:
        return S.SpliceStep(c.sae(self.sae), self.use_error_term,
                            c.conv(self.hook, self.sae.cfg.activation_space), c.mode)


def _features(features: Sequence[int] | int) -> list[int]:
    return [features] if isinstance(features, int) else [int(f) for f in features]


def _positions(positions: Positions) -> Positions:
    """Positions as plain data (a copy: a request must not carry a user's tensor view)."""
    if positions is None or isinstance(positions, (int, slice)):
        return positions
    return [int(p) for p in positions]


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

    def _value(self) -> float | None:
        """The new value of the selected latents; None sets them to zero."""
        return None

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        conv = ctx.convert(self.sae.cfg.activation_space, x)
        return ops.edit_latents(self.sae.data(), x, conv, _features(self.features),
                                self.positions, self._value(), ctx.name, impl=self.sae)

    def step(self, c: StepCompiler) -> S.EditStep:
        return S.EditStep(c.sae(self.sae), _features(self.features),
                          _positions(self.positions), self._value(),
                          c.conv(self.hook, self.sae.cfg.activation_space))


@dataclass
class Ablate(_LatentEdit):
    """Set SAE latents ``features`` to zero (at ``positions``), keeping the SAE error."""


@dataclass
class Clamp(_LatentEdit):
    """Set SAE latents ``features`` to ``value`` (at ``positions``), keeping the SAE error."""

    value: float = 0.0

    def _value(self) -> float | None:
        return float(self.value)


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

        >>> from saebridge.sae.model import SAE
        >>> sae = SAE.random("standard", 4, 8, "blocks.0.hook_resid_pre")
        >>> Steer.from_sae(sae, 3, coef=4.0).hook
        'blocks.0.hook_resid_pre'
        """
        # A transcoder's latents write at its output site.
        hook = getattr(sae.cfg, "hook_name_out", sae.cfg.hook_name)
        return cls(hook=hook, vector=sae.decoder_direction(feature).detach(), coef=coef,
                   positions=positions, head_index=sae.cfg.hook_head_index)

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        return add_vector(x, self.vector, self.coef, self.positions, self.head_index,
                          self.hook)

    def step(self, c: StepCompiler) -> S.SteerStep:
        # A copy: a row of W_dec is a view, and pickling a view ships its whole storage.
        vector = self.vector.detach().clone(memory_format=torch.contiguous_format)
        return S.SteerStep(vector, float(self.coef), _positions(self.positions),
                           self.head_index)


@dataclass
class Observe:
    """Read-only: hands the final activation at a site to ``callback(hook, x)``."""

    hook: str
    callback: Callable[[str, Tensor], None]
    writes: bool = False

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        self.callback(self.hook, x)
        return x


# ---- transcoders: read one site, write another ------------------------------------------

def _slot(sae: SAE) -> str:
    return f"{sae.cfg.hook_name}->{getattr(sae.cfg, 'hook_name_out', '')}#{id(sae)}"


def ln_gain_bias(stats: RawStats | None, name: str, affine: str) -> tuple[Tensor, Tensor]:
    """The unprocessed gain and bias of LayerNorm ``affine`` (``ln1``/``ln2``) in the block of
    hook ``name``: a transcoder reading that norm's output applies them to its input."""
    found = stats.ln_affine(split(name)[0] or 0, affine) if stats is not None else None
    if found is None:
        raise SpaceConversionError(
            f"transcoder at {name!r} reads the output of {affine} with its gain and bias, but "
            "this model's unprocessed LayerNorm weights are unknown. Build the model with "
            "saebridge.adapters.transformer_lens.from_hf(), or wrap an unprocessed one.")
    return found


@dataclass
class TranscoderRead:
    """Encodes the transcoder's input site and keeps the prediction; changes nothing."""

    sae: Transcoder
    writes: bool = False

    @property
    def hook(self) -> str:
        return self.sae.cfg.hook_name

    def _gain_bias(self, stats: RawStats | None) -> tuple[Tensor, Tensor] | None:
        affine = self.sae.cfg.input_affine
        return None if affine is None else ln_gain_bias(stats, self.hook, affine)

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        conv = ctx.convert(self.sae.cfg.activation_space, x)
        prediction, records = ops.transcoder_read(self.sae.data(), x, conv,
                                                  self._gain_bias(ctx.raw_stats), ctx.mode,
                                                  ctx.name,
                                                  impl=self.sae)
        _keep(ctx, self.hook, records)
        ctx.state[_slot(self.sae)] = prediction
        return x

    def step(self, c: StepCompiler) -> S.ReadStep:
        affine = self.sae.cfg.input_affine
        return S.ReadStep(c.sae(self.sae), c.conv(self.hook, self.sae.cfg.activation_space),
                          None if affine is None else c.gain_bias(self.hook, affine), c.mode,
                          _slot(self.sae))


@dataclass
class TranscoderWrite:
    """Replaces the transcoder's output site with the prediction made from its input."""

    sae: Transcoder
    use_error_term: bool = False
    writes: bool = True

    @property
    def hook(self) -> str:
        return self.sae.cfg.hook_name_out

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        conv = ctx.convert(self.sae.cfg.activation_space, x)
        new, records = ops.transcoder_write(self.sae.data(), x, conv,
                                            ctx.state.pop(_slot(self.sae), None),
                                            self.use_error_term, ctx.name)
        _keep(ctx, self.sae.cfg.hook_name, records)
        return new

    def step(self, c: StepCompiler) -> S.WriteStep:
        return S.WriteStep(c.sae(self.sae), c.conv(self.hook, self.sae.cfg.activation_space),
                           self.use_error_term, c.mode, _slot(self.sae))


def expand(ops_: Sequence[Intervention]) -> list[Intervention]:
    """Interventions as the engine applies them: a :class:`Splice` of a transcoder becomes
    a read at its input site and a write at its output site.

    Raises:
        SAEConfigError: a latent edit (Ablate/Clamp) of a transcoder, which is not supported.
    """
    out: list[Intervention] = []
    for op in ops_:
        sae = getattr(op, "sae", None)
        if getattr(getattr(sae, "cfg", None), "hook_name_out", None) is None:
            out.append(op)
        elif isinstance(op, Splice):
            out += [TranscoderRead(sae), TranscoderWrite(sae, op.use_error_term)]  # type: ignore[arg-type]
        else:
            raise SAEConfigError(
                f"{type(op).__name__} of a transcoder is not supported: its latents are read at "
                f"{sae.cfg.hook_name!r} but written at {sae.cfg.hook_name_out!r}. Splice it, or "
                "steer its output site with Steer.from_sae().")
    return out


__all__ = [
    "SAE_HOOKS",
    "Ablate",
    "Clamp",
    "Intervention",
    "Observe",
    "Positions",
    "SiteContext",
    "Splice",
    "Steer",
    "StepCompiler",
    "TranscoderRead",
    "TranscoderWrite",
    "expand",
]
