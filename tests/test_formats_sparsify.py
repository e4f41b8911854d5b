"""EleutherAI sparsify folders (SAEs and transcoders), written here as SparseCoder.save_to_disk
writes them, and spliced into the tiny GPT-2 on every backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saebridge import formats
from saebridge.errors import ModelMismatchWarning, SAEConfigError, UnknownHookError
from saebridge.sae import SAE
from saebridge.sae.transcoder import Transcoder
from saebridge.testing import assert_round_trip
from tests.parity import assert_same_logprobs, assert_splice_agrees

pytestmark = pytest.mark.filterwarnings(f"ignore::{ModelMismatchWarning.__module__}."
                                        f"{ModelMismatchWarning.__name__}")


def write_sparsify(root: Path, hookpoint: str, d_in: int, *, k: int = 8, num_latents: int = 96,
                   transcode: bool = False, skip: bool = False, seed: int = 0,
                   **cfg: object) -> Path:
    """``SparseCoder.save_to_disk(root / hookpoint)``: cfg.json is ``{**cfg.to_dict(), "d_in"}``
    and sae.safetensors holds encoder.weight/bias, W_dec [num_latents, d_in], b_dec, W_skip."""
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(num_latents, d_in, generator=gen)
    tensors = {"encoder.weight": torch.randn(num_latents, d_in, generator=gen) * d_in ** -0.5,
               "encoder.bias": 0.1 * torch.randn(num_latents, generator=gen),
               "W_dec": W_dec / W_dec.norm(dim=-1, keepdim=True),
               "b_dec": 0.1 * torch.randn(d_in, generator=gen)}
    if skip:
        tensors["W_skip"] = 0.05 * torch.randn(d_in, d_in, generator=gen)
    folder = root / hookpoint
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "sae.safetensors"))
    config = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
              "num_latents": num_latents, "k": k, "multi_topk": False,
              "skip_connection": skip, "transcode": transcode, **cfg, "d_in": d_in}
    (folder / "cfg.json").write_text(json.dumps(config))
    return folder


def reference(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """SparseCoder.forward written out: ReLU, then top-k, then a sparse decode."""
    t = load_file(str(folder / "sae.safetensors"))
    cfg = json.loads((folder / "cfg.json").read_text())
    x_in = x if cfg["transcode"] else x - t["b_dec"]
    pre = torch.relu(x_in @ t["encoder.weight"].T + t["encoder.bias"])
    top = pre.topk(cfg["k"], dim=-1, sorted=False)
    out = (top.values[..., None] * t["W_dec"][top.indices]).sum(-2) + t["b_dec"]
    return out + x @ t["W_skip"].T if "W_skip" in t else out


def test_sae_math_and_site(tmp_path: Path) -> None:
    folder = write_sparsify(tmp_path, "h.1.mlp", 64)
    assert formats.detect_format(folder) == "sparsify"
    sae = SAE.load(folder)
    assert type(sae) is SAE and sae.cfg.hook_name == "blocks.1.hook_mlp_out"
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 8 and sae.cfg.d_sae == 96
    assert sae.cfg.apply_b_dec_to_input and sae.cfg.activation_space.name == "hf"
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sae(x), reference(folder, x))
    # W_dec is stored [num_latents, d_in], SAELens's orientation: not transposed.
    assert torch.equal(sae.W_dec, load_file(str(folder / "sae.safetensors"))["W_dec"])
    assert_round_trip(sae, tmp_path / "converted")


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_math_and_sites(tmp_path: Path, skip: bool) -> None:
    folder = write_sparsify(tmp_path, "h.0.mlp.act", 256, transcode=True, skip=skip)
    tc = SAE.load(folder)
    assert isinstance(tc, Transcoder)
    assert (tc.cfg.hook_name, tc.cfg.hook_name_out) == ("blocks.0.mlp.hook_pre",
                                                        "blocks.0.mlp.hook_post")
    assert not tc.cfg.apply_b_dec_to_input and tc.cfg.skip == skip
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(tc(x), reference(folder, x))
    assert_round_trip(tc, tmp_path / "converted")
    info = formats.read_config(tmp_path / "h.0.mlp.act")
    assert info.hook_name_out == "blocks.0.mlp.hook_post"  # type: ignore[attr-defined]


def test_expansion_factor_and_hookpoint_errors(tmp_path: Path) -> None:
    folder = write_sparsify(tmp_path, "h.0", 8, num_latents=16, k=2)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 0,
                                                 "expansion_factor": 2}))
    assert formats.read_config(folder).d_sae == 16
    assert formats.read_config(folder).hook_name == "blocks.0.hook_resid_post"
    bad = write_sparsify(tmp_path, "h.0.ln_1", 8, num_latents=16, k=2)
    with pytest.raises(UnknownHookError, match="LayerNorm output"):
        SAE.load(bad)
    assert SAE.load(bad, hook_name="blocks.0.hook_resid_pre").cfg.hook_name \
        == "blocks.0.hook_resid_pre"
    unknown = write_sparsify(tmp_path, "transformer.blocks.0", 8, num_latents=16, k=2)
    with pytest.raises(UnknownHookError, match="hook_name="):
        SAE.load(unknown)
    grouped = write_sparsify(tmp_path / "g", "h.0", 8, num_latents=16, k=2,
                             activation="groupmax")
    with pytest.raises(SAEConfigError, match="groupmax"):
        SAE.load(grouped)


TOKENS = torch.randint(1, 384, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("hookpoint", ["h.0", "h.1.mlp", "h.1.attn"])
def test_sae_splice_agrees(tmp_path: Path, models, backend, hookpoint: str) -> None:
    sae = SAE.load(write_sparsify(tmp_path, hookpoint, 64, seed=4), device=backend.device)
    assert_splice_agrees(models(*backend), models("hf", backend.device), [sae], TOKENS,
                         what=backend.name, latents=True)


@pytest.mark.parametrize(("hookpoint", "d_in", "skip"), [
    ("h.1.mlp", 64, True), ("h.0.attn", 64, False), ("h.1", 64, False),
    ("h.0.mlp.act", 256, True)])
def test_transcoder_splice_agrees(tmp_path: Path, models, backend, hookpoint: str, d_in: int,
                                  skip: bool) -> None:
    tc = SAE.load(write_sparsify(tmp_path, hookpoint, d_in, transcode=True, skip=skip, seed=5),
                  device=backend.device)
    assert_splice_agrees(models(*backend), models("hf", backend.device), [tc], TOKENS,
                         what=backend.name)


def test_transcoder_splice_is_what_sparsify_means(tmp_path: Path, models) -> None:
    """The spliced HF model equals the HF model whose ``h.1.mlp`` output is replaced, by a
    plain torch hook, with the transcoder applied to that module's input (sparsify's own
    reading of a hookpoint), also through the LayerNorm's gain and bias."""
    folder = write_sparsify(tmp_path, "h.1.mlp", 64, transcode=True, skip=True, seed=6)
    tc = SAE.load(folder)
    hf = models("hf")
    ours = hf.run_with_saes(TOKENS, saes=[tc])
    raw = hf.adapter.model  # type: ignore[attr-defined]
    mlp = raw.transformer.h[1].mlp
    handle = mlp.register_forward_hook(lambda m, args, out: reference(folder, args[0]))
    try:
        with torch.no_grad():
            theirs = raw(input_ids=TOKENS).logits
    finally:
        handle.remove()
    assert_same_logprobs(ours, theirs, "a plain torch hook")


