"""Every writable hook of each tiny architecture (embeddings, block 1, the final norm), on
every backend, gives HF's log-probs under each kind of write: a splice of an SAE of each
activation space, a TransformerLens hook function, an ``sb.trace`` write, a steer. Where
no conversion can exist the splice is refused on exactly the backends that cannot carry
it (an unfolded SAE writing at a LayerNorm output of a ``fold_ln`` model, see
``test_spaces_normed.py``). The property tests (``test_parity.py``) sample seven sites;
this sweep leaves none out, which is how the LayerNorm-output writes were found to
differ."""

from __future__ import annotations

import pytest
import torch

import saebridge as sb
from saebridge.errors import SpaceConversionError
from tests.parity import assert_same_logprobs

TOKENS = torch.tensor([[1, 17, 5, 42, 9, 3, 77, 12], [4, 8, 15, 16, 23, 42, 2, 19]])


def writable_hooks(model: sb.Model) -> list[str]:
    return [n for n in model.hook_names() if model.adapter.writable(n)
            and (n.startswith("blocks.1.") or not n.startswith("blocks."))]


def sae_at(model: sb.Model, name: str, space: str) -> sb.SAE:
    x = model.run_with_cache(TOKENS[:1], names=[name])[1][name]
    head = {"hook_head_index": 1} if x.dim() == 4 else {}  # hook_q/k/v/z: one head
    return sb.SAE.random("standard", x.shape[-1], 32, name, seed=3, activation_space=space,
                         **head)


@pytest.mark.parametrize("space", ["tl-processed", "hf"])
def test_a_splice_at_every_writable_hook_agrees(arch_models, family, backend, space):
    ref = arch_models(family, "hf", backend.device)
    model = arch_models(family, backend.name, backend.device)
    hooks = writable_hooks(ref)
    assert len(hooks) >= 10 and "blocks.1.attn.hook_z" in hooks
    for name in hooks:
        sae = sae_at(ref, name, space).to(backend.device)
        refused = (space == "hf" and model.adapter.kind(name) == "normed"
                   and model.adapter.space.fold_ln)
        if refused:
            with pytest.raises(SpaceConversionError, match="fold_ln"):
                model.run_with_saes(TOKENS, [sae])
            continue
        assert_same_logprobs(model.run_with_saes(TOKENS, [sae]),
                             ref.run_with_saes(TOKENS, [sae]),
                             f"{family} {backend.name} at {name}")


def test_a_hook_function_a_trace_write_and_a_steer_at_every_writable_hook_agree(
        arch_models, family, backend):
    ref = arch_models(family, "hf", backend.device)
    model = arch_models(family, backend.name, backend.device)
    for name in writable_hooks(ref):
        x = ref.run_with_cache(TOKENS[:1], names=[name])[1][name]
        vector = torch.linspace(-0.5, 1.5, x.shape[-1], device=backend.device)  # a mean

        def fn(act, hook, vector=vector):
            return 1.3 * act + vector

        def traced(m, name=name, fn=fn):
            with sb.trace(m, TOKENS) as t:
                t[name] = fn(t[name], None)
            return t.logits

        steer = sb.Steer(name, vector, 3.0, head_index=1 if x.dim() == 4 else None)
        for what, run in (("hook function", lambda m, name=name, fn=fn: m.run_with_hooks(
                              TOKENS, fwd_hooks=[(name, fn)])),
                          ("sb.trace write", traced),
                          ("steer", lambda m, steer=steer: m.run_with_interventions(
                              TOKENS, [steer]))):
            assert_same_logprobs(run(model), run(ref),
                                 f"{what}: {family} {backend.name} at {name}")
