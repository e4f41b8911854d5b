"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors``.

Followed: SAELens 6.49 (``SAE.save_model``/``SAE.load_from_disk``, ``sae_lens/constants.py``,
``sae_lens/loading/pretrained_sae_loaders.py``). Written as SAELens 6 writes them: sizes and
preprocessing at the top level of cfg.json, ``hook_name``/``model_name``/
``hook_head_index``/``model_from_pretrained_kwargs`` under ``metadata``, the state dict
under SAELens's own keys with ``W_dec`` as ``[d_sae, d_in]`` (never transposed, never
normalised). Also read: SAELens ≤ 5 flat cfg.json (``hook_name`` or ``hook_point``,
``activation_fn_str`` + ``activation_fn_kwargs.k`` for topk, bool ``normalize_activations``,
``finetuning_scaling_factor``), SAELens training checkpoints (batchtopk ``topk_threshold``,
jumprelu ``log_threshold``) and an ``activation_scaler.json`` beside the weights. Weights are
only ever read with safetensors, never unpickled.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saebridge.errors import SAEConfigError, SAEFormatError
from saebridge.formats._common import READ_ERRORS, parse_json
from saebridge.sae.config import K_ARCHITECTURES, SAEConfig
from saebridge.sae.model import SAE
from saebridge.sae.params import dtype_name, torch_device

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
ACTIVATION_SCALER_CFG_FILENAME = "activation_scaler.json"
WRITTEN_BY_SAEBRIDGE = "6.0.0+saebridge"
"""``metadata.sae_lens_version`` written when the config has no SAELens ≥ 6 version: SAELens
reads a folder without one as a pre-6 flat config and would drop its metadata."""

_TOP_LEVEL = ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
              "normalize_activations", "reshape_activations")
_K_FIELDS = ("k", "rescale_acts_by_decoder_norm")
_V5_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
_FINETUNING_KEYS = ("scaling_factor", "finetuning_scaling_factor")


# ---- the format interface -------------------------------------------------------------

def detect(path: Path) -> bool:
    """True for a folder (or a file in one) holding cfg.json and sae_weights.safetensors."""
    folder = _folder(path)
    return (folder / SAE_CFG_FILENAME).is_file() and (folder / SAE_WEIGHTS_FILENAME).is_file()


def read_config(path: Path) -> SAEConfig:
    """The SAE config in ``path/cfg.json`` (SAELens 6 or ≤ 5 layout); weights are not read."""
    return _parse(_read_json(_folder(path) / SAE_CFG_FILENAME))[0]


def load(path: Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None) -> SAE:
    """The SAE in the SAELens folder ``path``, on ``device`` (default cpu) in ``dtype``
    (default: cfg.json's)."""
    folder = _folder(path)
    cfg, finetuning = _parse(_read_json(folder / SAE_CFG_FILENAME))
    if isinstance(dtype, torch.dtype):
        dtype = dtype_name(dtype)
    device = str(torch_device(device or "cpu"))  # before reading: a device error is no file's
    cfg = dataclasses.replace(cfg, device=device, dtype=dtype or cfg.dtype)
    tensors = _read_tensors(folder / SAE_WEIGHTS_FILENAME, cfg.device)
    sae = SAE(cfg, _convert_legacy_tensors(cfg, tensors, finetuning))
    scaling_factor = _read_scaling_factor(folder)
    if scaling_factor is not None and cfg.normalize_activations == "expected_average_only_in":
        # SAELens writes this file beside training checkpoints; its final save folds the
        # factor in instead. Folding here gives the SAE the inputs it was trained on.
        sae.fold_activation_norm_scaling_factor(scaling_factor)
    return sae


def save(sae: SAE, path: Path) -> None:
    """Write ``sae`` to the folder ``path`` exactly as SAELens 6's ``save_model`` lays it out."""
    try:  # before touching the disk, so a bad config leaves no half-written folder
        text = json.dumps(_unparse(sae.cfg), indent=2)
    except (TypeError, ValueError) as err:
        raise SAEConfigError(f"the SAE config cannot be written to "
                             f"{str(path / SAE_CFG_FILENAME)!r} as JSON ({err}); nothing was "
                             "written. Keep metadata to JSON types: str, int, float, bool, None, "
                             "list, dict.") from err
    tensors = {name: p.detach().contiguous() for name, p in sae.named_parameters()}
    if sae.cfg.architecture == "batchtopk" and sae.cfg.rescale_acts_by_decoder_norm:
        _fold_decoder_norms(tensors)  # a SAELens jumprelu cannot rescale at run time
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / SAE_WEIGHTS_FILENAME))
    (path / SAE_CFG_FILENAME).write_text(text, encoding="utf-8")


# ---- cfg.json -------------------------------------------------------------------------

def _parse(raw: Any) -> tuple[SAEConfig, bool]:
    """Config from a cfg.json dict, and whether v5 finetuning scaling must be folded."""
    if not isinstance(raw, dict):
        raise SAEConfigError(f"cfg.json must hold a JSON object, got {type(raw).__name__}. "
                             "Re-save the SAE, or fix the file by hand.")
    if "metadata" in raw:
        return _parse_v6(raw), False
    return _parse_v5(raw)


