"""TransformerLens ``TransformerBridge`` (TL ≥ 3; the only model class of TL 4.x).

A bridge wraps an HF model and exposes TransformerLens's hook names as aliases of its
own (``blocks.L.hook_resid_pre`` → ``blocks.L.hook_in``, ``attn.hook_z`` →
``blocks.L.attn.o.hook_in``, …). The adapter hooks the canonical names; caches are keyed
by them, never by the bridge's resolved names. In raw mode a bridge computes HF's numbers
and TransformerLens's unprocessed activations (space ``hf``); after
``enable_compatibility_mode()`` it computes processed TransformerLens's (its weights were
folded and centred in place).

Two facts the adapter handles: building a bridge *replaces the HF model's modules in
place* and compatibility mode rewrites its weights, so :func:`bridge_from_hf` works on a
deep copy and never touches the model it is given; and the bridge's ``hook_resid_mid`` is
``ln2``'s input, which the block's residual does not flow through, so a write there is
carried to the block output as a delta.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from saebridge.adapters.derived import IgnoreMasked, refuse_raw_result
from saebridge.adapters.weights import WeightReader
from saebridge.backends import SiteFn
from saebridge.errors import (
    ArgumentTypeError,
    DeviceError,
    UnknownHookError,
    UnsupportedArchitectureError,
)
from saebridge.generate import greedy_call
from saebridge.hookmap import hook_map, names, resolve, split
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.site import Kind, flag_message, flag_off
from saebridge.hookmap.space import HF, ActivationSpace, in_force
from saebridge.kernel.layout import Location

Tensor = torch.Tensor
SPACE_ATTR = "saebridge_space"
STATS_ATTR = "saebridge_raw_stats"
PRINT_ATTR = "saebridge_fingerprint"


def _fingerprint(bridge: Any) -> tuple:
    """What processing in place changes; a recorded space is trusted only while it matches."""
    with torch.no_grad():
        return (bool(getattr(bridge, "_weights_processed", False)),
                float(bridge.W_E.double().sum()), float(bridge.W_U.double().sum()))


def bridge_from_hf(hf_model: Any, *, compatibility_mode: bool = False,
                   tokenizer: Any | None = None, **processing: bool) -> Any:
    """A ``TransformerBridge`` around a *copy* of an in-memory HF model (no hub access).

    Building a bridge replaces the wrapped model's modules in place, and
    ``enable_compatibility_mode()`` rewrites its weights, so the HF model passed in is
    deep-copied first and stays usable with every other backend. The processing in force
    and the constants of the unprocessed weights are recorded on the bridge, so SAEs
    trained in any activation space splice into it.

    Args:
        hf_model: a ``transformers`` causal LM whose architecture TransformerLens bridges.
        compatibility_mode: call ``enable_compatibility_mode()`` (processed TL numerics).
        tokenizer: kept on the bridge as ``bridge.tokenizer`` (not reloaded by name).
        **processing: ``fold_ln``, ``center_writing_weights``, ``center_unembed``,
            ``fold_value_biases`` for compatibility mode (TransformerLens's defaults: on).

    >>> from saebridge import tiny, wrap
    >>> compat = bridge_from_hf(tiny.tiny_gpt2()[0], compatibility_mode=True)  # processed TL
    >>> wrap(compat).backend, wrap(compat).space.fold_ln  # without compatibility_mode: False
    ('transformer_bridge', True)
    """
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    from saebridge.adapters.hf import hf_architecture, refuse_bridged

    refuse_bridged(hf_model)
    arch = hf_architecture(hf_model)  # a model built from a config lists no architectures
    hmap = hook_map(arch)
    hmap.check_config(hf_model.config)
    modules = dict(hf_model.named_modules())
    if any(hmap.norms_removed(modules, prefix) for prefix in hmap.prefixes):
        # Its NormalizationBridge needs a real norm (Identity has no weight), and
        # compatibility mode would centre a stream that no LayerNorm centres.
        raise UnsupportedArchitectureError(
            f"this {arch} has its norms removed (LayerNorm-free), which TransformerBridge "
            "does not support. Use the HF model itself (sb.wrap(hf_model)) or, with "
            "TransformerLens 3.x, saebridge.adapters.transformer_lens.from_hf(hf_model), "
            "which builds a HookedTransformer with normalization removed.")
    _refuse_offloaded(hf_model)
    model = copy.deepcopy(hf_model)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    stats = None if hmap.tl_weights is None else RawStats.from_tl_weights(
        hmap.tl_weights(sd, int(getattr(model.config, hmap.config["n_heads"]))))
    bridge = build_bridge_from_module(model, arch, hf_config=model.config)
    space = HF
    if compatibility_mode:
        flags = {f: processing.get(f, True) for f in ActivationSpace().to_dict()}
        unknown_flags = set(processing) - set(flags)
        if unknown_flags:
            raise ArgumentTypeError(f"unknown processing flags {sorted(unknown_flags)}; valid: "
                            f"{sorted(flags)}.")
        bridge.enable_compatibility_mode(disable_warnings=True, **flags)
        space = _in_force(bridge, ActivationSpace(**flags))
    bridge.tokenizer = tokenizer
    setattr(bridge, SPACE_ATTR, space)
    setattr(bridge, STATS_ATTR, stats)
    setattr(bridge, PRINT_ATTR, _fingerprint(bridge))
    return bridge.eval()


def _refuse_offloaded(hf_model: Any) -> None:
    """TransformerBridge reads (and in compatibility mode rewrites) every weight when it is
    built, so it cannot take a model whose layers accelerate offloaded (meta)."""
    offloaded = [n for n, p in hf_model.named_parameters() if p.is_meta]
    if offloaded and WeightReader(hf_model).dispatched:
        raise DeviceError(
            f"cannot build a TransformerBridge over this dispatched model: accelerate "
            f"offloaded {len(offloaded)} of its weights (e.g. {offloaded[0]!r}) to CPU or disk, "
            "and a bridge reads and rewrites every weight when it is built. Wrap the HF model "
            "itself (sb.wrap(hf_model)) or nnsight over it, which run offloaded layers; or "
            "build a HookedTransformer with saebridge.adapters.transformer_lens.from_hf"
            "(hf_model), which reads offloaded weights one at a time.")


def _in_force(bridge: Any, space: ActivationSpace) -> ActivationSpace:
    softcap = float(getattr(bridge.cfg, "output_logits_soft_cap", 0.0) or 0.0) > 0
    return in_force(space, norm=bridge.cfg.normalization_type, softcap=softcap)


def detect_space(bridge: Any) -> ActivationSpace:
    """The processing a bridge's weights went through: as :func:`bridge_from_hf` recorded
    it unless processed in place since, ``hf`` for a bridge whose weights were never
    processed, else read off its TransformerLens-layout parameters (folded norms are gone
    or identity; centred rows have zero mean; folded value biases are zero)."""
    recorded = getattr(bridge, SPACE_ATTR, None)
    if recorded is not None and getattr(bridge, PRINT_ATTR, None) == _fingerprint(bridge):
        return recorded
    # Never recorded, or processed in place since (enable_compatibility_mode() on a bridge
    # that bridge_from_hf built raw): read it off the weights.
    if not getattr(bridge, "_weights_processed", False):
        return HF
    p = bridge.get_params()
    n_layers = bridge.cfg.n_layers

    def centred(t: Tensor) -> bool:
        return bool(t.mean(-1).abs().max() <= 1e-5 * t.abs().max().clamp_min(1e-12))

    def identity(key: str) -> bool:
        return key not in p or bool((p[key] == 1).all())

    b_V = [p.get(f"blocks.{i}.attn.b_V", p.get(f"blocks.{i}.attn._b_V")) for i in range(n_layers)]
    return _in_force(bridge, ActivationSpace(
        fold_ln=all(identity(f"blocks.{i}.ln1.w") for i in range(n_layers)),
        center_writing_weights=centred(p["embed.W_E"])
        and all(centred(p[f"blocks.{i}.mlp.W_out"]) for i in range(n_layers)),
        center_unembed=centred(p["unembed.W_U"]),
        fold_value_biases=all(b is None or bool((b == 0).all()) for b in b_V),
    ))


NEVER_RUN: dict[str, tuple[str, ...]] = {
    "GPTNeoXForCausalLM": ("attn.hook_rot_q", "attn.hook_rot_k"),
}
"""Hook points a TransformerBridge registers (in ``hook_dict``) but never runs, by HF
architecture (measured on transformer-lens 3.9.0); left out of its hooks, and asking for
one says so (the HF model computes them)."""


class BridgeAdapter:
    """Adapter for a TransformerLens ``TransformerBridge`` (raw or compatibility mode)."""

    backend = "transformer_bridge"

    def __init__(self, model: Any, tokenizer: Any | None = None) -> None:
        arch = getattr(model.cfg, "architecture", None) or "?"
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.map = hook_map(arch)
        self.n_layers, self.d_vocab = int(model.cfg.n_layers), int(model.cfg.d_vocab)
        name = getattr(model.cfg, "model_name", None)
        self.model_name: str | None = None if name in (None, "external", "custom") else name
        self.space = detect_space(model)
        hooks = model.hook_dict  # the bridge's own names plus TransformerLens aliases
        idle = NEVER_RUN.get(self.map.architectures[0], ())
        self._names = [n for n in names(self.map, self.n_layers) if n in hooks
                       and split(n)[1] not in idle
                       and (self.space.fold_value_biases or not n.endswith("hook_result"))
                       and flag_off(resolve(self.map, n, self.n_layers), model.cfg) is None]
        self._paths: dict[int, str] | None = None
        self._stats: RawStats | None = getattr(model, STATS_ATTR, None)
        if self._stats is None and self.space == HF:
            self._stats = RawStats.from_tl_weights(model.get_params())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hook_names(self) -> list[str]:
        return list(self._names)

    def kind(self, name: str) -> Kind:
        site = resolve(self.map, name, self.n_layers)  # unknown names: nearest listed
        kind, flag = site.kind, flag_off(site, self.model.cfg)
        if flag is not None:
            raise UnknownHookError(flag_message(name, flag))
        refuse_raw_result(name, self.space)
        if name not in self._names:
            raise UnknownHookError(
                f"hook {name!r} is in the {self.map.architectures[0]} hook map but this "
                "TransformerBridge does not run it (it is not in bridge.hook_dict, or the "
                "bridge registers it but never runs it for this architecture). Use one of "
                "model.hook_names(), or read it on the Hugging Face model "
                "(`saebridge hooks` lists where each hook lives).")
        return kind

    def writable(self, name: str) -> bool:
        return not name.endswith("hook_pattern")

    def locate(self, name: str) -> Location:
        """The bridge's own hook-point module behind a TransformerLens alias; nnsight sees
        the module's raw value, so the hook point's ``hook_conversion`` comes along, and an
        edit at ``hook_resid_mid`` must also reach ``hook_resid_post`` (:meth:`site_fns`)."""
        self.kind(name)
        if self._paths is None:
            self._paths = {id(m): p for p, m in self.model.named_modules()}
        hook = self.model.hook_dict[name]
        layer, rel = split(name)
        convert = hook.hook_conversion
        if rel == "attn.hook_attn_scores" and convert is None:
            convert = IgnoreMasked  # masked scores are finfo.min outside compatibility mode
        return Location(self._paths[id(hook)], "output", writable=self.writable(name),
                        convert=convert,
                        companion=f"blocks.{layer}.hook_resid_post"
                        if rel == "hook_resid_mid" else None)

    call_kwargs: ClassVar[dict[str, Any]] = {}

    def generate_call(self, tokens_BP: Tensor, n_new: int
                      ) -> tuple[Callable[..., Tensor], dict[str, Any]]:
        return greedy_call(self.model, n_new)

    def site_fns(self, edits: Mapping[str, SiteFn]) -> dict[str, SiteFn]:
        """What runs at each hook: ``edits``, with an edit at ``hook_resid_mid`` (the input
        of ``ln2``, not the residual the block adds to) carried on to the block output."""
        fns: dict[str, SiteFn] = dict(edits)
        deltas: dict[int, Tensor] = {}
        for name in [n for n in fns if split(n)[1] == "hook_resid_mid"]:
            layer = int(split(name)[0] or 0)
            fns[name] = _resid_mid_writer(fns[name], deltas, layer)
            post = f"blocks.{layer}.hook_resid_post"
            fns[post] = _resid_post_fixer(fns.get(post), deltas, layer)
        return fns

    def raw_stats(self) -> RawStats | None:
        if self._stats is None:
            return None
        return self._stats.to(self.device, next(self.model.parameters()).dtype)

    def run(self, tokens_BP: Tensor, edits: Mapping[str, SiteFn]) -> Tensor:
        fns = {n: IgnoreMasked.around(fn) if n.endswith("attn.hook_attn_scores") else fn
               for n, fn in self.site_fns(edits).items()}

        def hook(fn: SiteFn):
            def bridge_hook(x: Tensor, hook: Any) -> Tensor:
                return fn(x)
            return bridge_hook

        # run_with_hooks removes its hooks in a finally, also when a hook raises.
        out = self.model.run_with_hooks(
            tokens_BP, return_type="logits",
            fwd_hooks=[(name, hook(fn)) for name, fn in fns.items()])
        return out


def _resid_mid_writer(fn: SiteFn, deltas: dict[int, Tensor], layer: int) -> SiteFn:
    """``hook_resid_mid`` is ``ln2``'s input: what the MLP reads, but not the residual the
    block adds the MLP output to. Record how much an edit changed it."""
    def write(x: Tensor) -> Tensor:
        new = fn(x)
        if new is not x:
            deltas[layer] = new - x
        return new
    return write


def _resid_post_fixer(fn: SiteFn | None, deltas: dict[int, Tensor], layer: int) -> SiteFn:
    """Add the ``hook_resid_mid`` edit to the block output, before anything at
    ``hook_resid_post`` sees it: ``resid_mid + delta + mlp(ln2(resid_mid + delta))``."""
    def fix(x: Tensor) -> Tensor:
        delta = deltas.pop(layer, None)
        x = x if delta is None else x + delta
        return x if fn is None else fn(x)
    return fix
