"""Issue 16, files: bad SAE files, paths and devices get a saebridge error that names the file
(or device) and what is wrong with it; saving never leaves a folder that cannot be loaded;
the activation cache removes only files it wrote and reports a broken cache by name."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import saebridge as sb
from saebridge import formats
from saebridge.cache import ActivationShards, CacheDirError, cache_activations
from saebridge.errors import (
    ArgumentTypeError,
    DeviceError,
    SAEBridgeError,
    SAEConfigError,
    SAEFormatError,
    SAESaveError,
)

HOOK = "blocks.0.hook_resid_pre"


def saved(folder: Path, arch: str = "standard", **cfg) -> Path:
    sb.SAE.random(arch, 8, 16, HOOK, k=4 if arch == "topk" else None, **cfg).save(folder)
    return folder


def edit_cfg(folder: Path, edit) -> Path:
    cfg = json.loads((folder / "cfg.json").read_text())
    edit(cfg)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def no_builtin_in_chain(err: BaseException) -> None:
    """The error and every cause it chains: the first is saebridge's own."""
    assert isinstance(err, SAEBridgeError), repr(err)
    cause = err.__cause__
    while cause is not None:  # causes may be builtins; they are kept, not shown first
        cause = cause.__cause__


@pytest.mark.parametrize("factor", [0, -2.0, float("nan"), float("inf")])
def test_a_scaling_factor_that_would_give_nan_is_refused_at_load(tmp_path, factor):
    folder = saved(tmp_path / "sae", normalize_activations="expected_average_only_in")
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": factor}))
    with pytest.raises(SAEFormatError, match=r"activation_scaler\.json") as info:
        sb.SAE.load(folder)
    assert repr(factor) in str(info.value) and "finite number > 0" in str(info.value)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.0}))
    sae = sb.SAE.load(folder)  # a good factor is folded in: the SAE runs finite
    assert torch.isfinite(sae(torch.randn(3, 8))).all()


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_processing_flags_must_be_bools_at_load(tmp_path, value):
    folder = edit_cfg(saved(tmp_path / "sae"), lambda c: c["metadata"].update(
        model_from_pretrained_kwargs={"fold_ln": value, "center_writing_weights": False}))
    with pytest.raises(SAEConfigError, match=r"fold_ln.*true or false") as info:
        sb.SAE.load(folder)
    assert str(folder) in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("k", [float("nan"), float("inf"), -1.0])
def test_batchtopk_k_must_be_finite_and_positive(tmp_path, k):
    folder = saved(tmp_path / "sae", "batchtopk")
    edit_cfg(folder, lambda c: c["metadata"].update(training_architecture_details={"k": k}))
    with pytest.raises(SAEConfigError, match=r"finite positive") as info:
        sb.SAE.load(folder)
    assert str(folder) in str(info.value)


def test_a_k_on_an_sae_without_k_is_refused_not_dropped(tmp_path):
    folder = edit_cfg(saved(tmp_path / "sae"), lambda c: c.update(k=-3))
    with pytest.raises(SAEConfigError, match=r"'k' is -3.*standard SAE has no k"):
        sb.SAE.load(folder)
    edit_cfg(folder, lambda c: c.update(k=None))  # a null k says nothing: loads
    assert sb.SAE.load(folder).cfg.k is None


@pytest.mark.parametrize("device", ["meta", "cuda:7", "nonsense"])
def test_a_device_problem_is_reported_as_one(tmp_path, device):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    folder = saved(tmp_path / "sae")
    with pytest.raises(DeviceError, match=device.split(":")[0]) as info:
        sb.SAE.load(folder, device=device)
    assert "corrupt" not in str(info.value) and "truncated" not in str(info.value)


def test_an_sae_is_never_moved_to_meta():
    sae = sb.SAE.random("standard", 8, 16, HOOK)
    with pytest.raises(DeviceError, match="meta"):
        sae.to("meta")
    assert sae.W_enc.device.type == "cpu" and sae.cfg.device == "cpu"  # nothing moved
    assert torch.isfinite(sae(torch.randn(2, 8))).all()


@pytest.mark.parametrize("source", [None, 3, b"\0x"])
def test_a_path_that_is_no_path_is_refused(source):
    with pytest.raises(SAEBridgeError) as info:
        sb.SAE.load(source)
    assert isinstance(info.value, ArgumentTypeError | SAEFormatError)


