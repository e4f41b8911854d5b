"""OpenAI sparse_autoencoder / Transformer Debugger files, written as their code writes them."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from saebridge import formats
from saebridge.errors import ModelMismatchWarning, SAEFormatError, UnknownHookError
from saebridge.formats import openai
from saebridge.sae import SAE
from saebridge.testing import assert_round_trip
from tests.parity import assert_splice_agrees

pytestmark = pytest.mark.filterwarnings(f"ignore::{ModelMismatchWarning.__module__}."
                                        f"{ModelMismatchWarning.__name__}")


def openai_state_dict(d_in: int, n_latents: int, *, topk: int | None = None, seed: int = 0
                      ) -> OrderedDict:
    """``Autoencoder.state_dict()`` of openai/sparse_autoencoder, key for key and in order
    (parameters, buffers, then children; TopK's own state_dict leaks ``activation.k`` and
    ``activation.postact_fn`` into the top level; then ``activation`` and its state)."""
    gen = torch.Generator().manual_seed(seed)
    dec = torch.randn(d_in, n_latents, generator=gen)
    sd = OrderedDict()
    sd["pre_bias"] = 0.2 * torch.randn(d_in, generator=gen)
    sd["latent_bias"] = 0.1 * torch.randn(n_latents, generator=gen)
    sd["stats_last_nonzero"] = torch.randint(0, 50, (n_latents,), generator=gen)
    sd["latents_activation_frequency"] = torch.rand(n_latents, generator=gen)
    sd["latents_mean_square"] = torch.rand(n_latents, generator=gen)
    sd["encoder.weight"] = torch.randn(n_latents, d_in, generator=gen) * d_in ** -0.5
    if topk is not None:
        sd["activation.k"] = topk
        sd["activation.postact_fn"] = "ReLU"
    sd["decoder.weight"] = dec / dec.norm(dim=0, keepdim=True)
    sd["activation"] = "TopK" if topk is not None else "ReLU"
    sd["activation_state_dict"] = ({"k": topk, "postact_fn": "ReLU"} if topk is not None
                                   else OrderedDict())
    return sd


def write(root: Path, location: str, layer: int, sd: dict) -> Path:
    """``{location}/autoencoders/{layer}.pt``, the published layout."""
    path = root / location / "autoencoders" / f"{layer}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def reference(sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Their Autoencoder.forward, written out: (latents, reconstruction)."""
    topk = sd["activation"] == "TopK"
    mu = std = None
    if topk:  # normalize=True for TopK files: their LN, eps added to the (unbiased) std
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    pre = (x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    if topk:
        top = pre.topk(sd["activation_state_dict"]["k"], dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:
        latents = pre.relu()
    recons = latents @ sd["decoder.weight"].T + sd["pre_bias"]
    return latents, recons * std + mu if topk else recons


@pytest.mark.parametrize("topk", [None, 6])
def test_math_matches_their_forward(tmp_path: Path, topk: int | None) -> None:
    sd = openai_state_dict(16, 48, topk=topk)
    path = write(tmp_path, "resid_delta_mlp_v5_32k" if topk else "mlp_post_act", 3, sd)
    assert formats.detect_format(path) == "openai"
    sae = SAE.load(path)
    c = sae.cfg
    assert c.architecture == ("topk" if topk else "standard") and c.k == topk
    assert c.hook_name == ("blocks.3.hook_mlp_out" if topk else "blocks.3.mlp.hook_post")
    assert c.normalize_activations == ("layer_norm" if topk else "none")
    assert c.activation_space.name == "hf" and c.apply_b_dec_to_input
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
    latents, recons = reference(sd, x)
    torch.testing.assert_close(sae.encode(x), latents)
    torch.testing.assert_close(sae(x), recons)
    assert_round_trip(sae, tmp_path / "converted")


def test_locations_and_versions(tmp_path: Path) -> None:
    sites = {"mlp_post_act": "mlp.hook_post", "resid_delta_attn_v4": "hook_attn_out",
             "resid_post_attn_v5_128k": "hook_resid_mid", "resid_delta_mlp": "hook_mlp_out",
             "resid_post_mlp_v5_32k": "hook_resid_post"}
    for i, (location, site) in enumerate(sites.items()):
        path = write(tmp_path, location, 7 + i, openai_state_dict(8, 16))
        assert formats.read_config(path).hook_name == f"blocks.{7 + i}.{site}"


def test_tied_decoder_and_legacy_keys(tmp_path: Path) -> None:
    sd = openai_state_dict(8, 16)
    sd["decoder.linear.weight"] = sd.pop("decoder.weight").T.clone()  # TiedTranspose child
    sae = SAE.load(write(tmp_path, "mlp_post_act", 0, sd))
    assert torch.equal(sae.W_dec, sd["decoder.linear.weight"])


def test_site_needs_the_path_or_hook_name(tmp_path: Path) -> None:
    path = tmp_path / "my_sae.pt"
    torch.save(openai_state_dict(8, 16), path)
    with pytest.raises(UnknownHookError, match="hook_name="):
        SAE.load(path)
    sae = SAE.load(path, hook_name="blocks.1.hook_resid_pre")
    assert sae.cfg.hook_name == "blocks.1.hook_resid_pre"
    assert formats.read_config(path, hook_name="blocks.1.hook_mlp_out").d_sae == 16


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_only_weights_only_unpickling(tmp_path: Path) -> None:
    path = write(tmp_path, "mlp_post_act", 0, {**openai_state_dict(8, 16), "x": _Evil()})
    with pytest.raises(SAEFormatError, match="weights_only"):
        openai.load(path)
    assert not openai.detect(path)


@pytest.mark.parametrize(("location", "d_in", "topk"), [
    ("mlp_post_act", 256, None), ("resid_delta_mlp_v4", 64, None),
    ("resid_post_mlp_v5_32k", 64, 8), ("resid_delta_attn_v5_32k", 64, 8)])
def test_splice_agrees_across_backends(tmp_path: Path, models, backend, location: str,
                                       d_in: int, topk: int | None) -> None:
    """Raw-space SAEs: processed backends (centred resid/attn_out/mlp_out) must agree too,
    in log-probs and latents."""
    sae = SAE.load(write(tmp_path, location, 1, openai_state_dict(d_in, 96, topk=topk, seed=3)),
                   device=backend.device)
    tokens = torch.randint(1, 384, (2, 7), generator=torch.Generator().manual_seed(0))
    assert_splice_agrees(models(*backend), models("hf", backend.device), [sae], tokens,
                         what=backend.name, latents=True)
