"""Splice speed per backend: clean forward, hand-written splices, saebridge ``run_with_saes``.

For each backend (HF torch hooks, TransformerLens, nnsight when saebridge has its adapter)
and each SAE (standard d_sae 24576, TopK k=32 d_sae 32768, both at blocks.8.hook_resid_pre)
this times, in one process, interleaved, after warm-up:

* ``clean``: the backend's own forward, no hook;
* ``dense``: a hand-written native splice doing SAELens's dense math (torch pre-hook /
  TL ``run_with_hooks`` / nnsight trace): encode, dense ``acts @ W_dec`` decode;
* ``sae()``: the same native hook calling the saebridge SAE module (``SAE.forward``:
  blocked encoder, sparse decode) — saebridge's SAE math without its engine, to isolate
  the engine's overhead;
* ``saebridge``: ``sb.wrap(model).run_with_saes(tokens, saes=[sae])``.

Ratios are medians over rounds of per-round ratios (runs of one round are adjacent in
time, so load from other processes largely cancels). By default times are CPU time of one
torch thread, which other processes sharing the machine inflate least; ``--clock wall
--threads 0`` measures elapsed time with torch's default threads. Run::

    python benchmarks/bench_splice.py --repeats 11
"""

from __future__ import annotations

import abc
import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common
from common import HOOK, LAYER, Timing, benchmark_saes, dense_splice, per_round, table

import saebridge as sb

Splice = Callable[[torch.Tensor], torch.Tensor]
TARGET_RATIO = {"hf": 1.02, "transformer_lens": 1.02, "nnsight": 1.05}
TARGET_COST = 0.5


class Native(abc.ABC):
    """One backend's hand-written code: a clean forward and a forward with a splice."""

    name: str
    space: str
    obj: object
    tokens: torch.Tensor

    @abc.abstractmethod
    def clean(self) -> torch.Tensor: ...

    @abc.abstractmethod
    def spliced(self, fn: Splice) -> torch.Tensor: ...

    def resid(self) -> torch.Tensor:
        """The activation at HOOK, for calibrating the SAEs."""
        seen: list[torch.Tensor] = []

        def grab(x: torch.Tensor) -> torch.Tensor:
            seen.append(x.detach().clone())
            return x
        with torch.no_grad():
            self.spliced(grab)
        return seen[0]