def test_a_path_longer_than_the_os_allows(tmp_path):
    for long in ("a" * 5000, str(tmp_path / ("b" * 300)), "/".join(["c" * 200] * 30)):
        with pytest.raises(SAEFormatError, match="the OS allows at most 4096"):
            sb.SAE.load(long)
        with pytest.raises(SAEFormatError, match="the OS allows at most 4096"):
            sb.SAE.random("standard", 4, 8, HOOK).save(long)


def test_a_deeply_nested_cfg_json(tmp_path):
    folder = saved(tmp_path / "sae")
    (folder / "cfg.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SAEFormatError, match="deeper than Python can parse") as info:
        sb.SAE.load(folder)
    assert str(folder / "cfg.json") in str(info.value)


def gemma_folder(root: Path, layer: int = 0) -> Path:
    folder = root / "gemma-scope-2b-pt-res" / f"layer_{layer}" / "width_16k" / "average_l0_7"
    folder.mkdir(parents=True)
    return folder


def gemma_arrays(d_in: int = 8, d_sae: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
            "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
            "b_enc": np.zeros(d_sae, np.float32), "b_dec": np.zeros(d_in, np.float32),
            "threshold": np.zeros(d_sae, np.float32)}


def test_an_npz_header_claiming_a_huge_array_is_refused_before_allocating(tmp_path):
    folder = gemma_folder(tmp_path)
    with zipfile.ZipFile(folder / "params.npz", "w") as z:
        for name in gemma_arrays():
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 20, 1 << 20)})
            z.writestr(f"{name}.npy", header.getvalue())  # the header, no data
    with pytest.raises(SAEFormatError, match=r"claims shape \(1048576, 1048576\)") as info:
        sb.SAE.load(folder)
    assert str(folder / "params.npz") in str(info.value)


def test_a_corrupt_compressed_npz(tmp_path):
    folder = gemma_folder(tmp_path)
    np.savez_compressed(folder / "params.npz", **gemma_arrays(64, 512))
    data = bytearray((folder / "params.npz").read_bytes())
    for i in range(400, 700):  # inside the first member's deflate stream
        data[i] ^= 0x5A
    (folder / "params.npz").write_bytes(bytes(data))
    with pytest.raises(SAEFormatError) as info:
        sb.SAE.load(folder)
    assert str(folder / "params.npz") in str(info.value)


def _zip_version(data: bytes, version: int = 65) -> bytes:
    """A zip whose members claim to need zip ``version`` (6.5: zipfile cannot open them)."""
    out = bytearray(data)
    for magic, offset in ((b"PK\x01\x02", 6), (b"PK\x03\x04", 4)):
        i = out.find(magic)
        while i >= 0:
            out[i + offset:i + offset + 2] = struct.pack("<H", version)
            i = out.find(magic, i + 4)
    return bytes(out)


def test_the_gemma_scope_detector_opens_only_npz_files(tmp_path, monkeypatch):
    """A .pt is a zip too: the Gemma Scope detector must not open it (a zip of version 6.5
    made zipfile raise NotImplementedError there)."""
    buf = io.BytesIO()
    np.savez(buf, **gemma_arrays())
    pt = tmp_path / "gemma-scope-2b-pt-res" / "layer_0" / "sae.pt"
    pt.parent.mkdir(parents=True)
    pt.write_bytes(_zip_version(buf.getvalue()))
    from saebridge.formats import gemma_scope

    assert not gemma_scope.detect(pt)
    with pytest.raises(SAEBridgeError):
        sb.SAE.load(pt)
    npz = gemma_folder(tmp_path, 1) / "params.npz"
    npz.write_bytes(_zip_version(buf.getvalue()))
    with pytest.raises(SAEFormatError, match="zip file version") as info:
        sb.SAE.load(npz.parent)
    assert str(npz) in str(info.value)


def test_a_pickle_the_weights_only_unpickler_chokes_on(tmp_path):
    """A .pt whose pickle reads a memo slot that was never written: torch's weights-only
    unpickler raises KeyError, which detection and loading report as a bad file."""
    good = tmp_path / "good.pt"
    torch.save({"pre_bias": torch.zeros(4), "latent_bias": torch.zeros(8),
                "encoder.weight": torch.zeros(8, 4), "decoder.weight": torch.zeros(4, 8)}, good)
    path = tmp_path / "resid_delta_mlp_v5_32k" / "autoencoders" / "0.pt"
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"\x80\x02h\x05." if name.endswith("data.pkl") else src.read(name))
    with pytest.raises(SAEBridgeError):
        sb.SAE.load(path)
    with pytest.raises(SAEFormatError, match=r"KeyError") as info:
        sb.SAE.load(path, format="openai")
    assert str(path) in str(info.value)


