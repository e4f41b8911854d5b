"""Detection across every registered format, the hook_name override, inspection, hub ids, and
the proof that a raw-space SAE needs the space conversion in a processed model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import saebridge as sb
from saebridge import formats
from saebridge.errors import SAEFormatError
from saebridge.formats import UnknownFormatError, hub
from saebridge.sae import SAE
from saebridge.sae.blockdiag import BlockDiagSAE, block_diagonal
from saebridge.sae.transcoder import Transcoder
from saebridge.tolerance import logprob_atol

TOL = logprob_atol(torch.float32)
TOKENS = torch.randint(1, 384, (2, 7), generator=torch.Generator().manual_seed(0))


def sparsify_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": torch.randn(16, 8), "encoder.bias": torch.zeros(16),
               "W_dec": torch.randn(16, 8), "b_dec": torch.zeros(8)},
              str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"num_latents": 16, "k": 2, "d_in": 8}))
    return folder


def dictionary_learning_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"bias": torch.zeros(8), "encoder.weight": torch.randn(16, 8),
                "encoder.bias": torch.zeros(16), "decoder.weight": torch.randn(8, 16)},
               folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps(
        {"trainer": {"dict_class": "AutoEncoder", "submodule_name": "resid_post_layer_0"}}))
    return folder


def test_unknown_layout_lists_every_format(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an SAE")
    with pytest.raises(UnknownFormatError) as info:
        SAE.load(tmp_path)
    message = str(info.value)
    for name in formats.names():
        assert f"{name}:" in message
    assert "params.npz" in message and "ae.pt" in message and "sae.safetensors" in message


def test_ambiguous_layout_fails_and_format_picks(tmp_path: Path) -> None:
    folder = dictionary_learning_folder(sparsify_folder(tmp_path / "h.0"))
    with pytest.raises(UnknownFormatError, match="ambiguous") as info:
        SAE.load(folder)
    assert "sparsify" in str(info.value) and "dictionary_learning" in str(info.value)
    assert SAE.load(folder, format="sparsify").cfg.metadata["source_format"] == "sparsify"
    assert SAE.load(folder, format="dictionary_learning").cfg.hook_name \
        == "blocks.0.hook_resid_post"


def test_hook_name_override_for_every_format(tmp_path: Path) -> None:
    """Formats that record their site (SAELens, Kissane, the SAELens variants) take the
    override too; the family loaders are covered in their own tests."""
    hook = "blocks.1.hook_resid_mid"
    SAE.random("standard", 8, 16, "blocks.0.hook_resid_pre").save(tmp_path / "saelens")
    dense = block_diagonal(SAE.random("topk", 8, 16, "blocks.0.attn.hook_z", k=2), 2)
    BlockDiagSAE.from_dense(dense, 2).save(tmp_path / "bd")
    Transcoder.random("standard", 8, 16, 8, "blocks.0.hook_resid_pre",
                      "blocks.0.hook_mlp_out").save(tmp_path / "tc")
    (tmp_path / "k").mkdir()
    torch.save({"W_enc": torch.randn(8, 16), "W_dec": torch.randn(16, 8),
                "b_enc": torch.zeros(16), "b_dec": torch.zeros(8)}, tmp_path / "k" / "x.pt")
    (tmp_path / "k" / "x_cfg.json").write_text(json.dumps(
        {"act_name": "blocks.0.hook_mlp_out", "act_size": 8, "dict_size": 16}))
    expected = {"saelens": "saelens", "bd": "saelens-blockdiag", "tc": "saelens-transcoder",
                "k": "kissane"}
    for folder, fmt in expected.items():
        site = "blocks.1.attn.hook_z" if fmt == "saelens-blockdiag" else hook
        assert formats.detect_format(tmp_path / folder) == fmt
        assert SAE.load(tmp_path / folder, hook_name=site).cfg.hook_name == site, fmt
        assert sb.inspect(tmp_path / folder, hook_name=site).hook_name == site, fmt


def test_inspect_reports_format_site_space_dtype(tmp_path: Path) -> None:
    release = tmp_path / "gemma-scope-2b-pt-mlp" / "layer_1" / "width_16k" / "average_l0_8"
    release.mkdir(parents=True)
    arrays = {"W_enc": np.zeros((8, 16), np.float32), "W_dec": np.zeros((16, 8), np.float32),
              "b_enc": np.zeros(16, np.float32), "b_dec": np.zeros(8, np.float32),
              "threshold": np.zeros(16, np.float32)}
    np.savez(release / "params.npz", **arrays)
    info = sb.inspect(release)
    assert (info.format, info.architecture, info.hook_name, info.d_in, info.d_sae) == (
        "gemma_scope", "jumprelu", "blocks.1.hook_mlp_out", 8, 16)
    assert info.space.name == "hf" and info.dtype == "float32" and info.hook_name_out is None
    info = sb.inspect(sparsify_folder(tmp_path / "h.1.mlp"))
    assert (info.format, info.hook_name, info.config.k) == ("sparsify",
                                                             "blocks.1.hook_mlp_out", 2)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_raw_space_sae_needs_the_conversion(models) -> None:
    """A raw-space SAE at hook_mlp_out agrees on TransformerLens-processed only because the
    centred activation is converted: labelled (wrongly) as processed-space, it disagrees."""
    sae = SAE.random("jumprelu", 64, 96, "blocks.1.hook_mlp_out", activation_space="hf",
                     seed=2)
    hf = models("hf").run_with_saes(TOKENS, saes=[sae]).log_softmax(-1)
    tl = models("tl-processed").run_with_saes(TOKENS, saes=[sae]).log_softmax(-1)
    assert (tl - hf).abs().max() <= TOL
    wrong = SAE(sae.cfg.__class__(**{**sae.cfg.to_dict(), "model_from_pretrained_kwargs":
                                     None}), {n: p.detach() for n, p in sae.named_parameters()})
    tl_wrong = models("tl-processed").run_with_saes(TOKENS, saes=[wrong]).log_softmax(-1)
    assert (tl_wrong - hf).abs().max() > 100 * TOL


def test_hub_ids_resolve_through_huggingface_hub(tmp_path: Path, monkeypatch) -> None:
    """No network here: snapshot_download is replaced by a local 'cache'."""
    import huggingface_hub

    cache = tmp_path / "models--org--saes" / "snapshots" / "abc"
    sparsify_folder(cache / "h.0")
    calls = []

    def fake(repo_id: str, allow_patterns: list[str] | None = None, **kw: object) -> str:
        calls.append((repo_id, allow_patterns))
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    sae = SAE.load("org/saes", subfolder="h.0")
    assert sae.cfg.hook_name == "blocks.0.hook_resid_post"
    assert calls == [("org/saes", ["h.0/*"])]
    assert sb.inspect("org/saes", subfolder="h.0").format == "sparsify"

    def offline(*args: object, **kwargs: object) -> str:
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SAEFormatError, match="could not fetch 'org/other'"):
        SAE.load("org/other")
    assert not hub.looks_like_repo_id("./org/other") and hub.looks_like_repo_id("a/b")
    local = sparsify_folder(tmp_path / "local" / "h.1")
    assert SAE.load(tmp_path / "local", subfolder="h.1").cfg.metadata["hookpoint"] == "h.1"
    assert local.exists()
