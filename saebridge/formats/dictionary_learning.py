"""saprmarks/dictionary_learning folders: ``ae.pt`` + ``config.json``.

Followed: dictionary_learning ``dictionary.py`` (AutoEncoder, GatedAutoEncoder,
JumpReluAutoEncoder, AutoEncoderNew), ``trainers/top_k.py`` (AutoEncoderTopK),
``trainers/batch_top_k.py`` (BatchTopKSAE), ``trainers/matryoshka_batch_top_k.py``
(MatryoshkaBatchTopKSAE), ``utils.load_dictionary`` and ``training.trainSAE``, which writes
``config.json`` as ``{"trainer": trainer.config, "buffer": ...}`` with ``dict_class``,
``activation_dim``, ``dict_size``, ``k``, ``layer``, ``lm_name``, ``submodule_name``.
``ae.pt`` is ``ae.state_dict()``: ``nn.Linear`` weights are ``[out, in]`` (so
``W_enc = encoder.weight.T``, ``W_dec = decoder.weight.T``).

Conventions: every class but JumpReluAutoEncoder and AutoEncoderNew subtracts its decoder
bias from the input. BatchTopK and Matryoshka SAEs encode at inference with their learned
scalar ``threshold`` (``relu(pre) * (relu(pre) > threshold)``), a JumpReLU, as
``encode(use_threshold=True)`` does; TopK keeps the top ``k``. **Latents follow
``load_dictionary``**: it loads an ``AutoEncoder`` with ``normalize_decoder=True``, which
rescales a non-unit decoder to unit rows and the encoder (weights and bias) by the same
norms, so latents are multiplied by the decoder norms and reconstructions do not change;
the same rescaling is done here. Site: ``trainer.submodule_name`` (or the folder name, as
in the pythia-70m dictionaries: ``resid_3``, ``attn_3``, ``mlp_3``, ``embed``) through the
dictionary_learning alias table. Activations come from a plain HF model (raw space).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from saebridge.errors import SAEConfigError, SAEFormatError, UnknownHookError
from saebridge.formats._common import (
    RAW_SPACE,
    device_dtype,
    output_site,
    read_json,
    require,
    torch_load,
)
from saebridge.hookmap.aliases import resolve
from saebridge.sae.config import SAEConfig
from saebridge.sae.model import SAE
from saebridge.sae.params import dtype_name

Tensor = torch.Tensor
WEIGHTS_FILENAME = "ae.pt"
CFG_FILENAME = "config.json"
EXPECTS = "a folder with ae.pt and config.json (whose 'trainer' names the dict_class)"
CONVENTION = "trainer.submodule_name or the folder name, e.g. resid_post_layer_3 or resid_3"

# dict_class -> (architecture, apply_b_dec_to_input, ae.pt keys it needs)
CLASSES: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "AutoEncoder": ("standard", True, ("encoder.weight", "encoder.bias", "decoder.weight",
                                       "bias")),
    "AutoEncoderNew": ("standard", False, ("encoder.weight", "encoder.bias", "decoder.weight",
                                           "decoder.bias")),
    "GatedAutoEncoder": ("gated", True, ("encoder.weight", "decoder.weight", "decoder_bias",
                                         "r_mag", "gate_bias", "mag_bias")),
    "JumpReluAutoEncoder": ("jumprelu", False, ("W_enc", "b_enc", "W_dec", "b_dec",
                                                "threshold")),
    "AutoEncoderTopK": ("topk", True, ("encoder.weight", "encoder.bias", "decoder.weight",
                                       "b_dec")),
    "BatchTopKSAE": ("batchtopk", True, ("encoder.weight", "encoder.bias", "decoder.weight",
                                         "b_dec", "threshold")),
    "MatryoshkaBatchTopKSAE": ("batchtopk", True, ("W_enc", "b_enc", "W_dec", "b_dec",
                                                   "threshold")),
}


def detect(path: Path) -> bool:
    folder = _folder(path)
    if not ((folder / WEIGHTS_FILENAME).is_file() and (folder / CFG_FILENAME).is_file()):
        return False
    try:
        raw = read_json(folder / CFG_FILENAME, "")
    except SAEFormatError:
        return False
    return isinstance(raw, dict) and isinstance(raw.get("trainer"), dict) \
        and "dict_class" in raw["trainer"]


def read_config(path: Path, hook_name: str | None = None) -> SAEConfig:
    """The config from config.json; ae.pt is memory-mapped for its shapes, not read."""
    folder = _folder(path)
    return _config(_trainer(folder), torch_load(folder / WEIGHTS_FILENAME, mmap=True),
                   folder, hook_name)


def load(path: Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, hook_name: str | None = None) -> SAE:
    folder = _folder(path)
    trainer = _trainer(folder)
    sd = torch_load(folder / WEIGHTS_FILENAME)
    cfg = _config(trainer, sd, folder, hook_name)
    tensors = _tensors(trainer["dict_class"], sd, cfg.d_sae)
    dev, dt = device_dtype(device, dtype, tensors["W_enc"].dtype)
    return SAE(dataclasses.replace(cfg, device=dev, dtype=dt), tensors)


def save(sae: SAE, path: Path) -> None:
    """Not written: dictionary_learning's layout is read only."""
    raise SAEFormatError(
        "saebridge reads dictionary_learning folders but does not write them. Save as "
        "'saelens' (sae.save(path)), which every saebridge loader and SAELens read.")


