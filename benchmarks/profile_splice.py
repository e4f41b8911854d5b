"""Where a splice's time goes: torch.profiler over the SAE part of the splice, by op.

For each benchmark SAE this profiles, on the activations the splice sees (4 x 128 tokens,
d_in 768), the hand-written dense splice, saebridge's ``SAE.forward`` (what
``run_with_saes`` calls when nothing is cached: blocked encoder, sparse decode) and
``SAE.run`` (every intermediate dense, what a cached run calls), and prints self CPU time
per op and call. The encoder matmul costs as much as the dense decoder matmul (same FLOPs),
so skipping the decode alone can at best halve the splice; the blocked encoder also
saves the fresh ``[tokens, d_sae]`` output's first touch. Times are self CPU time of one
torch thread. Run::

    python benchmarks/profile_splice.py --repeats 5
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import common
from common import table


def op_times(fn, repeats: int) -> dict[str, float]:
    """Self CPU milliseconds per call of ``fn``, by aten op; matmuls split into the
    encoder's (``[n, d_in] @ [d_in, d_sae]``) and the decoder's."""
    with torch.no_grad():
        fn()
        fn()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(repeats):
                fn()
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
            name = event.key.removeprefix("aten::")
            if name in ("mm", "addmm"):
                shapes = [s for s in event.input_shapes if s]
                name += " (encoder)" if shapes and shapes[-1][-1] > 768 else " (decoder)"
            out[name] += event.self_cpu_time_total / 1e3 / repeats
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# profile_splice — {common.machine()}; self CPU ms per call "
          f"(mean of {args.repeats} profiled calls)\n")
    x = torch.randn(common.BATCH, common.POS, 768, generator=torch.Generator().manual_seed(0))
    for name, sae in common.benchmark_saes(x, "hf").items():
        dense = common.dense_splice(sae)
        t_dense = op_times(lambda d=dense: d(x), args.repeats)
        t_fwd = op_times(lambda s=sae: s(x), args.repeats)
        t_run = op_times(lambda s=sae: s.run(x), args.repeats)
        cols = (t_dense, t_fwd, t_run)
        ops = sorted(set().union(*cols), key=lambda k: -max(t.get(k, 0) for t in cols))
        rows = [[op, *(f"{t.get(op, 0):.1f}" for t in cols)]
                for op in ops if max(t.get(op, 0) for t in cols) >= 0.5]
        totals = [sum(t.values()) for t in cols]
        rows.append(["total", *(f"{total:.1f}" for total in totals)])
        print(f"{name} SAE (d_sae {sae.cfg.d_sae}):\n")
        print(table(["op", "dense splice ms", "SAE.forward ms", "SAE.run ms"], rows))
        floor = (totals[0] - t_dense.get("mm (decoder)", 0)) / totals[0]
        print(f"\nSAE.forward ÷ dense: {totals[1] / totals[0]:.2f}; SAE.run ÷ dense: "
              f"{totals[2] / totals[0]:.2f}; dense without its decoder matmul ÷ dense: "
              f"{floor:.2f} (the floor for a decode-only saving).\n")


if __name__ == "__main__":
    main()
