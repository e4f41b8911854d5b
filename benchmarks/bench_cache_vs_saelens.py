"""Activation caching throughput: ``sb.cache_activations`` vs SAELens's own caching.

One process, one model object, one hook, the same texts. The model is a HookedTransformer
built offline (``from_hf``, unprocessed, as SAELens's ``load_model`` loads one with
``from_pretrained_no_processing``) from the random GPT-2-small-shaped HF model of
``common.gpt2_small`` (``--layers`` cuts it for a quick run), with the tiny offline BPE
tokenizer of ``saebridge.tiny``. The input is a ``datasets.Dataset`` of texts that both
sides tokenise and pack into 128-token windows with BOS (SAELens's policy; the script
checks the windows and activations are equal), batches of 4 windows, float32.

Compared, in turn (``a b c d a b c d …``), on process CPU time and wall time:

- ``disk``: texts → files. SAELens: ``CacheActivationsRunner(cfg, override_dataset).run()``
  (its ``load_model`` patched to return the prebuilt model; ``shuffle=False``,
  ``buffer_size_gb`` set so that a shard holds ``TOKENS_PER_SHARD`` tokens, as on the other
  side): ``ActivationsStore`` batches, an HF ``datasets`` Arrow shard per buffer, shards
  consolidated into one dataset and loaded back. saebridge: ``sb.cache_activations(model,
  dataset, hooks=[HOOK], context_size=128, batch_size=4, tokens_per_shard=...)``:
  safetensors shards plus its JSON manifest, returned as an ``ActivationShards``.
  Each side writes the activations ``[tokens, 768]`` float32 and the token ids.
- ``memory``: texts → activations in memory, nothing written. SAELens:
  ``ActivationsStore.get_raw_llm_batch()`` per batch (as the runner builds the store);
  saebridge: ``saebridge.datasets.token_batches`` then ``saebridge.streaming.read_batch``
  per batch (the per-batch step of ``cache_activations``).

Run: ``python benchmarks/bench_cache_vs_saelens.py --batches 4 --repeats 3`` (CPU,
1 thread). ``--profile`` prints a cProfile of one run of each ``disk`` side.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars on either side (before tqdm)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import HOOK, table

import saebridge as sb

CONTEXT, BATCH = 128, 4
D_MODEL = 768
TOKENS_PER_SHARD = 2048  # --tokens-per-shard


def build(layers: int):
    """The unprocessed HookedTransformer (shared by both sides) and its tokenizer."""
    from saebridge.adapters.transformer_lens import from_hf
    from saebridge.tiny import tiny_tokenizer

    hf = common.gpt2_small()
    if layers < 12:
        hf.transformer.h = hf.transformer.h[:layers]
        hf.config.n_layer = layers
    tok = tiny_tokenizer()
    ht = from_hf(hf, tokenizer=tok, fold_ln=False, center_writing_weights=False,
                 center_unembed=False, fold_value_biases=False).eval()
    return ht, tok


def texts_dataset(tok, n_windows: int, seed: int = 0):
    """A ``datasets.Dataset`` of pseudo-texts (words of ``saebridge.tiny.CORPUS``) that packs
    into exactly ``n_windows`` windows (SAELens loops over a data set that runs short)."""
    import datasets

    from saebridge.datasets import pack
    from saebridge.tiny import CORPUS

    words, bos = CORPUS.split(), tok.bos_token_id
    gen = torch.Generator().manual_seed(seed)

    def windows(texts: list[str]) -> int:
        seqs = tok(texts, add_special_tokens=False)["input_ids"]
        return sum(1 for _ in pack(seqs, CONTEXT, bos, bos))

    texts: list[str] = []
    while not texts or windows(texts) < n_windows:
        n = int(torch.randint(20, 80, (1,), generator=gen))
        texts.append(" ".join(words[i] for i in torch.randint(0, len(words), (n,),
                                                              generator=gen).tolist()))
    while windows(texts) > n_windows:  # cut the last text back to the window boundary
        texts[-1] = texts[-1].rsplit(" ", 1)[0]
    return datasets.Dataset.from_dict({"text": texts})


def saelens_disk(ht, ds, n_tokens: int, out: Path):
    from sae_lens import cache_activations_runner as car
    from sae_lens.config import CacheActivationsRunnerConfig

    cfg = CacheActivationsRunnerConfig(
        dataset_path="offline-texts", model_name="gpt2-small-shaped-random", model_batch_size=BATCH,
        hook_name=HOOK, d_in=D_MODEL, training_tokens=n_tokens, context_size=CONTEXT,
        new_cached_activations_path=str(out), shuffle=False, dtype="float32", device="cpu",
        buffer_size_gb=(TOKENS_PER_SHARD * D_MODEL * 4 + 1) / 1e9, prepend_bos=True)
    original = car.load_model
    car.load_model = lambda **_: ht  # the prebuilt model; no hub
    try:
        return car.CacheActivationsRunner(cfg, override_dataset=ds).run()
    finally:
        car.load_model = original


def saebridge_disk(model, ds, out: Path):
    return sb.cache_activations(model, ds, hooks=[HOOK], out_dir=out, context_size=CONTEXT,
                                batch_size=BATCH, tokens_per_shard=TOKENS_PER_SHARD,
                                progress=False)


def saelens_memory(ht, ds, n_batches: int) -> list:
    from sae_lens.training.activations_store import ActivationsStore

    store = ActivationsStore(
        model=ht, dataset=ds, streaming=False, hook_name=HOOK, hook_head_index=None,
        context_size=CONTEXT, d_in=D_MODEL, n_batches_in_buffer=1,
        total_training_tokens=n_batches * BATCH * CONTEXT, store_batch_size_prompts=BATCH,
        train_batch_size_tokens=-1, prepend_bos=True, normalize_activations="none",
        device=torch.device("cpu"), dtype="float32")
    return [store.get_raw_llm_batch() for _ in range(n_batches)]


def saebridge_memory(model, ds, n_batches: int) -> list:
    from saebridge.datasets import token_batches
    from saebridge.streaming import read_batch

    batches = token_batches(model, ds, context_size=CONTEXT, batch_size=BATCH)
    return [read_batch(model, t, [HOOK], [], None)
            for _, t in zip(range(n_batches), batches, strict=False)]


def in_tmp(fn: Callable[[Path], object]) -> Callable[[], object]:
    def run() -> object:
        with tempfile.TemporaryDirectory() as d:
            return fn(Path(d) / "out")
    return run


def check_same(ht, model, ds, n_batches: int) -> str:
    """The two disk caches hold the same token windows and activations."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        lens = saelens_disk(ht, ds, n_batches * BATCH * CONTEXT, Path(d) / "a")
        lens = lens.with_format("torch")[:]
        shards = saebridge_disk(model, ds, Path(d) / "b")
        ours = [load_file(p) for p in shards.paths]
        toks = torch.cat([s["tokens"] for s in ours])
        acts = torch.cat([s[HOOK] for s in ours])
        their_toks = lens["token_ids"].reshape(-1).long()
        their_acts = lens[HOOK].reshape(-1, D_MODEL)
    if not torch.equal(toks, their_toks):
        raise AssertionError(f"token windows differ: {toks.shape} vs {their_toks.shape}")
    raw = (acts - their_acts).abs().max().item()
    centred = (acts - (their_acts - their_acts.mean(-1, keepdim=True))).abs().max().item()
    return (f"{toks.numel()} tokens, identical token ids; activations max |diff| {raw:.2e} "
            f"as stored, {centred:.2e} after centring SAELens's over d_model (saebridge "
            "stores the residual in its canonical space, TransformerLens's processed one, "
            "which is centred)")


