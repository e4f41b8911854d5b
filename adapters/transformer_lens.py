"""TransformerLens ``HookedTransformer`` through its hook points, and an offline converter.

Canonical names are TransformerLens's own, so the adapter maps nothing; it only knows the
model's activation space. :func:`from_hf` records that space and the constants of the
unprocessed weights on the model it builds; for any other model the space is read off
the weights (:func:`detect_space`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from saebridge.adapters.derived import refuse_raw_result
from saebridge.adapters.weights import WeightReader
from saebridge.backends import SiteFn
from saebridge.errors import BackendNotInstalledError, UnknownHookError
from saebridge.generate import greedy_call
from saebridge.hookmap import hook_map, names, resolve, split
from saebridge.hookmap.convert import RawStats
from saebridge.hookmap.registry import TL_CONFIGS, tl_table
from saebridge.hookmap.site import Kind, flag_message, flag_off
from saebridge.hookmap.space import HF, ActivationSpace, in_force
from saebridge.hookmap.tl_config import tl_fields
from saebridge.kernel.layout import Location

try:  # TransformerLens 4 removed HookedTransformer; saebridge must still import there.
    from transformer_lens import HookedTransformer
    from transformer_lens.config import HookedTransformerConfig
except ImportError:
    HookedTransformer = HookedTransformerConfig = None  # type: ignore[misc,assignment]

Tensor = torch.Tensor


TL_CONFIG = TL_CONFIGS
"""HF architecture name → TransformerLens config table (field ← HF config attribute,
constant or function), read from each architecture's file in ``saebridge/hookmap``: a live,
read-only view of the registry."""
SPACE_ATTR = "saebridge_space"
STATS_ATTR = "saebridge_raw_stats"
PRINT_ATTR = "saebridge_fingerprint"


def fingerprint(model: Any) -> tuple:
    """What processing in place changes: the norm type and sums of the weights that
    folding and centring rewrite. A recorded space is trusted only while it matches."""
    with torch.no_grad():
        sums = tuple(float(t.double().sum()) for t in (model.W_E, model.W_U, model.b_V))
    return (model.cfg.normalization_type, *sums)


def require_hooked_transformer() -> None:
    """Raise a clear error where this TransformerLens has no ``HookedTransformer`` (4.x).

    Raises:
        BackendNotInstalledError: naming the installed TransformerLens version.
    """
    if HookedTransformer is None:
        from importlib.metadata import version

        raise BackendNotInstalledError(
            f"TransformerLens {version('transformer-lens')} is installed, and it has no "
            "HookedTransformer (removed in TransformerLens 4.0). Use a TransformerBridge: "
            "saebridge.adapters.tl_bridge.bridge_from_hf(hf_model), with "
            "compatibility_mode=True for HookedTransformer's processed numerics; or install "
            "'transformer-lens<4' for HookedTransformer.")


def tl_config(hf_config: Any, architecture: str | None = None) -> Any:
    """A ``HookedTransformerConfig`` equivalent to an HF config (no hub access);
    ``architecture`` names it where ``hf_config.architectures`` does not."""
    require_hooked_transformer()
    arch = architecture or (getattr(hf_config, "architectures", None) or ["?"])[0]
    fields = tl_fields(tl_table(arch), hf_config)
    fields["model_name"] = getattr(hf_config, "_name_or_path", "") or "custom"
    return HookedTransformerConfig(original_architecture=arch, **fields)


def from_hf(hf_model: Any, *, fold_ln: bool = True, center_writing_weights: bool = True,
            center_unembed: bool = True, fold_value_biases: bool = True,
            tokenizer: Any | None = None, device: str | torch.device | None = None,
            dtype: torch.dtype | None = None, n_devices: int = 1) -> Any:
    """Build a HookedTransformer from an in-memory HF model, with no hub access.

    The HF model is never modified: weights are copied before processing. The processing
    flags in force and the constants needed to undo them are recorded on the returned
    model, so SAEs trained in any activation space can be spliced into it. As in
    TransformerLens's ``from_pretrained``, flags that cannot apply are dropped: centring
    needs LayerNorm (RMSNorm models are never centred) and ``center_unembed`` is refused
    under a logit soft cap (Gemma-2), which is not invariant to a constant shift.

    Supported: the architectures of :data:`TL_CONFIG` (GPT-2, GPT-NeoX, Llama, Mistral,
    Qwen2, Gemma-2). Under TransformerLens 4.x, which has no HookedTransformer, this raises
    :class:`~saebridge.errors.BackendNotInstalledError` naming the version.

    Dispatched models (``device_map=``, offloaded layers) are read one weight at a time.

    >>> from saebridge.tiny import tiny_gpt2
    >>> hf_model, tok = tiny_gpt2()
    >>> tl = from_hf(hf_model, tokenizer=tok)                       # processed, as TL's default
    >>> raw = from_hf(hf_model, fold_ln=False, center_writing_weights=False,
    ...               center_unembed=False, fold_value_biases=False)
    >>> tl.cfg.normalization_type, raw.cfg.normalization_type      # fold_ln leaves LNPre
    ('LNPre', 'LN')
    """
    from saebridge.adapters.hf import hf_architecture, refuse_bridged

    refuse_bridged(hf_model)
    arch = hf_architecture(hf_model)  # a model built from a config lists no architectures
    cfg = tl_config(hf_model.config, arch)
    hmap = hook_map(arch)
    hmap.check_config(hf_model.config)
    reader = WeightReader(hf_model)  # offloaded weights too, one at a time
    cfg.dtype, cfg.n_devices = dtype or next(hf_model.parameters()).dtype, n_devices
    cfg.device = str(device or reader.device("") or "cpu")
    weights = hmap.tl_weights({k: reader[k].clone() for k in reader.keys()},  # type: ignore[misc]
                              cfg.n_heads)
    if any(hmap.norms_removed(reader.modules, prefix) for prefix in hmap.prefixes):
        weights = _remove_norms(weights, cfg)
    stats = RawStats.from_tl_weights(weights)
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=True)
    if tokenizer is not None:
        # Not set_tokenizer(): it reloads the tokenizer by name_or_path, which may be a hub id
        # (and fails for an in-memory one). The BOS policy is applied by TL's to_tokens.
        if tokenizer.pad_token is None:  # TL's to_tokens pads; the user's tokenizer stays as is
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.pad_token = tokenizer.eos_token
        model.tokenizer = tokenizer
        model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
    space = in_force(ActivationSpace(fold_ln, center_writing_weights, center_unembed,
                                     fold_value_biases),
                     norm=cfg.normalization_type, softcap=cfg.output_logits_soft_cap > 0)
    model.load_and_process_state_dict(
        {k: v.to(cfg.device, cfg.dtype) for k, v in weights.items()}, **space.to_dict())
    setattr(model, SPACE_ATTR, space)
    setattr(model, STATS_ATTR, stats)
    setattr(model, PRINT_ATTR, fingerprint(model))
    return model.eval()


def _remove_norms(weights: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """Weights of a model whose norms were replaced by ``nn.Identity`` (they left no
    weights) for a TransformerLens model without norms (``cfg`` is switched to
    ``normalization_type=None``). A LayerNorm with a huge ``eps`` (gpt2_noLN) is not
    removed: it still subtracts the mean, so TransformerLens keeps it, and centres."""
    cfg.normalization_type = None
    is_norm = (".ln1.", ".ln2.", "ln_final.")
    return {k: v for k, v in weights.items() if not any(n in k for n in is_norm)}


def detect_space(model: Any) -> ActivationSpace:
    """The processing a HookedTransformer went through: as :func:`from_hf` recorded it,
    unless the weights were processed in place since; else read off its weights.

    ``fold_ln`` leaves ``LNPre``/``RMSPre`` norms; centring leaves rows with zero mean;
    folding the value biases leaves ``b_V`` all zero.
    """
    recorded = getattr(model, SPACE_ATTR, None)
    if recorded is not None and getattr(model, PRINT_ATTR, None) == fingerprint(model):
        return recorded
    # Never recorded, or processed in place since (e.g. process_weights_()): read it off.
    sd = model.state_dict()
    layers = range(model.cfg.n_layers)

    def centred(t: Tensor) -> bool:
        return bool(t.mean(-1).abs().max() <= 1e-5 * t.abs().max().clamp_min(1e-12))

    return ActivationSpace(
        fold_ln=model.cfg.normalization_type in ("LNPre", "RMSPre"),
        center_writing_weights=centred(sd["embed.W_E"])
        and all(centred(sd[f"blocks.{i}.mlp.W_out"]) for i in layers),
        center_unembed=centred(sd["unembed.W_U"]),
        fold_value_biases=all(bool((model.blocks[i].attn.b_V == 0).all()) for i in layers),
    )


class TLAdapter:
    """Adapter for a TransformerLens ``HookedTransformer``."""

    backend = "transformer_lens"

    def __init__(self, model: Any, tokenizer: Any | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.map = hook_map(model.cfg.original_architecture or "?")
        if model.cfg.normalization_type is None:  # LayerNorm-free: nothing is centred
            self.map = self.map.without_norms()
        self.n_layers, self.d_vocab = model.cfg.n_layers, model.cfg.d_vocab
        self.model_name: str | None = None if model.cfg.model_name == "custom" \
            else model.cfg.model_name
        self.space = detect_space(model)
        self._names = [n for n in names(self.map, self.n_layers) if n in model.hook_dict
                       and flag_off(resolve(self.map, n, self.n_layers), model.cfg) is None
                       and (self.space.fold_value_biases or not n.endswith("hook_result"))]

    @property
    def device(self) -> torch.device:
        return self.model.W_E.device

    def device_of(self, name: str) -> torch.device:
        """The device hook ``name`` computes on: its block's (``n_devices`` splits them)."""
        self.kind(name)  # unknown names fail with the nearest ones listed
        layer = split(name)[0]
        return self.device if layer is None else next(self.model.blocks[layer].parameters()
                                                      ).device

    def hook_names(self) -> list[str]:
        return list(self._names)

    def kind(self, name: str) -> Kind:
        site = resolve(self.map, name, self.n_layers)
        flag = flag_off(site, self.model.cfg)
        if flag is not None:
            raise UnknownHookError(flag_message(name, flag))
        refuse_raw_result(name, self.space)
        return site.kind

    def writable(self, name: str) -> bool:
        return True

    def locate(self, name: str) -> Location:
        """A hook point is a module named by its canonical name; its value is its output."""
        self.kind(name)  # unknown names fail with the nearest ones listed
        return Location(name)

    call_kwargs: ClassVar[dict[str, Any]] = {}

    def generate_call(self, tokens_BP: Tensor, n_new: int
                      ) -> tuple[Callable[..., Tensor], dict[str, Any]]:
        """Greedy decoding by whole forwards (TransformerLens's own ``generate`` embeds
        tokens outside ``hook_embed``)."""
        return greedy_call(self.model, n_new)

    def raw_stats(self) -> RawStats | None:
        """The recorded constants, each layer's on the device of its block (TransformerLens
        ``n_devices`` splits the blocks over GPUs)."""
        stats = getattr(self.model, STATS_ATTR, None)
        if stats is None and self.space == HF:
            stats = RawStats.from_tl_weights(self.model.state_dict())
            setattr(self.model, STATS_ATTR, stats)
        if stats is None:
            return None
        blocks = self.model.blocks

        def device(layer: int | None) -> torch.device:
            return self.device if layer is None else next(blocks[layer].parameters()).device

        return stats.to(device, self.model.cfg.dtype)

    def run(self, tokens_BP: Tensor, edits: Mapping[str, SiteFn]) -> Tensor:
        def hook(fn: SiteFn):
            def tl_hook(x: Tensor, hook: Any) -> Tensor:
                return fn(x)
            return tl_hook

        # run_with_hooks removes its hooks in a finally, also when a hook raises.
        return self.model.run_with_hooks(
            tokens_BP, return_type="logits",
            fwd_hooks=[(name, hook(fn)) for name, fn in edits.items()])

