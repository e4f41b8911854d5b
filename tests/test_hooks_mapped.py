"""The TransformerLens hooks no HF module boundary carries (``hook_attn_scores``,
``hook_rot_q/k``, ``hook_result``, ``hook_attn_in``, ``hook_q/k/v_input``, ``hook_mlp_in``,
``ln*.hook_scale``), compared with TransformerLens's own cache on the same weights: a
processed HookedTransformer with ``use_attn_result``/``use_split_qkv_input``/
``use_attn_in``/``use_hook_mlp_in`` set. On HF (eager and SDPA attention), nnsight over
HF (SDPA) and TransformerBridge, for GPT-2 and Llama (grouped-query, rotary).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import saebridge as sb
from saebridge.adapters.tl_bridge import bridge_from_hf
from saebridge.adapters.transformer_lens import from_hf
from saebridge.cli import main
from saebridge.errors import UnknownHookError
from saebridge.tiny import save_tiny, tiny

FAMILIES = ("gpt2", "llama")
BACKENDS = ("hf-eager", "hf-sdpa", "nnsight-hf", "bridge")
PER_BLOCK = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "ln1.hook_scale",
             "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_result", "hook_mlp_in",
             "ln2.hook_scale")
ROTARY = ("attn.hook_rot_q", "attn.hook_rot_k")
GATED = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_result",
         "hook_mlp_in")
"""Run by TransformerLens only under a cfg flag: not in a full cache, produced by name."""
TOKENS = torch.tensor([[1, 17, 33, 5, 260, 9, 71], [1, 4, 8, 15, 16, 23, 42]])
_BUILT: dict[str, tuple] = {}


def names_of(family: str) -> list[str]:
    rel = PER_BLOCK + (ROTARY if family != "gpt2" else ())
    return [f"blocks.{i}.{r}" for i in range(2) for r in rel] + ["ln_final.hook_scale"]


def tl_cache(hf, tok, **flags):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = from_hf(hf, tokenizer=tok)
    for flag, on in flags.items():
        setattr(model.cfg, flag, on)
    model.setup()
    return model.run_with_cache(TOKENS)[1]


def built(family: str) -> tuple:
    """``(hf model, tokenizer, reference)``: each hook's value in TransformerLens."""
    if family not in _BUILT:
        hf, tok = tiny(family)
        gqa = hf.config.to_dict().get("num_key_value_heads") not in (
            None, hf.config.to_dict().get("num_attention_heads"))
        flagged = tl_cache(hf, tok, use_attn_result=True, use_hook_mlp_in=True,
                           use_split_qkv_input=not gqa)
        plain = tl_cache(hf, tok)  # ln*.hook_scale: [batch, pos, 1] with the flags off
        attn_in = None if gqa else tl_cache(hf, tok, use_attn_in=True)
        ref = {}
        for name in names_of(family):
            rel = name.split(".", 2)[-1]
            if gqa and rel in GATED[:4]:
                # TransformerLens 3 cannot run use_attn_in/use_split_qkv_input with
                # grouped-query attention (its einsum fails): its code repeats resid_pre
                # over n_heads (q, attn_in) or n_key_value_heads (k, v).
                resid = plain[name.rsplit(".", 1)[0] + ".hook_resid_pre"]
                n = hf.config.num_key_value_heads if rel in ("hook_k_input", "hook_v_input") \
                    else hf.config.num_attention_heads
                ref[name] = resid.unsqueeze(-2).expand(*resid.shape[:-1], n, resid.shape[-1])
            else:
                ref[name] = (attn_in if rel == "hook_attn_in" else
                             plain if "hook_scale" in rel else flagged)[name]
        _BUILT[family] = (hf, tok, ref)
    return _BUILT[family]


def wrapped(family: str, backend: str) -> sb.Model:
    hf, tok, _ = built(family)
    hf = copy.deepcopy(hf)
    if backend == "bridge":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = bridge_from_hf(hf, tokenizer=tok, compatibility_mode=True)
        bridge.set_use_attn_result(True)
        bridge.set_use_hook_mlp_in(True)
        return sb.wrap(bridge, tokenizer=tok)
    hf.config._attn_implementation = "eager" if backend == "hf-eager" else "sdpa"
    if backend == "nnsight-hf":
        import nnsight

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sb.wrap(nnsight.LanguageModel(hf, tokenizer=copy.deepcopy(tok)),
                           tokenizer=tok)
    return sb.wrap(hf, tokenizer=tok)


