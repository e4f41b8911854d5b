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

from saebridge.errors import ArgumentTypeError, SAEConfigError
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.site import Kind
from saebridge.hookmap.space import CANONICAL, ActivationSpace
from saebridge.kernel import ops
from saebridge.kernel import steps as S
from saebridge.kernel.indexing import (
    Positions,
    add_vector,
    as_index,
    check_features,
    check_number,
    check_positions,
    check_vector,
)
from saebridge.kernel.ops import SAE_HOOKS
from saebridge.kernel.sae import SAEData
from saebridge.kernel.spaces import Conv, back
from saebridge.sae.foreign import as_sae

if TYPE_CHECKING:
    from saebridge.sae.model import SAE

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
    """Per-forward state shared by the sites of one run (a transcoder's prediction, the
    mean edits wrote into the residual stream)."""
    tokens: Tensor | None = None
    """The run's tokens ``[batch, pos]`` (for ``exclude_special_tokens``)."""

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

    def kind(self, name: str) -> Kind:
        """How processing changes the site ``name`` (the adapter's :meth:`kind`)."""
        ...

    def gain_bias(self, name: str, affine: str) -> tuple[Tensor, Tensor]:
        """The unprocessed gain and bias of LayerNorm ``affine`` in ``name``'s block."""
        ...

    def bypass(self, token_ids: tuple[int, ...]) -> Tensor | None:
        """The ``[batch, pos]`` mask of the run's tokens in ``token_ids`` (None: no ids)."""
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


def keep_records(ctx: SiteContext, hook: str, records: dict[str, Tensor]) -> None:
    """Record an op's ``records`` (keys relative to ``hook``) in the run's cache."""
    for key, value in records.items():
        ctx.record(f"{hook}.{key}", value)


def bypass_mask(token_ids: tuple[int, ...], tokens: Tensor | None) -> Tensor | None:
    """Where ``tokens`` (``[batch, pos]``) holds one of ``token_ids``: the positions an SAE
    with ``exclude_special_tokens`` leaves alone. None when there are no ids."""
    if not token_ids:
        return None
    if tokens is None:
        raise SAEConfigError(
            "exclude_special_tokens needs the run's tokens, which this run does not know (a "
            "remote generation, or interventions prepared for your own trace). Splice "
            "without exclude_special_tokens there, or run it with model.run_with_saes.")
    return torch.isin(tokens, torch.tensor(token_ids, device=tokens.device))


@dataclass
class Splice:
    """Replace the activation at ``sae.cfg.hook_name`` by the SAE's reconstruction.

    With ``use_error_term=True`` the SAE's error is added back, so the model's output is
    unchanged while every SAE hook (latents, reconstruction, error) is still recorded.
    At positions holding one of ``exclude_tokens`` (token ids: SAELens's
    ``exclude_special_tokens``) the activation is left as it is, with a zero error.
    """

    sae: SAE
    use_error_term: bool | None = False
    """None: the SAE's own ``use_error_term`` (SAELens's default)."""
    writes: bool = True
    exclude_tokens: tuple[int, ...] = ()
    latent_hooks: tuple[tuple[str, Callable[[Tensor], Tensor]], ...] = ()
    """``(key, fn)`` pairs run at the SAE's own hook points (``hook_sae_acts_post`` …), as
    SAELens fires hooks there (see :func:`saebridge.kernel.ops.splice_hooked`)."""

    def __post_init__(self) -> None:
        if self.use_error_term is None:
            self.use_error_term = bool(getattr(self.sae, "use_error_term", False))
        self.sae = as_sae(self.sae)  # a SAELens/dictionary_learning/sparsify object: shared

    @property
    def hook(self) -> str:
        return self.sae.cfg.hook_name

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        conv = ctx.convert(self.sae.cfg.activation_space, x)
        bypass = bypass_mask(self.exclude_tokens, ctx.tokens)
        if self.latent_hooks:
            hooks: dict[str, list[Callable[[Tensor], Tensor]]] = {}
            for key, fn in self.latent_hooks:
                hooks.setdefault(key, []).append(fn)
            new, records = ops.splice_hooked(self.sae.data(), x, conv, self.use_error_term,
                                             ctx.name, hooks, impl=self.sae, bypass=bypass)
        else:
            new, records = ops.splice(self.sae.data(), x, conv, self.use_error_term, ctx.mode,
                                      ctx.name, impl=self.sae, bypass=bypass)
        keep_records(ctx, self.hook, records)
        return new

    def step(self, c: StepCompiler) -> S.SpliceStep:
        if self.latent_hooks:
            raise ArgumentTypeError(
                f"hook functions at {self.hook!r}'s SAE hook points are code, which an nnsight "
                "trace kernel (remote runs) cannot carry. Run them on a local model, or use "
                "Ablate/Clamp, which are data.")
        return S.SpliceStep(c.sae(self.sae), self.use_error_term,
                            c.conv(self.hook, self.sae.cfg.activation_space), c.mode,
                            c.bypass(self.exclude_tokens))


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

    def __post_init__(self) -> None:
        self.sae = as_sae(self.sae)
        # Checked and copied now: a float, bool or negative index would otherwise be read
        # as another latent (1.7 as 1, -1 as the last), and a user's list edited later
        # would change the edit.
        self.features = check_features(self.features, self.sae.cfg.d_sae, self.sae.cfg.hook_name)
        self.positions = check_positions(self.positions)

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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.value, "Clamp value")

    def _value(self) -> float | None:
        return float(self.value)