class HFNative(Native):
    name, space = "hf", "hf"

    def __init__(self, hf_model, tokens: torch.Tensor) -> None:
        self.obj, self.tokens = hf_model, tokens
        self.block = hf_model.transformer.h[LAYER]

    def clean(self) -> torch.Tensor:
        return self.obj(input_ids=self.tokens, use_cache=False).logits

    def spliced(self, fn: Splice) -> torch.Tensor:
        def pre_hook(module, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        handle = self.block.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            return self.clean()
        finally:
            handle.remove()


class TLNative(Native):
    name, space = "transformer_lens", "tl-processed"

    def __init__(self, hf_model, tokens: torch.Tensor) -> None:
        from saebridge.adapters.transformer_lens import from_hf

        self.obj, self.tokens = from_hf(hf_model), tokens  # TL's default processing

    def clean(self) -> torch.Tensor:
        return self.obj(self.tokens, return_type="logits")

    def spliced(self, fn: Splice) -> torch.Tensor:
        return self.obj.run_with_hooks(self.tokens, return_type="logits",
                                       fwd_hooks=[(HOOK, lambda x, hook: fn(x))])


class NNsightNative(Native):
    name, space = "nnsight", "hf"

    def __init__(self, hf_model, tokens: torch.Tensor) -> None:
        from nnsight import NNsight

        self.obj, self.tokens = NNsight(hf_model), tokens

    def clean(self) -> torch.Tensor:
        with self.obj.trace(input_ids=self.tokens, use_cache=False):
            logits = self.obj.lm_head.output.save()
        return logits

    def spliced(self, fn: Splice) -> torch.Tensor:
        with self.obj.trace(input_ids=self.tokens, use_cache=False):
            block = self.obj.transformer.h[LAYER]
            block.input = fn(block.input)
            logits = self.obj.lm_head.output.save()
        return logits


def run_backend(native: Native, repeats: int) -> tuple[dict[str, Timing], dict[str, float]]:
    saes = benchmark_saes(native.resid(), native.space)
    model = sb.wrap(native.obj)
    fns: dict[str, Callable[[], object]] = {"clean": native.clean, "sb clean": lambda: model(
        native.tokens)}
    for name, sae in saes.items():
        dense = dense_splice(sae)
        fns[f"{name} dense"] = lambda d=dense: native.spliced(d)
        fns[f"{name} sae()"] = lambda s=sae: native.spliced(s)
        fns[f"{name} saebridge"] = lambda s=sae: model.run_with_saes(native.tokens, saes=[s])
    errors = {}
    with torch.no_grad():  # the splices agree: max |Δ log-prob| against the dense one
        for name, sae in saes.items():
            want = native.spliced(dense_splice(sae)).log_softmax(-1)
            got = model.run_with_saes(native.tokens, saes=[sae]).log_softmax(-1)
            errors[name] = float((got - want).abs().max())
    return common.time_interleaved(fns, repeats), errors


def report(backend: str, t: dict[str, Timing], errors: dict[str, float]) -> list[list[object]]:
    rows = []
    for sae in ("standard", "topk"):
        dense, own, same = t[f"{sae} dense"], t[f"{sae} saebridge"], t[f"{sae} sae()"]
        ratio, ratio_iqr = per_round(lambda a, b: a / b, own, dense)
        overhead, over_iqr = per_round(lambda a, b: a / b, own, same)
        cost_own, _ = per_round(lambda a, c: (a - c) / c, own, t["clean"])
        cost_dense, _ = per_round(lambda a, c: (a - c) / c, dense, t["clean"])
        cost_ratio, cost_iqr = per_round(lambda a, b, c: (a - c) / (b - c), own, dense,
                                         t["clean"])
        rows.append([
            backend, sae, common.ms(t["clean"]), common.ms(dense), common.ms(same),
            common.ms(own), f"{ratio:.3f} ± {ratio_iqr / 2:.3f}",
            _verdict(ratio <= TARGET_RATIO[backend], f"≤ {TARGET_RATIO[backend]}"),
            f"{overhead:.3f} ± {over_iqr / 2:.3f}", f"{cost_dense:.1%}", f"{cost_own:.1%}",
            f"{cost_ratio:.2f} ± {cost_iqr / 2:.2f}",
            _verdict(cost_ratio <= TARGET_COST, f"≤ {TARGET_COST}"), f"{errors[sae]:.1e}"])
    return rows


def _verdict(ok: bool, target: str) -> str:
    return f"{'met' if ok else 'MISSED'} ({target})"


HEADERS = ["backend", "SAE", "clean ms", "dense ms", "sae() ms", "saebridge ms",
           "saebridge ÷ dense", "target", "saebridge ÷ sae()", "dense cost", "saebridge cost",
           "cost ÷ dense cost", "target", "max |Δ logprob|"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--backends", nargs="+", default=["hf", "tl", "nnsight"])
    common.add_options(parser)
    args = parser.parse_args()
    common.set_clock(args.clock, args.threads)
    print(f"# bench_splice — {common.machine()}; batch {common.BATCH} x {common.POS}; "
          f"median of {args.repeats} interleaved rounds after 2 warm-up rounds\n")
    hf_model = common.gpt2_small()
    tokens = common.tokens()
    natives: list[Callable[[], Native]] = []
    for b in args.backends:
        if b == "hf":
            natives.append(lambda: HFNative(hf_model, tokens))
        elif b == "tl":
            natives.append(lambda: TLNative(hf_model, tokens))
        elif importlib.util.find_spec("saebridge.adapters.nnsight") is None:
            print("nnsight: skipped — saebridge.adapters.nnsight does not exist in this "
                  "checkout yet.\n")
        else:
            natives.append(lambda: NNsightNative(hf_model, tokens))
    rows, timings = [], []
    for make in natives:
        native = make()
        t, errors = run_backend(native, args.repeats)
        rows += report(native.name, t, errors)
        timings.append([native.name, common.ms(t["clean"]), common.ms(t["sb clean"]),
                        f"{per_round(lambda a, b: a / b, t['sb clean'], t['clean'])[0]:.3f}"])
        print(f"{native.name} done", file=sys.stderr, flush=True)
        del native
    print(table(HEADERS, rows))
    print("\nClean forward through saebridge (no SAE):\n")
    print(table(["backend", "native ms", "saebridge ms", "ratio"], timings))
    print("\nms: median ± half the interquartile range. cost = (spliced − clean) ÷ clean.")


if __name__ == "__main__":
    main()
