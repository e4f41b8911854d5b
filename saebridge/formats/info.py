"""``sb.inspect(path)``: what an SAE file is, read from its config alone.

Every format reads its config without loading weights where its layout allows: SAELens,
sparsify, Kissane and dictionary_learning from their JSON (``.pt`` tensors memory-mapped for
their shapes), OpenAI from a memory-mapped ``.pt``, Gemma Scope from the ``.npy`` headers.
Only a block-diagonal SAELens folder that does not record its heads has to read its weights
to find the blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from saebridge.formats import detect_format, hub, read_config
from saebridge.hookmap.space import ActivationSpace
from saebridge.sae.config import SAEConfig


@dataclass(frozen=True)
class SAEInfo:
    """A summary of an SAE file (``config`` holds every field)."""

    format: str
    architecture: str
    hook_name: str
    """Canonical site read (a transcoder's input site)."""
    hook_name_out: str | None
    """A transcoder's output site; None for an SAE."""
    d_in: int
    d_sae: int
    space: ActivationSpace
    """The activation space the SAE was trained in."""
    dtype: str
    config: SAEConfig
    space_source: str = ""
    """Where :attr:`space` came from (stated, the cfg key, its absence, the format)."""


SAELENS_FORMATS = ("saelens", "saelens-transcoder", "saelens-blockdiag")


def space_source(fmt: str, cfg: SAEConfig, stated: bool) -> str:
    """Why an SAE's activation space is what it is, following SAELens's ``load_model``
    (``sae_lens/load_model.py``): ``model_from_pretrained_kwargs`` present → TransformerLens
    ``from_pretrained_no_processing(**kwargs)`` (flags not named are off; ``{}`` is
    unprocessed); absent → ``from_pretrained`` defaults (processed). Other formats record
    no space: each states the one its training code used."""
    if stated:
        return "stated by the user (activation_space= / --sae-space)"
    if fmt not in SAELENS_FORMATS:
        return f"{fmt} format default (trained on the model's own activations)"
    kwargs = cfg.model_from_pretrained_kwargs
    if kwargs is None:
        return "model_from_pretrained_kwargs absent: from_pretrained defaults"
    return f"model_from_pretrained_kwargs={kwargs!r}: from_pretrained_no_processing(**kwargs)"


def inspect(path: str | os.PathLike[str], *, format: str | None = None,
            hook_name: str | None = None, subfolder: str | None = None,
            activation_space: Any = None) -> SAEInfo:
    """Format, architecture, site, sizes, space (and where it came from) and dtype of the
    SAE at ``path``; ``hook_name``/``activation_space`` state what the file gets wrong.

    >>> import tempfile, saebridge as sb
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     sb.SAE.random("topk", 4, 8, "blocks.0.hook_mlp_out", k=2).save(folder)
    ...     info = sb.inspect(folder)
    >>> info.format, info.architecture, info.hook_name, info.d_sae
    ('saelens', 'topk', 'blocks.0.hook_mlp_out', 8)
    """
    local = hub.resolve(path, subfolder)
    name = format or detect_format(local)
    cfg = read_config(local, format=name, hook_name=hook_name,
                      activation_space=activation_space)
    return SAEInfo(format=name, architecture=cfg.architecture, hook_name=cfg.hook_name,
                   hook_name_out=getattr(cfg, "hook_name_out", None), d_in=cfg.d_in,
                   d_sae=cfg.d_sae, space=cfg.activation_space, dtype=cfg.dtype, config=cfg,
                   space_source=space_source(name, cfg, activation_space is not None))
