"""Transcoders as interventions: a read at the input site keeps the prediction, a write at
the output site replaces it (:func:`expand` turns a transcoder's :class:`Splice` into the
two). The math is the kernel's (:func:`saebridge.kernel.ops.transcoder_read`/``_write``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from saebridge.errors import SAEConfigError, SpaceConversionError
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.lookup import split
from saebridge.interventions import (
    Intervention,
    SiteContext,
    Splice,
    StepCompiler,
    bypass_mask,
    keep_records,
)
from saebridge.kernel import ops
from saebridge.kernel import steps as S

if TYPE_CHECKING:
    from saebridge.sae.model import SAE
    from saebridge.sae.transcoder import Transcoder

Tensor = torch.Tensor


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
        keep_records(ctx, self.hook, records)
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
    exclude_tokens: tuple[int, ...] = ()

    @property
    def hook(self) -> str:
        return self.sae.cfg.hook_name_out

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        conv = ctx.convert(self.sae.cfg.activation_space, x)
        new, records = ops.transcoder_write(self.sae.data(), x, conv,
                                            ctx.state.pop(_slot(self.sae), None),
                                            self.use_error_term, ctx.name,
                                            bypass_mask(self.exclude_tokens, ctx.tokens))
        keep_records(ctx, self.sae.cfg.hook_name, records)
        return new

    def step(self, c: StepCompiler) -> S.WriteStep:
        return S.WriteStep(c.sae(self.sae), c.conv(self.hook, self.sae.cfg.activation_space),
                           self.use_error_term, c.mode, _slot(self.sae),
                           c.bypass(self.exclude_tokens))


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
        elif isinstance(op, Splice) and op.latent_hooks:
            raise SAEConfigError(
                f"hook functions at a transcoder's own hook points ({op.hook!r}.hook_sae_*) are "
                "not supported: its latents are read at one site and written at another. "
                "Hook its input or output site instead.")
        elif isinstance(op, Splice):
            out += [TranscoderRead(sae),  # type: ignore[arg-type]
                    TranscoderWrite(sae, op.use_error_term,  # type: ignore[arg-type]
                                    exclude_tokens=op.exclude_tokens)]
        else:
            raise SAEConfigError(
                f"{type(op).__name__} of a transcoder is not supported: its latents are read at "
                f"{sae.cfg.hook_name!r} but written at {sae.cfg.hook_name_out!r}. Splice it, or "
                "steer its output site with Steer.from_sae().")
    return out
