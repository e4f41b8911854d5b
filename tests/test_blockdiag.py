"""Block-diagonal per-head hook_z SAEs (from hand-written SAELens folders) and the Kissane et
al. dense hook_z SAEs, down to splicing on every backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saebridge import formats
from saebridge.errors import ModelMismatchWarning, ShapeError
from saebridge.sae import SAE
from saebridge.sae.blockdiag import BlockDiagSAE, block_diagonal
from saebridge.testing import assert_round_trip
from tests.parity import CHANGED, assert_same_logprobs, assert_splice_agrees, logprob_gap

pytestmark = pytest.mark.filterwarnings(f"ignore::{ModelMismatchWarning.__module__}."
                                        f"{ModelMismatchWarning.__name__}")
H, DH, M = 4, 16, 24  # the tiny GPT-2's heads; latents per head
TOKENS = torch.randint(1, 384, (2, 7), generator=torch.Generator().manual_seed(0))


def write_saelens(folder: Path, arch: str, tensors: dict[str, torch.Tensor], *,
                  space: dict | None, layer: int = 1, k: int | None = None) -> Path:
    """A SAELens 6 folder, as SAELens's save_model writes it (no saebridge involved)."""
    folder.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors.items()},
              str(folder / "sae_weights.safetensors"))
    cfg = {"d_in": H * DH, "d_sae": H * M, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "hook_z", "architecture": arch,
           "metadata": {"sae_lens_version": "6.3.0", "model_name": "gpt2-small",
                        "hook_name": f"blocks.{layer}.attn.hook_z", "hook_head_index": None,
                        "model_from_pretrained_kwargs": space, "context_size": 128}}
    if k is not None:
        cfg.update(k=k, rescale_acts_by_decoder_norm=False)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def block_tensors(arch: str, seed: int = 0, k: int | None = None) -> dict[str, torch.Tensor]:
    dense = block_diagonal(SAE.random(arch, H * DH, H * M, "blocks.1.attn.hook_z", k=k,
                                      seed=seed), H)
    return {n: p.detach() for n, p in dense.named_parameters()}


@pytest.mark.parametrize(("arch", "k"), [("standard", None), ("topk", 12), ("jumprelu", None)])
def test_detected_compacted_and_exact(tmp_path: Path, arch: str, k: int | None) -> None:
    tensors = block_tensors(arch, k=k)
    folder = write_saelens(tmp_path / "bd", arch, tensors, space={"fold_ln": False}, k=k)
    assert formats.detect_format(folder) == "saelens-blockdiag"
    sae = SAE.load(folder)
    assert isinstance(sae, BlockDiagSAE) and sae.cfg.n_heads == H
    assert sae.W_enc_blocks.shape == (H, DH, M) and sae.W_dec_blocks.shape == (H, M, DH)
    assert sum(p.numel() for p in sae.parameters()) < sum(t.numel() for t in tensors.values())
    dense = SAE.load(folder, format="saelens")
    x = torch.randn(3, 5, H, DH, generator=torch.Generator().manual_seed(1))
    a, b = dense.run(x), sae.run(x)
    assert torch.equal(a.acts_post != 0, b.acts_post != 0)
    torch.testing.assert_close(b.acts_post, a.acts_post)
    torch.testing.assert_close(b.recons, a.recons)
    # heads: latents [h*M, (h+1)*M) belong to head h, and only write there
    assert sae.head_of(M * 2 + 5) == 2 and list(sae.features_of(3)) == list(range(3 * M, 4 * M))
    direction = sae.decoder_direction(M + 1).reshape(H, DH)
    assert torch.equal(direction[1], dense.W_dec[M + 1].reshape(H, DH)[1])
    assert not direction[[0, 2, 3]].any()
    # saved back: the same dense matrices (zeros included), and load(save(x)) is exact
    sae.save(tmp_path / "again")
    written = load_file(str(tmp_path / "again" / "sae_weights.safetensors"))
    for name, tensor in tensors.items():
        assert torch.equal(written[name], tensor), name
    back = SAE.load(tmp_path / "again")
    assert isinstance(back, BlockDiagSAE) and back.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_dense_hook_z_folder_stays_dense(tmp_path: Path) -> None:
    sae = SAE.random("standard", H * DH, H * M, "blocks.0.attn.hook_z")
    folder = write_saelens(tmp_path / "d", "standard",
                           {n: p.detach() for n, p in sae.named_parameters()}, space=None)
    assert formats.detect_format(folder) == "saelens"
    assert type(SAE.load(folder)) is SAE
    with pytest.raises(ShapeError, match="not block-diagonal"):
        BlockDiagSAE.from_dense(sae, H)


SPACES = [{"fold_ln": False}, None]  # raw; TL-processed (b_V folded)


@pytest.mark.parametrize("space", SPACES)
def test_splice_all_and_some_heads(tmp_path: Path, models, backend, space: dict | None) -> None:
    sae = SAE.load(write_saelens(tmp_path / "bd", "standard", block_tensors("standard", 5),
                                 space=space), device=backend.device)
    assert isinstance(sae, BlockDiagSAE)
    model, hf = models(*backend), models("hf", backend.device)
    full = assert_splice_agrees(model, hf, [sae], TOKENS, what=f"{backend.name}, all heads")
    some = assert_splice_agrees(model, hf, [sae.splice_heads([1, 3])], TOKENS,
                                what=f"{backend.name}, heads 1 and 3")
    assert logprob_gap(some, full) > CHANGED


