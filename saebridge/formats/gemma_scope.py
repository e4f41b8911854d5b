"""Gemma Scope ``params.npz`` JumpReLU SAEs.

Followed: the Gemma Scope release (google/gemma-scope-* on the Hugging Face hub, its
tutorial's ``JumpReLUSAE``) and SAELens's ``gemma_2_sae_huggingface_loader``. The file holds
``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``;
``acts = relu(pre) * (pre > threshold)`` with ``pre = x @ W_enc + b_enc`` (no ``b_dec``
subtracted) and ``recons = acts @ W_dec + b_dec``. The SAEs were trained on raw Gemma 2
activations.

The file does not record its site. The release path does: ``layer_{L}/width_{W}/
average_l0_{X}/params.npz`` (or ``.../canonical``) inside a repository named
``gemma-scope-{size}-{pt|it}-{res|mlp|att}`` (``models--google--gemma-scope-…`` in the hub
cache): ``res`` → ``hook_resid_post``, ``mlp`` → ``hook_mlp_out``, ``att`` →
``attn.hook_z`` (all heads concatenated). ``embedding/…`` under a ``res`` release is
``hook_embed``; those SAEs were trained on the embedding *before* Gemma's ``sqrt(d_model)``
scaling, which the canonical ``hook_embed`` includes (TransformerLens folds it into
``W_E``), so the scale is folded into the weights: ``W_enc / sqrt(d)`` as SAELens does, and
``W_dec``, ``b_dec`` times ``sqrt(d)`` (SAELens leaves ``b_dec`` unscaled, which is exact
only for a zero ``b_dec``). Elsewhere, pass ``SAE.load(path, hook_name=...)``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from saebridge.errors import SAEFormatError, UnknownHookError
from saebridge.formats._common import RAW_SPACE, READ_ERRORS, device_dtype
from saebridge.sae.config import SAEConfig
from saebridge.sae.model import SAE

FILENAME = "params.npz"
EXPECTS = "params.npz with W_enc, W_dec, b_enc, b_dec and threshold"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_RELEASE_RE = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)(?:-canonical)?$")
SITES = {"res": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out",
         "att": "blocks.{layer}.attn.hook_z"}
CONVENTION = ("layer_{L}/width_{W}/average_l0_{X}/params.npz under a gemma-scope-{size}-"
              "{pt|it}-{res|mlp|att} repository")


def detect(path: Path) -> bool:
    file = _file(path)
    if file.suffix != ".npz" or not file.is_file():  # a .pt is a zip too: never opened here
        return False
    try:  # member names only: a broken header is then reported by load, precisely
        with zipfile.ZipFile(file) as z:
            members = set(z.namelist())
    except READ_ERRORS:
        # Not a readable zip. Under Gemma Scope's own file name it is a broken Gemma Scope
        # file, which load reports with the cause; under any other name, not this format.
        return file.name == FILENAME
    return all(f"{k}.npy" in members for k in KEYS)


def read_config(path: Path, hook_name: str | None = None) -> SAEConfig:
    """The config from the array headers in params.npz and the path; no weights are read."""
    file = _file(path)
    shapes = _shapes(file)
    return _config(file, shapes, hook_name)


def load(path: Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, hook_name: str | None = None) -> SAE:
    file = _file(path)
    cfg = _config(file, _shapes(file, whole=True), hook_name)
    # allow_pickle=False: object arrays are refused, never unpickled.
    try:
        with np.load(file, allow_pickle=False) as data:
            tensors = {k: torch.from_numpy(np.ascontiguousarray(data[k])) for k in KEYS}
    except READ_ERRORS as err:  # zlib.error from a corrupt compressed member, among others
        raise SAEFormatError(f"cannot read {str(file)!r} as an npz of plain arrays "
                             f"({type(err).__name__}: {err}). The file is truncated or "
                             "corrupt; download it again.") from err
    dev, dt = device_dtype(device, dtype, tensors["W_enc"].dtype)
    cfg = dataclasses.replace(cfg, device=dev, dtype=dt)
    if cfg.metadata.get("gemma_scope_site") == "embedding":
        scale = math.sqrt(cfg.d_in)
        tensors["W_enc"] = tensors["W_enc"] / scale
        tensors["W_dec"] = tensors["W_dec"] * scale
        tensors["b_dec"] = tensors["b_dec"] * scale
    return SAE(cfg, tensors)


def save(sae: SAE, path: Path) -> None:
    """Not written: Gemma Scope's layout is read only."""
    raise SAEFormatError(
        "saebridge reads Gemma Scope params.npz files but does not write them. Save as "
        "'saelens' (sae.save(path)), which every saebridge loader and SAELens read.")


