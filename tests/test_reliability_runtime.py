"""Issue 16, runs: no hang inside a trace block, NaN propagates the same on every path,
interventions copy what they hold and check their indices, positions and shapes, too-long
inputs are refused before any forward, and a model built from a config converts."""

from __future__ import annotations

import threading

import pytest
import torch

import saebridge as sb
from saebridge.errors import (
    ArgumentTypeError,
    IndexOutOfRangeError,
    SAEBridgeError,
    ShapeError,
    TokensError,
    TraceOrderError,
)
from saebridge.kernel import ops
from saebridge.kernel.spaces import Conv
from saebridge.testing import hooks_left, sparse_random_sae

HOOK = "blocks.1.hook_resid_pre"
TRACED = ("hf", "tl-processed", "nnsight-hf")
"""Backends whose trace blocks are probed: torch hooks, hook points, an nnsight envoy."""


# ---- 1. a run inside a trace block fails at once, and the model works afterwards -----------

def _in_thread(fn, timeout: float = 120.0) -> BaseException | None:
    """Run ``fn`` in a daemon thread: a hang fails the test instead of stalling the suite."""
    outcome: dict[str, BaseException | None] = {}

    def work() -> None:
        try:
            fn()
            outcome["error"] = None
        except BaseException as err:  # handed back to the test
            outcome["error"] = err

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s: the run hung"
    return outcome["error"]


PROBES = {
    "second wrapper": lambda m, raw, tok, t: sb.wrap(raw, tokenizer=tok)(t),
    "nested trace on the raw model": lambda m, raw, tok, t: sb.trace(raw, t).__enter__(),
    "nested trace on the same wrapper": lambda m, raw, tok, t: sb.trace(m, t).__enter__(),
    "generate through the wrapper": lambda m, raw, tok, t: m.generate(t, 2),
}


@pytest.mark.parametrize("probe", list(PROBES))
@pytest.mark.parametrize("name", TRACED)
def test_a_run_of_the_traced_model_inside_its_block_fails_fast(models, tokenizer, name,
                                                                probe):
    model = models(name)
    raw = model.adapter.envoy if name.startswith("nnsight") else model.adapter.model
    tokens = model.to_tokens("Hello world, hello")
    clean, hooks = model(tokens), hooks_left(model)
    caught: list[BaseException] = []

    def block() -> None:
        with sb.trace(model, tokens) as t:
            t["blocks.0.hook_resid_pre"]
            try:
                PROBES[probe](model, raw, tokenizer, tokens)
            except TraceOrderError as err:
                caught.append(err)
            t["blocks.1.hook_resid_post"]  # the trace itself goes on
        assert torch.equal(t.logits, clean)

    assert _in_thread(block) is None
    assert len(caught) == 1 and "sb.trace" in str(caught[0])
    # Afterwards every wrapper of the model runs, from this thread and from another.
    assert not model.lock.locked() and hooks_left(model) == hooks
    assert torch.equal(model(tokens), clean)
    assert torch.equal(sb.wrap(raw, tokenizer=tokenizer)(tokens), clean)
    assert _in_thread(lambda: model(tokens)) is None


# ---- 4. NaN propagates identically on every path ---------------------------------------------

ARCHS = ("standard", "jumprelu", "gated", "topk", "batchtopk")


