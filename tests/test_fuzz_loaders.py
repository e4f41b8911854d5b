"""Fuzzing every loader: generated configs, state dicts and corrupt files give either a
working SAE or a saebridge error — never an unrelated crash, never a silently wrong SAE.
And a pickle that would run code is refused without running it."""

from __future__ import annotations

import json
import os
import pathlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import saebridge as sb
from saebridge.errors import SAEBridgeError

SAELENS_KEYS = ["architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "k", "metadata", "hook_name", "hook_point",
                "activation_fn_str", "activation_fn_kwargs", "model_from_pretrained_kwargs",
                "reshape_activations", "rescale_acts_by_decoder_norm", "hook_head_index"]
SPARSIFY_KEYS = ["d_in", "num_latents", "expansion_factor", "k", "normalize_decoder",
                 "transcode", "skip_connection", "activation", "hookpoint"]
TENSOR_NAMES = ["W_enc", "W_dec", "b_enc", "b_dec", "threshold", "log_threshold", "b_gate",
                "b_mag", "r_mag", "encoder.weight", "encoder.bias", "pre_bias", "latent_bias",
                "decoder.weight", "W_skip", "scaling_factor", "k", "threshold_F"]

values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True),
              st.sampled_from(["standard", "topk", "jumprelu", "gated", "batchtopk",
                               "float32", "bfloat16", "cpu", "none", "layer_norm", "hook_z",
                               "blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "h.0",
                               "relu", "topk", "AutoEncoder", "resid_post_layer_0"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["k", "trainer", "dict_class",
                                                             "activation_dim", "dict_size",
                                                             "layer", "lm_name", "fold_ln"]),
                                            inner, max_size=4)),
    max_leaves=8)


def config(keys: list[str]) -> st.SearchStrategy[dict]:
    return st.dictionaries(st.sampled_from(keys), values, max_size=len(keys))


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
tensors = st.dictionaries(
    st.sampled_from(TENSOR_NAMES),
    st.tuples(shapes, st.sampled_from([torch.float32, torch.float16, torch.int64])).map(
        lambda sd: torch.randn(sd[0]).to(sd[1]) if sd[1] != torch.int64
        else torch.zeros(sd[0], dtype=torch.int64)),
    max_size=8)


FILES = ("cfg.json", "sae_weights.safetensors", "sae.safetensors", "params.npz", "ae.pt",
         "config.json", "activation_scaler.json")
ITEMS = sorted({*SAELENS_KEYS, *SPARSIFY_KEYS, *TENSOR_NAMES, "trainer", "buffer", "dict_class",
                "activation_dim", "dict_size", "layer", "lm_name", "fold_ln", "num_latents",
                "d_sae", "d_out", "training_architecture_details", "submodule_name",
                "activation_fn", "dtype"})
"""What a message may name as the thing that is wrong: a config key or tensor name these
tests write (or a loader requires)."""


def _names(item: str, text: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(item)}(?![\w])", text) is not None


def assert_error_names_file_and_fault(err: SAEBridgeError, path: Path) -> None:
    """The oracle of a refusal: not merely "some saebridge error", but one whose message
    names the file it was loading and what in it was wrong — a key or tensor by name, or
    for a broken file, that file inside the folder and the cause."""
    message = str(err)
    assert str(path) in message, f"the error does not name {path}: {message}"
    rest = message.replace(str(path), "<path>")
    item = [name for name in ITEMS if _names(name, rest)]
    inner = [name for name in FILES if _names(name, rest)]
    assert item or ((inner or path.is_file()) and len(rest) > len("<path>") + 40), (
        f"the error names no key, tensor or file in {path} as the fault: {message}")


