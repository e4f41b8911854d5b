"""TransformerLens 4.x, where HookedTransformer is gone and TransformerBridge is the only
model class. ``.ci/run`` runs this file and tests/test_bridge.py in a second environment
pinned by constraints-tl4.txt (``SAEBRIDGE_EXPECT_TL_MAJOR=4``); under TransformerLens 3.x
the 4.x-only checks are skipped with a reason."""

from __future__ import annotations

import importlib
import os
from importlib.metadata import version

import pytest
import torch

import saebridge as sb
from saebridge.errors import BackendNotInstalledError
from saebridge.tiny import tiny_gpt2, tiny_tokenizer
from saebridge.tolerance import logprob_atol

TL_VERSION = version("transformer-lens")
TL_MAJOR = int(TL_VERSION.split(".")[0])
tl4_only = pytest.mark.skipif(TL_MAJOR < 4, reason=f"TransformerLens {TL_VERSION} is 3.x")


def test_the_environment_is_the_one_ci_asked_for():
    expected = os.environ.get("SAEBRIDGE_EXPECT_TL_MAJOR")
    if expected is None:
        pytest.skip("SAEBRIDGE_EXPECT_TL_MAJOR not set (only .ci/run's TL 4 step sets it)")
    assert TL_MAJOR == int(expected), f"TransformerLens {TL_VERSION} installed"


def test_saebridge_and_both_tl_adapters_import():
    for module in ("saebridge", "saebridge.adapters.transformer_lens",
                   "saebridge.adapters.tl_bridge"):
        importlib.import_module(module)


@tl4_only
def test_asking_for_a_hooked_transformer_names_the_version():
    from saebridge.adapters.transformer_lens import from_hf

    model, tok = tiny_gpt2(tokenizer=tiny_tokenizer())
    with pytest.raises(BackendNotInstalledError) as err:
        from_hf(model, tokenizer=tok)
    message = str(err.value)
    assert f"TransformerLens {TL_VERSION}" in message
    assert "bridge_from_hf" in message
    with pytest.raises(ImportError):  # the builtin a caller would catch still catches it
        from_hf(model)


def test_bridge_splice_matches_hf_under_this_transformer_lens():
    from saebridge.adapters.tl_bridge import bridge_from_hf

    hf, tok = tiny_gpt2(tokenizer=tiny_tokenizer())
    sae = sb.SAE.random("topk", 64, 32, "blocks.1.hook_resid_post", k=4, seed=3,
                        activation_space="tl-processed")
    ref = sb.wrap(hf, tokenizer=tok)
    tokens = ref.to_tokens("Hello world, hello model")
    want = ref.run_with_saes(tokens, [sae]).log_softmax(-1)
    for compat in (False, True):
        bridge = sb.wrap(bridge_from_hf(hf, compatibility_mode=compat), tokenizer=tok)
        got = bridge.run_with_saes(tokens, [sae]).log_softmax(-1)
        assert (got - want).abs().max() <= logprob_atol(torch.float32)