def test_transcoder_error_term_and_cache(models, backend, tmp_path: Path) -> None:
    tc = SAE.load(write_sparsify(tmp_path, "h.1.mlp", 64, transcode=True, seed=7),
                  device=backend.device)
    m = models(*backend)
    assert_same_logprobs(m.run_with_saes(TOKENS, saes=[tc], use_error_term=True), m(TOKENS),
                         f"{backend.name} with the error term")
    _, cache = m.run_with_cache_with_saes(TOKENS, saes=[tc], names=[])
    acts = cache["blocks.1.ln2.hook_normalized.hook_sae_acts_post"]
    assert acts.shape == (2, 7, 96) and int((acts[0, 0] != 0).sum()) <= 8
    assert cache["blocks.1.ln2.hook_normalized.hook_sae_recons"].shape == (2, 7, 64)


@pytest.mark.parametrize(("family", "transcoder", "skip"), [
    ("llama", "layers.0.mlp", True), ("neox", "layers.1.mlp", False)])
def test_layers_hookpoints_on_llama_and_neox(tmp_path: Path, arch_models, backend, family: str,
                                             transcoder: str, skip: bool) -> None:
    """``layers.{L}`` hookpoints: which architecture reads them how is decided by the run's
    config.json model name; a transcoder through an RMSNorm (Llama) or LayerNorm (NeoX)
    gain splices the same on every backend."""
    model = {"llama": "meta-llama/Llama-3.2-1B", "neox": "EleutherAI/pythia-70m"}[family]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": model, "batch_size": 8}))
    tc = SAE.load(write_sparsify(run, transcoder, 64, transcode=True, skip=skip, seed=8),
                  device=backend.device)
    sae = SAE.load(write_sparsify(run, "layers.1", 64, seed=9), device=backend.device)
    assert isinstance(tc, Transcoder) and tc.cfg.model_name == model
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    tokens = torch.randint(1, 384, (2, 6), generator=torch.Generator().manual_seed(1))
    model, hf = arch_models(family, *backend), arch_models(family, "hf", backend.device)
    for spliced in (tc, sae):
        assert_splice_agrees(model, hf, [spliced], tokens, what=backend.name)
    with pytest.raises(UnknownHookError, match="hook_name="):  # no run config: ambiguous
        SAE.load(write_sparsify(tmp_path / "bare", "layers.0.mlp", 64, transcode=True))
