"""model.generate: greedy decoding with interventions at every step, the same on every backend."""

from __future__ import annotations

import pytest
import torch

import saebridge as sb
from saebridge.errors import TokensError
from saebridge.generate import greedy
from saebridge.testing import hooks_left

N_NEW = 5


@pytest.fixture
def tokens(models):
    hf = models("hf")
    return torch.cat([hf.to_tokens("Hello world, hello"),
                      hf.to_tokens("the residual stream features")[:, :8]])


def interventions():
    # An hf-space SAE: on processed TL its conversion rebuilds the raw residual mean from the
    # tokens of each step, so a stale plan would show.
    sae = sb.SAE.random("standard", 64, 48, "blocks.1.hook_resid_pre", seed=11,
                        activation_space="hf")
    z = sb.SAE.random("topk", 64, 48, "blocks.0.attn.hook_z", k=6, seed=12,
                      activation_space="tl-processed")
    return [sb.Splice(sae), sb.Steer.from_sae(z, 7, coef=6.0, positions=[1, 2]),
            sb.Steer("hook_embed", torch.randn(64, generator=torch.Generator().manual_seed(5)),
                     2.0)], [z]


def margin_ok(model: sb.Model, out: torch.Tensor, ops: list, saes: list) -> bool:
    """Every greedy choice won by more than float noise, so backends cannot tie-break apart."""
    logits = model._run(out[:, :-1], [*ops, *(sb.Splice(s) for s in saes)])[0]
    top2 = logits[:, -N_NEW:].topk(2, dim=-1).values
    return bool((top2[..., 0] - top2[..., 1]).min() > 1e-3)


def test_greedy_tokens_agree_on_every_backend(models, backend, tokens):
    model, hf = models(*backend), models("hf", backend.device)
    ops, saes = interventions()
    clean = {m: m.generate(tokens, N_NEW) for m in (model, hf)}
    steered = {m: m.generate(tokens, N_NEW, interventions=ops, saes=saes) for m in (model, hf)}
    assert margin_ok(hf, clean[hf], [], []) and margin_ok(hf, steered[hf], ops, saes)
    assert clean[model].shape == (2, tokens.shape[1] + N_NEW)
    assert torch.equal(clean[model], clean[hf])
    assert torch.equal(steered[model], steered[hf])
    assert not torch.equal(steered[hf], clean[hf])


def test_generation_equals_a_loop_of_runs(models, backend, tokens):
    """Every backend's generate (HF generate with hooks, nnsight's tracer.iter, …) applies
    the interventions in every step exactly as a single run over the sequence so far does."""
    model = models(*backend)
    ops, saes = interventions()
    want = greedy(lambda t: model._run(t, [*ops, *(sb.Splice(s) for s in saes)])[0],
                  tokens, N_NEW)
    assert torch.equal(model.generate(tokens, N_NEW, interventions=ops, saes=saes), want)


def test_attached_saes_and_text_use_the_front(models):
    model = models("nnsight-hf")
    sae = interventions()[1][0]
    with model.saes([sae]):
        attached = model.generate("Hello world", 3, return_type="tokens")  # text: TL's str
    assert torch.equal(attached, model.generate(model.to_tokens("Hello world"), 3, saes=[sae]))
    assert torch.equal(model.generate("Hello", 0, return_type="tokens"), model.to_tokens("Hello"))
    with pytest.raises(TokensError, match="max_new_tokens"):
        model.generate("Hello", -1)


def test_an_error_while_generating_leaves_no_state(models, tokens, backend):
    model = models(*backend)
    before = model.generate(tokens, 2)
    hooks = hooks_left(model)  # after a first forward: a bridge's own capture hooks stay
    wrong = sb.SAE.random("standard", 32, 16, "blocks.1.hook_resid_pre")  # d_in 32 ≠ 64
    with pytest.raises(ValueError, match="d_in=32"):
        model.generate(tokens, 2, saes=[wrong])
    assert hooks_left(model) == hooks
    assert torch.equal(model.generate(tokens, 2), before)


def test_nnsight_refuses_generation_configs_that_change_the_choice(models, tokens):
    model = models("nnsight-hf")
    config = model.adapter.envoy._module.generation_config
    config.repetition_penalty = 50.0  # makes generate pick other tokens than the argmax
    try:
        with pytest.raises(RuntimeError, match="logits processors"):
            model.generate(tokens, 4)
    finally:
        config.repetition_penalty = 1.0
