"""SAELens idioms, run unchanged on every backend and on SAELens's HookedSAETransformer.

Each idiom is research code as SAELens's docs and tutorials write it (the basic-loading and
HookedSAETransformer tutorials, the feature-steering and ablation notebooks; rewritten, not
copied), as a function of the model object and of SAELens ``SAE`` objects. It runs once on
the backend under test (a ``saebridge.Model``, given the *same SAELens objects*: they are
converted once, sharing storage) and once on a ``HookedSAETransformer`` of the same weights
loaded as SAELens's ``load_model`` loads it for the SAEs (unprocessed: the SAEs are trained
on raw activations), and the results must agree. Hooks are looked up the way SAELens code
does it, through ``sae.cfg.metadata.hook_name``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import saebridge as sb
from tests.test_tl_idioms import PROMPT, assert_same

pytest.importorskip("sae_lens")
from tests.oracle import saelens_sae, tl_model

IDIOMS: dict[str, Callable[[Any, dict[str, Any]], Any]] = {}


def idiom(fn: Callable[[Any, dict[str, Any]], Any]) -> Callable[[Any, dict[str, Any]], Any]:
    IDIOMS[fn.__name__] = fn
    return fn


def hook(sae: Any) -> str:
    return sae.cfg.metadata.hook_name


def logprobs(logits: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(-1)


# ---- splicing ----------------------------------------------------------------------------

@idiom
def run_with_saes_logprobs(model, saes):
    return logprobs(model.run_with_saes(model.to_tokens(PROMPT), saes=[saes["res"]]))


@idiom
def run_with_saes_single_sae_not_in_a_list(model, saes):
    return logprobs(model.run_with_saes(model.to_tokens(PROMPT), saes=saes["res"]))


@idiom
def run_with_saes_two_layers(model, saes):
    return logprobs(model.run_with_saes(model.to_tokens(PROMPT),
                                        saes=[saes["res"], saes["mlp"]]))


@idiom
def run_with_saes_error_term_keeps_the_output(model, saes):
    toks = model.to_tokens(PROMPT)
    return (logprobs(model.run_with_saes(toks, saes=[saes["res"]], use_error_term=True)),
            logprobs(model(toks)))


@idiom
def loss_with_and_without_sae(model, saes):
    toks = model.to_tokens(PROMPT)
    clean = model(toks, return_type="loss")
    spliced = model.run_with_saes(toks, saes=[saes["res"]], return_type="loss")
    return clean, spliced, (spliced - clean)


@idiom
def per_token_loss_with_sae(model, saes):
    return model.run_with_saes(model.to_tokens(PROMPT), saes=[saes["mlp"]],
                               return_type="loss", loss_per_token=True)


@idiom
def run_with_saes_logits_and_loss(model, saes):
    logits, loss = model.run_with_saes(model.to_tokens(PROMPT), saes=[saes["res"]],
                                       return_type="both")
    return logprobs(logits), loss


@idiom
def exclude_special_tokens_leaves_bos_alone(model, saes):
    toks = model.to_tokens(PROMPT)  # starts with BOS
    return logprobs(model.run_with_saes(toks, saes=[saes["res"]], exclude_special_tokens=True))


@idiom
def attention_sae_on_hook_z(model, saes):
    toks = model.to_tokens(PROMPT)
    names = [f"{hook(saes['attn'])}.{k}" for k in ("hook_sae_input", "hook_sae_acts_post",
                                                    "hook_sae_recons", "hook_sae_output")]
    logits, cache = model.run_with_cache_with_saes(toks, saes=[saes["attn"]], names_filter=names)
    return logprobs(logits), [cache[n] for n in names]  # recons flat, output per head


# ---- the cache of SAE hook points --------------------------------------------------------

def _cache(model, saes, key, **kw):
    name = f"{hook(saes['res'])}.{key}"
    _, cache = model.run_with_cache_with_saes(model.to_tokens(PROMPT), saes=[saes["res"]],
                                              names_filter=name, **kw)
    return cache[name]


@idiom
def full_cache_holds_every_sae_hook(model, saes):
    sae = saes["mlp"]
    _, cache = model.run_with_cache_with_saes(model.to_tokens(PROMPT), saes=[sae])
    keys = [f"{hook(sae)}.{k}" for k in ("hook_sae_input", "hook_sae_acts_pre",
                                          "hook_sae_acts_post", "hook_sae_recons",
                                          "hook_sae_output")]
    return [cache[k] for k in keys]


@idiom
def cache_acts_post(model, saes):
    return _cache(model, saes, "hook_sae_acts_post")


@idiom
def cache_acts_pre(model, saes):
    return _cache(model, saes, "hook_sae_acts_pre")


@idiom
def cache_sae_input(model, saes):
    return _cache(model, saes, "hook_sae_input")


@idiom
def cache_sae_recons(model, saes):
    return _cache(model, saes, "hook_sae_recons")


@idiom
def cache_sae_output(model, saes):
    return _cache(model, saes, "hook_sae_output")


@idiom
def cache_sae_error_with_error_term(model, saes):
    return _cache(model, saes, "hook_sae_error", use_error_term=True)


@idiom
def l0_per_token(model, saes):
    return (_cache(model, saes, "hook_sae_acts_post") > 0).sum(-1)


@idiom
def top_features_at_last_token(model, saes):
    acts = _cache(model, saes, "hook_sae_acts_post")
    return acts[0, -1].topk(3).indices.tolist()


@idiom
def cache_names_filter_on_sae_hooks(model, saes):
    _, cache = model.run_with_cache_with_saes(
        model.to_tokens(PROMPT), saes=[saes["res"], saes["mlp"]],
        names_filter=lambda name: name.endswith("hook_sae_acts_post"))
    return {key: cache[key] for key in sorted(cache.keys())}


@idiom
def encode_the_cached_sae_input(model, saes):
    sae = saes["mlp"]
    name = f"{hook(sae)}.hook_sae_input"
    _, cache = model.run_with_cache_with_saes(model.to_tokens(PROMPT), saes=[sae],
                                              names_filter=[name])
    return sae.encode(cache[name])


# ---- stateful attachment ------------------------------------------------------------------

@idiom
def add_sae_then_reset(model, saes):
    toks = model.to_tokens(PROMPT)
    model.add_sae(saes["res"])
    spliced = logprobs(model(toks))
    model.reset_saes()
    return spliced, logprobs(model(toks))


@idiom
def add_sae_with_error_term(model, saes):
    toks = model.to_tokens(PROMPT)
    model.add_sae(saes["mlp"], use_error_term=True)
    try:
        return model(toks, return_type="loss"), model(toks, return_type="loss")
    finally:
        model.reset_saes()


@idiom
def reset_one_hook_of_two(model, saes):
    toks = model.to_tokens(PROMPT)
    model.add_sae(saes["res"])
    model.add_sae(saes["mlp"])
    model.reset_saes(act_names=hook(saes["res"]))
    only_mlp = logprobs(model(toks))
    model.reset_saes()
    return only_mlp, logprobs(model.run_with_saes(toks, saes=[saes["mlp"]]))


@idiom
def saes_context_manager(model, saes):
    toks = model.to_tokens(PROMPT)
    with model.saes(saes=[saes["res"]]):
        inside = logprobs(model(toks))
    return inside, logprobs(model(toks))


@idiom
def saes_context_restores_after_an_error(model, saes):
    toks = model.to_tokens(PROMPT)
    try:
        with model.saes(saes=[saes["res"]]):
            raise RuntimeError("in user code")
    except RuntimeError:
        pass
    return logprobs(model(toks))


@idiom
def steer_along_a_decoder_direction(model, saes):
    sae = saes["res"]
    direction = sae.W_dec[5].detach()

    def steer(resid, hook):
        return resid + 4.0 * direction

    return logprobs(model.run_with_hooks(model.to_tokens(PROMPT),
                                         fwd_hooks=[(hook(sae), steer)]))


# ---- latent-level hooks (SAELens's feature steering and ablation) ------------------------

@idiom
def ablate_a_feature_through_its_hook(model, saes):
    sae = saes["res"]

    def ablate(acts, hook):
        acts[..., 3] = 0.0
        return acts

    with model.saes(saes=[sae], use_error_term=True):
        return logprobs(model.run_with_hooks(
            model.to_tokens(PROMPT), fwd_hooks=[(f"{hook(sae)}.hook_sae_acts_post", ablate)]))


@idiom
def steer_a_feature_through_its_hook(model, saes):
    sae = saes["mlp"]

    def boost(acts, hook):
        acts[:, -1, 7] += 10.0
        return acts

    return logprobs(model.run_with_hooks_with_saes(
        model.to_tokens(PROMPT), saes=[sae],
        fwd_hooks=[(f"{hook(sae)}.hook_sae_acts_post", boost)]))


@idiom
def clamp_a_feature_with_add_sae(model, saes):
    sae = saes["res"]

    def clamp(acts, hook):
        acts[:, 1:, 11] = 5.0
        return acts

    model.add_sae(sae, use_error_term=True)
    try:
        return logprobs(model.run_with_hooks(
            model.to_tokens(PROMPT), fwd_hooks=[(f"{hook(sae)}.hook_sae_acts_post", clamp)]))
    finally:
        model.reset_saes()


@idiom
def read_latents_with_a_hook(model, saes):
    sae, seen = saes["mlp"], []

    def record(acts, hook):
        seen.append((hook.name, acts.detach().clone()))

    model.run_with_hooks_with_saes(model.to_tokens(PROMPT), saes=[sae],
                                   fwd_hooks=[(f"{hook(sae)}.hook_sae_acts_post", record)])
    return seen


# ---- the test -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saelens_saes():
    """SAELens SAE objects on raw activations (SAELens loads them from saebridge's folders)."""
    res = sb.SAE.random("topk", 64, 128, "blocks.1.hook_resid_pre", k=6, seed=1,
                        activation_space="hf")
    mlp = sb.SAE.random("jumprelu", 64, 96, "blocks.0.hook_mlp_out", seed=2,
                        activation_space="hf")
    attn = sb.SAE.random("standard", 64, 128, "blocks.0.attn.hook_z", seed=3,
                         activation_space="hf")
    return {"res": saelens_sae(res), "mlp": saelens_sae(mlp), "attn": saelens_sae(attn)}


@pytest.fixture(scope="module")
def hooked_sae_transformer(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    return tl_model(hf, tokenizer, "hf")


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_idiom_gives_saelens_results(model, hooked_sae_transformer, saelens_saes, name):
    with torch.no_grad():
        want = IDIOMS[name](hooked_sae_transformer, saelens_saes)
        got = IDIOMS[name](model, saelens_saes)
    assert_same(got, want, name)
    assert not model._attached, "an idiom left SAEs attached"


def test_the_corpus_is_large_enough():
    assert len(IDIOMS) >= 22
