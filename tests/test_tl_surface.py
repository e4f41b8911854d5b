"""TransformerLens's surface beyond the idioms: SAEs with hooks, remote runs, the exact
loss and shorthand functions, and what bad input gets (an error of saebridge's hierarchy
that names the hook, and no state left behind)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

import saebridge as sb
from saebridge.activation_cache import ActivationCache, get_act_name
from saebridge.errors import (
    OptionError,
    ShapeError,
    TokensError,
    UnknownHookError,
    UnsupportedError,
)
from saebridge.testing import hooks_left
from saebridge.tl_surface import lm_cross_entropy_loss

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _load_idioms():
    spec = importlib.util.spec_from_file_location(
        "tl_idioms", Path(__file__).with_name("test_tl_idioms.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IDIOMS = _load_idioms()
WRITERS = {"head_ablation_loss", "hooks_context_manager", "in_place_edit_without_return",
           "mean_ablation_of_the_residual", "steering_with_an_embedding",
           "activation_patching", "add_hook_then_reset"}
"""Idioms whose hook functions change activations (or add persistent hooks): code a remote
request cannot carry."""


@pytest.fixture
def tl(models, backend):
    return models("tl-processed", backend.device).adapter.model


# ---- SAEs with TransformerLens hooks ------------------------------------------------------

@pytest.fixture
def sae(backend):
    return sb.SAE.random("standard", 64, 96, "blocks.0.hook_resid_post", seed=5,
                         activation_space="tl-processed").to(backend.device)


def test_run_with_hooks_with_saes_sees_the_reconstruction(model, tl, sae):
    seen = {}

    def read(act, hook):
        seen[hook.name] = act.clone()

    hook = sae.cfg.hook_name
    loss = model.run_with_hooks_with_saes(PROMPT, saes=[sae], return_type="loss",
                                          fwd_hooks=[(hook, read)])
    # TransformerLens with the SAE spliced by hand, then the same reader.
    ref = {}
    want = tl.run_with_hooks(PROMPT, return_type="loss", fwd_hooks=[
        (hook, lambda act, hook: sae(act)), (hook, lambda act, hook: ref.update(x=act))])
    torch.testing.assert_close(loss, want.detach(), atol=1e-4, rtol=1e-4)
    # The reconstruction itself, with the mean it wrote into the centred stream (as in TL).
    torch.testing.assert_close(seen[hook], ref["x"], atol=1e-4, rtol=1e-4)
    assert model.attached == [] and not model._hook_fns


def test_cache_with_saes_takes_names_filter(model, sae):
    hook = sae.cfg.hook_name
    loss, cache = model.run_with_cache_with_saes(
        PROMPT, saes=[sae], return_type="loss",
        names_filter=lambda name: name.endswith(("hook_sae_acts_post", "hook_resid_pre")))
    assert sorted(cache) == [f"{hook}.hook_sae_acts_post", "blocks.0.hook_resid_pre",
                             "blocks.1.hook_resid_pre"]
    _, listed = model.run_with_cache_with_saes(PROMPT, saes=[sae],
                                               names_filter=[f"{hook}.hook_sae_recons", hook])
    assert sorted(listed) == [hook, f"{hook}.hook_sae_recons"]
    assert loss == pytest.approx(float(model.run_with_saes(PROMPT, saes=[sae],
                                                           return_type="loss")), abs=1e-5)


# ---- remote runs: data, not code ------------------------------------------------------------

@pytest.fixture(scope="module")
def remote(tiny_dir, tokenizer):
    nnsight = pytest.importorskip("nnsight")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnsight.NNsightDeprecationWarning)
        lm = nnsight.LanguageModel(hf.eval(), tokenizer=copy.deepcopy(tokenizer))
    return sb.wrap(lm, remote="local")


@pytest.mark.parametrize("name", sorted(set(IDIOMS.IDIOMS) - WRITERS))
def test_read_only_idioms_run_remotely(remote, models, name):
    tl = models("tl-processed").adapter.model
    IDIOMS.assert_same(IDIOMS.IDIOMS[name](remote), IDIOMS.IDIOMS[name](tl), name)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_editing_hooks_are_refused_remotely(remote, models, name):
    hf = models("hf")
    before = hf(PROMPT)
    with pytest.raises(UnsupportedError, match="remote"):
        IDIOMS.IDIOMS[name](remote)
    assert not remote._hook_fns
    torch.testing.assert_close(remote(PROMPT), before, atol=1e-5, rtol=0)


# ---- exact definitions ------------------------------------------------------------------------

def test_loss_is_transformer_lens_own():
    from transformer_lens.utilities import lm_cross_entropy_loss as tl_loss

    logits, tokens = torch.randn(2, 7, 11), torch.randint(0, 11, (2, 7))
    torch.testing.assert_close(lm_cross_entropy_loss(logits, tokens), tl_loss(logits, tokens))
    torch.testing.assert_close(lm_cross_entropy_loss(logits, tokens, per_token=True),
                               tl_loss(logits, tokens, per_token=True))


@pytest.mark.parametrize("args", [("resid_pre", 0), ("k6",), ("scale4ln1",), ("pre5",),
                                  ("normalized", 27, "ln2"), ("embed",), ("attn", 3),
                                  ("mlp_post", 2), ("hook_embed",), ("resid_mid", 1, "b"),
                                  ("blocks.0.hook_resid_post",), ("scale",), ("z", 2, "a")])
def test_get_act_name_is_transformer_lens_own(args):
    from transformer_lens.utilities import get_act_name as tl_get_act_name

    assert get_act_name(*args) == tl_get_act_name(*args)


def test_cfg_is_a_plain_dataclass_with_transformer_lens_values(model, tl):
    cfg = model.cfg
    assert dataclasses.is_dataclass(cfg) and type(cfg).__module__ == "saebridge.tl_weights"
    for f in dataclasses.fields(cfg):
        if f.name in ("extra", "device", "dtype", "model_name", "tokenizer_prepends_bos",
                      "original_architecture"):
            continue
        assert getattr(cfg, f.name) == getattr(tl.cfg, f.name), f.name
    assert cfg.dtype == torch.float32 and torch.device(cfg.device) == model.adapter.device


# ---- bad input, and no state left behind ----------------------------------------------------

def test_wrong_shape_names_the_hook_and_leaves_nothing(model):
    before, hooks = model(PROMPT), hooks_left(model)

    def truncate(act, hook):
        return act[:, :-1]

    with pytest.raises(ShapeError, match=r"truncate.*blocks\.0\.hook_mlp_out.*shape"):
        model.run_with_hooks(PROMPT, fwd_hooks=[("blocks.0.hook_mlp_out", truncate)])
    with pytest.raises(ShapeError, match="returned a float"):
        model.run_with_hooks(PROMPT, fwd_hooks=[("blocks.0.hook_mlp_out", lambda a, h: 1.0)])
    assert not model._hook_fns and hooks_left(model) == hooks
    assert torch.equal(model(PROMPT), before)


def test_hooks_are_removed_when_the_function_raises(model):
    before, hooks = model(PROMPT), hooks_left(model)

    def fail(act, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        model.run_with_hooks(PROMPT, fwd_hooks=[("blocks.1.attn.hook_z", fail)])
    with pytest.raises(RuntimeError, match="user hook failed"), \
            model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, h: a * 2)]):
        fail(None, None)
    assert not model._hook_fns and hooks_left(model) == hooks
    assert torch.equal(model(PROMPT), before)


def test_bad_hook_arguments_are_refused_before_running(model):
    with pytest.raises(UnknownHookError, match=r"blocks\.0\.hook_resid_pre"):
        model.run_with_hooks(PROMPT, fwd_hooks=[("blocks.0.hook_resid_pree", print)])
    with pytest.raises(UnsupportedError, match="backward"):
        model.run_with_hooks(PROMPT, bwd_hooks=[("blocks.0.hook_resid_pre", print)])
    with pytest.raises(TypeError, match="callable"):
        model.add_hook("blocks.0.hook_resid_pre", "not a function")
    with pytest.raises(OptionError, match="return_type"):
        model(PROMPT, return_type="probs")
    with pytest.raises(UnsupportedError, match="greedily"):
        model.generate(PROMPT, 3, do_sample=True)
    with pytest.raises(TokensError, match="not one"):
        model.to_single_token(" John")
    assert not model._hook_fns


def test_writing_a_read_only_hook_is_refused(model, backend):
    name = "blocks.0.attn.hook_pattern"
    seen = []
    model.run_with_hooks(PROMPT, fwd_hooks=[(name, lambda p, h: seen.append(p.shape))])
    assert seen and seen[0][-1] == seen[0][-2]
    if model.adapter.writable(name):
        pytest.skip(f"{backend.name} can write attention patterns")
    with pytest.raises(UnknownHookError, match="only read"):
        model.run_with_hooks(PROMPT, fwd_hooks=[(name, lambda p, h: p * 0)])
    assert not model._hook_fns


def test_cache_helpers_explain_what_they_lack(model):
    _, cache = model.run_with_cache(["Hello world", "John gave"])
    with pytest.raises(ShapeError, match="batch sizes"):
        cache.remove_batch_dim()
    with pytest.raises(UnknownHookError, match="Nearest valid"):
        cache["resid_pree", 0]
    loose = ActivationCache(dict(cache))
    with pytest.raises(UnknownHookError, match="records no model"):
        loose.accumulated_resid()


# ---- every architecture: config, weights and cache helpers as TransformerLens's ------------

@pytest.mark.parametrize("name", ["hf", "tl-unprocessed", "bridge", "bridge-compat"])
def test_every_architecture_gives_transformer_lens_weights_and_stacks(arch_models, family,
                                                                      name):
    model, tl = arch_models(family, name), arch_models(family, "tl-processed").adapter.model
    for field in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab",
                  "normalization_type", "n_key_value_heads", "positional_embedding_type"):
        assert getattr(model.cfg, field) == getattr(tl.cfg, field), field
    for weight in ("W_E", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_V", "b_O", "W_in",
                   "W_out"):
        torch.testing.assert_close(getattr(model, weight), getattr(tl, weight).detach(),
                                   atol=1e-5, rtol=1e-5, msg=weight)
    tokens = model.to_tokens(PROMPT)  # BOS first (TransformerLens's Pythia default: none)
    _, cache = model.run_with_cache(tokens)
    _, want = tl.run_with_cache(tokens)
    for stack in ("accumulated_resid", "decompose_resid", "stack_head_results"):
        torch.testing.assert_close(getattr(cache, stack)(apply_ln=True, pos_slice=-1),
                                   getattr(want, stack)(apply_ln=True, pos_slice=-1).detach(),
                                   atol=1e-4, rtol=1e-4, msg=stack)
    # A hook function edits the canonical value (value biases folded away) on every backend.
    def ablate(act, hook):
        act[:, :, 0] = 0.0
        return act

    for site in ("blocks.0.attn.hook_z", "blocks.1.attn.hook_v"):
        got = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True,
                                   fwd_hooks=[(site, ablate)])
        ref = tl.run_with_hooks(tokens, return_type="loss", loss_per_token=True,
                                fwd_hooks=[(site, ablate)])
        torch.testing.assert_close(got, ref.detach(), atol=1e-4, rtol=1e-4, msg=site)
