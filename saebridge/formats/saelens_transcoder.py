"""SAELens transcoder folders: ``cfg.json`` + ``sae_weights.safetensors`` with ``d_out``.

Followed: SAELens 6 ``sae_lens/saes/transcoder.py``: architectures ``transcoder``,
``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``; ``d_out`` at the
top level of cfg.json, ``hook_name_out`` in ``metadata``; tensors ``W_enc [d_in, d_sae]``,
``b_enc``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, ``threshold`` (jumprelu) and
``W_skip [d_out, d_in]`` (skip). SAELens has no TopK transcoder: sparsify's are written as
``topk_transcoder``/``topk_skip_transcoder`` with a top-level ``k``, an extension that
saebridge reads back exactly and SAELens does not load. Where a transcoder reads a
LayerNorm's output, ``metadata.input_affine`` names it (saebridge's key).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import saebridge.formats.saelens as saelens  # the leaf, not the formats registry
from saebridge.errors import SAEConfigError, SAEFormatError
from saebridge.formats._common import device_dtype, read_json, require
from saebridge.sae.model import SAE
from saebridge.sae.transcoder import Transcoder, TranscoderConfig

EXPECTS = "a SAELens folder whose cfg.json architecture is a transcoder (with d_out)"
REFINES = "saelens"
# SAELens architecture -> (saebridge architecture, skip)
ARCHITECTURES = {"transcoder": ("standard", False), "skip_transcoder": ("standard", True),
                 "jumprelu_transcoder": ("jumprelu", False),
                 "jumprelu_skip_transcoder": ("jumprelu", True),
                 "topk_transcoder": ("topk", False), "topk_skip_transcoder": ("topk", True)}
_TOP = ("d_in", "d_sae", "d_out", "dtype", "device", "apply_b_dec_to_input",
        "normalize_activations", "reshape_activations")
_FIELD_META = ("hook_name", "hook_name_out", "hook_head_index", "model_name",
               "model_from_pretrained_kwargs", "input_affine")


def detect(path: Path) -> bool:
    folder = saelens._folder(path)
    if not saelens.detect(folder):
        return False
    try:
        raw = read_json(folder / saelens.SAE_CFG_FILENAME, "")
    except SAEFormatError:
        return False
    return isinstance(raw, dict) and str(raw.get("architecture")) in ARCHITECTURES


def read_config(path: Path, hook_name: str | None = None) -> TranscoderConfig:
    folder = saelens._folder(path)
    return _parse(read_json(folder / saelens.SAE_CFG_FILENAME, "a SAELens folder"), hook_name)


def load(path: Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, hook_name: str | None = None) -> Transcoder:
    folder = saelens._folder(path)
    cfg = read_config(folder, hook_name)
    tensors = saelens._read_tensors(folder / saelens.SAE_WEIGHTS_FILENAME, "cpu")
    dev, dt = device_dtype(device, dtype or cfg.dtype, tensors["W_enc"].dtype)
    return Transcoder(dataclasses.replace(cfg, device=dev, dtype=dt), tensors)


def save(sae: SAE, path: Path) -> None:
    """Write a :class:`Transcoder` in SAELens 6's transcoder layout."""
    if not isinstance(sae, Transcoder):
        raise SAEConfigError(f"the saelens-transcoder format holds transcoders; got a "
                             f"{type(sae).__name__}. Save it as 'saelens'.")
    text = json.dumps(_unparse(sae.cfg), indent=2)
    tensors = {name: p.detach().contiguous() for name, p in sae.named_parameters()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / saelens.SAE_WEIGHTS_FILENAME))
    (path / saelens.SAE_CFG_FILENAME).write_text(text, encoding="utf-8")


def _parse(raw: Any, hook_name: str | None) -> TranscoderConfig:
    if not isinstance(raw, dict) or str(raw.get("architecture")) not in ARCHITECTURES:
        raise SAEFormatError(f"cfg.json is not a SAELens transcoder config (architecture must "
                             f"be one of {', '.join(ARCHITECTURES)}).")
    meta = copy.deepcopy(raw.get("metadata") or {})
    require(meta, ("hook_name", "hook_name_out"), "cfg.json metadata", "a SAELens transcoder")
    require(raw, ("d_in", "d_sae", "d_out"), "cfg.json", "a SAELens transcoder")
    arch, skip = ARCHITECTURES[raw["architecture"]]
    if meta.get("sae_lens_version") == saelens.WRITTEN_BY_SAEBRIDGE:
        del meta["sae_lens_version"]
    fields = {name: raw[name] for name in _TOP if name in raw}
    fields["dtype"] = str(fields.get("dtype", "float32")).removeprefix("torch.")
    fields.setdefault("apply_b_dec_to_input", False)  # SAELens transcoders never subtract it
    known = {**{n: meta.pop(n, None) for n in _FIELD_META}}
    for key, value in raw.items():
        if key not in (*_TOP, "metadata", "architecture", "k", "rescale_acts_by_decoder_norm"):
            meta.setdefault(key, value)
    return TranscoderConfig(
        architecture=arch, k=raw.get("k") if arch == "topk" else None, skip=skip,
        rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
        hook_name=hook_name or known["hook_name"], hook_name_out=known["hook_name_out"],
        hook_head_index=known["hook_head_index"], model_name=known["model_name"],
        model_from_pretrained_kwargs=known["model_from_pretrained_kwargs"],
        input_affine=None if hook_name else known["input_affine"], metadata=meta, **fields)


def _unparse(cfg: TranscoderConfig) -> dict[str, Any]:
    names = {("standard", False): "transcoder", ("standard", True): "skip_transcoder",
             ("jumprelu", False): "jumprelu_transcoder",
             ("jumprelu", True): "jumprelu_skip_transcoder",
             ("topk", False): "topk_transcoder", ("topk", True): "topk_skip_transcoder"}
    key = (cfg.architecture, cfg.skip)
    if key not in names:
        raise SAEConfigError(f"a {cfg.architecture} transcoder has no SAELens layout; "
                             "supported: standard, jumprelu and topk (with or without skip).")
    meta = copy.deepcopy(cfg.metadata)
    if not saelens._is_v6_version(meta.get("sae_lens_version")):
        meta["sae_lens_version"] = saelens.WRITTEN_BY_SAEBRIDGE
    meta.update({n: copy.deepcopy(getattr(cfg, n)) for n in _FIELD_META
                 if n != "input_affine" or cfg.input_affine is not None})
    raw: dict[str, Any] = {name: getattr(cfg, name) for name in _TOP}
    if cfg.architecture == "topk":
        raw.update(k=cfg.k, rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm)
    raw["architecture"] = names[key]
    raw["metadata"] = meta
    return raw
