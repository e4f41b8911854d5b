"""Streaming activation caching: peak memory does not grow with the data set.

Runs ``sb.cache_activations`` on the GPT-2-small-shaped model (HF backend) over N and 10 N
batches of 4 x 128 tokens, caching ``blocks.8.hook_resid_pre`` and the latents of a TopK
k=32, d_sae 32768 SAE there, each run in a fresh child process. Reported: the process's
lifetime peak RSS, and the peak above the RSS after model set-up and one warm-up forward
(see memory.py), with their 10 N ÷ N ratios. Run::

    python benchmarks/bench_cache_activations.py --batches 4
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common
import memory
from common import HOOK, table

TOKENS_PER_SHARD = 2048


def child(n_batches: int) -> None:
    import json

    import saebridge as sb

    model = sb.wrap(common.gpt2_small())
    sae = sb.SAE.random("topk", 768, 32768, HOOK, k=32, seed=2, activation_space="hf")
    with torch.no_grad():
        model.run_with_cache_with_saes(common.tokens(), saes=[sae], names=[HOOK],
                                       use_error_term=True, sparse=True)
    before = memory.rss_mb()
    memory.reset_peak()
    batches = (common.tokens(seed=i) for i in range(n_batches))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        ds = sb.cache_activations(model, batches, hooks=[HOOK], saes=[sae], out_dir=out,
                                  tokens_per_shard=TOKENS_PER_SHARD, progress=False)
        seconds = time.perf_counter() - start
        disk = sum(p.stat().st_size for p in Path(out).iterdir())
        n_tokens, n_shards = len(ds), len(ds.paths)
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({"tokens": n_tokens, "shards": n_shards, "disk_mb": disk / 2**20,
                      "peak_above_mb": memory.peak_mb() - before, "lifetime_mb": lifetime,
                      "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", type=int, default=None)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    print(f"# bench_cache_activations — {common.machine(timed=False)}; batches of {common.BATCH} x "
          f"{common.POS}, tokens_per_shard {TOKENS_PER_SHARD}\n")
    res = [memory.run_child(Path(__file__), str(n)) for n in (args.batches, 10 * args.batches)]
    rows = [[r["tokens"], r["shards"], f"{r['disk_mb']:.0f}", f"{r['seconds']:.0f}",
             f"{r['lifetime_mb']:.0f}", f"{r['peak_above_mb']:.0f}"] for r in res]
    print(table(["tokens", "shards", "on disk MB", "seconds", "peak RSS MB",
                 "peak above set-up MB"], rows))
    ratio = res[1]["lifetime_mb"] / res[0]["lifetime_mb"]
    above = res[1]["peak_above_mb"] / max(res[0]["peak_above_mb"], 1.0)
    verdict = "met" if ratio <= 1.2 else "MISSED"
    print(f"\n10x tokens: peak RSS x{ratio:.3f} ({verdict}: target ≤ 1.2); "
          f"peak above set-up x{above:.2f}.")


if __name__ == "__main__":
    main()
