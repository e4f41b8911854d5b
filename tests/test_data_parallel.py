"""Data-parallel runs under torch.distributed (gloo, 2 CPU processes): each rank takes its
share of the batches and writes its own shards and statistics, and rank 0's merge equals a
one-process run exactly."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

import saebridge as sb
from saebridge.latent_stats import STATE
from saebridge.tiny import tiny_gpt2

TEXTS = [f"Doc {i}: a bird flew {'far ' * (i % 6)}over the hills." for i in range(48)]
HOOK = "blocks.1.hook_resid_pre"
OPTIONS = dict(context_size=16, batch_size=3, latent_stats=4, tokens_per_shard=96)

RANKS = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def work(rank, out, texts, options):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank,
                                world_size=2)
        import saebridge as sb
        from saebridge.tiny import tiny_gpt2
        hf, tok = tiny_gpt2()
        model = sb.wrap(hf, tokenizer=tok)
        sae = sb.SAE.random("topk", 64, 80, "blocks.1.hook_resid_pre", k=5, seed=7)
        sb.cache_latents(model, texts, [sae], out_dir=out, **options)
        dist.destroy_process_group()

    if __name__ == "__main__":
        out, texts, options = sys.argv[1], eval(sys.argv[2]), eval(sys.argv[3])
        mp.spawn(work, args=(out, texts, options), nprocs=2)
""")


def test_two_ranks_merge_to_the_one_process_run(tmp_path):
    script, out = tmp_path / "ranks.py", tmp_path / "dp"
    script.write_text(RANKS)
    done = subprocess.run([sys.executable, str(script), str(out), repr(TEXTS), repr(OPTIONS)],
                          capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    hf, tok = tiny_gpt2()
    model = sb.wrap(hf, tokenizer=tok)
    sae = sb.SAE.random("topk", 64, 80, HOOK, k=5, seed=7)
    sb.cache_latents(model, TEXTS, [sae], out_dir=tmp_path / "one", **OPTIONS)
    merged, one = sb.load_stats(out)[HOOK], sb.load_stats(tmp_path / "one")[HOOK]
    for name in STATE:
        assert torch.equal(getattr(merged, name), getattr(one, name)), name
    # Each rank wrote its own shards: together, every token once.
    ranks = [sb.ActivationShards(out / f"rank_{r:03d}") for r in range(2)]
    single = sb.ActivationShards(tmp_path / "one")
    assert sum(len(r) for r in ranks) == len(single) and all(len(r) for r in ranks)
    per_rank = [load_file(str(p))["tokens"] for r in ranks for p in r.paths]
    assert sorted(torch.cat(per_rank).tolist()) == sorted(
        torch.cat([load_file(str(p))["tokens"] for p in single.paths]).tolist())