def assert_sane_or_saebridge_error(path: Path) -> None:
    try:
        sae = sb.SAE.load(path)
    except SAEBridgeError as err:
        assert_error_names_file_and_fault(err, path)
        return
    # Loaded: it must be a consistent SAE that runs on its own width.
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    assert sae.W_enc.shape[-2:] == (d_in, d_sae) or sae.W_enc.numel() == d_in * d_sae
    x = torch.randn(2, d_in, dtype=sae.W_dec.dtype)
    out = sae(x)
    assert out.shape[-1] == d_in


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 25)))
@given(cfg=config(SAELENS_KEYS), sd=tensors)
def test_saelens_folder(tmp_path_factory, cfg, sd):
    folder = tmp_path_factory.mktemp("saelens")
    (folder / "cfg.json").write_text(json.dumps(cfg, default=str))
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "sae_weights.safetensors")
    assert_sane_or_saebridge_error(folder)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 25)))
@given(cfg=config(SPARSIFY_KEYS), sd=tensors)
def test_sparsify_folder(tmp_path_factory, cfg, sd):
    folder = tmp_path_factory.mktemp("sparsify") / "h.0"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg, default=str))
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "sae.safetensors")
    assert_sane_or_saebridge_error(folder)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 25)))
@given(sd=tensors, layer=st.integers(0, 3))
def test_gemma_scope_npz(tmp_path_factory, sd, layer):
    folder = tmp_path_factory.mktemp("gs") / "gemma-scope-2b-pt-res" / f"layer_{layer}" \
        / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.float().numpy() for k, v in sd.items()})
    assert_sane_or_saebridge_error(folder)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 25)))
@given(cfg=config(["trainer", "buffer"]), sd=tensors)
def test_dictionary_learning_folder(tmp_path_factory, cfg, sd):
    folder = tmp_path_factory.mktemp("dl") / "resid_post_layer_0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg, default=str))
    torch.save(sd, folder / "ae.pt")
    assert_sane_or_saebridge_error(folder)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 25)))
@given(sd=tensors, layer=st.integers(0, 3))
def test_openai_pt(tmp_path_factory, sd, layer):
    folder = tmp_path_factory.mktemp("oai") / "resid_delta_mlp_v5_32k" / "autoencoders"
    folder.mkdir(parents=True)
    torch.save(sd, folder / f"{layer}.pt")
    assert_sane_or_saebridge_error(folder / f"{layer}.pt")


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 25)))
@given(data=st.binary(max_size=400), cut=st.integers(0, 2000))
def test_corrupt_and_truncated_weight_files(tmp_path_factory, data, cut):
    """Random bytes, and valid files cut short, in every weight file name a loader reads."""
    good = sb.SAE.random("standard", 8, 16, "blocks.0.hook_resid_pre")
    root = tmp_path_factory.mktemp("corrupt")
    good.save(root / "saelens")
    weights = root / "saelens" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:cut])
    assert_sane_or_saebridge_error(root / "saelens")
    for name in ("sae_weights.safetensors", "params.npz", "ae.pt"):
        folder = root / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_bytes(data)
        (folder / "cfg.json").write_text(json.dumps({"d_in": 8, "d_sae": 16}))
        assert_sane_or_saebridge_error(folder)


class _CreatesAFile:
    """Unpickling this would create ``marker``: the loader must refuse it unrun."""

    marker: Path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("layout", ["openai", "dictionary_learning"])
def test_a_pickle_that_runs_code_is_refused_without_running(tmp_path, layout):
    marker = tmp_path / "pwned"
    payload = _CreatesAFile()
    payload.marker = marker
    sd = {"pre_bias": torch.zeros(4), "latent_bias": torch.zeros(8),
          "encoder.weight": torch.zeros(8, 4), "decoder.weight": torch.zeros(4, 8),
          "evil": payload}
    if layout == "openai":
        path = tmp_path / "resid_delta_mlp_v5_32k" / "autoencoders" / "0.pt"
        path.parent.mkdir(parents=True)
    else:
        path = tmp_path / "resid_post_layer_0" / "ae.pt"
        path.parent.mkdir()
        (path.parent / "config.json").write_text(json.dumps(
            {"trainer": {"dict_class": "AutoEncoder", "activation_dim": 4, "dict_size": 8,
                         "layer": 0, "lm_name": "gpt2"}}))
    torch.save(sd, path)
    with pytest.raises(SAEBridgeError):
        sb.SAE.load(path if layout == "openai" else path.parent)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: unpickling it runs it
    assert marker.exists()
