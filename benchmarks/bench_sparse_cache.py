"""Sparse latent cache: memory of ``run_with_cache_with_saes(..., sparse=True)`` vs dense.

GPT-2-small-shaped model (HF backend), batch 4 x 128, a TopK k=32 SAE with d_sae 24576 at
blocks.8.hook_resid_pre. Each mode runs in its own child process: one warm-up call, then
the measured call, with the peak resident memory above the pre-call level read from the
kernel (see memory.py). The cache is kept alive until the peak is read. Run::

    python benchmarks/bench_sparse_cache.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common
import memory
from common import HOOK, table

D_SAE, K = 24576, 32
KEY = f"{HOOK}.hook_sae_acts_post"


def child(mode: str) -> None:
    import json

    import saebridge as sb

    model = sb.wrap(common.gpt2_small())
    sae = sb.SAE.random("topk", 768, D_SAE, HOOK, k=K, seed=2, activation_space="hf")
    tokens = common.tokens()
    sparse = mode == "sparse"
    with torch.no_grad():
        model.run_with_cache_with_saes(tokens, saes=[sae], names=[HOOK], sparse=sparse)
        before = memory.rss_mb()
        memory.reset_peak()
        logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], names=[HOOK],
                                                       sparse=sparse)
        peak = memory.peak_mb() - before
        held = memory.rss_mb() - before
    lat = cache[KEY]
    lat_bytes = lat.indices().nbytes + lat.values().nbytes if lat.is_sparse else lat.nbytes
    total = sum(v.indices().nbytes + v.values().nbytes if v.is_sparse else v.nbytes
                for v in cache.values())
    print(json.dumps({"peak_mb": peak, "held_mb": held, "latents_mb": lat_bytes / 2**20,
                      "cache_mb": total / 2**20, "keys": len(cache),
                      "logits_mb": logits.nbytes / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    print(f"# bench_sparse_cache — {common.machine(timed=False)}; batch {common.BATCH} x "
          f"{common.POS}, TopK k={K}, d_sae {D_SAE}\n")
    res = {mode: memory.run_child(Path(__file__), mode) for mode in ("dense", "sparse")}
    rows = [[mode, f"{r['latents_mb']:.2f}", f"{r['cache_mb']:.1f}", r["keys"],
             f"{r['logits_mb']:.0f}", f"{r['held_mb']:.0f}", f"{r['peak_mb']:.0f}"]
            for mode, r in res.items()]
    print(table(["cache", "latents MB", "whole cache MB", "entries", "logits MB",
                 "RSS held after MB", "peak RSS during call MB"], rows))
    ratio = res["sparse"]["latents_mb"] / res["dense"]["latents_mb"]
    verdict = "met" if ratio <= 1 / 20 else "MISSED"
    print(f"\nsparse latents ÷ dense latents = 1/{1 / ratio:.0f} ({verdict}: target ≤ 1/20). "
          "Peak and held: resident memory above the level before the call (it includes the "
          "returned logits).")


if __name__ == "__main__":
    main()
