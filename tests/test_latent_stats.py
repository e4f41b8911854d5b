"""Latent statistics on the fly: equal to a brute-force count over the dense latents, merged
exactly across batches and resumptions, and neither lost nor counted twice when a run is
killed (at a batch, or between writing the statistics and renaming their shard)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import saebridge as sb
from saebridge.datasets import token_batches
from saebridge.latent_stats import STATE, LatentStats
from saebridge.tiny import tiny_gpt2

TEXTS = [f"Text {i}: the cat sat on the mat and {'then ' * (i % 7)}left." for i in range(60)]
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    hf, tok = tiny_gpt2()
    return sb.wrap(hf, tokenizer=tok)


def sae() -> sb.SAE:
    return sb.SAE.random("topk", 64, 96, HOOK, k=6, seed=3)


def assert_same_stats(a: LatentStats, b: LatentStats) -> None:
    for name in STATE:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_stats_equal_a_brute_force_count(model, tmp_path):
    s = sae()
    sb.cache_latents(model, TEXTS, [s], out_dir=tmp_path, context_size=16, batch_size=4,
                     latent_stats=3, tokens_per_shard=64)
    stats = sb.load_stats(tmp_path)[HOOK]
    batches = list(token_batches(model, TEXTS, context_size=16, batch_size=4))
    acts = torch.cat([model.run_with_cache_with_saes(b, saes=[s], use_error_term=True)[1][
        HOOK + ".hook_sae_acts_post"] for b in batches])  # [windows, 16, d_sae]
    tokens = torch.cat(batches)
    assert int(stats.n_tokens) == tokens.numel()
    assert torch.equal(stats.fire_count, (acts > 0).sum((0, 1)))
    assert torch.equal(stats.max, acts.amax((0, 1)).clamp_min(0))
    torch.testing.assert_close(stats.mean, acts.mean((0, 1)), atol=1e-6, rtol=1e-5)
    assert torch.equal(stats.hist.sum(1), stats.fire_count)
    peak, where = acts.max(1)  # per window and latent: [windows, d_sae]
    for latent in range(0, 96, 7):
        best = sorted(range(len(peak)), key=lambda w: (-float(peak[w, latent]), w))
        best = [w for w in best if peak[w, latent] > 0][:3]
        got = stats.examples(latent)
        assert [ex.batch * 4 + ex.row for ex in got] == best
        assert [ex.tokens for ex in got] == [tokens[w].tolist() for w in best]
        assert [ex.position for ex in got] == [int(where[w, latent]) for w in best]
    text = sb.show_latent(tmp_path, HOOK, int(stats.fire_count.argmax()), model.tokenizer)
    assert "«" in text and text.startswith("latent ")
    with pytest.raises(sb.errors.DatasetError, match="out of range"):
        stats.show(96, model.tokenizer)


def test_merge_is_exact_whatever_the_split(model, tmp_path):
    s = sae()
    batches = list(token_batches(model, TEXTS, context_size=16, batch_size=4))
    whole = LatentStats(96, top_k=4, context_size=16)
    parts = [LatentStats(96, top_k=4, context_size=16) for _ in range(3)]
    for i, b in enumerate(batches):
        coo = model.run_with_cache_with_saes(b, saes=[s], use_error_term=True, sparse=True)[1][
            HOOK + ".hook_sae_acts_post"].coalesce()
        for stats in (whole, parts[i % 3]):
            stats.update(i, b, *coo.indices(), coo.values())
    merged = parts[2].merge(parts[0]).merge(parts[1])
    assert_same_stats(merged, whole)


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import saebridge as sb
    from saebridge.tiny import tiny_gpt2
    hf, tok = tiny_gpt2()
    model = sb.wrap(hf, tokenizer=tok)
    texts = [f"Text {i}: the cat sat on the mat and {'then ' * (i % 7)}left." for i in range(60)]
    sae = sb.SAE.random("topk", 64, 96, "blocks.0.hook_resid_post", k=6, seed=3)
    where, out = sys.argv[1], sys.argv[2]
    if where == "rename":  # die between the statistics and the rename of the first shard
        real = os.replace
        def replace(src, dst):
            if "shard_" in str(dst):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        os.replace = replace
    elif where == "batch":  # die while reading batch 9
        orig = model.run_with_cache_with_saes
        count = [0]
        def run(*a, **k):
            count[0] += 1
            if count[0] == 10:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(*a, **k)
        model.run_with_cache_with_saes = run
    sb.cache_latents(model, texts, [sae], out_dir=out, context_size=16, batch_size=4,
                     latent_stats=3, tokens_per_shard=128)
""")


def test_killed_run_resumes_exactly(model, tmp_path):
    """Killed while reading a batch, then killed again between writing the statistics of
    shard 2 and renaming it into place, then finished here: the same shards and statistics
    as a run never interrupted (the tiny model is the same, seeded, in every process)."""
    script, out = tmp_path / "run.py", tmp_path / "out"
    script.write_text(KILLED_RUN)
    for where in ("batch", "rename"):
        killed = subprocess.run([sys.executable, str(script), where, str(out)],
                                capture_output=True, timeout=120)
        assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    n = len(list(out.glob("shard_*.safetensors")))
    assert n == 4 and not (out / "latent_stats.safetensors").exists()
    assert (out / f"latent_stats_{n + 1:06d}.safetensors").exists()  # the torn shard's
    kw = dict(context_size=16, batch_size=4, latent_stats=3, tokens_per_shard=128)
    sb.cache_latents(model, TEXTS, [sae()], out_dir=out, **kw)
    sb.cache_latents(model, TEXTS, [sae()], out_dir=tmp_path / "ref", **kw)
    assert_same_stats(sb.load_stats(out)[HOOK], sb.load_stats(tmp_path / "ref")[HOOK])
    again, ref = sb.ActivationShards(out), sb.ActivationShards(tmp_path / "ref")
    assert len(again.paths) == len(ref.paths) and len(again) == len(ref)
    for mine, theirs in zip(again.paths, ref.paths, strict=True):
        a, b = load_file(mine), load_file(theirs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    leftovers = sorted(p.name for p in out.glob("latent_stats_*"))
    assert leftovers == [f"latent_stats_{len(ref.paths):06d}.safetensors"]
