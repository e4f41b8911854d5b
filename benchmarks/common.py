"""Shared pieces of the benchmark scripts: the model, the SAEs, the timer, the tables.

The model is GPT-2-small-shaped (12 layers, d_model 768, 12 heads, vocab 50257) with
random weights from a ``GPT2Config``: nothing is downloaded. The SAEs are random too, with
the encoder bias set so that the standard SAE fires about as many latents per token as a
trained GPT-2-small residual SAE does (L0 ≈ 64 of 24576); the TopK SAE fires k=32.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from saebridge.sae import SAE

HOOK = "blocks.8.hook_resid_pre"
LAYER = 8
BATCH, POS = 4, 128
STANDARD_L0 = 64


def gpt2_small(seed: int = 0):
    """A random GPT-2-small-shaped ``GPT2LMHeadModel`` in eval mode (default attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        architectures=["GPT2LMHeadModel"])
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def tokens(seed: int = 0, batch: int = BATCH, pos: int = POS) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, pos), generator=torch.Generator().manual_seed(seed))


def benchmark_saes(resid_BPD: torch.Tensor, space: str) -> dict[str, SAE]:
    """The two benchmark SAEs at ``blocks.8.hook_resid_pre``, trained in ``space``.

    ``resid_BPD`` is the activation they will read (in their space); the standard SAE's
    ``b_enc`` is shifted so that, on it, ``STANDARD_L0`` latents fire per token on average.
    """
    standard = SAE.random("standard", 768, 24576, HOOK, seed=1, activation_space=space)
    topk = SAE.random("topk", 768, 32768, HOOK, k=32, seed=2, activation_space=space)
    with torch.no_grad():
        pre = ((resid_BPD - standard.b_dec) @ standard.W_enc + standard.b_enc).flatten()
        cut = pre.kthvalue(pre.numel() - STANDARD_L0 * resid_BPD[..., 0].numel()).values
        standard.b_enc.sub_(cut)
    return {"standard": standard, "topk": topk}


def dense_splice(sae: SAE) -> Callable[[torch.Tensor], torch.Tensor]:
    """The usual hand-written splice: SAELens's dense math, written out (no saebridge)."""
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    k = int(sae.cfg.k) if sae.cfg.architecture == "topk" else None

    def splice(x: torch.Tensor) -> torch.Tensor:
        pre = (x - b_dec) @ W_enc + b_enc
        if k is None:
            acts = pre.relu()
        else:
            values, indices = pre.topk(k, dim=-1, sorted=False)
            acts = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        return acts @ W_dec + b_dec
    return splice


@dataclass
class Timing:
    runs_s: list[float]
    """Wall time of every timed run, in the order run."""

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)

    @property
    def iqr_s(self) -> float:
        q = statistics.quantiles(self.runs_s, n=4)
        return q[2] - q[0]


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
"""``cpu``: CPU time of this process (all its threads), which time spent descheduled by
other processes on a shared machine does not inflate; ``wall``: elapsed time."""
clock = CLOCKS["cpu"]


def set_clock(name: str, threads: int | None) -> None:
    global clock
    clock = CLOCKS[name]
    if threads:
        torch.set_num_threads(threads)


def add_options(parser: Any) -> None:
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: process CPU time (robust on a shared machine); wall")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default)")


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
                     ) -> dict[str, Timing]:
    """Times of each function on :data:`clock`, run in turn (``a b c a b c …``) so that load
    from other processes falls on every variant alike, after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = clock()
                fn()
                times[name].append(clock() - start)
    return {name: Timing(ts) for name, ts in times.items()}


def per_round(fn: Callable[..., float], *timings: Timing) -> tuple[float, float]:
    """Median and interquartile range of ``fn(t1_i, t2_i, …)`` over the rounds ``i``:
    combining runs of the same round cancels load that drifts between rounds."""
    values = [fn(*xs) for xs in zip(*(t.runs_s for t in timings), strict=True)]
    q = statistics.quantiles(values, n=4)
    return statistics.median(values), q[2] - q[0]


def machine(timed: bool = True) -> str:
    cores = os.cpu_count()
    name = (", CPU time" if clock is CLOCKS["cpu"] else ", wall time") if timed else ""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {cores} cores (load average "
            f"{load} at start), torch {torch.__version__}, {torch.get_num_threads()} "
            f"thread(s){name}")


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in cells]
    return "\n".join([line, rule, *body])


def ms(t: Timing) -> str:
    return f"{t.median_s * 1e3:.0f} ± {t.iqr_s * 1e3 / 2:.0f}"
