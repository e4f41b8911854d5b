"""Gemma Scope params.npz files in the release's folder layout, written here with numpy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from saebridge import formats
from saebridge.errors import ModelMismatchWarning, SAEFormatError, UnknownHookError
from saebridge.sae import SAE
from saebridge.testing import assert_round_trip
from tests.parity import assert_splice_agrees

pytestmark = pytest.mark.filterwarnings(f"ignore::{ModelMismatchWarning.__module__}."
                                        f"{ModelMismatchWarning.__name__}")


def params(d_in: int, d_sae: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    W_dec = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    return {"W_enc": (rng.standard_normal((d_in, d_sae)) * d_in ** -0.5).astype(np.float32),
            "W_dec": W_dec / np.linalg.norm(W_dec, axis=-1, keepdims=True),
            "b_enc": (0.1 * rng.standard_normal(d_sae)).astype(np.float32),
            "b_dec": (0.1 * rng.standard_normal(d_in)).astype(np.float32),
            "threshold": (0.3 * rng.random(d_sae)).astype(np.float32)}


def write(root: Path, release: str, inner: str, arrays: dict[str, np.ndarray]) -> Path:
    """``{release}/{inner}/params.npz`` as in google/gemma-scope-* repositories."""
    folder = root / release / inner
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **arrays)
    return folder / "params.npz"


def reference(p: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """The Gemma Scope tutorial's JumpReLUSAE.forward."""
    t = {k: torch.from_numpy(v) for k, v in p.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    acts = (pre > t["threshold"]) * torch.relu(pre)
    return acts @ t["W_dec"] + t["b_dec"]


def test_math_and_release_sites(tmp_path: Path) -> None:
    p = params(16, 40)
    file = write(tmp_path, "gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71", p)
    assert formats.detect_format(file) == "gemma_scope"
    assert formats.detect_format(file.parent) == "gemma_scope"
    sae = SAE.load(file.parent)
    c = sae.cfg
    assert (c.architecture, c.hook_name, c.model_name) == (
        "jumprelu", "blocks.20.hook_resid_post", "gemma-2-2b")
    assert not c.apply_b_dec_to_input and c.activation_space.name == "hf"
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sae(x), reference(p, x))
    assert_round_trip(sae, tmp_path / "converted")
    cases = {("gemma-scope-9b-it-mlp", "layer_3/width_131k/average_l0_12"):
             "blocks.3.hook_mlp_out",
             ("gemma-scope-2b-pt-att", "layer_5/width_16k/average_l0_40"): "blocks.5.attn.hook_z",
             ("gemma-scope-2b-pt-res-canonical", "layer_7/width_16k/canonical"):
             "blocks.7.hook_resid_post",
             ("models--google--gemma-scope-2b-pt-mlp", "snapshots/0a1b/layer_0/width_16k/"
              "average_l0_10"): "blocks.0.hook_mlp_out"}
    for (release, inner), hook in cases.items():
        cfg = formats.read_config(write(tmp_path, release, inner, params(16, 40)))
        assert cfg.hook_name == hook
        assert cfg.is_hook_z == hook.endswith("hook_z")


def test_embedding_sae_is_rescaled(tmp_path: Path) -> None:
    p = params(16, 32)
    sae = SAE.load(write(tmp_path, "gemma-scope-2b-pt-res", "embedding/width_4k/average_l0_6",
                         p))
    assert sae.cfg.hook_name == "hook_embed"
    # trained on unscaled embeddings; the canonical hook_embed is scaled by sqrt(d_model)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sae(x), reference(p, x / math.sqrt(16)) * math.sqrt(16))


def test_site_outside_the_release_layout(tmp_path: Path) -> None:
    file = tmp_path / "downloads" / "params.npz"
    file.parent.mkdir()
    np.savez(file, **params(16, 24))
    with pytest.raises(UnknownHookError, match="hook_name="):
        SAE.load(file)
    assert SAE.load(file, hook_name="blocks.0.hook_resid_pre").cfg.hook_name \
        == "blocks.0.hook_resid_pre"
    cfg = formats.read_config(file, hook_name="blocks.1.attn.hook_z")
    assert cfg.is_hook_z and (cfg.d_in, cfg.d_sae) == (16, 24)


def test_reads_no_weights_for_config(tmp_path: Path) -> None:
    """read_config needs only the .npy headers: a file whose array data is cut off still
    gives its config, while loading it fails."""
    file = write(tmp_path, "gemma-scope-2b-pt-res", "layer_1/width_16k/average_l0_5",
                 params(16, 24))
    import zipfile
    trimmed = file.with_name("trimmed.npz")
    with zipfile.ZipFile(file) as src, zipfile.ZipFile(trimmed, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name)[:128])  # the header and a little data
    file.unlink()
    trimmed.rename(file)
    cfg = formats.read_config(file)
    assert (cfg.d_in, cfg.d_sae, cfg.hook_name) == (16, 24, "blocks.1.hook_resid_post")
    with pytest.raises(SAEFormatError, match="npz"):
        SAE.load(file)


@pytest.mark.parametrize(("release", "layer", "hook"), [
    ("gemma-scope-2b-pt-res", 1, "hook_resid_post"), ("gemma-scope-2b-pt-mlp", 0,
                                                       "hook_mlp_out"),
    ("gemma-scope-2b-pt-att", 1, "attn.hook_z")])
def test_splice_agrees_across_backends(tmp_path: Path, models, backend, release: str,
                                       layer: int, hook: str) -> None:
    sae = SAE.load(write(tmp_path, release, f"layer_{layer}/width_16k/average_l0_9",
                         params(64, 96, seed=layer + 3)), device=backend.device)
    assert sae.cfg.hook_name == f"blocks.{layer}.{hook}"
    tokens = torch.randint(1, 384, (2, 7), generator=torch.Generator().manual_seed(0))
    assert_splice_agrees(models(*backend), models("hf", backend.device), [sae], tokens,
                         what=backend.name)