def test_saving_onto_a_file_is_refused_and_leaves_it(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(SAESaveError, match="a file is there") as info:
        sb.SAE.random("standard", 4, 8, HOOK).save(target)
    assert isinstance(info.value, FileExistsError) and target.read_text() == "mine"


def sparsify_folder(root: Path) -> Path:
    folder = root / "h.0"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"d_in": 8, "num_latents": 16, "k": 4}))
    save_file({"encoder.weight": torch.randn(16, 8), "encoder.bias": torch.zeros(16),
               "W_dec": torch.randn(16, 8), "b_dec": torch.zeros(8)}, folder / "sae.safetensors")
    return folder


def test_saving_into_a_folder_of_another_format_is_refused(tmp_path):
    folder = sparsify_folder(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SAESaveError, match="already holds an SAE in the sparsify format"):
        sb.SAE.random("standard", 8, 16, HOOK).save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert formats.detect_format(folder) == "sparsify"  # still loadable as it was
    sae = saved(tmp_path / "again")  # saving over an SAE of the same format is fine
    sae_2 = sb.SAE.random("topk", 8, 16, HOOK, k=2, seed=3)
    sae_2.save(sae)
    assert sb.SAE.load(sae).cfg.architecture == "topk"


def test_convert_refuses_to_write_over_its_own_source(tmp_path):
    folder = saved(tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    res = subprocess.run([sys.executable, "-m", "saebridge", "convert", str(folder), "--to",
                          "saelens", str(folder)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "over its own source" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ---- the activation cache ------------------------------------------------------------------

def _cache(model, out: Path, n: int = 3) -> ActivationShards:
    batches = [torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(i))
               for i in range(n)]
    return cache_activations(model, batches, hooks=["blocks.0.hook_resid_post"], out_dir=out,
                             tokens_per_shard=6)


def test_the_cache_removes_only_its_own_temporary_file(models, tmp_path):
    model = models("hf")
    out = tmp_path / "cache"
    out.mkdir()
    mine = {"notes.tmp": b"user", "data.json.tmp": b"{}", "shard_000099.safetensors.tmp": b"x",
            "saebridge_cache.json.tmp.bak": b"y"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    (out / "shard_000000.safetensors.tmp").write_bytes(b"torn write")  # its own, interrupted
    shards = _cache(model, out)
    assert len(shards.paths) == 3 and not (out / "shard_000000.safetensors.tmp").exists()
    assert {name: (out / name).read_bytes() for name in mine} == mine


def test_a_corrupt_manifest_is_named(models, tmp_path):
    model = models("hf")
    out = tmp_path / "cache"
    _cache(model, out)
    (out / "saebridge_cache.json").write_text("{ not json")
    for action in (lambda: _cache(model, out), lambda: ActivationShards(out)):
        with pytest.raises(CacheDirError, match=r"saebridge_cache\.json") as info:
            action()
        assert "JSONDecodeError" in str(info.value)
    (out / "saebridge_cache.json").write_text("[1, 2]")
    with pytest.raises(CacheDirError, match="not what cache_activations writes"):
        ActivationShards(out)


def test_a_truncated_shard_is_named(models, tmp_path):
    model = models("hf")
    out = tmp_path / "cache"
    _cache(model, out)
    shard = out / "shard_000002.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    for action in (lambda: _cache(model, out), lambda: ActivationShards(out)):
        with pytest.raises(CacheDirError, match=r"shard_000002\.safetensors") as info:
            action()
        assert "truncated or corrupt" in str(info.value)
    good = out / "shard_000001.safetensors"
    data = good.read_bytes()
    shards = _cache(model, tmp_path / "other")
    (tmp_path / "other" / "shard_000001.safetensors").write_bytes(data[:-40])
    with pytest.raises(CacheDirError, match="shard_000001"):
        shards[7]  # the second shard, read only now
    with pytest.raises(ArgumentTypeError):
        shards[1.5]
