"""Transcoders: read one site, predict another.

A transcoder encodes the activation at ``hook_name`` (its input) and decodes a prediction
of the activation at ``hook_name_out`` (its output, ``d_out`` wide), optionally adding a
linear skip term ``x @ W_skip.T`` (sparsify's ``skip_connection``, SAELens's
``SkipTranscoder``). Splicing one replaces the output site with that prediction; the
engine reads the input site first (see :func:`saebridge.interventions.expand`).

Followed: SAELens 6 ``sae_lens/saes/transcoder.py`` (``d_out``, ``hook_name_out``,
``W_dec [d_sae, d_out]``, ``W_skip [d_out, d_in]``) and sparsify's ``SparseCoder`` with
``transcode=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from saebridge.errors import SAEConfigError
from saebridge.kernel.sae import SAESpec
from saebridge.sae.config import SAEConfig
from saebridge.sae.model import SAE
from saebridge.sae.params import parameter_shapes

Tensor = torch.Tensor

INPUT_AFFINES = ("ln1", "ln2")
"""LayerNorms whose output (with gain and bias) a transcoder may read: its ``hook_name`` is
then that norm's ``hook_normalized``, and the engine applies the model's unprocessed gain
and bias before encoding (see :class:`saebridge.hookmap.aliases.AliasSite`)."""


@dataclass(kw_only=True)
class TranscoderConfig(SAEConfig):
    """An :class:`SAEConfig` with an output site.

    >>> cfg = TranscoderConfig(architecture="topk", k=2, d_in=4, d_sae=8, d_out=4,
    ...     hook_name="blocks.0.hook_resid_pre", hook_name_out="blocks.0.hook_resid_post",
    ...     apply_b_dec_to_input=False)
    >>> cfg.hook_name_out
    'blocks.0.hook_resid_post'
    """

    d_out: int
    """Width of the predicted activation."""
    hook_name_out: str
    """Canonical hook whose activation the transcoder predicts (and replaces when spliced)."""
    skip: bool = False
    """Add ``x @ W_skip.T`` to the prediction (``W_skip [d_out, d_in]``)."""
    input_affine: str | None = None
    """``"ln1"``/``"ln2"``: the input is that LayerNorm's output with its gain and bias."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.d_out, bool) or not isinstance(self.d_out, int) or self.d_out < 1:
            raise SAEConfigError(f"transcoder config field 'd_out' is {self.d_out!r}; it must "
                                 "be an integer >= 1 (the width of the output site).")
        if not isinstance(self.hook_name_out, str) or not self.hook_name_out:
            raise SAEConfigError(f"transcoder config field 'hook_name_out' is "
                                 f"{self.hook_name_out!r}; it must be a TransformerLens hook "
                                 "name such as 'blocks.3.hook_mlp_out'.")
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise SAEConfigError(
                f"a transcoder with d_in={self.d_in} != d_out={self.d_out} cannot subtract "
                "b_dec (d_out wide) from its input. Set apply_b_dec_to_input to false.")
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise SAEConfigError(
                f"a transcoder cannot use normalize_activations="
                f"{self.normalize_activations!r}: the statistics of its input do not describe "
                "its output. Use 'none'.")
        if self.input_affine not in (None, *INPUT_AFFINES):
            raise SAEConfigError(f"transcoder input_affine {self.input_affine!r} is not one of "
                                 f"None, {', '.join(INPUT_AFFINES)}.")
        if self.input_affine and not self.hook_name.endswith(f"{self.input_affine}."
                                                             "hook_normalized"):
            raise SAEConfigError(
                f"input_affine={self.input_affine!r} needs hook_name to be that norm's "
                f"hook_normalized, got {self.hook_name!r}.")
        if not isinstance(self.skip, bool):
            raise SAEConfigError(f"transcoder config field 'skip' is {self.skip!r}; it must be "
                                 "true or false.")


