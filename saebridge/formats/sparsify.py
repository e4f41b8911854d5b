"""EleutherAI sparsify folders: ``cfg.json`` + ``sae.safetensors``, one folder per hookpoint.

Followed: sparsify 1.3 ``sparse_coder.py`` (``SparseCoder.save_to_disk``/``load_from_disk``,
``encode``/``decode``/``forward``), ``fused_encoder.py`` and ``trainer.py``. The weights are
``encoder.weight [num_latents, d_in]``, ``encoder.bias [num_latents]``, ``W_dec
[num_latents, d_in]`` (the same orientation as the encoder, *not* transposed), ``b_dec
[d_in]`` and, with ``skip_connection``, ``W_skip [d_in, d_in]`` (applied as
``x @ W_skip.T``). ``cfg.json`` is the ``SparseCoderConfig`` plus ``d_in``; the number of
latents is ``num_latents or d_in * expansion_factor``.

Semantics: an SAE subtracts ``b_dec`` from its input, a transcoder (``transcode``) does not;
the encoder takes the ReLU *before* keeping the top ``k`` (the same latents as keeping the
top ``k`` and then ReLU-ing them, which is what :class:`SAE` computes); ``multi_topk`` only
changes the training loss. The folder's name is the hookpoint, a module path under the
HF model's ``base_model``: an SAE reads that module's output, a transcoder its input and
predicts its output (the alias tables in ``saebridge.hookmap``; where architectures read a
path differently, the ``model`` in the run's ``config.json`` one level up decides). sparsify
trains on a plain HF model, so activations are raw.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from saebridge.errors import SAEConfigError, SAEFormatError, UnknownHookError
from saebridge.formats._common import (
    RAW_SPACE,
    READ_ERRORS,
    alias_sides,
    device_dtype,
    read_json,
)
from saebridge.sae.config import SAEConfig
from saebridge.sae.model import SAE
from saebridge.sae.transcoder import Transcoder, TranscoderConfig

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae.safetensors"
EXPECTS = "a folder named after its hookpoint with cfg.json and sae.safetensors"
CONVENTION = "the folder is named after the hookpoint, e.g. h.5.mlp or layers.5"
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F64": torch.float64}


def detect(path: Path) -> bool:
    folder = _folder(path)
    return (folder / CFG_FILENAME).is_file() and (folder / WEIGHTS_FILENAME).is_file()


def read_config(path: Path, hook_name: str | None = None) -> SAEConfig:
    """The config from cfg.json and the folder name; only the weights' dtype is peeked at."""
    folder = _folder(path)
    raw = read_json(folder / CFG_FILENAME, f"a sparsify folder holds {CFG_FILENAME}")
    return _config(raw, folder, hook_name, _stored_dtype(folder / WEIGHTS_FILENAME))


def load(path: Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, hook_name: str | None = None) -> SAE:
    """The sparse coder in ``path``: an :class:`SAE`, or a :class:`Transcoder` for
    transcoders and for SAEs with a skip connection (which write their own site)."""
    folder = _folder(path)
    raw = read_json(folder / CFG_FILENAME, f"a sparsify folder holds {CFG_FILENAME}")
    tensors = _read_tensors(folder / WEIGHTS_FILENAME)
    cfg = _config(raw, folder, hook_name, tensors["encoder.weight"].dtype)
    dev, dt = device_dtype(device, dtype, tensors["encoder.weight"].dtype)
    cfg = dataclasses.replace(cfg, device=dev, dtype=dt)
    state = {"W_enc": tensors["encoder.weight"].T.contiguous(),
             "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"],
             "b_dec": tensors["b_dec"]}
    if "W_skip" in tensors:
        state["W_skip"] = tensors["W_skip"]
    if isinstance(cfg, TranscoderConfig):
        return Transcoder(cfg, state)
    return SAE(cfg, state)


def save(sae: SAE, path: Path) -> None:
    """Not written: sparsify's layout is read only."""
    raise SAEFormatError(
        "saebridge reads sparsify folders but does not write them. Save as 'saelens' "
        "(sae.save(path)), which every saebridge loader and SAELens read.")


def _folder(path: Path) -> Path:
    return path.parent if path.name in (CFG_FILENAME, WEIGHTS_FILENAME) else path


