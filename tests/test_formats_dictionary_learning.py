"""dictionary_learning folders (ae.pt + config.json) for every dictionary class, written here
as its trainers save them (``torch.save(ae.state_dict())`` and ``{"trainer", "buffer"}``)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from saebridge import formats
from saebridge.errors import ModelMismatchWarning, SAEConfigError, SAEFormatError
from saebridge.sae import SAE
from saebridge.testing import assert_round_trip
from tests.parity import assert_splice_agrees

pytestmark = pytest.mark.filterwarnings(f"ignore::{ModelMismatchWarning.__module__}."
                                        f"{ModelMismatchWarning.__name__}")
CLASSES = ("AutoEncoder", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
           "BatchTopKSAE", "MatryoshkaBatchTopKSAE")


def state_dict(dict_class: str, D: int, F: int, seed: int = 0) -> OrderedDict:
    """``ae.state_dict()`` of each class: nn.Linear weights are [out, in]; buffers as
    registered (TopK/BatchTopK/Matryoshka keep ``k`` and a scalar ``threshold``)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, s: float = 0.1) -> torch.Tensor:
        return s * torch.randn(*shape, generator=g)

    enc_FD = r(F, D, s=D ** -0.5)
    dec_DF = torch.randn(D, F, generator=g)
    dec_DF = dec_DF / dec_DF.norm(dim=0) * (0.5 + torch.rand(F, generator=g))  # non-unit
    sd = OrderedDict()
    if dict_class == "AutoEncoder":
        sd.update({"bias": r(D), "encoder.weight": enc_FD, "encoder.bias": r(F),
                   "decoder.weight": dec_DF})
    elif dict_class == "GatedAutoEncoder":
        sd.update({"decoder_bias": r(D), "encoder.weight": enc_FD, "r_mag": r(F),
                   "gate_bias": r(F), "mag_bias": r(F), "decoder.weight": dec_DF})
    elif dict_class == "JumpReluAutoEncoder":
        sd.update({"W_enc": enc_FD.T.clone(), "b_enc": r(F), "W_dec": dec_DF.T.clone(),
                   "b_dec": r(D), "threshold": 0.2 * torch.rand(F, generator=g)})
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        unit = dec_DF / dec_DF.norm(dim=0)
        sd.update({"k": torch.tensor(6), "threshold": torch.tensor(0.15),
                   "encoder.weight": enc_FD, "encoder.bias": r(F), "decoder.weight": unit,
                   "b_dec": r(D)})
    else:  # MatryoshkaBatchTopKSAE
        sd.update({"k": torch.tensor(6, dtype=torch.int), "threshold": torch.tensor(0.15),
                   "group_sizes": torch.tensor([F // 4, F - F // 4]),
                   "W_enc": enc_FD.T.clone(), "b_enc": r(F),
                   "W_dec": (dec_DF / dec_DF.norm(dim=0)).T.clone(), "b_dec": r(D)})
    return sd


def write(folder: Path, dict_class: str, sd: dict, *, submodule: str | None = "resid_post_layer_1"
          ) -> Path:
    folder.mkdir(parents=True)
    torch.save(sd, folder / "ae.pt")
    D, F = (sd["W_enc"].shape if "W_enc" in sd else sd["encoder.weight"].T.shape)
    trainer = {"trainer_class": dict_class.replace("AutoEncoder", "") + "Trainer",
               "dict_class": dict_class, "lr": 1e-4, "steps": 1000, "seed": 0,
               "activation_dim": int(D), "dict_size": int(F), "device": "cuda:0", "layer": 1,
               "lm_name": "EleutherAI/pythia-70m-deduped", "wandb_name": dict_class}
    if "k" in sd:
        trainer["k"] = int(sd["k"])
    if submodule is not None:
        trainer["submodule_name"] = submodule
    config = {"trainer": trainer, "buffer": {"d_submodule": int(D), "io": "out",
                                             "n_ctx": 128, "refresh_batch_size": 512}}
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    return folder


def reference(dict_class: str, sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's encode/decode written out: (latents, reconstruction); AutoEncoder's
    latents as ``load_dictionary`` gives them (decoder normalised)."""
    if dict_class == "AutoEncoder":
        f = torch.relu((x - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        return f * sd["decoder.weight"].norm(dim=0), f @ sd["decoder.weight"].T + sd["bias"]
    if dict_class == "GatedAutoEncoder":
        x_enc = (x - sd["decoder_bias"]) @ sd["encoder.weight"].T
        f = (x_enc + sd["gate_bias"] > 0) * torch.relu(sd["r_mag"].exp() * x_enc
                                                        + sd["mag_bias"])
        return f, f @ sd["decoder.weight"].T + sd["decoder_bias"]
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ sd["W_enc"] + sd["b_enc"]
        f = torch.relu(pre * (pre > sd["threshold"]))
        return f, f @ sd["W_dec"] + sd["b_dec"]
    if dict_class == "AutoEncoderTopK":
        post = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        top = post.topk(int(sd["k"]), sorted=False, dim=-1)
        f = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
        return f, f @ sd["decoder.weight"].T + sd["b_dec"]
    if dict_class == "BatchTopKSAE":  # encode(use_threshold=True), the inference default
        post = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        f = post * (post > sd["threshold"])
        return f, f @ sd["decoder.weight"].T + sd["b_dec"]
    post = torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
    f = post * (post > sd["threshold"])
    return f, f @ sd["W_dec"] + sd["b_dec"]


@pytest.mark.parametrize("dict_class", CLASSES)
def test_math_matches_each_class(tmp_path: Path, dict_class: str) -> None:
    sd = state_dict(dict_class, 16, 40)
    folder = write(tmp_path / "ae", dict_class, sd)
    assert formats.detect_format(folder) == "dictionary_learning"
    sae = SAE.load(folder)
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.model_name == "EleutherAI/pythia-70m-deduped"
    assert sae.cfg.activation_space.name == "hf"
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(4))
    latents, recons = reference(dict_class, sd, x)
    torch.testing.assert_close(sae.encode(x), latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x), recons, atol=1e-5, rtol=1e-5)
    assert formats.read_config(folder) == sae.cfg
    assert_round_trip(sae, tmp_path / "converted")


def test_site_from_folder_name_and_override(tmp_path: Path) -> None:
    for name, site in {"resid_0": "blocks.0.hook_resid_post", "attn_1": "blocks.1.hook_attn_out",
                       "mlp_1": "blocks.1.hook_mlp_out", "embed": "hook_embed"}.items():
        folder = write(tmp_path / name, "AutoEncoder", state_dict("AutoEncoder", 8, 16),
                       submodule=None)
        assert formats.read_config(folder).hook_name == site
    folder = write(tmp_path / "x" / "trainer_0", "AutoEncoder",
                   state_dict("AutoEncoder", 8, 16), submodule=None)
    with pytest.raises(KeyError, match="hook_name="):
        SAE.load(folder)
    assert SAE.load(folder, hook_name="blocks.0.hook_mlp_out").cfg.hook_name \
        == "blocks.0.hook_mlp_out"


def test_unsupported_and_incomplete(tmp_path: Path) -> None:
    sd = state_dict("AutoEncoder", 8, 16)
    folder = write(tmp_path / "a", "CrossCoder", sd)
    with pytest.raises(SAEConfigError, match="CrossCoder"):
        SAE.load(folder)
    old = state_dict("BatchTopKSAE", 8, 16)
    del old["threshold"]  # saved before dictionary_learning learned an inference threshold
    with pytest.raises(SAEFormatError, match="threshold"):
        SAE.load(write(tmp_path / "b", "BatchTopKSAE", old))


@pytest.mark.parametrize("dict_class", CLASSES)
def test_splice_agrees_across_backends(tmp_path: Path, models, backend, dict_class: str
                                       ) -> None:
    sae = SAE.load(write(tmp_path / "ae", dict_class, state_dict(dict_class, 64, 96, seed=9)),
                   device=backend.device)
    tokens = torch.randint(1, 384, (2, 7), generator=torch.Generator().manual_seed(0))
    assert_splice_agrees(models(*backend), models("hf", backend.device), [sae], tokens,
                         what=backend.name)