def _folder(path: Path) -> Path:
    return path.parent if path.name in (WEIGHTS_FILENAME, CFG_FILENAME) else path


def _trainer(folder: Path) -> dict[str, Any]:
    raw = read_json(folder / CFG_FILENAME, "a dictionary_learning folder holds config.json")
    trainer = raw.get("trainer") if isinstance(raw, dict) else None
    if not isinstance(trainer, dict) or "dict_class" not in trainer:
        raise SAEFormatError(f"{str(folder / CFG_FILENAME)!r} has no trainer.dict_class; "
                             "dictionary_learning writes {'trainer': {...}, 'buffer': {...}}.")
    if not isinstance(trainer["dict_class"], str) or trainer["dict_class"] not in CLASSES:
        raise SAEConfigError(
            f"dictionary_learning dict_class {trainer['dict_class']!r} is not supported; valid: "
            f"{', '.join(CLASSES)}.")
    return trainer


def _site(trainer: dict[str, Any], folder: Path, hook_name: str | None) -> str:
    if hook_name is not None:
        return hook_name
    names = [n for n in (trainer.get("submodule_name"), folder.name) if isinstance(n, str)]
    for name in names:
        try:
            resolve("dictionary_learning", name)
        except UnknownHookError:
            continue
        return output_site("dictionary_learning", name, None, CONVENTION)
    return output_site("dictionary_learning", None, None, CONVENTION)


def _int(value: Any) -> int | None:
    return int(value.item()) if isinstance(value, Tensor) else value


def _config(trainer: dict[str, Any], sd: dict[str, Any], folder: Path,
            hook_name: str | None) -> SAEConfig:
    dict_class = trainer["dict_class"]
    arch, b_dec_in, keys = CLASSES[dict_class]
    require(sd, keys, f"{str(folder / WEIGHTS_FILENAME)!r}", f"a {dict_class} state dict")
    if "W_enc" in sd:
        d_in, d_sae = sd["W_enc"].shape
    else:
        d_sae, d_in = sd["encoder.weight"].shape
    k = _int(sd.get("k", trainer.get("k"))) if arch in ("topk", "batchtopk") else None
    if arch == "topk" and not isinstance(k, int):
        raise SAEFormatError(f"AutoEncoderTopK in {str(folder)!r} has no k in ae.pt or "
                             "config.json. Add trainer.k to config.json.")
    meta: dict[str, Any] = {"source_format": "dictionary_learning", "dict_class": dict_class,
                            **{key: trainer[key] for key in ("layer", "submodule_name")
                               if key in trainer}}
    if "group_sizes" in sd:
        meta["group_sizes"] = [int(g) for g in sd["group_sizes"].tolist()]
    hook = _site(trainer, folder, hook_name)
    stored = sd["W_enc" if "W_enc" in sd else "encoder.weight"].dtype
    return SAEConfig(
        architecture=arch, d_in=int(d_in), d_sae=int(d_sae), k=k, hook_name=hook,
        model_name=trainer.get("lm_name"), dtype=dtype_name(stored),
        apply_b_dec_to_input=b_dec_in,
        reshape_activations="hook_z" if hook.endswith("hook_z") else "none",
        model_from_pretrained_kwargs=dict(RAW_SPACE), metadata=meta)


def _tensors(dict_class: str, sd: dict[str, Any], d_sae: int) -> dict[str, Tensor]:
    if dict_class in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        out = {k: sd[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    elif dict_class == "GatedAutoEncoder":
        return {"W_enc": sd["encoder.weight"].T, "W_dec": sd["decoder.weight"].T,
                "b_dec": sd["decoder_bias"], "b_gate": sd["gate_bias"],
                "b_mag": sd["mag_bias"], "r_mag": sd["r_mag"]}
    else:
        out = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["encoder.bias"],
               "W_dec": sd["decoder.weight"].T,
               "b_dec": sd.get("b_dec", sd.get("bias", sd.get("decoder.bias")))}
    if CLASSES[dict_class][0] in ("jumprelu", "batchtopk"):  # TopK's threshold is unused
        threshold = sd["threshold"].reshape(-1)
        out["threshold"] = threshold.expand(d_sae) if threshold.numel() == 1 else threshold
    if dict_class == "AutoEncoder":
        out = _unit_decoder(out)
    return {k: v.contiguous() for k, v in out.items()}


def _unit_decoder(t: dict[str, Tensor]) -> dict[str, Tensor]:
    """``AutoEncoder.normalize_decoder`` as ``load_dictionary`` applies it: unit decoder
    rows, the encoder weights and bias scaled by the same norms (a no-op for unit rows)."""
    norms_F = t["W_dec"].norm(dim=-1)
    if torch.allclose(norms_F, torch.ones_like(norms_F)):
        return t
    return {**t, "W_dec": t["W_dec"] / norms_F[:, None], "W_enc": t["W_enc"] * norms_F,
            "b_enc": t["b_enc"] * norms_F}
