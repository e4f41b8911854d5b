"""Decode alone: dense ``acts @ W_dec`` against saebridge's sparse decode.

1. TopK k=32, d_sae 65536, d_in 768, 512 tokens: the dense matmul (what SAELens-style code
   does after scattering the top-k into a dense tensor) against
   * the gather kernel on TopK's own (indices, values) — what ``SAE.run`` / a splice does;
   * ``SAE.decode(dense_latents)``, which first finds the non-zeros (one counting pass and
     one ``nonzero``) — what a user calling ``decode`` on dense latents gets.
2. ReLU-style latents at d_sae 24576 and several L0: dense against sparse-from-dense, the
   measurement behind ``MAX_SPARSE_DENSITY``.

Run::

    python benchmarks/bench_decode.py --repeats 21
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common
from common import per_round, table

from saebridge.kernel import sparse
from saebridge.sae import SAE

D_IN, N_TOKENS = 768, 512


def topk_case(repeats: int) -> list[list[object]]:
    sae = SAE.random("topk", D_IN, 65536, "blocks.8.hook_resid_pre", k=32, seed=0)
    gen = torch.Generator().manual_seed(0)
    ranked = torch.randn(N_TOKENS, 65536, generator=gen)
    acts, latents = sparse.topk_latents(ranked, 32)
    W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    t = common.time_interleaved({
        "dense": lambda: acts @ W_dec + b_dec,
        "gather": lambda: sparse.decode_sparse(latents, W_dec) + b_dec,
        "decode()": lambda: sae.decode(acts),
    }, repeats)
    with torch.no_grad():
        err = float((sae.decode(acts) - (acts @ W_dec + b_dec)).abs().max())
    rows = []
    for name in ("gather", "decode()"):
        speedup, iqr = per_round(lambda d, s: d / s, t["dense"], t[name])
        rows.append([name, common.ms(t["dense"]), common.ms(t[name]),
                     f"{speedup:.0f}x ± {iqr / 2:.0f}",
                     f"{'met' if speedup >= 10 else 'MISSED'} (≥ 10x)", f"{err:.1e}"])
    return rows


def density_case(repeats: int) -> list[list[object]]:
    d_sae = 24576
    W_dec = torch.randn(d_sae, D_IN, generator=torch.Generator().manual_seed(1))
    rows = []
    for l0 in (16, 64, 256, 768, 2048, 4096):
        gen = torch.Generator().manual_seed(l0)
        acts = torch.rand(N_TOKENS, d_sae, generator=gen)
        acts = acts * (torch.rand(N_TOKENS, d_sae, generator=gen) < l0 / d_sae)
        t = common.time_interleaved({
            "dense": lambda a=acts: a @ W_dec,
            "sparse": lambda a=acts: sparse.decode_sparse(
                sparse.from_dense(a, max_density=1.0), W_dec),  # type: ignore[arg-type]
        }, repeats)
        speedup, iqr = per_round(lambda d, s: d / s, t["dense"], t["sparse"])
        rows.append([l0, f"{l0 / d_sae:.2%}", common.ms(t["dense"]), common.ms(t["sparse"]),
                     f"{speedup:.1f}x ± {iqr / 2:.1f}",
                     "sparse" if sparse.is_sparse_enough(l0, d_sae) else "dense"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    common.add_options(parser)
    args = parser.parse_args()
    common.set_clock(args.clock, args.threads)
    print(f"# bench_decode — {common.machine()}; {N_TOKENS} tokens, d_in {D_IN}; median of "
          f"{args.repeats} interleaved rounds\n")
    print("TopK k=32, d_sae 65536:\n")
    print(table(["sparse path", "dense ms", "sparse ms", "speed-up", "target",
                 "max |Δ| vs dense"], topk_case(args.repeats)))
    print("\nReLU-style latents, d_sae 24576 (sparse path includes finding the non-zeros):\n")
    print(table(["L0", "density", "dense ms", "sparse ms", "speed-up", "saebridge picks"],
                density_case(args.repeats)))
    print("\nms: median ± half the interquartile range.")


if __name__ == "__main__":
    main()
