"""The common front: stateless runs, stateful SAEs, tokens, caches, exception safety."""

from __future__ import annotations

import pytest
import torch

import saebridge as sb
from saebridge.errors import ShapeError, TokensError, UnknownHookError
from saebridge.testing import RaiseAt, hooks_left, torch_module
from tests.parity import assert_changed, assert_same_logprobs


@pytest.fixture
def sae(backend):
    return sb.SAE.random("standard", 64, 128, "blocks.0.hook_resid_post", seed=3,
                         activation_space="tl-processed").to(backend.device)


def test_run_with_saes_is_stateless(model, sae):
    tokens = model.to_tokens("Hello world, hello SAE")
    before, hooks = model(tokens), hooks_left(model)
    spliced = model.run_with_saes(tokens, saes=[sae])
    assert_changed(spliced, before, "the splice")
    assert torch.equal(model(tokens), before)
    assert hooks_left(model) == hooks


def test_add_sae_reset_and_context_manager(model, sae):
    tokens = model.to_tokens("Hello world")
    clean, spliced = model(tokens), model.run_with_saes(tokens, saes=[sae])
    model.add_sae(sae)
    try:
        assert torch.allclose(model(tokens), spliced, atol=1e-6)
    finally:
        model.reset_saes()
    assert torch.equal(model(tokens), clean)
    with pytest.raises(RuntimeError, match="boom"), model.saes([sae]):
        assert torch.allclose(model(tokens), spliced, atol=1e-6)
        raise RuntimeError("boom")
    assert torch.equal(model(tokens), clean)


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z",
                                  "blocks.1.hook_resid_mid", "ln_final.hook_normalized"])
def test_exception_mid_forward_leaves_no_state(model, sae, hook):
    tokens = model.to_tokens("Hello world")
    before, hooks = model(tokens), hooks_left(model)
    params = {k: v.clone() for k, v in torch_module(model).state_dict().items()}
    with pytest.raises(RuntimeError, match="mid-forward"):
        failing = RaiseAt(hook, RuntimeError("user code failed mid-forward"))
        model.run_with_interventions(tokens, [sb.Steer.from_sae(sae, 0), failing])
    assert hooks_left(model) == hooks
    assert torch.equal(model(tokens), before)
    for k, v in torch_module(model).state_dict().items():
        assert torch.equal(v, params[k]), k


def test_tokens_are_validated(model):
    with pytest.raises(TokensError, match="out of the vocabulary"):
        model(torch.tensor([[0, 10_000]]))
    with pytest.raises(TokensError, match="integer ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(TokensError, match="batch, pos"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError):  # the builtin catches it too
        model(torch.zeros(1, 2, 3, dtype=torch.long))


def test_one_bos_policy_for_every_backend(models, model, backend, tokenizer):
    hf = models("hf", backend.device)
    tokens = model.to_tokens("Hello world")
    assert torch.equal(tokens, hf.to_tokens("Hello world"))
    assert tokens[0, 0].item() == tokenizer.bos_token_id
    assert_same_logprobs(model("Hello world"), hf("Hello world"), backend.name)


def test_transformer_lens_own_bos_policy_agrees(models):
    tl = models("tl-processed").adapter.model
    assert torch.equal(tl.to_tokens("Hello world"), models("hf").to_tokens("Hello world"))


def test_cache_with_saes_has_saelens_keys(model, sae):
    _, cache = model.run_with_cache_with_saes("Hello world", saes=[sae],
                                              names=["blocks.0.hook_resid_post"])
    hook = sae.cfg.hook_name
    for key in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
                "hook_sae_error", "hook_sae_output"):
        assert f"{hook}.{key}" in cache
    assert cache[f"{hook}.hook_sae_acts_post"].shape[-1] == 128
    # The hook's own value is what the model goes on with: the reconstruction, as a
    # processed TransformerLens model (the canonical space, the SAE's too) holds it — with
    # the mean the reconstruction wrote, not re-centred.
    out = cache[f"{hook}.hook_sae_output"]
    torch.testing.assert_close(cache[hook], out, atol=1e-5, rtol=0)
    with pytest.raises(UnknownHookError, match="Nearest valid"):
        cache[f"{hook}.hook_sae_act_post"]


def test_errors_before_the_forward(model):
    hooks = hooks_left(model)
    bad = sb.SAE.random("standard", 64, 16, "blocks.0.hook_resid_pree")
    with pytest.raises(UnknownHookError, match=r"blocks\.0\.hook_resid_pre"):
        model.run_with_saes("Hello", saes=[bad])
    with pytest.raises(UnknownHookError):
        model.add_sae(bad)
    assert model.attached == []
    wide = sb.SAE.random("standard", 32, 16, "blocks.0.hook_resid_pre")
    with pytest.raises(ShapeError, match=r"d_in=32.*width 64"):
        model.run_with_saes("Hello", saes=[wide])
    assert hooks_left(model) == hooks


def test_wrap_refuses_unknown_objects():
    with pytest.raises(sb.errors.UnsupportedArchitectureError, match="Supported"):
        sb.wrap(torch.nn.Linear(2, 2))