@pytest.mark.parametrize("space", SPACES)
def test_some_heads_by_hand(tmp_path: Path, models, space: dict | None) -> None:
    """The subset splice, by hand: a TransformerLens hook (in the SAE's own space) that puts
    the dense SAE's reconstruction into heads 1 and 3 only."""
    sae = SAE.load(write_saelens(tmp_path / "bd", "standard", block_tensors("standard", 5),
                                 space=space))
    some = models("hf").run_with_saes(TOKENS, saes=[sae.splice_heads([1, 3])])
    dense = SAE.load(tmp_path / "bd", format="saelens")
    tl = models("tl-unprocessed" if space else "tl-processed").adapter.model

    def by_hand(z: torch.Tensor, hook: object) -> torch.Tensor:
        out = z.clone()
        out[:, :, [1, 3]] = dense(z)[:, :, [1, 3]]
        return out

    theirs = tl.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.attn.hook_z", by_hand)])
    assert_same_logprobs(theirs, some, "a TransformerLens hook")
    x = torch.randn(4, H, DH, generator=torch.Generator().manual_seed(2))
    out = sae.splice_heads([1, 3])(x)
    assert torch.equal(out[:, [0, 2]], x[:, [0, 2]])
    torch.testing.assert_close(out[:, [1, 3]], sae(x)[:, [1, 3]])
    # latents of every head are still computed (and cached) by a subset splice
    _, cache = models("hf").run_with_cache_with_saes(TOKENS, saes=[sae.splice_heads([0])],
                                                    names=[])
    _, full_cache = models("hf").run_with_cache_with_saes(TOKENS, saes=[sae], names=[])
    key = "blocks.1.attn.hook_z.hook_sae_acts_post"
    torch.testing.assert_close(cache[key], full_cache[key])


# ---- Kissane et al. dense hook_z SAEs ----------------------------------------------------

def write_kissane(folder: Path, layer: int, seed: int = 0) -> Path:
    """``{name}.pt`` (AutoEncoder.state_dict()) beside ``{name}_cfg.json``, as their save()."""
    g = torch.Generator().manual_seed(seed)
    d, f = H * DH, 128
    W_dec = torch.randn(f, d, generator=g)
    sd = {"W_enc": torch.randn(d, f, generator=g) * d ** -0.5,
          "W_dec": W_dec / W_dec.norm(dim=-1, keepdim=True),
          "b_enc": 0.1 * torch.randn(f, generator=g), "b_dec": 0.1 * torch.randn(d, generator=g)}
    name = (f"gpt2-small_L{layer}_Hcat_z_lr1.20e-03_l11.80e+00_ds{f}_bs4096_dc1.00e-06_"
            "rsanthropic_rie25000_nr4_v9")
    folder.mkdir(parents=True)
    torch.save(sd, folder / f"{name}.pt")
    cfg = {"seed": 49, "batch_size": 4096, "buffer_mult": 384, "lr": 0.0012,
           "num_tokens": 2000000000, "l1_coeff": 1.8, "beta1": 0.9, "beta2": 0.99,
           "dict_mult": 32, "seq_len": 128, "enc_dtype": "fp32", "model_name": "gpt2-small",
           "site": "z", "layer": layer, "device": "cuda", "reinit": "reinit", "head": "cat",
           "concat_heads": True, "resample_scheme": "anthropic", "anthropic_neuron_resample_scale":
           0.2, "dead_direction_cutoff": 1e-06, "re_init_every": 25000, "anthropic_resample_last":
           12500, "l1_coeff_v2": 0.0, "act_name": f"blocks.{layer}.attn.hook_z",
           "act_size": d, "dict_size": f, "name": name}
    (folder / f"{name}_cfg.json").write_text(json.dumps(cfg))
    return folder / f"{name}.pt"


def test_kissane_math(tmp_path: Path) -> None:
    path = write_kissane(tmp_path / "k", layer=1, seed=3)
    assert formats.detect_format(path) == "kissane"
    assert formats.detect_format(path.parent) == "kissane"
    sae = SAE.load(path.parent)
    assert type(sae) is SAE and sae.cfg.hook_name == "blocks.1.attn.hook_z"
    assert sae.cfg.is_hook_z and sae.cfg.activation_space.name == "tl-processed"
    sd = torch.load(path, weights_only=True)
    x = torch.randn(5, H * DH, generator=torch.Generator().manual_seed(4))
    acts = torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])  # their forward
    torch.testing.assert_close(sae(x), acts @ sd["W_dec"] + sd["b_dec"])
    assert_round_trip(sae, tmp_path / "converted")


def test_kissane_splice_agrees(tmp_path: Path, models, backend) -> None:
    sae = SAE.load(write_kissane(tmp_path / "k", layer=1, seed=3).parent, device=backend.device)
    assert_splice_agrees(models(*backend), models("hf", backend.device), [sae], TOKENS,
                         what=backend.name, latents=True)
