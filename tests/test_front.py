"""The common front: stateless runs, stateful SAEs, tokens, caches, exception safety."""

from __future__ import annotations

import pytest
import torch

import saebridge as sb
from saebridge.errors import ShapeError, TokensError, UnknownHookError
from saebridge.testing import RaiseAt, hooks_left

BACKENDS = ["hf", "tl-processed", "tl-unprocessed"]


@pytest.fixture
def sae():
    return sb.SAE.random("standard", 64, 128, "blocks.0.hook_resid_post", seed=3,
                         activation_space="tl-processed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_with_saes_is_stateless(models, sae, backend):
    model = models(backend)
    tokens = model.to_tokens("Hello world, hello SAE")
    before = model(tokens)
    spliced = model.run_with_saes(tokens, saes=[sae])
    assert (spliced - before).abs().max() > 1e-3  # the splice did something
    assert torch.equal(model(tokens), before)
    assert hooks_left(model) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_sae_reset_and_context_manager(models, sae, backend):
    model = models(backend)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z",
                                  "blocks.1.hook_resid_mid", "ln_final.hook_normalized"])
def test_exception_mid_forward_leaves_no_state(models, sae, backend, hook):
    model = models(backend)
    tokens = model.to_tokens("Hello world")
    before = model(tokens)
    params = {k: v.clone() for k, v in model.adapter.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="mid-forward"):
        failing = RaiseAt(hook, RuntimeError("user code failed mid-forward"))
        model.run_with_interventions(tokens, [sb.Steer.from_sae(sae, 0), failing])
    assert hooks_left(model) == 0
    assert torch.equal(model(tokens), before)
    for k, v in model.adapter.model.state_dict().items():
        assert torch.equal(v, params[k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_are_validated(models, backend):
    model = models(backend)
    with pytest.raises(TokensError, match="out of the vocabulary"):
        model(torch.tensor([[0, 10_000]]))
    with pytest.raises(TokensError, match="integer ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(TokensError, match="batch, pos"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError):  # the builtin catches it too
        model(torch.zeros(1, 2, 3, dtype=torch.long))


def test_one_bos_policy_for_every_backend(models, tokenizer):
    toks = {b: models(b).to_tokens("Hello world") for b in BACKENDS}
    assert all(torch.equal(t, toks["hf"]) for t in toks.values())
    assert toks["hf"][0, 0].item() == tokenizer.bos_token_id
    tl = models("tl-processed").adapter.model
    assert torch.equal(tl.to_tokens("Hello world"), toks["hf"])  # TL's own policy agrees
    logits = {b: models(b)("Hello world").log_softmax(-1) for b in BACKENDS}
    for b in BACKENDS:
        torch.testing.assert_close(logits[b], logits["hf"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_with_saes_has_saelens_keys(models, sae, backend):
    model = models(backend)
    _, cache = model.run_with_cache_with_saes("Hello world", saes=[sae],
                                              names=["blocks.0.hook_resid_post"])
    hook = sae.cfg.hook_name
    for key in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
                "hook_sae_error", "hook_sae_output"):
        assert f"{hook}.{key}" in cache
    assert cache[f"{hook}.hook_sae_acts_post"].shape[-1] == 128
    # The hook's own value is what the model goes on with: the reconstruction (in the
    # canonical space, where the residual stream is centred).
    out = cache[f"{hook}.hook_sae_output"]
    torch.testing.assert_close(cache[hook], out - out.mean(-1, keepdim=True), atol=1e-5, rtol=0)
    with pytest.raises(UnknownHookError, match="Nearest valid"):
        cache[f"{hook}.hook_sae_act_post"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_before_the_forward(models, backend):
    model = models(backend)
    bad = sb.SAE.random("standard", 64, 16, "blocks.0.hook_resid_pree")
    with pytest.raises(UnknownHookError, match=r"blocks\.0\.hook_resid_pre"):
        model.run_with_saes("Hello", saes=[bad])
    with pytest.raises(UnknownHookError):
        model.add_sae(bad)
    assert model._attached == []
    wide = sb.SAE.random("standard", 32, 16, "blocks.0.hook_resid_pre")
    with pytest.raises(ShapeError, match=r"d_in=32.*width 64"):
        model.run_with_saes("Hello", saes=[wide])
    assert hooks_left(model) == 0


def test_wrap_refuses_unknown_objects():
    with pytest.raises(sb.errors.UnsupportedArchitectureError, match="Supported"):
        sb.wrap(torch.nn.Linear(2, 2))