@dataclass
class Steer:
    """Add ``coef * vector`` to the activation at ``hook`` (at ``positions``).

    The vector needs no space conversion: at every site the activation spaces differ from
    the native one by a shift, and a shift does not change what adding a vector does. (At
    the residual stream the shift is the mean over d_model, and every reader of the stream
    is a LayerNorm that removes it; at ``hook_z`` it is the value bias, a constant.) One
    site reads what is added differently: a LayerNorm's output (``ln*.hook_normalized``),
    whose readers a ``fold_ln`` model centres. There the steer has the canonical (processed)
    meaning on every backend: the vector's mean over d_model is dropped on unfolded ones too.
    """

    hook: str
    vector: Tensor
    coef: float = 1.0
    positions: Positions = None
    head_index: int | None = None
    writes: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.hook, str):
            raise ArgumentTypeError(f"Steer hook must be a hook name (str), got "
                                    f"{self.hook!r} ({type(self.hook).__name__}).")
        check_number(self.coef, "Steer coef")
        # A copy: a view of W_dec (or of any tensor the caller keeps) would let a later
        # in-place edit of either side change the other.
        self.vector = check_vector(self.vector)
        self.positions = check_positions(self.positions)
        if self.head_index is not None:
            self.head_index = as_index(self.head_index, "Steer head_index")

    @classmethod
    def from_sae(cls, sae: SAE, feature: int, coef: float = 1.0,
                 positions: Positions = None) -> Steer:
        """Steer along the decoder direction of one SAE feature, at the SAE's hook (the
        vector is a copy of that row of ``W_dec``).

        >>> from saebridge.sae.model import SAE
        >>> sae = SAE.random("standard", 4, 8, "blocks.0.hook_resid_pre")
        >>> Steer.from_sae(sae, 3, coef=4.0).hook
        'blocks.0.hook_resid_pre'
        """
        sae = as_sae(sae)
        (index,) = check_features([feature], sae.cfg.d_sae, sae.cfg.hook_name)
        # A transcoder's latents write at its output site.
        hook = getattr(sae.cfg, "hook_name_out", sae.cfg.hook_name)
        return cls(hook=hook, vector=sae.decoder_direction(index), coef=coef,
                   positions=positions, head_index=sae.cfg.hook_head_index)

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        new = add_vector(x, self.vector, self.coef, self.positions, self.head_index,
                         self.hook)
        return back(ctx.convert(CANONICAL, x), new, None) if ctx.kind == "normed" else new

    def step(self, c: StepCompiler) -> S.SteerStep:
        # A copy: a row of W_dec is a view, and pickling a view ships its whole storage.
        vector = self.vector.detach().clone(memory_format=torch.contiguous_format)
        center = c.kind(self.hook) == "normed" and c.conv(self.hook, CANONICAL).center_writes
        return S.SteerStep(vector, float(self.coef), _positions(self.positions),
                           self.head_index, center)


@dataclass
class Observe:
    """Read-only: hands the final activation at a site to ``callback(hook, x)``."""

    hook: str
    callback: Callable[[str, Tensor], None]
    writes: bool = False

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        self.callback(self.hook, x)
        return x


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
]