# Named ``where``: conftest gives ``backend`` to the shared backend matrix.
@pytest.mark.parametrize("where", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_mapped_hook_equals_transformer_lens(family, where):
    _, _, ref = built(family)
    model = wrapped(family, where)
    wanted = [n for n in names_of(family) if where != "bridge"
              or n.split(".", 2)[-1] not in GATED[:4]]  # the bridge runs what its flags say
    _, cache = model.run_with_cache(TOKENS, names=wanted)
    for name in wanted:
        assert cache[name].shape == ref[name].shape, name
        torch.testing.assert_close(cache[name], ref[name], atol=5e-5, rtol=1e-4, msg=name)
    scores = cache["blocks.1.attn.hook_attn_scores"]
    assert torch.isneginf(scores[..., 0, 1:]).all()  # TransformerLens's IGNORE, -inf


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_full_cache_has_scores_and_patterns_and_restores_attention(family):
    model = wrapped(family, "hf-sdpa")
    hf = model.adapter.model
    _, cache = model.run_with_cache(TOKENS)
    assert {"blocks.0.attn.hook_pattern", "blocks.1.attn.hook_attn_scores",
            "ln_final.hook_scale"} <= set(cache)
    assert not any(n.split(".", 2)[-1] in GATED for n in cache)  # as TL with the flags off
    assert hf.config._attn_implementation == "sdpa"
    # Logits are the model's own (eager and SDPA agree to fp32 rounding).
    torch.testing.assert_close(model(TOKENS), hf(TOKENS).logits, atol=1e-5, rtol=1e-4)

    def fail(act, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_pattern", fail)])
    assert hf.config._attn_implementation == "sdpa"


def test_computed_hooks_are_read_only():
    model = wrapped("gpt2", "hf-sdpa")
    for name in ("blocks.0.attn.hook_result", "blocks.0.ln1.hook_scale"):
        width = model.run_with_cache(TOKENS, names=[name])[1][name].shape[-1]
        with pytest.raises(UnknownHookError, match="read but not written"):
            model.run_with_interventions(TOKENS, [sb.Steer(name, torch.ones(width))])


def with_mlp_in(family: str):
    """A processed HookedTransformer of ``family`` with ``use_hook_mlp_in`` set."""
    hf, tok, _ = built(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = from_hf(hf, tokenizer=tok)  # copies the weights: hf is left as it is
    tl.set_use_hook_mlp_in(True)
    return tl


def cache_under(model, hooks: list, names: list[str]) -> tuple:
    """``(logits, cache of names)`` with ``hooks`` on, in TransformerLens's spelling (a
    HookedTransformer or a wrapped model alike)."""
    with model.hooks(fwd_hooks=hooks):
        return model.run_with_cache(TOKENS, names_filter=names)


@pytest.mark.parametrize("where", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_write_at_hook_mlp_in_feeds_only_the_mlp_as_in_transformer_lens(family, where):
    """``hook_mlp_in`` is the MLP's own copy of the stream (TransformerLens's
    ``use_hook_mlp_in``): an edit there changes the MLP's input, not the residual."""
    hf, _, _ = built(family)
    d = hf.config.hidden_size
    vector = torch.linspace(-1.0, 3.0, d)

    def edit(x, hook):
        return 1.5 * x + vector

    hooks = [("blocks.0.hook_mlp_in", edit)]
    names = ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]
    want_logits, want = cache_under(with_mlp_in(family), hooks, names)
    model = wrapped(family, where)
    logits, got = cache_under(model, hooks, names)
    for name in names:
        if where == "bridge" and name.endswith("resid_mid"):
            continue  # the bridge's own hook_resid_mid is ln2's input: it sees the edit too
        torch.testing.assert_close(got[name], want[name], atol=5e-5, rtol=1e-4, msg=name)
    gap = (logits.log_softmax(-1) - want_logits.log_softmax(-1)).abs().max()
    assert gap < 1e-4
    clean = model.run_with_cache(TOKENS, names=["blocks.0.hook_mlp_out"])[1]
    assert not torch.allclose(clean["blocks.0.hook_mlp_out"], got["blocks.0.hook_mlp_out"])


@pytest.mark.parametrize("family", ["neox", "gemma2"])
def test_hook_mlp_in_writes_in_parallel_and_sandwich_blocks(family):
    """NeoX's MLP reads the block input beside attention; Gemma-2's reads its own
    pre-feedforward norm: an edit at ``hook_mlp_in`` still reaches only the MLP, as in
    TransformerLens with ``use_hook_mlp_in``."""
    hf, _, _ = built(family)
    vector = torch.linspace(-1.0, 3.0, hf.config.hidden_size)
    hooks = [("blocks.0.hook_mlp_in", lambda x, hook: 1.5 * x + vector)]
    names = ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]
    want_logits, want = cache_under(with_mlp_in(family), hooks, names)
    logits, got = cache_under(wrapped(family, "hf-eager"), hooks, names)
    for name in names:
        torch.testing.assert_close(got[name], want[name], atol=5e-5, rtol=1e-4, msg=name)
    assert (logits.log_softmax(-1) - want_logits.log_softmax(-1)).abs().max() < 1e-4


@pytest.mark.parametrize("space", ["tl-processed", "hf"])
@pytest.mark.parametrize("where", ("hf-sdpa", "nnsight-hf"))
@pytest.mark.parametrize("family", ["gpt2", "neox"])  # neox: the MLP reads the block input
def test_an_sae_spliced_at_hook_mlp_in_equals_transformer_lens(family, where, space):
    hf, _, _ = built(family)
    tl = with_mlp_in(family)
    sae = sb.SAE.random("topk", hf.config.hidden_size, 48, "blocks.1.hook_mlp_in", k=6, seed=3,
                        activation_space=space)
    steer = sb.Steer("blocks.0.hook_resid_post", torch.linspace(0.0, 2.0, 64))  # a mean
    ops = [steer, sb.Splice(sae)]
    want = sb.wrap(tl).run_with_interventions(TOKENS, ops)
    got = wrapped(family, where).run_with_interventions(TOKENS, ops)
    gap = (got.log_softmax(-1) - want.log_softmax(-1)).abs().max()
    assert gap < 1e-4
    assert (want.log_softmax(-1) - sb.wrap(tl)(TOKENS).log_softmax(-1)).abs().max() > 1e-2


def test_transformer_lens_without_the_flag_names_it():
    hf, tok, _ = built("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sb.wrap(from_hf(hf, tokenizer=tok))
    assert "blocks.0.attn.hook_result" not in model.hook_names()
    assert "blocks.0.attn.hook_attn_scores" in model.hook_names()
    with pytest.raises(UnknownHookError, match=r"use_attn_result=True.*set_use_attn_result"):
        model.run_with_cache(TOKENS, names=["blocks.0.attn.hook_result"])


def test_cli_hooks_lists_computed_and_unproduced_hooks(tmp_path, capsys):
    assert main(["hooks", str(save_tiny("neox", tmp_path / "neox"))]) == 0
    out = capsys.readouterr().out
    assert "computed: scores" in out and "computed: rot_q" in out
    assert "not in a full cache (TransformerLens: cfg.use_attn_result)" in out
    produced, missing = out.split("Not produced on this model")
    assert "blocks.1.attn.hook_result" in produced and "hook_resid_mid" not in produced
    assert "hook_resid_mid: GPT-NeoX (Pythia) runs attention and MLP in parallel" in missing
    assert "hook_pos_embed: GPT-NeoX uses rotary position embeddings" in missing


def test_unprocessed_result_is_refused_not_misconverted():
    """A raw bridge's hook_result keeps each head's b_V @ W_O, which the canonical space
    folds into b_O: refused (naming where to read it) rather than cached off by it."""
    hf, tok, _ = built("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = bridge_from_hf(copy.deepcopy(hf), tokenizer=tok)
    bridge.set_use_attn_result(True)
    model = sb.wrap(bridge, tokenizer=tok)
    assert "blocks.0.attn.hook_result" not in model.hook_names()
    with pytest.raises(UnknownHookError, match="enable_compatibility_mode"):
        model.run_with_cache(TOKENS, names=["blocks.0.attn.hook_result"])
