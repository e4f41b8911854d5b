"""TransformerLens idioms, run unchanged on every backend and on TransformerLens itself.

Each idiom below is research code as TransformerLens's docs and tutorials write it (the Main
Demo, Exploratory Analysis, activation patching, the logit lens, direct logit attribution;
rewritten, not copied), as a function of the model object. It runs once on the backend
under test (a ``saebridge.Model``) and once on a TransformerLens-processed
``HookedTransformer`` of the same weights, and the results must agree: porting means
replacing the model object, nothing else. Logits are compared only through what
TransformerLens's ``center_unembed`` leaves unchanged (log-probs, logit differences).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch

PROMPT = "When Mary and John went to the store, John gave a drink to"
CORRECT, WRONG = " the", " a"
TOL = {"atol": 2e-4, "rtol": 2e-4}
"""fp32: summation order only (log-probs are held to 1e-4 elsewhere; these are sums of
d_model products, DLA over a vocabulary)."""

IDIOMS: dict[str, Callable[[Any], Any]] = {}


def idiom(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    IDIOMS[fn.__name__] = fn
    return fn


def get_act_name(name: str, layer: int | None = None) -> str:
    from transformer_lens.utilities import get_act_name as tl_get_act_name

    return tl_get_act_name(name, layer)


# ---- config, tokens, outputs ----------------------------------------------------------------

@idiom
def config_fields(model):
    c = model.cfg
    return [c.n_layers, c.d_model, c.n_heads, c.d_head, c.d_mlp, c.d_vocab, c.n_ctx, c.act_fn,
            c.normalization_type, c.positional_embedding_type, c.d_vocab_out, c.eps]


@idiom
def str_tokens(model):
    return model.to_str_tokens(PROMPT), model.to_str_tokens(model.to_tokens(PROMPT))


@idiom
def tokens_with_and_without_bos(model):
    return model.to_tokens(PROMPT), model.to_tokens(PROMPT, prepend_bos=False)


@idiom
def batch_of_texts_is_padded(model):
    texts = ["Hi", PROMPT, "John gave"]
    return model.to_tokens(texts), model.to_tokens(texts, padding_side="left")


@idiom
def round_trip_to_string(model):
    tokens = model.to_tokens(PROMPT)
    return model.to_string(tokens[0, 1:]), model.to_string(tokens[:, 1:])


@idiom
def single_tokens(model):
    return model.to_single_token(CORRECT), model.to_single_token(WRONG)


@idiom
def tokenizer_attribute(model):
    return model.tokenizer.decode(model.to_tokens(PROMPT)[0, 1:])


@idiom
def loss_of_a_prompt(model):
    return model(PROMPT, return_type="loss")


@idiom
def loss_per_token(model):
    return model(model.to_tokens(PROMPT), return_type="loss", loss_per_token=True)


@idiom
def both_logits_and_loss(model):
    logits, loss = model(PROMPT, return_type="both")
    return logits.log_softmax(-1), loss


@idiom
def no_output(model):
    return model(PROMPT, return_type=None)


@idiom
def logit_difference(model):
    logits = model(model.to_tokens(PROMPT))
    c, w = model.to_single_token(CORRECT), model.to_single_token(WRONG)
    return logits[0, -1, c] - logits[0, -1, w], logits[0, -1].argmax()


@idiom
def greedy_generation(model):
    return model.generate(PROMPT, max_new_tokens=4, do_sample=False, verbose=False,
                          stop_at_eos=False)


@idiom
def generation_of_tokens(model):
    tokens = model.to_tokens("John gave")
    return model.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False,
                          stop_at_eos=True)


# ---- weights --------------------------------------------------------------------------------

@idiom
def stacked_weights(model):
    return [getattr(model, n) for n in ("W_E", "W_pos", "W_U", "b_U", "W_Q", "W_K", "W_V",
                                        "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out",
                                        "b_in", "b_out")]


@idiom
def per_block_weights(model):
    return model.blocks[1].attn.W_O[2], model.blocks[0].mlp.W_in, model.blocks[0].attn.b_Q


@idiom
def full_ov_circuit_of_a_head(model):
    return model.W_E[:50] @ model.W_V[0, 1] @ model.W_O[0, 1] @ model.W_U


@idiom
def unembedding_directions(model):
    c, w = model.to_single_token(CORRECT), model.to_single_token(WRONG)
    return model.tokens_to_residual_directions(torch.tensor([c, w]))


@idiom
def hook_names_available(model):
    return sorted(n for n in model.hook_dict if n.endswith(("hook_z", "hook_resid_pre")))


# ---- caches ---------------------------------------------------------------------------------

@idiom
def attention_pattern_from_cache(model):
    _, cache = model.run_with_cache(PROMPT)
    return cache["blocks.1.attn.hook_pattern"], cache["pattern", 0]


@idiom
def cache_shorthand(model):
    _, cache = model.run_with_cache(PROMPT)
    return [cache["resid_pre", 0], cache["resid_post", -1], cache["z", 1, "attn"],
            cache["q1"], cache["post", 0], cache[get_act_name("mlp_out", 1)],
            cache["normalized", 0, "ln2"]]


@idiom
def names_filter_callable(model):
    _, cache = model.run_with_cache(PROMPT, names_filter=lambda n: n.endswith("hook_z"))
    return sorted(cache.keys()), [cache[k] for k in sorted(cache.keys())]


@idiom
def names_filter_string_and_list(model):
    loss, one = model.run_with_cache(PROMPT, names_filter="blocks.0.hook_resid_post",
                                     return_type="loss")
    _, two = model.run_with_cache(PROMPT, names_filter=["hook_embed", "blocks.1.hook_mlp_out"])
    return loss, list(one.keys()), sorted(two.keys()), two["blocks.1.hook_mlp_out"]


@idiom
def cache_without_batch_dim(model):
    _, cache = model.run_with_cache(PROMPT, remove_batch_dim=True)
    _, other = model.run_with_cache(PROMPT)
    other.remove_batch_dim()
    return cache["blocks.0.attn.hook_pattern"], other["resid_mid", 1]


@idiom
def logit_lens(model):
    logits, cache = model.run_with_cache(PROMPT)
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    lens_logits = stack[:, 0, -1] @ model.W_U
    return labels, lens_logits.log_softmax(-1), logits[0, -1].log_softmax(-1)


@idiom
def accumulated_resid_with_mids(model):
    _, cache = model.run_with_cache(PROMPT)
    return (cache.accumulated_resid(layer=1, incl_mid=True, pos_slice=-1, return_labels=True),
            cache.accumulated_resid(layer=1, mlp_input=True, apply_ln=True))


@idiom
def decomposed_logit_difference(model):
    tokens = model.to_tokens(PROMPT)
    _, cache = model.run_with_cache(tokens)
    stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    c, w = model.to_single_token(CORRECT), model.to_single_token(WRONG)
    attrs = cache.logit_attrs(stack, tokens=torch.tensor([c]), incorrect_tokens=torch.tensor([w]),
                              pos_slice=-1)
    return labels, attrs


@idiom
def per_head_direct_logit_attribution(model):
    _, cache = model.run_with_cache(PROMPT)
    heads, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    scaled = cache.apply_ln_to_stack(heads, layer=-1, pos_slice=-1)
    direction = model.tokens_to_residual_directions(CORRECT)
    return labels, scaled @ direction, cache.logit_attrs(heads, CORRECT, WRONG, pos_slice=-1)


@idiom
def head_results_with_remainder(model):
    _, cache = model.run_with_cache(PROMPT)
    return cache.stack_head_results(layer=1, incl_remainder=True, apply_ln=True)


@idiom
def stacked_activations_and_ln(model):
    _, cache = model.run_with_cache(PROMPT)
    attn = cache.stack_activation("attn_out")
    return attn, cache.apply_ln_to_stack(attn, layer=1), \
        cache.apply_ln_to_stack(attn[:1], layer=1, mlp_input=True)


# ---- hooks ----------------------------------------------------------------------------------

def _ablate_head(z, hook, head):
    z[:, :, head, :] = 0.0
    return z


@idiom
def head_ablation_loss(model):
    hook = partial(_ablate_head, head=1)
    return [model.run_with_hooks(PROMPT, return_type="loss", loss_per_token=True,
                                 fwd_hooks=[(get_act_name("z", layer), hook)])
            for layer in range(model.cfg.n_layers)]


@idiom
def in_place_edit_without_return(model):
    def zero_mlp(post, hook):
        post[:, -1] = 0.0

    return model.run_with_hooks(PROMPT, return_type="loss",
                                fwd_hooks=[("blocks.0.mlp.hook_post", zero_mlp)])


@idiom
def mean_ablation_of_the_residual(model):
    def mean_over_positions(resid, hook):
        return resid.mean(1, keepdim=True).expand_as(resid).clone()

    logits = model.run_with_hooks(PROMPT, fwd_hooks=[("blocks.1.hook_resid_pre",
                                                      mean_over_positions)])
    return logits.log_softmax(-1)


@idiom
def steering_with_an_embedding(model):
    direction = model.W_E[model.to_single_token(CORRECT)]

    def steer(resid, hook):
        return resid + 4.0 * direction

    return model.run_with_hooks(PROMPT, return_type="loss",
                                fwd_hooks=[("blocks.1.hook_resid_mid", steer)])


@idiom
def activation_patching(model):
    clean = model.to_tokens(PROMPT)
    corrupted = model.to_tokens(PROMPT.replace("Mary", "Jack"))
    _, clean_cache = model.run_with_cache(clean)
    c, w = model.to_single_token(CORRECT), model.to_single_token(WRONG)

    def patch(resid, hook, pos):
        resid[:, pos] = clean_cache[hook.name][:, pos]
        return resid

    results = torch.zeros(model.cfg.n_layers, 3)
    for layer in range(model.cfg.n_layers):
        for i, pos in enumerate((4, 8, -1)):
            logits = model.run_with_hooks(corrupted, fwd_hooks=[
                (get_act_name("resid_pre", layer), partial(patch, pos=pos))])
            results[layer, i] = logits[0, -1, c] - logits[0, -1, w]
    return results


@idiom
def hook_point_name_layer_and_ctx(model):
    seen = []

    def record(pattern, hook):
        seen.append((hook.name, hook.layer(), pattern[0, :, -1].sum().item()))
        hook.ctx["max"] = pattern.max()

    model.run_with_hooks(PROMPT, return_type=None,
                         fwd_hooks=[(lambda name: name.endswith("hook_pattern"), record)])
    kept = model.hook_dict["blocks.1.attn.hook_pattern"].ctx["max"]
    model.reset_hooks()  # clears contexts too
    return seen, kept, model.hook_dict["blocks.1.attn.hook_pattern"].ctx


@idiom
def hooks_context_manager(model):
    def scale(post, hook):
        return post * 0.5

    with model.hooks(fwd_hooks=[("blocks.0.mlp.hook_post", scale)]):
        hooked = model(PROMPT, return_type="loss")
        _, cache = model.run_with_cache(PROMPT, names_filter="blocks.0.mlp.hook_post")
    return hooked, cache["blocks.0.mlp.hook_post"], model(PROMPT, return_type="loss")


@idiom
def add_hook_then_reset(model):
    def double_values(v, hook):
        return v * 2.0

    model.add_hook("blocks.0.attn.hook_v", double_values)
    hooked = model(PROMPT, return_type="loss")
    model.reset_hooks()
    model.run_with_hooks(PROMPT, fwd_hooks=[("blocks.1.attn.hook_q", double_values)],
                         reset_hooks_end=False)
    kept = model(PROMPT, return_type="loss")
    model.reset_hooks()
    return hooked, kept, model(PROMPT, return_type="loss")


@pytest.fixture
def tl(models, backend):
    """TransformerLens itself: the processed HookedTransformer of the same weights."""
    return models("tl-processed", backend.device).adapter.model


def assert_same(got: Any, want: Any, where: str = "result") -> None:
    """Equal structure, equal strings and ints, tensors and floats within :data:`TOL`."""
    if isinstance(want, torch.Tensor) or isinstance(got, torch.Tensor):
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor), where
        assert got.shape == want.shape, f"{where}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
        torch.testing.assert_close(got.detach().cpu().double(), want.detach().cpu().double(),
                                   **TOL, msg=lambda m: f"{where}: {m}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: {got!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys"
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, float) and not isinstance(got, str):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4), where
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_idiom_gives_transformer_lens_results(model, tl, name):
    got = IDIOMS[name](model)
    want = IDIOMS[name](tl)
    assert_same(got, want, name)
    assert not model._hook_fns and not tl.hook_dict["blocks.0.hook_resid_pre"].fwd_hooks


def test_the_corpus_is_large_enough():
    assert len(IDIOMS) >= 30