class Transcoder(SAE):
    """An SAE whose decoder predicts another site (``cfg.hook_name_out``).

    ``encode`` and the latents are an SAE's; ``decode`` gives ``[..., d_out]`` without the
    skip term (as SAELens's), ``forward``/``run`` add it.

    >>> tc = Transcoder.random("topk", 4, 16, 6, "blocks.0.mlp.hook_pre",
    ...                        "blocks.0.mlp.hook_post", k=2, skip=True)
    >>> tuple(tc(torch.randn(3, 4)).shape)
    (3, 6)
    """

    cfg: TranscoderConfig
    W_skip: nn.Parameter | None
    saelens_format: ClassVar[str] = "saelens-transcoder"
    """The format that ``save(format="saelens")`` writes this kind of SAE in."""

    def __init__(self, cfg: TranscoderConfig, state_dict: dict[str, Tensor] | None = None
                 ) -> None:
        if not isinstance(cfg, TranscoderConfig):
            raise SAEConfigError(f"a Transcoder needs a TranscoderConfig, got "
                                 f"{type(cfg).__name__}. Build one with d_out and hook_name_out.")
        super().__init__(cfg, state_dict)
        if not cfg.skip:
            self.register_parameter("W_skip", None)

    def _parameter_shapes(self, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        assert isinstance(cfg, TranscoderConfig)  # __init__ checked it
        shapes = parameter_shapes(cfg)
        shapes["W_dec"] = (cfg.d_sae, cfg.d_out)
        shapes["b_dec"] = (cfg.d_out,)
        if cfg.skip:
            shapes["W_skip"] = (cfg.d_out, cfg.d_in)
        return shapes

    @classmethod
    def random(cls, architecture: str, d_in: int, d_sae: int, d_out: int,  # type: ignore[override]
               hook_name: str, hook_name_out: str, *, k: int | float | None = None,
               seed: int = 0, skip: bool = False, input_affine: str | None = None,
               **cfg_overrides: object) -> Transcoder:
        """A transcoder with every parameter random and non-trivial (tests, examples)."""
        cfg_overrides.setdefault("apply_b_dec_to_input", False)
        base = SAE.random(architecture, d_in, d_sae, hook_name, k=k, seed=seed,
                          **cfg_overrides)  # type: ignore[arg-type]
        cfg = TranscoderConfig(**{**base.cfg.to_dict(), "d_out": d_out,
                                  "hook_name_out": hook_name_out, "skip": skip,
                                  "input_affine": input_affine})
        gen = torch.Generator().manual_seed(seed + 2)
        tensors = {name: p.detach() for name, p in base.named_parameters()}
        dtype = base.W_enc.dtype
        norms_F1 = 0.5 + torch.rand(d_sae, 1, generator=gen, dtype=torch.float64)
        W_dec = torch.randn(d_sae, d_out, generator=gen, dtype=torch.float64)
        tensors["W_dec"] = (W_dec / W_dec.norm(dim=-1, keepdim=True) * norms_F1).to(dtype)
        tensors["b_dec"] = (0.1 * torch.randn(d_out, generator=gen, dtype=torch.float64)
                            ).to(dtype)
        if skip:
            tensors["W_skip"] = (0.1 * torch.randn(d_out, d_in, generator=gen,
                                                   dtype=torch.float64)).to(dtype)
        return cls(cfg, tensors)

    def spec(self) -> SAESpec:
        """The SAE's spec with the output site: the kernel then adds the skip term
        (``x @ W_skip.T``) to the prediction and leaves it ``[..., d_out]``.

        >>> tc = Transcoder.random("standard", 4, 8, 4, "blocks.0.hook_resid_pre",
        ...                        "blocks.0.hook_resid_post", skip=True)
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(tc(x), tc.decode(tc.encode(x)) + x @ tc.W_skip.T)
        True
        """
        return super().spec()._replace(d_out=self.cfg.d_out, hook_name_out=self.cfg.hook_name_out)

    def decoder_direction(self, feature: int) -> Tensor:
        """The direction latent ``feature`` writes at the *output* site, ``[d_out]``."""
        return self.W_dec[feature]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_out={self.cfg.d_out}, " \
               f"hook_name_out={self.cfg.hook_name_out!r}"
