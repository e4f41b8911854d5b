"""The ``saebridge`` command line: validate (the main job), inspect, convert, hooks.

Thin over the library: each command parses arguments, calls the public API and prints::

    $ saebridge validate                 # built-in tiny GPT-2 and SAEs, every backend
    $ saebridge validate --model ./gpt2 --sae ./sae --json report.json

:func:`main` takes the same arguments and returns the exit status:

>>> import tempfile
>>> from saebridge.sae import SAE
>>> with tempfile.TemporaryDirectory() as folder:
...     SAE.random("topk", 64, 256, "blocks.0.hook_resid_post", k=8).save(folder)
...     main(["inspect", folder, "--config-only"])
format                 saelens
architecture           topk
hook_name              blocks.0.hook_resid_post
hook_head_index        None
d_in                   64
d_sae                  256
k                      8
activation_space       tl-processed
dtype                  float32
model_name             None
normalize_activations  none
0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import saebridge.formats as formats
from saebridge.backends import entry, wrap
from saebridge.errors import SAEBridgeError, UnsupportedArchitectureError, unknown
from saebridge.model import Model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNPROCESSED = dict(fold_ln=False, center_writing_weights=False, center_unembed=False,
                   fold_value_biases=False)


def _tl(processed: bool) -> Callable[[Any, Any], Model]:
    def build(hf: Any, tok: Any) -> Model:
        from_hf = entry("transformer_lens", "from_hf")
        return wrap(from_hf(hf, tokenizer=tok, **({} if processed else UNPROCESSED)))
    return build


def _hf(hf: Any, tok: Any) -> Model:
    return wrap(hf, tokenizer=tok)


def _bridge(compat: bool) -> Callable[[Any, Any], Model]:
    def build(hf: Any, tok: Any) -> Model:
        bridge_from_hf = entry("transformer_bridge", "bridge_from_hf")
        return wrap(bridge_from_hf(hf, compatibility_mode=compat, tokenizer=tok))
    return build


def _nnsight_hf(hf: Any, tok: Any) -> Model:
    import copy
    import warnings

    import nnsight

    with warnings.catch_warnings():  # LanguageModel is deprecated in nnsight 0.8, still common
        warnings.simplefilter("ignore", nnsight.NNsightDeprecationWarning)
        # Copies: nnsight installs controllers on the modules and edits the tokenizer.
        return wrap(nnsight.LanguageModel(copy.deepcopy(hf), tokenizer=copy.deepcopy(tok)))


def _nnsight_tl(hf: Any, tok: Any) -> Model:
    return wrap(entry("nnsight", "UnifiedTransformer")(hf, tokenizer=tok))


BACKENDS: dict[str, tuple[str, Callable[[Any, Any], Model]]] = {
    "hf": ("transformers", _hf),
    "tl-processed": ("transformer_lens", _tl(processed=True)),
    "tl-unprocessed": ("transformer_lens", _tl(processed=False)),
    "bridge": ("transformer_lens", _bridge(compat=False)),
    "bridge-compat": ("transformer_lens", _bridge(compat=True)),
    "nnsight-hf": ("nnsight", _nnsight_hf),
    "nnsight-tl": ("nnsight", _nnsight_tl),
}
"""Backend label → (the package it needs, a builder from an HF model and tokenizer)."""


def installed_backends() -> list[str]:
    return [n for n, (pkg, _) in BACKENDS.items() if importlib.util.find_spec(pkg)]


class _Progress:
    """A progress bar on a terminal, plain lines otherwise (quiet with ``enabled=False``)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled, self.total, self.done = enabled, total, 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, leave=False)

    def __call__(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_description(label[:40])
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _default_saes(d_model: int) -> list[Any]:
    """The built-in SAEs: three architectures, sites and training spaces."""
    from saebridge.sae import SAE

    return [
        SAE.random("standard", d_model, 256, "blocks.0.hook_resid_post", seed=1,
                   activation_space="tl-processed"),
        SAE.random("topk", d_model, 256, "blocks.1.hook_attn_out", k=16, seed=2,
                   activation_space="hf"),
        SAE.random("jumprelu", d_model, 256, "blocks.1.attn.hook_z", seed=3,
                   activation_space="tl-processed"),
    ]


def _load_model(path: str | None, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    if path is None:
        from saebridge.tiny import tiny_gpt2

        hf, tok = tiny_gpt2(seed=0)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
        tok = AutoTokenizer.from_pretrained(path)
    return hf.to(device=device, dtype=dtype).eval(), tok


def cmd_validate(args: argparse.Namespace) -> int:
    from saebridge.sae import SAE
    from saebridge.validation import dumps, validate

    dtype = DTYPES[args.dtype]
    names = args.backends.split(",") if args.backends else installed_backends()
    for name in names:
        if name not in BACKENDS:
            raise UnsupportedArchitectureError(unknown(
                "backend", name, BACKENDS, "Pass --backends as a comma-separated list."))
    hf, tok = _load_model(args.model, args.device, dtype)
    models = {n: BACKENDS[n][1](hf, tok) for n in names}
    first = models[names[0]]
    if args.sae:
        saes = [SAE.load(p, device=args.device, dtype=dtype) for p in args.sae]
    else:
        saes = [s.to(device=args.device, dtype=dtype) for s in _default_saes(hf.config.n_embd)]
    if args.tokens:
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, first.adapter.d_vocab, (1, args.tokens), generator=gen)
    else:
        tokens = first.to_tokens(args.prompt)
    print(f"saebridge validate: {args.model or 'built-in tiny GPT-2'} on {args.device} "
          f"({args.dtype}), {tokens.shape[1]} tokens, backends {', '.join(names)}, "
          f"{len(saes)} SAE(s){'' if args.space_conversion else ', space conversion OFF'}")
    total = len(names) * (1 + 4 * len(saes))
    progress = _Progress(total, enabled=not args.quiet)
    try:
        report = validate(models, tokens, saes, convert_spaces=args.space_conversion,
                          progress=progress)
    finally:
        progress.close()
    print(report.table())
    if args.json:
        Path(args.json).write_text(dumps(report) + "\n")
    return 0 if report.ok else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    fmt = formats.detect_format(args.sae)
    cfg = formats.read_config(args.sae, format=fmt)
    info: dict[str, Any] = {
        "format": fmt, "architecture": cfg.architecture, "hook_name": cfg.hook_name,
        "hook_head_index": cfg.hook_head_index, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
        "k": cfg.k, "activation_space": cfg.activation_space.name, "dtype": cfg.dtype,
        "model_name": cfg.model_name, "normalize_activations": cfg.normalize_activations,
    }
    if not args.config_only:
        norms = formats.load(args.sae, format=fmt).W_dec.detach().float().norm(dim=-1)
        info["decoder_norm"] = {"min": norms.min().item(), "mean": norms.mean().item(),
                                "max": norms.max().item()}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    sae = formats.load(args.sae)
    formats.save(sae, args.out, format=args.to)
    print(f"wrote {args.to} SAE ({sae.cfg.architecture}, {sae.cfg.hook_name}) to {args.out}")
    return 0


def _bridge_names(hf: Any, tok: Any) -> dict[str, str]:
    """Canonical name → the TransformerBridge hook it resolves to (empty without TL)."""
    if not importlib.util.find_spec("transformer_lens"):
        return {}
    try:
        bridge = entry("transformer_bridge", "bridge_from_hf")(hf, tokenizer=tok)
    except SAEBridgeError:  # an architecture or model TransformerBridge cannot take
        return {}
    return {name: getattr(hp, "name", None) or name for name, hp in bridge.hook_dict.items()}


def cmd_hooks(args: argparse.Namespace) -> int:
    hf, tok = _load_model(args.model, "cpu", torch.float32)
    adapter: Any = wrap(hf, tokenizer=tok).adapter
    bridge = _bridge_names(hf, tok)
    print("HookedTransformer and nnsight over TransformerLens use the canonical name itself; "
          "nnsight over HF reads the HF module's .input/.output.")
    print(f"{'canonical (TransformerLens) name':<34}{'kind':<7}{'TransformerBridge hook':<30}"
          "HF / nnsight module (side, element, layout)")
    for name in adapter.hook_names():
        site = adapter.site(name)
        where = f"{adapter.prefix}{site.module} ({site.io}"
        where += f", [{site.index}]" if site.index is not None else ""
        where += f", {site.layout}" if site.layout != "flat" else ""
        where += f", + input of {site.residual_from}" if site.residual_from else ""
        where += ", read-only" if not site.writable else ""
        print(f"{name:<34}{site.kind:<7}{bridge.get(name, '-'):<30}{where})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saebridge", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check backends against each other on the same work")
    v.add_argument("--model", help="saved HF model folder (default: built-in tiny GPT-2)")
    v.add_argument("--sae", action="append", help="SAE path (repeatable; default: built-in)")
    v.add_argument("--backends", help=f"comma-separated, from {', '.join(BACKENDS)} "
                   "(default: every installed)")
    v.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    v.add_argument("--dtype", default="float32", choices=list(DTYPES))
    src = v.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="Sparse autoencoders find features in the residual "
                     "stream of a transformer.")
    src.add_argument("--tokens", type=int, help="use N random tokens instead of a prompt")
    v.add_argument("--json", help="also write the report as JSON to this file")
    v.add_argument("--no-space-conversion", dest="space_conversion", action="store_false",
                   help="treat every SAE as trained in each model's own space (to see the bug "
                   "the conversion fixes)")
    v.add_argument("--quiet", action="store_true", help="no progress display")
    v.set_defaults(func=cmd_validate)
    i = sub.add_parser("inspect", help="describe an SAE (format, site, space, norms)")
    i.add_argument("sae")
    i.add_argument("--config-only", action="store_true", help="read no weights")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)
    c = sub.add_parser("convert", help="convert an SAE to another format")
    c.add_argument("sae")
    c.add_argument("--to", default="saelens", choices=formats.names())
    c.add_argument("out")
    c.set_defaults(func=cmd_convert)
    h = sub.add_parser("hooks", help="canonical hook names of a model and where each lives")
    h.add_argument("model", nargs="?", help="saved HF model folder (default: built-in)")
    h.set_defaults(func=cmd_hooks)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SAEBridgeError as err:
        print(f"saebridge {args.command}: error: {err}", file=sys.stderr)
        return 2