def site_from_path(file: Path) -> tuple[str, str, str] | None:
    """``(hook_name, model_name, kind)`` from a release path, or None.

    >>> site_from_path(Path("gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71/params.npz"))
    ('blocks.20.hook_resid_post', 'gemma-2-2b', 'res')
    """
    for parent in file.parents:
        release = _RELEASE_RE.search(parent.name)
        if release is None:
            continue
        size, variant, kind = release.groups()
        model = f"gemma-2-{size}" + ("-it" if variant == "it" else "")
        inside = file.relative_to(parent).parts
        layer = next((int(m.group(1)) for p in inside if (m := re.fullmatch(r"layer_(\d+)", p))),
                     None)
        if layer is not None:
            return SITES[kind].replace("{layer}", str(layer)), model, kind
        if kind == "res" and "embedding" in inside:
            return "hook_embed", model, "embedding"
        return None
    return None


def _file(path: Path) -> Path:
    return path / FILENAME if path.is_dir() else path


def _shapes(file: Path, whole: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array, read from the .npy headers inside the zip. With
    ``whole`` (before loading), a header claiming more data than its member holds (a 4 TiB
    array in a small file) is refused before anything is allocated."""
    out = {}
    try:
        with zipfile.ZipFile(file) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                    claimed = math.prod(shape) * dtype.itemsize
                    if whole and claimed > info.file_size - f.tell():
                        raise SAEFormatError(
                            f"{str(file)!r}: array {info.filename!r} claims shape "
                            f"{tuple(shape)} ({claimed} bytes of {dtype}) but its member holds "
                            f"{info.file_size} bytes. The file is corrupt; download it again.")
                out[info.filename.removesuffix(".npy")] = (tuple(shape), dtype)
    except SAEFormatError:
        raise
    except READ_ERRORS as err:  # a zip of another kind: compression method, version, ...
        raise SAEFormatError(f"{str(file)!r} is not an npz archive of arrays "
                             f"({type(err).__name__}: {err}).") from err
    return out


def _sizes(file: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """``(d_in, d_sae)`` from the array shapes, refusing any that do not fit together."""
    W_enc = shapes["W_enc"]
    d_in, d_sae = W_enc if len(W_enc) == 2 else (-1, -1)
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,),
            "b_dec": (d_in,), "threshold": (d_sae,)}
    for key, shape in want.items():
        if shapes[key] != shape or min(shape) < 1:
            raise SAEFormatError(
                f"{str(file)!r}: array {key!r} has shape {shapes[key]}, which does not fit "
                f"W_enc {W_enc}. A Gemma Scope params.npz holds W_enc [d_in, d_sae], W_dec "
                "[d_sae, d_in], b_enc and threshold [d_sae] and b_dec [d_in]; the file is not "
                "one, or is damaged.")
    return d_in, d_sae


def _config(file: Path, shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
            hook_name: str | None) -> SAEConfig:
    missing = [k for k in KEYS if k not in shapes]
    if missing:
        raise SAEFormatError(f"{str(file)!r} lacks {missing}; a Gemma Scope params.npz holds "
                             f"{', '.join(KEYS)}.")
    d_in, d_sae = _sizes(file, {k: shapes[k][0] for k in KEYS})
    found = site_from_path(file)
    if hook_name is None and found is None:
        raise UnknownHookError(
            f"Gemma Scope files do not record their site, and {str(file)!r} does not follow the "
            f"release layout ({CONVENTION}). Pass hook_name=, e.g. SAE.load(path, "
            "hook_name='blocks.20.hook_resid_post').")
    hook = hook_name or found[0]  # type: ignore[index]
    meta = {"source_format": "gemma_scope"}
    if found is not None and hook_name is None:
        meta["gemma_scope_site"] = found[2]
    torch_dtype = torch.from_numpy(np.zeros(0, dtype=shapes["W_enc"][1])).dtype
    return SAEConfig(
        architecture="jumprelu", d_in=d_in, d_sae=d_sae, hook_name=hook,
        model_name=found[1] if found else None, apply_b_dec_to_input=False,
        dtype=str(torch_dtype).removeprefix("torch."),
        reshape_activations="hook_z" if hook.endswith("hook_z") else "none",
        model_from_pretrained_kwargs=dict(RAW_SPACE), metadata=meta)
