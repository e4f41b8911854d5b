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
space_source           model_from_pretrained_kwargs absent: from_pretrained defaults
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import saebridge.formats as formats
from saebridge.backends import entry, wrap
from saebridge.errors import SAEBridgeError, SAESaveError, UnsupportedArchitectureError, unknown
from saebridge.hookmap import names
from saebridge.hookmap.site import Site, Unavailable
from saebridge.validate_setup import (
    BACKENDS,
    installed_backends,
    load_model,
    models_for,
    saes_for,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


def cmd_validate(args: argparse.Namespace) -> int:
    from saebridge.tolerance import ACTIVE_AGREEMENT, PRECISION_MULTIPLE
    from saebridge.validation import dumps, validate

    dtype = DTYPES[args.dtype]
    names = args.backends.split(",") if args.backends else installed_backends()
    for name in names:
        if name not in BACKENDS:
            raise UnsupportedArchitectureError(unknown(
                "backend", name, BACKENDS, "Pass --backends as a comma-separated list."))
    models, exact, skipped = models_for(args.model, args.device, names, dtype)
    first = next(iter(models.values()))
    saes, saes32 = saes_for(args.sae, args.device, next(iter(exact.values()), first), dtype,
                            args.sae_space)
    if args.tokens:
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, first.adapter.d_vocab, (1, args.tokens), generator=gen)
    else:
        tokens = first.to_tokens(args.prompt)
    arch = getattr(getattr(first.adapter, "map", None), "architectures", ("?",))[0]
    print(f"saebridge validate: {args.model or 'built-in tiny GPT-2'} ({arch}) on "
          f"{args.device} ({args.dtype}), {tokens.shape[1]} tokens, backends "
          f"{', '.join(models)}, {len(saes)} SAE(s)"
          f"{'' if args.space_conversion else ', space conversion OFF'}")
    for name, why in skipped.items():
        print(f"left out: {name}: {why}")
    if exact:
        print(f"criterion ({args.dtype}): max|Δlogp| within {PRECISION_MULTIPLE[dtype]:g}× the "
              f"precision's own error (the reference's {args.dtype} run vs its float32 run); "
              f"latents' active sets overlapping ≥ {ACTIVE_AGREEMENT[dtype]:g}")
    progress = _Progress(len(models) * (1 + 4 * len(saes)), enabled=not args.quiet)
    try:
        report = validate(models, tokens, saes, convert_spaces=args.space_conversion,
                          progress=progress, references=exact or None,
                          reference_saes=saes32 if exact else None)
    finally:
        progress.close()
    print(report.table())
    if args.json:
        Path(args.json).write_text(dumps(report) + "\n")
    return 0 if report.ok else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from saebridge.formats.info import inspect

    found = inspect(args.sae, activation_space=args.sae_space)
    fmt, cfg = found.format, found.config
    info: dict[str, Any] = {
        "format": fmt, "architecture": cfg.architecture, "hook_name": cfg.hook_name,
        "hook_head_index": cfg.hook_head_index, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
        "k": cfg.k, "activation_space": cfg.activation_space.name,
        "space_source": found.space_source, "dtype": cfg.dtype,
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
    source, out = Path(args.sae).resolve(), Path(args.out).resolve()
    if out == source or (source.is_file() and out == source.parent):
        # Writing over the files being converted: a failure halfway would lose the SAE.
        raise SAESaveError(
            f"convert would write its output {args.out!r} over its own source {args.sae!r}. "
            "Pass a different output folder (and move it into place afterwards if wanted).")
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
    hf, tok = load_model(args.model, "cpu", torch.float32)
    adapter: Any = wrap(hf, tokenizer=tok).adapter
    bridge = _bridge_names(hf, tok)
    print("HookedTransformer and nnsight over TransformerLens use the canonical name itself; "
          "nnsight over HF reads the HF module's .input/.output.")
    print(f"{'canonical (TransformerLens) name':<34}{'kind':<7}{'TransformerBridge hook':<32}"
          "HF / nnsight module (side, element, layout)")
    for name in names(adapter.map, adapter.n_layers):
        site = adapter.site(name)
        print(f"{name:<34}{site.kind:<7}{bridge.get(name, '-'):<32}{_where(adapter, site)})")
    missing = {rel: s.reason for table in (adapter.map.before_blocks, adapter.map.block,
                                           adapter.map.after_blocks)
               for rel, s in table.items() if isinstance(s, Unavailable)}
    if missing:
        print("\nNot produced on this model (blocks.{L}. omitted):")
    for rel, reason in missing.items():
        print(f"  {rel}: {reason}")
    return 0


def _where(adapter: Any, site: Site) -> str:
    """Where a site lives and how it is read, for ``saebridge hooks``."""
    where = f"{adapter.prefix}{site.module} ({site.io}"
    where += f", [{site.index}]" if site.index is not None else ""
    where += f", {site.layout}" if site.layout != "flat" else ""
    where += f", + input of {site.residual_from}" if site.residual_from else ""
    where += f", computed: {site.derive}" if site.derive else ""
    where += ", under eager attention (switched for the run)" if site.requires else ""
    where += ", read-only" if not site.writable else ""
    where += (f", not in a full cache (TransformerLens: cfg.{site.tl_flag}); ask for it by "
              "name") if site.tl_flag else ""
    return where


SAE_SPACE_HELP = ("the activation space the SAE was trained in, overriding its file: "
                  "tl-processed, hf, tl-unprocessed")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saebridge", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check backends against each other on the same work")
    v.add_argument("--model", help="saved HF model folder (default: built-in tiny GPT-2)")
    v.add_argument("--sae", action="append", help="SAE path (repeatable; default: built-in)")
    v.add_argument("--sae-space", help=SAE_SPACE_HELP + " (every --sae)")
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
    i.add_argument("--sae-space", help=SAE_SPACE_HELP)
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
