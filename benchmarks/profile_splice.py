"""Where a splice's time goes: torch.profiler over the SAE part of the splice, by op.

For each benchmark SAE this profiles, on the activations the splice sees (4 x 128 tokens,
d_in 768), the hand-written dense splice and saebridge's SAE pass (``SAE.run``, what
``run_with_saes`` calls), and prints self CPU time per op and call. It shows the floor
under sparse decoding: the encoder matmul, which no decode trick removes, costs as much
as the dense decoder matmul (same FLOPs), so skipping the decode can at best halve the
splice. Times are self CPU time of one torch thread. Run::

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
        t_own = op_times(lambda s=sae: s.run(x), args.repeats)
        ops = sorted(set(t_dense) | set(t_own), key=lambda k: -max(t_dense.get(k, 0),
                                                                 t_own.get(k, 0)))
        rows = [[op, f"{t_dense.get(op, 0):.1f}", f"{t_own.get(op, 0):.1f}"]
                for op in ops if max(t_dense.get(op, 0), t_own.get(op, 0)) >= 0.5]
        total_d, total_o = sum(t_dense.values()), sum(t_own.values())
        rows.append(["total", f"{total_d:.1f}", f"{total_o:.1f}"])
        print(f"{name} SAE (d_sae {sae.cfg.d_sae}):\n")
        print(table(["op", "dense splice ms", "saebridge SAE.run ms"], rows))
        floor = (total_d - t_dense.get("mm (decoder)", 0)) / total_d
        print(f"\nsaebridge ÷ dense: {total_o / total_d:.2f}; dense without its decoder "
              f"matmul ÷ dense: {floor:.2f} (the floor for any decode-only saving).\n")


if __name__ == "__main__":
    main()
