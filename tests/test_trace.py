"""sb.trace: read and write canonical hooks in order, on every backend."""

from __future__ import annotations

import pytest
import torch

import saebridge as sb
from saebridge.errors import ShapeError, TraceOrderError, UnknownHookError
from saebridge.testing import hooks_left
from tests.parity import assert_changed, assert_same_logprobs

READS = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_z",
         "blocks.1.hook_resid_mid", "blocks.1.mlp.hook_post", "ln_final.hook_normalized"]


@pytest.fixture
def tokens(models):
    return models("hf").to_tokens("Hello world, hello")


def no_state_left(model: sb.Model, hooks: int) -> bool:
    """No hook beyond the ``hooks`` the model had before, and the model is unlocked."""
    return hooks_left(model) == hooks and not model.lock.locked()


def test_reads_are_the_canonical_cache(models, model, backend, tokens):
    hooks = hooks_left(model)
    with sb.trace(model, tokens) as t:
        got = {name: t[name] for name in READS}
    _, cache = models("hf", backend.device).run_with_cache(tokens, READS)
    for name in READS:
        torch.testing.assert_close(got[name], cache[name], atol=1e-5, rtol=1e-5, msg=name)
    assert torch.equal(t.logits, model(tokens))
    assert no_state_left(model, hooks)


def test_writes_agree_across_backends(models, backend, tokens):
    logits = {}
    for name in (backend.name, "hf"):
        with sb.trace(models(name, backend.device), tokens) as t:
            resid = t["blocks.0.hook_resid_post"]
            t["blocks.0.hook_resid_post"] = resid * 0.5
            z = t["blocks.1.attn.hook_z"]
            z[:, 1:, 2] = 0  # in place, on the value read: goes back too
            mid = t["blocks.1.hook_resid_mid"]
        assert torch.equal(z[:, 1:, 2], torch.zeros_like(z[:, 1:, 2]))
        logits[name] = t.logits
        assert mid.shape == resid.shape
    assert_same_logprobs(logits[backend.name], logits["hf"], backend.name)
    assert_changed(logits["hf"], models("hf", backend.device)(tokens), "the writes")


# Native space is HF's only where no weight processing sits between HF and the hooks.
@pytest.mark.backends("raw")
def test_a_write_equals_the_same_edit_as_an_intervention(model, tokens):
    vector = torch.randn(64, generator=torch.Generator().manual_seed(3))
    with sb.trace(model, tokens, space="native") as t:
        name = "blocks.1.hook_resid_pre"
        t[name] = t[name] + 2.0 * vector
    assert torch.equal(t.logits,
                       model.run_with_interventions(tokens, [sb.Steer(name, vector, 2.0)]))


def test_out_of_order_unknown_and_read_only_hooks_fail_clearly(model, tokens, backend):
    hooks = hooks_left(model)
    with pytest.raises(TraceOrderError, match="already ran past"), sb.trace(model, tokens) as t:
        t["blocks.1.hook_resid_pre"]
        t["blocks.0.hook_resid_pre"]
    with pytest.raises(UnknownHookError, match="Nearest valid"), sb.trace(model, tokens) as t:
        t["blocks.0.hook_resid_pree"]
    with pytest.raises(ShapeError, match="shape"), sb.trace(model, tokens) as t:
        t["blocks.0.hook_resid_pre"] = torch.zeros(3)
    if backend.name in ("hf", "nnsight-hf"):
        with pytest.raises(TraceOrderError, match="read but not written"), \
                sb.trace(model, tokens) as t:
            t["blocks.0.attn.hook_pattern"] = t["blocks.0.attn.hook_pattern"]
    with sb.trace(model, tokens) as t:
        logits = t.logits  # runs the rest of the forward
        with pytest.raises(TraceOrderError):
            t["ln_final.hook_normalized"]
    assert torch.equal(logits, model(tokens))
    assert no_state_left(model, hooks)


def test_running_the_traced_model_inside_its_block_is_refused(models, tokens):
    model = models("hf")
    before = model(tokens)
    with pytest.raises(TraceOrderError, match="paused"), sb.trace(model, tokens) as t:
        t["blocks.0.hook_resid_pre"]
        model(tokens)
    assert no_state_left(model, 0)
    assert torch.equal(model(tokens), before)  # the wrapper works again


def test_an_error_in_the_block_leaves_no_state(model, tokens):
    before, hooks = model(tokens), hooks_left(model)
    with pytest.raises(RuntimeError, match="boom"), sb.trace(model, tokens) as t:
        t["blocks.0.hook_resid_post"] = t["blocks.0.hook_resid_post"] * 0
        raise RuntimeError("boom")
    assert no_state_left(model, hooks)
    assert torch.equal(model(tokens), before)


def test_attached_saes_apply_and_a_forward_error_reaches_the_block(models, tokens):
    model = models("nnsight-hf")
    sae = sb.SAE.random("standard", 64, 32, "blocks.0.hook_resid_post", seed=1,
                        activation_space="tl-processed")
    with model.saes([sae]), sb.trace(model, tokens) as t:
        resid = t["blocks.0.hook_resid_post"]
    _, cache = model.run_with_cache_with_saes(tokens, [sae], names=["blocks.0.hook_resid_post"])
    torch.testing.assert_close(resid, cache["blocks.0.hook_resid_post"])
    assert torch.equal(t.logits, model.run_with_saes(tokens, [sae]))
    wrong = sb.SAE.random("standard", 32, 16, "blocks.1.hook_resid_pre")  # d_in 32 ≠ 64
    with model.saes([wrong]):
        with pytest.raises(ShapeError, match="d_in=32"), sb.trace(model, tokens) as t:
            t["blocks.1.hook_resid_post"]
    assert no_state_left(model, 0)