def _parse_v6(raw: dict[str, Any]) -> SAEConfig:
    meta = raw["metadata"]
    if not isinstance(meta, dict):
        raise SAEConfigError(f"cfg.json 'metadata' must be a JSON object, got {meta!r}. "
                             "Fix the file, or remove 'metadata' for a SAELens ≤ 5 flat layout.")
    meta = copy.deepcopy(meta)
    arch = _required(raw, "architecture", "top level")
    if meta.get("sae_lens_version") == WRITTEN_BY_SAEBRIDGE:
        del meta["sae_lens_version"]
    fields = {name: raw[name] for name in _TOP_LEVEL if name in raw}
    k_fields = {name: raw[name] for name in _K_FIELDS if name in raw}
    if arch == "jumprelu" and meta.get("training_architecture") == "batchtopk":
        # SAELens 6 saves a trained batchtopk SAE as a jumprelu with this provenance.
        arch = meta.pop("training_architecture")
        details = dict(meta.pop("training_architecture_details", None) or {})
        k_fields = {"k": details.pop("k", None)}
        if details:
            meta["training_architecture_details"] = details
    elif arch not in K_ARCHITECTURES:
        # A null k / false rescale says nothing and is kept verbatim; a real value on an
        # architecture without k goes to SAEConfig, which refuses it (never silently dropped).
        unset = {key: v for key, v in k_fields.items() if v is None or v is False}
        meta.update({key: v for key, v in unset.items() if key not in meta})
        k_fields = {key: v for key, v in k_fields.items() if key not in unset}
    for key, value in raw.items():  # SAELens ignores other keys; keep them, in metadata
        if key not in (*_TOP_LEVEL, *_K_FIELDS, "metadata", "architecture"):
            meta.setdefault(key, value)
    hook_name = _required(meta, "hook_name", "metadata")
    return _config(arch, fields, k_fields, meta, hook_name)


def _parse_v5(raw: dict[str, Any]) -> tuple[SAEConfig, bool]:
    rest = {_V5_RENAMES.get(key, key): value for key, value in raw.items()
            if not (key in _V5_RENAMES and _V5_RENAMES[key] in raw)}
    arch = rest.pop("architecture", "standard")
    activation = rest.pop("activation_fn", "relu")
    act_kwargs = rest.pop("activation_fn_kwargs", None) or {}
    k_fields: dict[str, Any] = {}
    if activation == "topk":
        if "k" not in act_kwargs:
            raise SAEConfigError(
                "cfg.json says activation_fn_str 'topk' but activation_fn_kwargs has no 'k' "
                f"(got {act_kwargs!r}). Add the k the SAE was trained with.")
        arch, k_fields = "topk", {"k": act_kwargs.pop("k")}
    elif activation not in ("relu", None):
        raise SAEConfigError(
            f"cfg.json activation_fn {activation!r} is not supported; valid: 'relu', 'topk'. "
            "SAELens 6 would silently use relu here; convert the SAE first if that is meant.")
    if act_kwargs:
        rest["activation_fn_kwargs"] = act_kwargs
    norm = rest.pop("normalize_activations", "none")
    rest["normalize_activations"] = ("expected_average_only_in" if norm is True else
                                     "none" if norm in (False, None) else norm)
    finetuning = rest.pop("finetuning_scaling_factor", False) is True
    hook_name = _required(rest, "hook_name", "top level (SAELens ≤ 5 layout)")
    rest.setdefault("reshape_activations", "hook_z" if "hook_z" in str(hook_name) else "none")
    rest.setdefault("apply_b_dec_to_input", True)
    fields = {name: rest.pop(name) for name in _TOP_LEVEL if name in rest}
    # What is left is metadata; _config lifts the hook and model keys out of it.
    return _config(arch, fields, k_fields, rest, hook_name), finetuning


def _config(arch: Any, fields: dict[str, Any], k_fields: dict[str, Any], meta: dict[str, Any],
            hook_name: Any) -> SAEConfig:
    meta.pop("hook_name", None)
    dtype = fields.get("dtype", "float32")
    if isinstance(dtype, str):
        fields["dtype"] = dtype.removeprefix("torch.")
    for name in ("d_in", "d_sae"):
        _required(fields, name, "top level")
    fields.setdefault("apply_b_dec_to_input", True)  # SAELens's SAEConfig default
    return SAEConfig(
        architecture=arch, hook_name=hook_name,
        hook_head_index=meta.pop("hook_head_index", None),
        model_name=meta.pop("model_name", None),
        model_from_pretrained_kwargs=meta.pop("model_from_pretrained_kwargs", None),
        metadata=meta, **fields, **k_fields)


