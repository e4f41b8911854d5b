"""``stop_at_layer`` and the automatic stop, on every backend: the residual stream at the
stop (TransformerLens's meaning, canonical space), nothing after it computed, interventions
past it refused, nothing left behind, and the same values as a whole run."""

from __future__ import annotations

import re

import pytest
import torch

import saebridge as sb
from saebridge.engine import underlying
from saebridge.errors import OptionError
from tests.parity import ACTS_TOL

LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers|blocks)\.(\d+)(?:\.|$)")
UNEMBED = ("lm_head", "unembed")


class Calls:
    """Every module with weights of its own (the ones that compute) under ``model`` that
    runs to its end, by path, while in use."""

    def __init__(self, model: sb.Model) -> None:
        self.root = underlying(model.adapter)
        self.called: list[str] = []

    def __enter__(self) -> Calls:
        self.handles = [m.register_forward_hook(lambda *_, p=p: self.called.append(p))
                        for p, m in self.root.named_modules()
                        if p and next(m.parameters(recurse=False), None) is not None]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def layers(self) -> set[int]:
        return {int(m.group(1)) for p in self.called if (m := LAYER_RE.search(p))}

    def unembedded(self) -> bool:
        return any(part in UNEMBED for p in self.called for part in p.split("."))


def test_stop_returns_the_residual_and_skips_the_rest(model, backend):
    tokens = model.to_tokens("The quick brown fox")
    clean = model(tokens)
    _, cache = model.run_with_cache(tokens)
    n = model.adapter.n_layers
    for stop, hook in ((1, "blocks.1.hook_resid_pre"), (0, "blocks.0.hook_resid_pre"),
                       (-1, f"blocks.{n - 1}.hook_resid_pre"),
                       (n, f"blocks.{n - 1}.hook_resid_post")):
        with Calls(model) as calls:
            resid = model(tokens, stop_at_layer=stop)
        torch.testing.assert_close(resid, cache[hook], **ACTS_TOL, msg=f"stop {stop}")
        layer = stop % (n + 1) if stop >= 0 else stop + n
        assert not {la for la in calls.layers() if la >= layer}, f"stop {stop} ran later blocks"
        assert not calls.unembedded()
    # Nothing left behind: a whole run after the stopped ones is the clean one.
    assert torch.equal(model(tokens), clean)


def test_stop_on_every_run_method(model, backend):
    tokens = model.to_tokens("Hello world")
    sae = sb.SAE.random("topk", 64, 128, "blocks.0.hook_resid_post", k=8, seed=1)
    want = model(tokens, stop_at_layer=1)
    out, cache = model.run_with_cache(tokens, stop_at_layer=1)
    assert torch.equal(out, want)
    assert "blocks.0.hook_resid_post" in cache and "blocks.1.hook_resid_pre" not in cache
    assert not any(k.startswith("blocks.1.") or k.startswith("ln_final") for k in cache)
    out, cache = model.run_with_cache_with_saes(tokens, saes=[sae], stop_at_layer=1)
    _, full = model.run_with_cache_with_saes(tokens, saes=[sae])
    key = "blocks.0.hook_resid_post.hook_sae_acts_post"
    torch.testing.assert_close(cache[key], full[key], **ACTS_TOL)
    # The splice (no error term) is upstream of the stop: the residual shows it.
    assert not torch.allclose(out, want, **ACTS_TOL)
    seen: list[str] = []
    out = model.run_with_hooks(tokens, stop_at_layer=1, fwd_hooks=[
        ("blocks.0.hook_mlp_out", lambda act, hook: seen.append(hook.name))])
    assert torch.equal(out, want) and seen == ["blocks.0.hook_mlp_out"]
    with sb.trace(model, tokens, stop_at_layer=1) as t:
        t["blocks.0.hook_mlp_out"]
    torch.testing.assert_close(t.logits, want, **ACTS_TOL)  # its forward runs in a thread


def test_automatic_stop_when_logits_are_unused(model, backend):
    tokens = model.to_tokens("The quick brown fox")
    _, full = model.run_with_cache(tokens, names=["blocks.0.hook_mlp_out"])
    with Calls(model) as calls:
        out, cache = model.run_with_cache(tokens, names=["blocks.0.hook_mlp_out"],
                                          return_type=None)
    assert out is None and torch.equal(cache["blocks.0.hook_mlp_out"],
                                       full["blocks.0.hook_mlp_out"])
    assert calls.layers() == {0} and not calls.unembedded()
    seen: list[torch.Tensor] = []
    with Calls(model) as calls:
        model.run_with_hooks(tokens, return_type=None, fwd_hooks=[
            ("blocks.0.hook_resid_post", lambda act, hook: seen.append(act.clone()))])
    assert calls.layers() == {0} and len(seen) == 1
    # Logits asked for: the whole forward runs.
    with Calls(model) as calls:
        model.run_with_cache(tokens, names=["blocks.0.hook_mlp_out"])
    assert calls.unembedded()


def test_interventions_past_the_stop_are_refused(model, backend):
    tokens = model.to_tokens("Hello world")
    late = sb.SAE.random("topk", 64, 128, "blocks.1.hook_resid_pre", k=8, seed=2)
    clean = model(tokens)
    with pytest.raises(OptionError, match="after the stop"):
        model.run_with_saes(tokens, saes=[late], stop_at_layer=1)
    with pytest.raises(OptionError, match=r"blocks\.1\.hook_attn_out"):
        model.run_with_hooks(tokens, stop_at_layer=1, fwd_hooks=[
            ("blocks.1.hook_attn_out", lambda act, hook: act * 0)])
    with pytest.raises(OptionError, match="after the stop"), \
            sb.trace(model, tokens, stop_at_layer=1) as t:
        t["blocks.1.hook_resid_post"]
    with model.saes([late]), pytest.raises(OptionError, match=r"model\.reset_saes"):
        model(tokens, stop_at_layer=0)
    assert torch.equal(model(tokens), clean)


@pytest.mark.parametrize("bad", [3, -3, 1.5, True, "1"])
def test_out_of_range_stop_is_refused(models, bad):
    model = models("hf")
    with pytest.raises(OptionError, match=r"from -2 to 2"):
        model(model.to_tokens("Hi"), stop_at_layer=bad)
    with pytest.raises(OptionError, match=r"out of range"):
        sb.trace(model, "Hi", stop_at_layer=bad)


def test_matches_transformer_lens_stop_at_layer(models):
    """TransformerLens's own ``stop_at_layer`` on a processed HookedTransformer (whose space
    is the canonical one): the same residual, for every valid value."""
    model = models("tl-processed")
    tokens = model.to_tokens("The quick brown fox")
    for stop in range(-2, 3):
        assert torch.equal(model(tokens, stop_at_layer=stop),
                           model.adapter.model(tokens, stop_at_layer=stop)), stop
