"""Streaming activation caching: peak memory does not grow with the data set.

Runs ``sb.cache_activations`` on the GPT-2-small-shaped model (HF backend) over N and 10 N
batches of 4 x 128 tokens, caching ``blocks.8.hook_resid_pre`` and the latents of a TopK
k=32, d_sae 32768 SAE there, each run in a fresh child process. Reported: the process's
lifetime peak RSS, and the peak above the RSS after model set-up and one warm-up forward
(see memory.py), with their 10 N ÷ N ratios. ``--texts``: the same over a generator of
texts (never held in memory) that ``cache_activations`` tokenises with the offline tiny
tokenizer and packs into N and 10 N batches of 4 x 128-token windows (the streaming path).
Run::

    python benchmarks/bench_cache_activations.py --batches 4 [--texts]
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


def texts(n_windows: int):
    """Texts (CORPUS, numbered) that pack into ``n_windows`` 128-token windows: each text
    takes its tokens plus one BOS (window start or separator)."""
    from saebridge.tiny import CORPUS, tiny_tokenizer

    tok, total, i = tiny_tokenizer(), 0, 0
    while total < n_windows * common.POS:
        text = f"{i} {CORPUS}"
        total, i = total + len(tok(text, add_special_tokens=False)["input_ids"]) + 1, i + 1
        yield text


def child(n_batches: int, text_input: bool) -> None:
    import json

    import saebridge as sb
    from saebridge.tiny import tiny_tokenizer

    model = sb.wrap(common.gpt2_small(), tokenizer=tiny_tokenizer() if text_input else None)
    sae = sb.SAE.random("topk", 768, 32768, HOOK, k=32, seed=2, activation_space="hf")
    with torch.no_grad():
        model.run_with_cache_with_saes(common.tokens(), saes=[sae], names=[HOOK],
                                       use_error_term=True, sparse=True)
    before = memory.rss_mb()
    memory.reset_peak()
    batches = (common.tokens(seed=i) for i in range(n_batches))
    packing = {}
    if text_input:
        batches = texts(n_batches * common.BATCH)
        packing = {"context_size": common.POS, "batch_size": common.BATCH}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        ds = sb.cache_activations(model, batches, hooks=[HOOK], saes=[sae], out_dir=out,
                                  tokens_per_shard=TOKENS_PER_SHARD, progress=False, **packing)
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
    parser.add_argument("--texts", action="store_true", help="stream texts, not token batches")
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.texts)
        return
    print(f"# bench_cache_activations — {common.machine(timed=False)}; batches of {common.BATCH} x "
          f"{common.POS}, tokens_per_shard {TOKENS_PER_SHARD}"
          f"{', text input' if args.texts else ''}\n")
    flags = ["--texts"] if args.texts else []
    res = [memory.run_child(Path(__file__), str(n), *flags)
           for n in (args.batches, 10 * args.batches)]
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
