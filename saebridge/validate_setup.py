"""What ``saebridge validate`` compares: each backend built from one HF model (any
architecture the hook maps know; backends that cannot run it are left out, with why), the
built-in SAEs sized from the model's own activations, and checks of ``--sae`` SAEs.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import torch

from saebridge.backends import entry, wrap
from saebridge.errors import SAEBridgeError, ShapeError, UnsupportedArchitectureError
from saebridge.model import Model

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


def default_saes(model: Model) -> list[Any]:
    """The built-in SAEs: three architectures, sites and training spaces, each sized from
    the model's own activations at a site its architecture has."""
    from saebridge.sae import SAE

    last = min(1, model.adapter.n_layers - 1)
    wanted = [("standard", "blocks.0.hook_resid_post", "tl-processed", {}),
              ("topk", f"blocks.{last}.hook_attn_out", "hf", {"k": 16}),
              ("jumprelu", f"blocks.{last}.attn.hook_z", "tl-processed", {})]
    hooks = set(model.hook_names())
    widths = hook_widths(model, [hook for _, hook, _, _ in wanted if hook in hooks])
    return [SAE.random(arch, widths[hook][0], 256, hook, seed=i + 1, activation_space=space,
                       **kw)
            for i, (arch, hook, space, kw) in enumerate(wanted) if hook in widths]


def hook_widths(model: Model, hooks: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``hook → (width, per-head width)`` of the model's activations (one short forward)."""
    if not hooks:
        return {}
    _, cache = model.run_with_cache(torch.zeros(1, 2, dtype=torch.long), names=list(hooks))
    return {h: (a.shape[-1] * a.shape[-2], a.shape[-1]) if a.dim() == 4
            else (a.shape[-1], a.shape[-1]) for h, a in cache.items()}


def check_saes(model: Model, saes: Sequence[Any], paths: Sequence[str]) -> None:
    """Refuse an ``--sae`` whose hook this model lacks or whose ``d_in`` does not fit it.

    Raises:
        UnknownHookError: the SAE's hook is not one of the model's (nearest listed).
        ShapeError: naming the SAE, its d_in and the hook's width.
    """
    for sae in saes:
        model.adapter.kind(sae.cfg.hook_name)
    widths = hook_widths(model, [s.cfg.hook_name for s in saes])
    for sae, path in zip(saes, paths, strict=True):
        flat, head = widths[sae.cfg.hook_name]
        valid = {flat, head} if sae.cfg.hook_head_index is not None or flat == head else {flat}
        if sae.cfg.d_in not in valid:
            heads = f" ({flat // head} heads of {head})" if flat != head else ""
            raise ShapeError(
                f"SAE {path!r} has d_in={sae.cfg.d_in}, but hook {sae.cfg.hook_name!r} of "
                f"this model has width {flat}{heads}: it was made for another model or "
                "site. Pass SAEs made for this model (see `saebridge inspect SAE` and "
                "`saebridge hooks MODEL`).")


def load_model(path: str | None, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    if path is None:
        from saebridge.tiny import tiny_gpt2

        hf, tok = tiny_gpt2(seed=0)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
        tok = AutoTokenizer.from_pretrained(path)
    return hf.to(device=device, dtype=dtype).eval(), tok


def build_backends(hf: Any, tok: Any, names: Sequence[str]
                   ) -> tuple[dict[str, Model], dict[str, str]]:
    """Each backend in ``names`` built around ``hf``, and why each that cannot run this
    model was left out (an architecture it does not take, a package it lacks)."""
    models, skipped = {}, {}
    for name in names:
        try:
            models[name] = BACKENDS[name][1](hf, tok)
        except SAEBridgeError as err:
            skipped[name] = str(err).split(". ")[0]
    return models, skipped


def models_for(path: str | None, device: str, names: Sequence[str], dtype: torch.dtype
               ) -> tuple[dict[str, Model], dict[str, Model], dict[str, str]]:
    """The backends in ``dtype``, the same in fp32 when ``dtype`` is a low precision (the
    criterion compares with them; else empty), and the backends left out, with why."""
    hf32, tok = load_model(path, device, torch.float32)
    exact, skipped = build_backends(hf32, tok, list(names))
    models = exact
    if dtype != torch.float32:
        models, _ = build_backends(copy.deepcopy(hf32).to(dtype), tok, list(exact))
    if len(models) < 2:
        raise UnsupportedArchitectureError(
            f"saebridge validate needs two backends that can run this model; "
            f"{', '.join(models) or 'none'} can. Left out: "
            + "; ".join(f"{n}: {why}" for n, why in skipped.items())
            + ". Install the missing extras, or pass --backends with ones that run it.")
    return models, (exact if dtype != torch.float32 else {}), skipped


def saes_for(paths: Sequence[str] | None, device: str, first: Model, dtype: torch.dtype,
             space: str | None = None) -> tuple[list, list]:
    """The SAEs at ``paths`` (default: :func:`default_saes`) in ``dtype`` and in fp32,
    checked against ``first``, an fp32 model; ``space`` states their activation space."""
    from saebridge.sae import SAE

    if paths:
        exact = [SAE.load(p, device=device, dtype=torch.float32, activation_space=space)
                 for p in paths]
        check_saes(first, exact, paths)
    else:
        exact = [s.to(device=device) for s in default_saes(first)]
    return [copy.deepcopy(s).to(dtype=dtype) for s in exact], exact