def time_both(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """CPU and wall seconds of each function, interleaved, after one untimed round."""
    runs: dict[str, dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                c, w = time.process_time(), time.perf_counter()
                fn()
                runs[name]["cpu"].append(time.process_time() - c)
                runs[name]["wall"].append(time.perf_counter() - w)
    return runs


def profile(name: str, fn: Callable[[], object]) -> None:
    prof = cProfile.Profile()
    with torch.no_grad():
        prof.runcall(fn)
    print(f"\n### cProfile: {name} (top 18 by cumulative time)\n```")
    pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats("cumulative").print_stats(18)
    print("```")


def main() -> None:
    global TOKENS_PER_SHARD
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4, help="batches of 4 x 128 tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--tokens-per-shard", type=int, default=2048)
    parser.add_argument("--variants", default="disk,memory")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="sae_lens")  # "not tokenized", "fewer samples"
    TOKENS_PER_SHARD = args.tokens_per_shard
    ht, tok = build(args.layers)
    model = sb.wrap(ht, tokenizer=tok)
    n_tokens = args.batches * BATCH * CONTEXT
    ds = texts_dataset(tok, args.batches * BATCH)
    print(f"# bench_cache_vs_saelens — {common.machine(timed=False)}; HookedTransformer "
          f"{args.layers} layers d_model {D_MODEL} (unprocessed), hook {HOOK}, {len(ds)} texts "
          f"→ {args.batches} batches of {BATCH} x {CONTEXT} = {n_tokens} tokens, "
          f"tokens_per_shard {TOKENS_PER_SHARD}, float32, {args.repeats} timed rounds\n")
    print("same work:", check_same(ht, model, ds, args.batches), "\n")
    fns: dict[str, Callable[[], object]] = {}
    if "disk" in args.variants:
        fns["disk: SAELens CacheActivationsRunner.run"] = in_tmp(
            lambda p: saelens_disk(ht, ds, n_tokens, p))
        fns["disk: sb.cache_activations"] = in_tmp(lambda p: saebridge_disk(model, ds, p))
    if "memory" in args.variants:
        fns["memory: SAELens ActivationsStore.get_raw_llm_batch"] = (
            lambda: saelens_memory(ht, ds, args.batches))
        fns["memory: sb token_batches + read_batch"] = (
            lambda: saebridge_memory(model, ds, args.batches))
    runs = time_both(fns, args.repeats)
    rows = []
    for name, r in runs.items():
        cpu, wall = statistics.median(r["cpu"]), statistics.median(r["wall"])
        rows.append([name, f"{cpu:.2f}", f"{n_tokens / cpu:.0f}", f"{wall:.2f}",
                     f"{n_tokens / wall:.0f}"])
    print(table(["run", "CPU s (median)", "tokens/s (CPU)", "wall s (median)",
                 "tokens/s (wall)"], rows))
    names = list(runs)
    for a, b in zip(names[::2], names[1::2], strict=True):
        ratios = [x / y for x, y in zip(runs[a]["cpu"], runs[b]["cpu"], strict=True)]
        print(f"\n{b.split(':')[0]}: saebridge tokens/s ÷ SAELens tokens/s (per round, CPU) = "
              f"{statistics.median(ratios):.3f} (rounds: {', '.join(f'{x:.3f}' for x in ratios)})")
    if args.profile:
        profile("SAELens CacheActivationsRunner.run",
                in_tmp(lambda p: saelens_disk(ht, ds, n_tokens, p)))
        profile("sb.cache_activations", in_tmp(lambda p: saebridge_disk(model, ds, p)))


if __name__ == "__main__":
    main()
