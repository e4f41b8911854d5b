"""Latents at layer 5 of a 12-layer GPT-2-small-shaped model: the run stopped after the
SAE's block (automatic stop, ``return_type=None``) vs the whole forward; and
``cache_latents`` throughput over texts with latent statistics on.

Run: ``python benchmarks/bench_stop_at_layer.py`` (CPU, 1 thread; prints markdown tables).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gpt2_small, tokens

import saebridge as sb

HOOK5 = "blocks.5.hook_resid_pre"
REPEATS = 7


def median_s(fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    model = sb.wrap(gpt2_small())
    sae = sb.SAE.random("topk", 768, 24576, HOOK5, k=32)
    if "--cache-only" not in sys.argv:
        compare_stop(model, sae)
    cache_throughput(model, sae)


def compare_stop(model: sb.Model, sae: sb.SAE) -> None:
    toks = tokens()
    key = HOOK5 + ".hook_sae_acts_post"
    with torch.no_grad():
        def full():
            return model.run_with_cache_with_saes(toks, saes=[sae], names=[],
                                                  use_error_term=True)[1][key]

        def stopped():
            return model.run_with_cache_with_saes(toks, saes=[sae], names=[], return_type=None,
                                                  use_error_term=True)[1][key]

        same = torch.equal(full(), stopped())
        t_full, t_stop = median_s(full), median_s(stopped)
        t_forward = median_s(lambda: model(toks))
    print("| run (4 x 128 tokens) | median s | ÷ full forward |")
    print("|---|---|---|")
    for name, t in (("full forward (logits)", t_forward), ("latents, whole forward", t_full),
                    ("latents, stopped after block 5", t_stop)):
        print(f"| {name} | {t:.3f} | {t / t_forward:.2f} |")
    print(f"\nlatents identical to the whole run: {same}")


def cache_throughput(model: sb.Model, sae: sb.SAE) -> None:
    from saebridge.tiny import tiny_tokenizer  # trained offline; ids fit the 50257 vocab

    texts = [" ".join(f"word{(i * 7 + j) % 97}" for j in range(60)) for i in range(40)]
    model = sb.wrap(model.adapter.model, tokenizer=tiny_tokenizer())
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        shards = sb.cache_latents(model, texts, [sae], out_dir=out, context_size=128,
                                  batch_size=4, latent_stats=10)
        elapsed = time.perf_counter() - start
        n = len(shards)
    print(f"\ncache_latents over texts, stats on: {n} tokens in {elapsed:.1f} s = "
          f"{n / elapsed:.0f} tokens/s")


if __name__ == "__main__":
    main()
