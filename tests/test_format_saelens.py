"""SAELens folders: saebridge's own round trip, and folders written by hand in SAELens's layouts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from saebridge import formats
from saebridge.errors import RegistryError, SAEConfigError, SAEFormatError, ShapeError
from saebridge.formats import UnknownFormatError, saelens
from saebridge.sae import SAE
from tests.parity import assert_splice_agrees

RESID = "blocks.2.hook_resid_pre"
MODES = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
V6_META = {"sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1",
           "model_name": "gpt2", "hook_name": RESID, "hook_head_index": None,
           "context_size": 128, "prepend_bos": True, "seqpos_slice": [None],
           "dataset_path": "apollo-research/Skylion007-openwebtext-tokenizer-gpt2",
           "model_from_pretrained_kwargs": {"center_writing_weights": False}}


def write_folder(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A folder exactly as SAELens lays one out, written without saebridge."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


def weights(d_in: int, d_sae: int, *names: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes.update({name: (d_sae,) for name in names})
    out = {name: torch.randn(shape, generator=gen) * 0.3 for name, shape in shapes.items()}
    if "threshold" in out:
        out["threshold"] = out["threshold"].abs()
    return out


# ---- saebridge's own round trip ------------------------------------------------------

@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch=st.sampled_from(["standard", "topk", "batchtopk", "jumprelu", "gated"]),
       mode=st.sampled_from(MODES), dtype=st.sampled_from(["float32", "bfloat16", "float64"]),
       hook_z=st.booleans(), seed=st.integers(0, 100), data=st.data())
def test_round_trip_is_exact(tmp_path_factory: pytest.TempPathFactory, arch: str, mode: str,
                             dtype: str, hook_z: bool, seed: int, data: st.DataObject) -> None:
    hook = "blocks.0.attn.hook_z" if hook_z else RESID
    k = {"topk": 3, "batchtopk": data.draw(st.sampled_from([None, 3, 2.5]))}.get(arch)
    sae = SAE.random(arch, 6, 12, hook, k=k, seed=seed, normalize_activations=mode,
                     dtype=dtype, hook_head_index=data.draw(st.sampled_from([None, 1])),
                     model_name=data.draw(st.sampled_from([None, "gpt2"])),
                     rescale_acts_by_decoder_norm=arch == "topk" and data.draw(st.booleans()),
                     activation_space=data.draw(st.sampled_from([None, "hf", "tl-processed"])),
                     metadata=data.draw(st.sampled_from([{}, {"context_size": 64,
                                                              "sae_lens_version": "6.1.0"}])))
    folder = tmp_path_factory.mktemp("sae")
    sae.save(folder)
    back = SAE.load(folder)
    assert back.cfg == sae.cfg
    assert back.state_dict().keys() == sae.state_dict().keys()
    for name, tensor in sae.state_dict().items():
        assert back.state_dict()[name].dtype == tensor.dtype
        assert torch.equal(back.state_dict()[name], tensor), name


def test_written_layout_is_saelens_6(tmp_path: Path) -> None:
    sae = SAE.random("topk", 4, 8, RESID, k=2, model_name="gpt2",
                     metadata={"context_size": 32, "prepend_bos": False})
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 2
    assert cfg["rescale_acts_by_decoder_norm"] is False
    assert {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
            "reshape_activations", "metadata"} <= cfg.keys()
    assert "hook_name" not in cfg
    meta = cfg["metadata"]
    assert meta["hook_name"] == RESID and meta["model_name"] == "gpt2"
    assert meta["context_size"] == 32 and meta["prepend_bos"] is False
    assert meta["sae_lens_version"].startswith("6.")  # else SAELens reads it as a pre-6 file
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert tensors["W_dec"].shape == (8, 4)  # [d_sae, d_in], as SAELens stores it


def test_gated_and_batchtopk_layout(tmp_path: Path) -> None:
    SAE.random("gated", 4, 8, RESID).save(tmp_path / "g")
    assert set(load_file(str(tmp_path / "g" / "sae_weights.safetensors"))) == {
        "W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"}
    SAE.random("batchtopk", 4, 8, RESID, k=2).save(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    # SAELens 6 saves trained batchtopk SAEs as jumprelu; the provenance is in metadata.
    assert cfg["architecture"] == "jumprelu" and "k" not in cfg
    assert cfg["metadata"]["training_architecture"] == "batchtopk"
    assert cfg["metadata"]["training_architecture_details"] == {"k": 2}


def test_batchtopk_with_rescale_saves_folded(tmp_path: Path) -> None:
    sae = SAE.random("batchtopk", 6, 10, RESID, k=3, rescale_acts_by_decoder_norm=True)
    sae.save(tmp_path)
    back = SAE.load(tmp_path)
    assert not back.cfg.rescale_acts_by_decoder_norm
    assert torch.allclose(back.W_dec.norm(dim=-1), torch.ones(10))
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(back.encode(x) != 0, sae.encode(x) != 0)
    torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-5)


# ---- folders written by SAELens (by hand here) -------------------------------------

def test_reads_v6_layout(tmp_path: Path) -> None:
    cfg = {"d_in": 4, "d_sae": 6, "dtype": "float32", "device": "cuda",
           "apply_b_dec_to_input": False, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": V6_META, "architecture": "jumprelu"}
    tensors = weights(4, 6, "b_enc", "threshold")
    sae = SAE.load(write_folder(tmp_path, cfg, tensors))
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.device == "cpu"
    assert sae.cfg.hook_name == RESID and sae.cfg.model_name == "gpt2"
    assert sae.cfg.model_from_pretrained_kwargs == {"center_writing_weights": False}
    assert not sae.cfg.activation_space.center_writing_weights
    assert sae.cfg.metadata == {k: v for k, v in V6_META.items() if k not in (
        "hook_name", "model_name", "hook_head_index", "model_from_pretrained_kwargs")}
    for name, tensor in tensors.items():
        assert torch.equal(getattr(sae, name), tensor)
    x = torch.randn(3, 4)
    pre = x @ tensors["W_enc"] + tensors["b_enc"]  # apply_b_dec_to_input is false
    post = torch.where(pre > tensors["threshold"], pre, torch.zeros_like(pre))
    torch.testing.assert_close(sae(x), post @ tensors["W_dec"] + tensors["b_dec"])
    # re-saving keeps SAELens's metadata verbatim
    sae.save(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert again["metadata"] == V6_META


def test_reads_v6_topk_and_training_batchtopk(tmp_path: Path) -> None:
    topk = {"d_in": 4, "d_sae": 6, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none", "metadata": V6_META, "k": 2,
            "rescale_acts_by_decoder_norm": True, "architecture": "topk"}
    sae = SAE.load(write_folder(tmp_path / "t", topk, weights(4, 6, "b_enc")))
    assert (sae.cfg.k, sae.cfg.rescale_acts_by_decoder_norm) == (2, True)
    # a BatchTopKTrainingSAE checkpoint: scalar double topk_threshold, training fields on top
    ckpt = {**topk, "architecture": "batchtopk", "k": 2.5, "topk_threshold_lr": 0.01}
    tensors = {**weights(4, 6, "b_enc"), "topk_threshold": torch.tensor(0.2, dtype=torch.float64)}
    bt = SAE.load(write_folder(tmp_path / "b", ckpt, tensors))
    assert bt.cfg.architecture == "batchtopk" and bt.cfg.k == 2.5
    assert bt.cfg.metadata["topk_threshold_lr"] == 0.01
    assert torch.equal(bt.threshold, torch.full((6,), 0.2))


def test_reads_saelens_batchtopk_inference_save(tmp_path: Path) -> None:
    meta = {**V6_META, "training_architecture": "batchtopk",
            "training_architecture_details": {"k": 16.0, "topk_threshold_lr": 0.01,
                                              "rescale_acts_by_decoder_norm": True}}
    cfg = {"d_in": 4, "d_sae": 6, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": meta, "architecture": "jumprelu"}
    sae = SAE.load(write_folder(tmp_path, cfg, weights(4, 6, "b_enc", "threshold")))
    assert sae.cfg.architecture == "batchtopk" and sae.cfg.k == 16.0
    assert not sae.cfg.rescale_acts_by_decoder_norm  # SAELens folded the norms on save
    sae.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "cfg.json").read_text())["metadata"] == meta


def test_reads_v5_flat_layout(tmp_path: Path) -> None:
    cfg = {"architecture": "standard", "d_in": 4, "d_sae": 6, "dtype": "torch.float32",
           "device": "cuda", "model_name": "gpt2-small", "hook_point": "blocks.2.attn.hook_z",
           "hook_point_layer": 2, "hook_point_head_index": None, "activation_fn_str": "relu",
           "activation_fn_kwargs": {}, "apply_b_dec_to_input": True,
           "finetuning_scaling_factor": False, "sae_lens_training_version": "3.1.0",
           "prepend_bos": True, "dataset_path": "Skylion007/openwebtext", "context_size": 128,
           "normalize_activations": True, "model_from_pretrained_kwargs": {},
           "neuronpedia_id": None}
    tensors = {**weights(4, 6, "b_enc"), "scaling_factor": torch.ones(6)}
    sae = SAE.load(write_folder(tmp_path, cfg, tensors))
    c = sae.cfg
    assert (c.architecture, c.dtype, c.hook_name, c.model_name) == (
        "standard", "float32", "blocks.2.attn.hook_z", "gpt2-small")
    assert c.normalize_activations == "expected_average_only_in"  # bool True, as SAELens reads it
    assert c.reshape_activations == "hook_z" and c.apply_b_dec_to_input
    assert c.metadata["hook_point_layer"] == 2 and c.metadata["context_size"] == 128
    assert "scaling_factor" not in sae.state_dict()  # all ones: dropped, as SAELens does
    assert torch.equal(sae.W_dec, tensors["W_dec"])


def test_reads_v5_topk_and_finetuning_factor(tmp_path: Path) -> None:
    cfg = {"d_in": 4, "d_sae": 6, "dtype": "float32", "hook_name": RESID,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
           "finetuning_scaling_factor": True, "apply_b_dec_to_input": True}
    factor = torch.linspace(0.5, 2.0, 6)
    tensors = {**weights(4, 6, "b_enc", seed=3), "scaling_factor": factor}
    sae = SAE.load(write_folder(tmp_path, cfg, tensors))
    assert (sae.cfg.architecture, sae.cfg.k) == ("topk", 3)
    x = torch.randn(5, 4)
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    keep = pre.argsort(dim=-1, descending=True)[:, :3]
    acts = torch.zeros_like(pre).scatter(-1, keep, pre.gather(-1, keep).clamp(min=0))
    assert torch.equal(sae.encode(x), acts)  # the factor leaves the latents alone
    want = (acts * factor) @ tensors["W_dec"] + tensors["b_dec"]  # SAELens 5 decode
    torch.testing.assert_close(sae(x), want, rtol=1e-5, atol=1e-5)
    bad = {**cfg, "finetuning_scaling_factor": False}
    with pytest.raises(SAEFormatError, match="finetuning_scaling_factor"):
        SAE.load(write_folder(tmp_path / "bad", bad, tensors))


def test_reads_log_threshold(tmp_path: Path) -> None:
    cfg = {"d_in": 4, "d_sae": 6, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": V6_META, "architecture": "jumprelu"}
    tensors = {**weights(4, 6, "b_enc"), "log_threshold": torch.full((6,), math.log(0.3))}
    sae = SAE.load(write_folder(tmp_path, cfg, tensors))
    torch.testing.assert_close(sae.threshold, torch.full((6,), 0.3))


def test_activation_scaler_file_is_folded(tmp_path: Path) -> None:
    sae = SAE.random("standard", 4, 8, RESID, normalize_activations="expected_average_only_in")
    sae.save(tmp_path)
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 4.0}))
    back = SAE.load(tmp_path)
    assert back.cfg.normalize_activations == "none"
    x = torch.randn(3, 4)
    torch.testing.assert_close(back(x), sae(4.0 * x) / 4.0)
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None}))
    assert torch.equal(SAE.load(tmp_path).W_enc, sae.W_enc)
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": "big"}))
    with pytest.raises(SAEFormatError, match="scaling_factor"):
        SAE.load(tmp_path)


def test_load_options(tmp_path: Path) -> None:
    sae = SAE.random("gated", 4, 8, RESID, device="cpu")
    sae.save(tmp_path)
    wide = SAE.load(tmp_path / "cfg.json", dtype=torch.float64)
    assert wide.cfg.dtype == "float64" and wide.r_mag.dtype == torch.float64
    assert torch.equal(wide.r_mag, sae.r_mag.double())
    assert SAE.load(tmp_path, dtype="bfloat16", format="saelens").W_enc.dtype == torch.bfloat16
    assert formats.read_config(tmp_path) == sae.cfg
    assert formats.detect_format(tmp_path) == "saelens"
    with pytest.raises(SAEConfigError, match="dtype"):
        SAE.load(tmp_path, dtype="float8")
    with pytest.raises(SAEConfigError, match="'gpu'"):
        SAE.load(tmp_path, device="gpu")


@pytest.mark.filterwarnings("ignore::saebridge.errors.ModelMismatchWarning")  # gpt2's SAE
@pytest.mark.parametrize(("arch", "hook", "space"), [
    ("jumprelu", "blocks.1.hook_resid_pre", {"center_writing_weights": False}),
    ("topk", "blocks.0.hook_mlp_out", {}),  # SAELens's default: processed TransformerLens
    ("standard", "blocks.1.attn.hook_z", {"fold_ln": False, "center_writing_weights": False,
                                          "center_unembed": False})])
def test_splice_agrees_across_backends(tmp_path: Path, models, backend, arch: str, hook: str,
                                       space: dict) -> None:
    """A folder as SAELens 6 writes it, trained in the space its
    ``model_from_pretrained_kwargs`` name, spliced into every backend."""
    meta = {**V6_META, "hook_name": hook, "model_from_pretrained_kwargs": space}
    cfg = {"d_in": 64, "d_sae": 96, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none",
           "metadata": meta, "architecture": arch}
    names = {"jumprelu": ("b_enc", "threshold"), "topk": ("b_enc",),
             "standard": ("b_enc",)}[arch]
    if arch == "topk":
        cfg.update(k=8, rescale_acts_by_decoder_norm=False)
    tensors = weights(64, 96, *names, seed=4)
    tensors["W_enc"] = tensors["W_enc"] / 8  # pre-activations of order one
    sae = SAE.load(write_folder(tmp_path, cfg, tensors), device=backend.device)
    tokens = torch.randint(1, 384, (2, 7), generator=torch.Generator().manual_seed(0))
    assert_splice_agrees(models(*backend), models("hf", backend.device), [sae], tokens,
                         what=backend.name, latents=True)


# ---- broken folders ------------------------------------------------------------------

def good_folder(tmp_path: Path) -> Path:
    SAE.random("standard", 4, 8, RESID).save(tmp_path / "sae")
    return tmp_path / "sae"


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(SAEFormatError, match="no file or folder"):
        SAE.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnknownFormatError, match="saelens") as info:
        SAE.load(tmp_path / "empty")
    assert isinstance(info.value, KeyError) and isinstance(info.value, SAEFormatError)
    folder = good_folder(tmp_path)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(SAEFormatError, match=r"sae_weights\.safetensors"):
        SAE.load(folder, format="saelens")


@pytest.mark.parametrize(("text", "error", "needle"), [
    ("{not json", SAEFormatError, "not valid JSON"),
    ("[1, 2]", SAEConfigError, "JSON object"),
    ('{"d_in": 4}', SAEConfigError, "hook_name"),
])
def test_malformed_cfg(tmp_path: Path, text: str, error: type, needle: str) -> None:
    folder = good_folder(tmp_path)
    (folder / "cfg.json").write_text(text)
    with pytest.raises(error, match=needle):
        SAE.load(folder)


@pytest.mark.parametrize(("change", "needle"), [
    ({"architecture": "crosscoder"}, "'standard'"),
    ({"d_in": "4"}, "d_in"),
    ({"apply_b_dec_to_input": "yes"}, "true or false"),
    ({"metadata": "gpt2"}, "metadata"),
    ({"normalize_activations": "mean"}, "'layer_norm'"),
])
def test_bad_cfg_values(tmp_path: Path, change: dict, needle: str) -> None:
    folder = good_folder(tmp_path)
    cfg = {**json.loads((folder / "cfg.json").read_text()), **change}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEConfigError, match=needle):
        SAE.load(folder)


def test_v5_unsupported_activation(tmp_path: Path) -> None:
    cfg = {"d_in": 4, "d_sae": 6, "hook_name": RESID, "activation_fn_str": "tanh-relu"}
    with pytest.raises(SAEConfigError, match="tanh-relu"):
        SAE.load(write_folder(tmp_path, cfg, weights(4, 6, "b_enc")))
    cfg = {**cfg, "activation_fn_str": "topk", "activation_fn_kwargs": {}}
    with pytest.raises(SAEConfigError, match="'k'"):
        SAE.load(write_folder(tmp_path / "k", cfg, weights(4, 6, "b_enc")))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle", "empty"])
def test_corrupt_weights(tmp_path: Path, damage: str) -> None:
    folder = good_folder(tmp_path)
    path = folder / "sae_weights.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 20])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01garbage" * 50)
    elif damage == "pickle":  # never unpickled: just not safetensors
        torch.save({"W_enc": torch.zeros(4, 8)}, path)
    else:
        path.write_bytes(b"")
    with pytest.raises(SAEFormatError, match="safetensors"):
        SAE.load(folder)


@pytest.mark.parametrize(("edit", "error", "needle"), [
    (lambda t: t.pop("b_enc"), SAEFormatError, "b_enc"),
    (lambda t: t.update(threshold=torch.zeros(8)), SAEFormatError, "threshold"),
    (lambda t: t.update(W_dec=t["W_dec"].T.contiguous()), ShapeError, "W_dec"),
])
def test_wrong_tensors(tmp_path: Path, edit: object, error: type, needle: str) -> None:
    folder = good_folder(tmp_path)
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    edit(tensors)  # type: ignore[operator]
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(error, match=needle):
        SAE.load(folder)


def test_unsavable_metadata_writes_nothing(tmp_path: Path) -> None:
    sae = SAE.random("standard", 4, 8, RESID, metadata={"when": object()})
    with pytest.raises(SAEConfigError, match="JSON"):
        sae.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- the registry --------------------------------------------------------------------

def test_registry() -> None:
    assert "saelens" in formats.names() and formats.get("saelens") is saelens
    with pytest.raises(RegistryError, match="already registered"):
        formats.register_format("saelens", saelens)
    with pytest.raises(UnknownFormatError, match="register_format") as info:
        formats.get("saelenz")
    assert "'saelens'" in str(info.value) and isinstance(info.value, KeyError)
    with pytest.raises(UnknownFormatError):
        SAE.random("standard", 4, 8, RESID).save("unused", format="no-such-format")