def _config(raw: Any, folder: Path, hook_name: str | None, stored: torch.dtype
            ) -> SAEConfig:
    if not isinstance(raw, dict) or "d_in" not in raw:
        raise SAEFormatError(f"{str(folder / CFG_FILENAME)!r} is not a sparsify config: it "
                             "must be a JSON object with d_in and the SparseCoderConfig fields.")
    d_in = raw["d_in"]
    d_sae = raw.get("num_latents") or d_in * raw.get("expansion_factor", 32)
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise SAEConfigError(f"sparsify activation {activation!r} is not supported (only "
                             "'topk'); groupmax keeps one latent per group of latents.")
    if raw.get("signed", False):
        raise SAEConfigError("sparsify coders with signed=true (no ReLU) are not supported.")
    if raw.get("embed_skip") or raw.get("gram_lookup"):
        raise SAEConfigError(
            "sparsify coders with embed_skip or gram_lookup read a second input (embeddings, "
            "n-gram tables) that a splice at one site cannot provide; they are not supported.")
    transcode, skip = bool(raw.get("transcode", False)), bool(raw.get("skip_connection", False))
    hookpoint = folder.name
    model_name = _run_model(folder)
    meta = {"source_format": "sparsify", "hookpoint": hookpoint,
            **{k: raw[k] for k in ("multi_topk", "normalize_decoder", "expansion_factor")
               if k in raw}}
    common: dict[str, Any] = dict(
        architecture="topk", d_in=d_in, d_sae=d_sae, k=raw.get("k", 32),
        dtype=str(stored).removeprefix("torch."), apply_b_dec_to_input=not transcode,
        model_name=model_name,
        model_from_pretrained_kwargs=dict(RAW_SPACE), metadata=meta)
    sides = alias_sides("sparsify", hookpoint, hook_name, CONVENTION, model_name)
    if not (transcode or skip):
        site = sides.output if hook_name is None else sides.input
        if site is None or site.affine is not None:
            raise UnknownHookError(
                f"sparsify hookpoint {hookpoint!r}: an SAE reads the module's output, which has "
                f"no canonical hook ({sides.why_not or 'not mapped'}). Pass hook_name=.")
        return SAEConfig(hook_name=site.name, **common)
    if sides.input is None or sides.output is None or sides.output.affine is not None:
        raise UnknownHookError(
            f"sparsify {'transcoder' if transcode else 'skip SAE'} at {hookpoint!r}: it reads "
            f"the module's input and writes its output, and one of them has no canonical hook "
            f"({sides.why_not or 'not mapped'}). Pass hook_name= for the input site.")
    # An SAE with a skip connection also adds x @ W_skip.T: a transcoder from a site to itself.
    out_site = sides.output if transcode else sides.input
    affine = sides.input.affine if hook_name is None else None
    return TranscoderConfig(hook_name=sides.input.name, hook_name_out=out_site.name,
                            d_out=d_in, skip=skip, input_affine=affine, **common)


def _run_model(folder: Path) -> str | None:
    """The model named in the training run's ``config.json`` (sparsify's RunConfig writes
    it one level up, beside the hookpoint folders), when there is one."""
    try:
        raw = read_json(folder.parent / "config.json", "")
    except SAEFormatError:
        return None
    model = raw.get("model") if isinstance(raw, dict) else None
    return model if isinstance(model, str) else None


def _stored_dtype(path: Path) -> torch.dtype:
    try:
        with safe_open(str(path), framework="pt") as f:
            key = next(iter(f.keys()))
            return _ST_DTYPES.get(f.get_slice(key).get_dtype(), torch.float32)
    except (*READ_ERRORS, StopIteration) as err:  # StopIteration: a file with no tensors
        raise SAEFormatError(f"cannot read {str(path)!r} as safetensors "
                             f"({type(err).__name__}: {err}). The file is truncated, empty or "
                             "corrupt; download it again.") from err


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except READ_ERRORS as err:
        raise SAEFormatError(f"cannot read {str(path)!r} as safetensors "
                             f"({type(err).__name__}: {err}). The file is truncated or "
                             "corrupt; download it again.") from err
    missing = [k for k in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if k not in tensors]
    if missing:
        raise SAEFormatError(
            f"{str(path)!r} lacks {missing}; a sparsify coder holds encoder.weight, "
            "encoder.bias, W_dec and b_dec (a coder saved with decoder=False cannot be spliced).")
    return tensors
