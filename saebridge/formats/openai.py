"""OpenAI ``sparse_autoencoder`` / Transformer Debugger ``.pt`` state dicts.

Followed: openai/sparse_autoencoder ``model.py``/``paths.py`` and transformer-debugger
``neuron_explainer/models/autoencoder.py``. ``Autoencoder.state_dict()`` holds
``pre_bias [d_in]``, ``latent_bias [n_latents]``, ``encoder.weight [n_latents, d_in]``,
``decoder.weight [d_in, n_latents]`` (``decoder.linear.weight`` when tied), the statistics
buffers ``stats_last_nonzero``, ``latents_activation_frequency``, ``latents_mean_square``,
and the activation as ``activation`` (``"ReLU"``/``"TopK"``) plus
``activation_state_dict`` (TopK: ``{"k", "postact_fn"}``). The TopK module's own
``state_dict`` also leaks ``activation.k``/``activation.postact_fn`` into the top level:
their strict loader rejects those extra keys; they are read and ignored here.

Semantics: ``latents = act((x - pre_bias) @ encoder.weight.T + latent_bias)``,
``recons = latents @ decoder.weight.T + pre_bias``. TopK files were trained on
LayerNorm'd inputs (``normalize=True``, which their loader infers from the activation
being TopK; it is not stored): ``x`` is centred and divided by ``std + 1e-5`` before
encoding and the reconstruction is scaled back (SAELens's ``layer_norm``). Files are
published as ``{location}{version}/autoencoders/{layer}.pt``, which gives the site;
their SAEs read unprocessed GPT-2 activations (raw space).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from saebridge.errors import SAEConfigError, SAEFormatError
from saebridge.formats._common import (
    RAW_SPACE,
    device_dtype,
    output_site,
    require,
    torch_load,
)
from saebridge.sae.config import SAEConfig
from saebridge.sae.model import SAE
from saebridge.sae.params import dtype_name

EXPECTS = ("a .pt state dict with pre_bias, latent_bias, encoder.weight and decoder.weight, "
           "published as {location}{version}/autoencoders/{layer}.pt")
KEYS = ("pre_bias", "latent_bias", "encoder.weight")
LOCATIONS = ("mlp_post_act", "resid_delta_attn", "resid_post_attn", "resid_delta_mlp",
             "resid_post_mlp")
_PATH_RE = re.compile(rf"^({'|'.join(LOCATIONS)})(_v\w+)?$")
CONVENTION = "{location}{version}/autoencoders/{layer}.pt with location one of " + \
    ", ".join(LOCATIONS)


def detect(path: Path) -> bool:
    """True for a ``.pt`` file holding OpenAI's autoencoder keys."""
    if not (path.is_file() and path.suffix == ".pt"):
        return False
    try:
        sd = torch_load(path, mmap=True)
    except SAEFormatError:
        return False
    return all(k in sd for k in KEYS)


def read_config(path: Path, hook_name: str | None = None) -> SAEConfig:
    """The config of the file at ``path``; tensors are memory-mapped, not read."""
    return _config(torch_load(path, mmap=True), path, hook_name)


def load(path: Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, hook_name: str | None = None) -> SAE:
    """The autoencoder at ``path`` as an :class:`SAE` in raw space."""
    sd = torch_load(path)
    cfg = _config(sd, path, hook_name)
    dev, dt = device_dtype(device, dtype, sd["encoder.weight"].dtype)
    cfg = dataclasses.replace(cfg, device=dev, dtype=dt)
    W_dec_FD = sd["decoder.linear.weight"] if "decoder.linear.weight" in sd \
        else sd["decoder.weight"].T
    tensors = {"W_enc": sd["encoder.weight"].T, "W_dec": W_dec_FD,
               "b_enc": sd["latent_bias"], "b_dec": sd["pre_bias"]}
    return SAE(cfg, {k: v.contiguous() for k, v in tensors.items()})


def save(sae: SAE, path: Path) -> None:
    """Not written: OpenAI's layout is read only."""
    raise SAEFormatError(
        "saebridge reads OpenAI sparse_autoencoder files but does not write them. Save as "
        "'saelens' (sae.save(path)), which every saebridge loader and SAELens read.")


def site_name(path: Path) -> str | None:
    """``"{location}.{layer}"`` from the published path, or None when it does not follow it.

    >>> site_name(Path("resid_delta_mlp_v5_32k/autoencoders/7.pt"))
    'resid_delta_mlp.7'
    """
    if not path.stem.isdigit() or path.parent.name != "autoencoders":
        return None
    match = _PATH_RE.match(path.parent.parent.name)
    return f"{match.group(1)}.{int(path.stem)}" if match else None


def _activation(sd: dict[str, Any]) -> tuple[str, int | None]:
    name = sd.get("activation", "ReLU")
    if name == "ReLU":
        return "standard", None
    if name == "TopK":
        act_sd = sd.get("activation_state_dict") or {}
        k = act_sd.get("k", sd.get("activation.k"))
        post = act_sd.get("postact_fn", sd.get("activation.postact_fn", "ReLU"))
        if post != "ReLU":
            raise SAEConfigError(
                f"OpenAI TopK autoencoder with postact_fn {post!r} is not supported: saebridge's "
                "topk applies a ReLU to the kept values (postact_fn 'ReLU').")
        if isinstance(k, torch.Tensor):
            k = int(k.item())
        if not isinstance(k, int):
            raise SAEFormatError(f"OpenAI TopK autoencoder has no integer k in "
                                 f"activation_state_dict (got {k!r}). The file is incomplete.")
        return "topk", k
    raise SAEConfigError(f"OpenAI autoencoder activation {name!r} is not supported; valid: "
                         "'ReLU', 'TopK'.")


def _config(sd: dict[str, Any], path: Path, hook_name: str | None) -> SAEConfig:
    require(sd, KEYS, f"{str(path)!r}", "an OpenAI autoencoder state dict")
    if "decoder.weight" not in sd and "decoder.linear.weight" not in sd:
        raise SAEFormatError(f"{str(path)!r} has no decoder.weight (nor decoder.linear.weight "
                             "of a tied decoder). The file is incomplete.")
    d_sae, d_in = sd["encoder.weight"].shape
    arch, k = _activation(sd)
    name = site_name(path)
    hook = output_site("openai", name, hook_name, CONVENTION)
    return SAEConfig(
        architecture=arch, d_in=int(d_in), d_sae=int(d_sae), k=k, hook_name=hook,
        model_name="gpt2" if name else None, dtype=dtype_name(sd["encoder.weight"].dtype),
        apply_b_dec_to_input=True,
        # Their loader: normalize = (activation == "TopK"); LN is theirs = SAELens layer_norm.
        normalize_activations="layer_norm" if arch == "topk" else "none",
        reshape_activations="hook_z" if hook.endswith("hook_z") else "none",
        model_from_pretrained_kwargs=dict(RAW_SPACE),
        metadata={"source_format": "openai", **({"openai_location": name} if name else {})})