@pytest.mark.parametrize("arch", ARCHS)
def test_a_nan_row_is_nan_on_the_sparse_and_dense_paths(arch):
    sae = sparse_random_sae(arch, 16, 2048, HOOK, l0=8)
    x = torch.randn(512, 16, dtype=sae.W_enc.dtype, generator=torch.Generator().manual_seed(1))
    x[3] = torch.nan
    x[7, 5] = torch.nan  # one NaN entry spoils its whole row too
    with torch.no_grad():
        sparse = sae.forward_sparse(x)
        assert sparse is not None  # the blocked encoder ran (this is the path under test)
        dense = sae.run(x).recons
        rows = dense.isnan().any(-1)
        assert rows.nonzero().flatten().tolist() == [3, 7]
        assert torch.equal(sparse.recons.isnan(), dense.isnan())
        assert torch.equal(sae(x).isnan(), dense.isnan())
        fine = ~rows
        torch.testing.assert_close(sparse.recons[fine], dense[fine], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_nan_input_gives_the_same_splice_with_and_without_a_cache(arch):
    """A splice that caches nothing takes the sparse path, one that caches takes the dense
    one: the output must not depend on it, NaN included."""
    sae = sparse_random_sae(arch, 16, 2048, HOOK, l0=8, dtype=torch.float32)
    x = torch.randn(4, 128, 16, generator=torch.Generator().manual_seed(2))
    x[1, 5] = torch.nan
    with torch.no_grad():  # as every run is: autograd would force the dense path
        assert sae.forward_sparse(x) is not None
        outs = {mode: ops.splice(sae.data(), x, Conv(), False, mode, HOOK)[0]
                for mode in ("none", "dense", "sparse")}
    for mode in ("none", "sparse"):
        assert torch.equal(outs[mode].isnan(), outs["dense"].isnan()), mode
        assert outs[mode][1, 5].isnan().all()


def test_topk_ranks_nan_first_in_every_block():
    """The blocked TopK keeps a NaN found in a later block, as one ``topk`` does."""
    from saebridge.kernel.blocked import encode_active

    W_enc = torch.randn(4, 1024, generator=torch.Generator().manual_seed(3))
    b_enc = torch.zeros(1024)
    b_enc[700] = torch.nan
    latents = encode_active(torch.randn(3, 4), W_enc, b_enc, "topk", k=3, block=256)
    assert latents.col_Z.view(3, 3).eq(700).any(-1).all()
    assert latents.values_Z.isnan().sum() == 3


# ---- 5. interventions hold copies ------------------------------------------------------------

def test_interventions_copy_what_they_hold():
    sae = sb.SAE.random("standard", 64, 32, HOOK, seed=1)
    row = sae.W_dec[3].detach().clone()
    steer = sb.Steer.from_sae(sae, 3)
    steer.vector /= steer.vector.norm()
    assert torch.equal(sae.W_dec[3], row)  # the SAE is untouched
    vector = torch.ones(64)
    steer = sb.Steer(HOOK, vector)
    vector.mul_(5)
    assert torch.equal(steer.vector, torch.ones(64))
    features, positions = [1, 2], [0, 1]
    ablate = sb.Ablate(sae, features, positions=positions)
    features.append(9)
    positions.append(7)
    assert ablate.features == [1, 2] and ablate.positions == [0, 1]


# ---- silent wrong results: indices, positions, shapes --------------------------------------

@pytest.mark.parametrize(("make", "error"), [
    (lambda s: sb.Ablate(s, [1.7]), ArgumentTypeError),
    (lambda s: sb.Ablate(s, [True]), ArgumentTypeError),
    (lambda s: sb.Ablate(s, 1.0), ArgumentTypeError),
    (lambda s: sb.Ablate(s, [-1]), IndexOutOfRangeError),
    (lambda s: sb.Ablate(s, [32]), IndexOutOfRangeError),
    (lambda s: sb.Ablate(s, []), IndexOutOfRangeError),
    (lambda s: sb.Clamp(s, [0], "big"), ArgumentTypeError),
    (lambda s: sb.Steer.from_sae(s, -1), IndexOutOfRangeError),
    (lambda s: sb.Steer.from_sae(s, 32), IndexOutOfRangeError),
    (lambda s: sb.Steer.from_sae(s, 2.0), ArgumentTypeError),
    (lambda s: sb.Steer.from_sae(s, 1, positions=[-1]), IndexOutOfRangeError),
    (lambda s: sb.Steer.from_sae(s, 1, positions=slice(-3, None)), IndexOutOfRangeError),
    (lambda s: sb.Steer.from_sae(s, 1, positions=slice(0, 4, 0)), IndexOutOfRangeError),
    (lambda s: sb.Steer.from_sae(s, 1, positions=[0.5]), ArgumentTypeError),
    (lambda s: sb.Steer(HOOK, [1.0] * 64), ArgumentTypeError),
    (lambda s: sb.Steer(HOOK, torch.ones(64, dtype=torch.long)), ArgumentTypeError),
    (lambda s: sb.Steer(HOOK, torch.ones(1, 6, 64)), ShapeError),
    (lambda s: sb.Steer(3, torch.ones(64)), ArgumentTypeError),
    (lambda s: sb.Steer(HOOK, torch.ones(64), coef="2"), ArgumentTypeError),
    (lambda s: sb.Steer(HOOK, torch.ones(64), head_index=-1), IndexOutOfRangeError),
])
def test_bad_indices_and_types_are_refused_when_built(make, error):
    sae = sb.SAE.random("standard", 64, 32, HOOK, seed=1)
    with pytest.raises(error):
        make(sae)


@pytest.mark.parametrize(("op", "error", "needle"), [
    (lambda s: sb.Steer.from_sae(s, 1, positions=slice(50, 60)), IndexOutOfRangeError,
     "selects none"),
    (lambda s: sb.Steer.from_sae(s, 1, positions=[2, 6]), IndexOutOfRangeError, "position 6"),
    (lambda s: sb.Ablate(s, [1], positions=9), IndexOutOfRangeError, "position 9"),
    (lambda s: sb.Steer(HOOK, torch.ones(6, 64)), ShapeError, "one position's activation"),
    (lambda s: sb.Steer("blocks.1.attn.hook_z", torch.ones(16), head_index=4),
     IndexOutOfRangeError, "head index 4"),
    (lambda s: sb.Steer(HOOK, torch.ones(16), head_index=0), ShapeError, "no heads"),
])
def test_what_does_not_fit_the_input_is_refused_at_run_time(model, backend, op, error, needle):
    """On a 6-token input: a slice past the end, a position past it, a [pos, d] vector that
    would be added per position, a head the site lacks: errors, no state left."""
    sae = sb.SAE.random("standard", 64, 32, HOOK, seed=1).to(backend.device)
    tokens = torch.tensor([[0, 5, 7, 9, 11, 13]], device=backend.device)
    clean, hooks = model(tokens), hooks_left(model)
    with pytest.raises(error, match=needle):
        model.run_with_interventions(tokens, [op(sae)])
    assert hooks_left(model) == hooks and torch.equal(model(tokens), clean)


def test_the_index_rules_in_the_readme_are_the_ones_enforced():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Errors and state**"):]
    for rule in ("negative", "slice", "[pos, d]", "n_ctx"):
        assert rule in section, rule


# ---- inputs longer than the model's context ----------------------------------------------

def test_a_sequence_longer_than_n_ctx_is_refused(model, backend):
    n_ctx = 64  # the tiny GPT-2's n_positions
    long = torch.zeros(1, n_ctx + 1, dtype=torch.long, device=backend.device)
    hooks = hooks_left(model)
    for run in (lambda: model(long), lambda: model.run_with_cache(long),
                lambda: model.generate(long[:, :n_ctx - 2], 3),
                lambda: model.generate(long[:, :n_ctx - 2], 5)):
        with pytest.raises(TokensError, match=f"n_ctx={n_ctx}"):
            run()
    assert model.generate(long[:, :n_ctx - 2], 2).shape[1] == n_ctx  # up to n_ctx runs
    assert hooks_left(model) == hooks


# ---- a model built from a config -------------------------------------------------------------

def test_a_model_built_from_a_config_converts():
    """``GPT2LMHeadModel(config)`` has ``config.architectures = None``: the class names it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from saebridge.adapters.transformer_lens import from_hf

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config).eval()
    assert hf.config.architectures is None
    tokens = torch.tensor([[0, 5, 7, 9]])
    ref = sb.wrap(hf)(tokens).log_softmax(-1)
    for converted in (from_hf(hf), from_hf(hf, fold_ln=False, center_writing_weights=False,
                                           center_unembed=False, fold_value_biases=False)):
        got = sb.wrap(converted)(tokens).log_softmax(-1)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert hf.config.architectures is None  # the user's model is not modified


def test_errors_are_saebridge_errors():
    for cls in (ArgumentTypeError, IndexOutOfRangeError):
        assert issubclass(cls, SAEBridgeError)


@pytest.mark.parametrize("method", ["encode", "decode", "forward", "forward_sparse", "run"])
def test_sae_methods_refuse_what_is_not_a_tensor(method):
    sae = sb.SAE.random("standard", 4, 8, HOOK)
    for bad in ("x", [1.0] * 4, None):
        with pytest.raises(ArgumentTypeError, match=f"SAE.{method}"):
            getattr(sae, method)(bad)
