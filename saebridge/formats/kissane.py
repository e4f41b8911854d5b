"""Kissane et al. attention-output SAEs: ``{name}.pt`` + ``{name}_cfg.json`` side by side.

Followed: ckkissane/attention-output-saes ``common/torch_modules/autoencoder.py`` (and
SAELens's ``connor_rob_hook_z`` loader). The state dict holds ``W_enc [act_size,
dict_size]``, ``W_dec [dict_size, act_size]``, ``b_enc``, ``b_dec``; ``acts =
relu((x - b_dec) @ W_enc + b_enc)``, ``recons = acts @ W_dec + b_dec``. The config names the
TransformerLens hook (``act_name``, e.g. ``blocks.5.attn.hook_z``; with ``concat_heads``
the heads are flattened into ``act_size``). They were trained on
``HookedTransformer.from_pretrained`` activations, TransformerLens's default processing
(``hook_z`` without the value bias), which is what no ``model_from_pretrained_kwargs``
means.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from saebridge.errors import SAEFormatError
from saebridge.formats._common import device_dtype, read_json, require, torch_load
from saebridge.sae.config import SAEConfig
from saebridge.sae.model import SAE

EXPECTS = "{name}.pt with W_enc, W_dec, b_enc, b_dec beside {name}_cfg.json naming act_name"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def detect(path: Path) -> bool:
    pair = _pair(path)
    if pair is None:
        return False
    try:
        raw = read_json(pair[1], "")
    except SAEFormatError:
        return False
    return isinstance(raw, dict) and {"act_name", "act_size", "dict_size"} <= raw.keys()


def read_config(path: Path, hook_name: str | None = None) -> SAEConfig:
    """The config from ``{name}_cfg.json`` alone."""
    _, cfg_file = _require_pair(path)
    return _config(read_json(cfg_file, "a Kissane SAE has a _cfg.json beside its .pt"),
                   hook_name)


def load(path: Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, hook_name: str | None = None) -> SAE:
    weights, cfg_file = _require_pair(path)
    cfg = _config(read_json(cfg_file, "a Kissane SAE has a _cfg.json beside its .pt"), hook_name)
    sd = torch_load(weights)
    require(sd, KEYS, f"{str(weights)!r}", "a Kissane et al. AutoEncoder state dict")
    dev, dt = device_dtype(device, dtype, sd["W_enc"].dtype)
    return SAE(dataclasses.replace(cfg, device=dev, dtype=dt), {k: sd[k] for k in KEYS})


def save(sae: SAE, path: Path) -> None:
    """Not written: this layout is read only."""
    raise SAEFormatError(
        "saebridge reads Kissane et al. SAE files but does not write them. Save as 'saelens' "
        "(sae.save(path)), which every saebridge loader and SAELens read.")


def _pair(path: Path) -> tuple[Path, Path] | None:
    """``(weights.pt, weights_cfg.json)`` for a path to either file, or a folder with one pair."""
    if path.is_dir():
        pairs = [p for f in sorted(path.glob("*_cfg.json")) if (p := _pair(f)) is not None]
        return pairs[0] if len(pairs) == 1 else None
    if path.name.endswith("_cfg.json"):
        weights = path.with_name(path.name.removesuffix("_cfg.json") + ".pt")
    elif path.suffix == ".pt":
        weights = path
    else:
        return None
    cfg_file = weights.with_name(weights.stem + "_cfg.json")
    return (weights, cfg_file) if weights.is_file() and cfg_file.is_file() else None


def _require_pair(path: Path) -> tuple[Path, Path]:
    pair = _pair(path)
    if pair is None:
        raise SAEFormatError(f"no Kissane SAE at {str(path)!r}: expected {EXPECTS} (a folder "
                             "must hold exactly one such pair). Check the path.")
    return pair


def _config(raw: Any, hook_name: str | None) -> SAEConfig:
    require(raw, ("act_name", "act_size", "dict_size"), "the _cfg.json",
            "a Kissane et al. SAE config")
    hook = hook_name or raw["act_name"]
    keep = ("layer", "site", "head", "l1_coeff", "seq_len", "lr", "concat_heads")
    return SAEConfig(
        architecture="standard", d_in=raw["act_size"], d_sae=raw["dict_size"], hook_name=hook,
        model_name=raw.get("model_name"), dtype=_DTYPES.get(raw.get("enc_dtype"), "float32"),
        apply_b_dec_to_input=True,
        reshape_activations="hook_z" if hook.endswith("hook_z") else "none",
        model_from_pretrained_kwargs=None,
        metadata={"source_format": "kissane", **{k: raw[k] for k in keep if k in raw}})