def _unparse(cfg: SAEConfig) -> dict[str, Any]:
    meta = copy.deepcopy(cfg.metadata)
    if not _is_v6_version(meta.get("sae_lens_version")):
        meta["sae_lens_version"] = WRITTEN_BY_SAEBRIDGE
    meta.update(model_name=cfg.model_name, hook_name=cfg.hook_name,
                hook_head_index=cfg.hook_head_index,
                model_from_pretrained_kwargs=copy.deepcopy(cfg.model_from_pretrained_kwargs))
    raw: dict[str, Any] = {name: getattr(cfg, name) for name in _TOP_LEVEL}
    raw["metadata"] = meta
    arch = cfg.architecture
    if arch == "topk":
        raw.update(k=cfg.k, rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm)
    elif arch == "batchtopk":
        arch, meta["training_architecture"] = "jumprelu", "batchtopk"
        if cfg.k is not None:
            meta["training_architecture_details"] = {
                **(meta.get("training_architecture_details") or {}), "k": cfg.k}
    raw["architecture"] = arch
    return raw


def _is_v6_version(version: Any) -> bool:
    match = re.match(r"\s*(\d+)\.", str(version)) if version is not None else None
    return match is not None and int(match.group(1)) >= 6


def _required(raw: dict[str, Any], key: str, where: str) -> Any:
    if key not in raw or raw[key] is None:
        raise SAEConfigError(f"cfg.json has no {key!r} at its {where}; SAELens always writes "
                             f"one. Add it (e.g. \"{key}\": ...) or re-save the SAE.")
    return raw[key]


# ---- files ----------------------------------------------------------------------------

def _folder(path: Path) -> Path:
    path = Path(path)
    return path.parent if path.name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME) else path


def _missing(path: Path) -> SAEFormatError:
    return SAEFormatError(f"no {path.name} in {str(path.parent)!r}: a SAELens SAE folder holds "
                          f"{SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}. Check the path.")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise _missing(path)
    return parse_json(path, "Fix or re-save it.")


def _read_tensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise _missing(path)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except READ_ERRORS as err:
        raise SAEFormatError(
            f"cannot read {str(path)!r} as safetensors ({type(err).__name__}: {err}). The file "
            "is truncated, corrupt or not safetensors; download or save it again.") from err


def _read_scaling_factor(folder: Path) -> float | None:
    path = folder / ACTIVATION_SCALER_CFG_FILENAME
    if not path.is_file():
        return None
    raw = _read_json(path)
    factor = raw.get("scaling_factor") if isinstance(raw, dict) else "missing"
    if factor is None:
        return None
    if isinstance(factor, bool) or not isinstance(factor, int | float):
        raise SAEFormatError(f"{str(path)!r} must hold {{\"scaling_factor\": number or null}}, "
                             f"got {raw!r}. Fix or delete the file.")
    if not math.isfinite(factor) or factor <= 0:
        # Folded in, 0 or NaN would turn every reconstruction into NaN at run time.
        raise SAEFormatError(
            f"{str(path)!r} has scaling_factor {factor!r}; it must be a finite number > 0 "
            "(SAELens's sqrt(d_in) / mean activation norm). Fix the file, or delete it if "
            "the factor is already folded into the weights.")
    return float(factor)


# ---- tensors --------------------------------------------------------------------------

def _convert_legacy_tensors(cfg: SAEConfig, tensors: dict[str, torch.Tensor],
                            finetuning: bool) -> dict[str, torch.Tensor]:
    """Turn older SAELens state dicts into the SAELens 6 inference keys."""
    for key in _FINETUNING_KEYS:
        if key not in tensors:
            continue
        factor_F = tensors.pop(key)
        if torch.all(factor_F == 1):
            continue
        if not (finetuning or key == "finetuning_scaling_factor"):
            raise SAEFormatError(
                f"sae_weights.safetensors holds {key!r} but cfg.json has "
                "finetuning_scaling_factor false. Set it true if the SAE was trained with it.")
        # SAELens ≤ 5 decoded as (acts * factor) @ W_dec; folding keeps acts unchanged.
        tensors["W_dec"] = tensors["W_dec"] * factor_F.to(tensors["W_dec"].dtype)[:, None]
    if cfg.architecture in ("jumprelu", "batchtopk") and "threshold" not in tensors:
        if "log_threshold" in tensors:
            tensors["threshold"] = torch.exp(tensors.pop("log_threshold"))
        elif "topk_threshold" in tensors:  # a BatchTopKTrainingSAE checkpoint
            value = tensors.pop("topk_threshold").reshape(())
            tensors["threshold"] = torch.full((cfg.d_sae,), value.item(), device=value.device)
    return tensors


def _fold_decoder_norms(tensors: dict[str, torch.Tensor]) -> None:
    """SAELens's ``_fold_norm_topk`` on copies: unit decoder rows, same function."""
    norms_F = tensors["W_dec"].norm(dim=-1).clamp(min=1e-8)
    tensors["b_enc"] = tensors["b_enc"] * norms_F
    tensors["W_dec"] = tensors["W_dec"] / norms_F[:, None]
    tensors["W_enc"] = tensors["W_enc"] * norms_F[None, :]
