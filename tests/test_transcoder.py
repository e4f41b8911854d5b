"""Transcoders: the class, SAELens transcoder folders, and splicing (read one site, write
another) on every backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import saebridge as sb
from saebridge import formats
from saebridge.errors import SAEConfigError, UnknownHookError
from saebridge.sae.transcoder import Transcoder, TranscoderConfig
from tests.parity import assert_same_logprobs, assert_splice_agrees

TOKENS = torch.randint(1, 384, (2, 7), generator=torch.Generator().manual_seed(0))


def test_config_rules() -> None:
    base = dict(architecture="standard", d_in=4, d_sae=8, hook_name="blocks.0.hook_resid_pre",
                hook_name_out="blocks.0.hook_resid_post", apply_b_dec_to_input=False)
    assert TranscoderConfig(**base, d_out=6).d_out == 6
    with pytest.raises(SAEConfigError, match="apply_b_dec_to_input"):
        TranscoderConfig(**{**base, "apply_b_dec_to_input": True}, d_out=6)
    with pytest.raises(SAEConfigError, match="normalize_activations"):
        TranscoderConfig(**base, d_out=4, normalize_activations="layer_norm")
    with pytest.raises(SAEConfigError, match="hook_normalized"):
        TranscoderConfig(**base, d_out=4, input_affine="ln2")
    with pytest.raises(SAEConfigError, match="d_out"):
        TranscoderConfig(**base, d_out=0)


@pytest.mark.parametrize(("arch", "skip"), [("standard", True), ("jumprelu", False),
                                            ("topk", True)])
def test_math(arch: str, skip: bool) -> None:
    tc = Transcoder.random(arch, 8, 32, 5, "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post",
                           k=4 if arch == "topk" else None, skip=skip, seed=1)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    pre = x @ tc.W_enc + tc.b_enc  # no b_dec: it lives in the output space
    if arch == "topk":
        top = pre.topk(4, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    elif arch == "jumprelu":
        acts = pre.relu() * (pre > tc.threshold)
    else:
        acts = pre.relu()
    expected = acts @ tc.W_dec + tc.b_dec + (x @ tc.W_skip.T if skip else 0)
    torch.testing.assert_close(tc(x), expected)
    torch.testing.assert_close(tc.encode(x), acts)
    assert tc(x).shape == (3, 5)


@given(arch=st.sampled_from(["standard", "jumprelu", "topk"]), skip=st.booleans(),
       affine=st.booleans(), seed=st.integers(0, 1000))
def test_saelens_round_trip_is_exact(tmp_path_factory: pytest.TempPathFactory, arch: str,
                                     skip: bool, affine: bool, seed: int) -> None:
    hook = "blocks.1.ln2.hook_normalized" if affine else "blocks.1.hook_resid_mid"
    tc = Transcoder.random(arch, 6, 12, 6, hook, "blocks.1.hook_mlp_out", skip=skip,
                           k=3 if arch == "topk" else None, seed=seed,
                           input_affine="ln2" if affine else None, activation_space="hf",
                           metadata={"context_size": 64})
    folder = tmp_path_factory.mktemp("tc")
    tc.save(folder)
    assert formats.detect_format(folder) == "saelens-transcoder"
    raw = json.loads((folder / "cfg.json").read_text())
    assert raw["d_out"] == 6 and raw["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    back = sb.SAE.load(folder)
    assert isinstance(back, Transcoder) and back.cfg == tc.cfg
    for name, tensor in tc.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_reads_a_saelens_skip_transcoder_folder(tmp_path: Path) -> None:
    """A folder as SAELens 6 saves a JumpReLUSkipTranscoder."""
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(8, 16, generator=g), "b_enc": torch.randn(16, generator=g),
         "W_dec": torch.randn(16, 8, generator=g), "b_dec": torch.randn(8, generator=g),
         "threshold": torch.rand(16, generator=g), "W_skip": torch.randn(8, 8, generator=g)}
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"d_in": 8, "d_sae": 16, "d_out": 8, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none",
           "reshape_activations": "none", "architecture": "jumprelu_skip_transcoder",
           "metadata": {"sae_lens_version": "6.20.0", "model_name": "gemma-2-2b",
                        "hook_name": "blocks.3.ln2.hook_normalized",
                        "hook_name_out": "blocks.3.hook_mlp_out", "hook_head_index": None,
                        "hook_head_index_out": None, "prepend_bos": True}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    tc = sb.SAE.load(tmp_path)
    assert isinstance(tc, Transcoder) and tc.cfg.architecture == "jumprelu" and tc.cfg.skip
    assert tc.cfg.metadata["hook_head_index_out"] is None
    x = torch.randn(2, 8, generator=g)
    pre = x @ t["W_enc"] + t["b_enc"]
    acts = pre.relu() * (pre > t["threshold"])
    torch.testing.assert_close(tc(x), acts @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T)
    assert sb.inspect(tmp_path).hook_name_out == "blocks.3.hook_mlp_out"


@pytest.mark.parametrize(("hook_in", "hook_out", "affine", "space"), [
    ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", "ln2", "hf"),
    ("blocks.0.ln1.hook_normalized", "blocks.0.hook_attn_out", "ln1", "hf"),
    ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", None, "tl-processed"),
    ("blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", None, "hf")])
def test_splice_agrees_across_backends(models, backend, hook_in: str, hook_out: str,
                                       affine: str | None, space: str) -> None:
    tc = Transcoder.random("topk", 64, 128, 64, hook_in, hook_out, k=8, skip=True,
                           input_affine=affine, activation_space=space, seed=3
                           ).to(backend.device)
    model = models(*backend)
    assert_splice_agrees(model, models("hf", backend.device), [tc], TOKENS, what=backend.name,
                         latents=True)
    # the error term gives the clean model back
    assert_same_logprobs(model.run_with_saes(TOKENS, saes=[tc], use_error_term=True),
                         model(TOKENS), f"{backend.name} with the error term")


def test_attached_and_steered(models) -> None:
    tc = Transcoder.random("standard", 64, 96, 64, "blocks.0.hook_resid_pre",
                           "blocks.0.hook_mlp_out", activation_space="hf", seed=4)
    m = models("tl-processed")
    with m.saes([tc]):
        attached = m(TOKENS)
    torch.testing.assert_close(attached, m.run_with_saes(TOKENS, saes=[tc]))
    steer = sb.Steer.from_sae(tc, 5, coef=3.0)
    assert steer.hook == "blocks.0.hook_mlp_out"  # a transcoder's latents write there
    assert torch.equal(steer.vector, tc.W_dec[5])


def test_unsupported_uses_fail_clearly(models) -> None:
    backwards = Transcoder.random("standard", 64, 32, 64, "blocks.1.hook_resid_pre",
                                  "blocks.0.hook_mlp_out")
    with pytest.raises(UnknownHookError, match="ran before its input site"):
        models("hf").run_with_saes(TOKENS, saes=[backwards])
    tc = Transcoder.random("standard", 64, 32, 64, "blocks.0.hook_resid_pre",
                           "blocks.0.hook_mlp_out")
    with pytest.raises(SAEConfigError, match="Ablate of a transcoder"):
        models("hf").run_with_interventions(TOKENS, [sb.Ablate(tc, [1])])
