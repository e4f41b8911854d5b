"""What TransformerLens's model surface needs from each backend: its config fields and its
weights in the canonical (TransformerLens-processed) space.

The core reaches these through :func:`saebridge.backends.entry` (``"transformer_lens"``
entries ``config_fields`` and ``canonical_weights``). Weights are TransformerLens's own
wherever a model already holds them processed (a processed ``HookedTransformer``, a
TransformerBridge in compatibility mode); everywhere else they are processed here by
TransformerLens's own code from the unprocessed weights (:func:`from_hf` for a Hugging
Face model, ``ProcessWeights.process_weights`` for an unprocessed HookedTransformer or a
raw bridge), so direct-logit attribution gives TransformerLens's numbers on every backend.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from saebridge.errors import UnsupportedArchitectureError
from saebridge.hookmap.registry import tl_table
from saebridge.hookmap.space import HF, TL_PROCESSED, ActivationSpace, in_force
from saebridge.hookmap.tl_config import tl_fields

Tensor = torch.Tensor


def _inner(adapter: Any) -> Any:
    """The adapter of the model itself (an nnsight adapter wraps one)."""
    return getattr(adapter, "inner", adapter)


def _refuse(adapter: Any, what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{what} of a {adapter.backend} model cannot be given: it knows no TransformerLens "
        "config for it. Wrap a Hugging Face model, a HookedTransformer or a "
        "TransformerBridge of a supported architecture.")


def config_fields(adapter: Any) -> dict[str, Any]:
    """TransformerLens config fields of the model behind ``adapter`` (before processing:
    the core's ``TLConfig`` says what processing makes of them)."""
    inner = _inner(adapter)
    model = inner.model
    cfg = getattr(model, "cfg", None)
    if cfg is not None and inner.backend in ("transformer_lens", "transformer_bridge"):
        names = [f.name for f in dataclasses.fields(cfg)] if dataclasses.is_dataclass(cfg) \
            else list(vars(cfg))
        fields = {n: getattr(cfg, n) for n in names if not n.startswith("_")}
        fields.setdefault("original_architecture", getattr(cfg, "architecture", None))
        return fields
    config = getattr(model, "config", None)
    if inner.backend != "hf" or config is None:
        raise _refuse(adapter, "the config")
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    fields = tl_fields(tl_table(arch), config)
    param = next(model.parameters())
    fields.update(original_architecture=arch, dtype=param.dtype, device=str(inner.device),
                  model_name=getattr(config, "_name_or_path", "") or "custom")
    if "ln_final.hook_normalized" not in inner.hook_names():  # norms removed
        fields["normalization_type"] = None
    return fields


def canonical_weights(adapter: Any) -> dict[str, Tensor]:
    """The model's weights as a TransformerLens-processed ``HookedTransformer`` of it holds
    them (TransformerLens names: ``embed.W_E``, ``blocks.0.attn.W_Q``, …), detached.

    Raises:
        SpaceConversionError: a HookedTransformer or bridge processed with some flags
            but not others (its unprocessed weights are gone).
        UnsupportedArchitectureError: a model of no supported architecture.
    """
    inner = _inner(adapter)
    model = inner.model
    if inner.backend == "hf":
        from saebridge.adapters.transformer_lens import from_hf

        return _detached(from_hf(model).state_dict())
    if inner.backend not in ("transformer_lens", "transformer_bridge"):
        raise _refuse(adapter, "the weights")
    cfg = model.cfg
    target = in_force(TL_PROCESSED, norm=cfg.normalization_type,
                      softcap=float(getattr(cfg, "output_logits_soft_cap", 0) or 0) > 0)
    if inner.space not in (target, HF):
        from saebridge.errors import SpaceConversionError

        raise SpaceConversionError(
            f"this {inner.backend} model was processed with {inner.space.name!r}, neither "
            "all of TransformerLens's default processing nor none of it, so its weights "
            "cannot be brought to the canonical space. Build it with every processing flag "
            "or none (from_hf / bridge_from_hf).")
    if inner.backend == "transformer_bridge":
        return _bridge_weights(model, processed=inner.space == target)
    if inner.space == target:
        return _detached(model.state_dict())
    return _process(model.state_dict(), copy.deepcopy(cfg), target)


def _bridge_weights(bridge: Any, processed: bool) -> dict[str, Tensor]:
    """A bridge's weights after TransformerLens's own processing (a raw bridge is processed
    as a copy, by ``enable_compatibility_mode()``), with ``W_E`` as ``hook_embed`` reads it:
    a bridge keeps Gemma's ``sqrt(d_model)`` embedding scale out of ``W_E``, a
    HookedTransformer folds it in."""
    if not processed:
        bridge = copy.deepcopy(bridge)
        bridge.enable_compatibility_mode(disable_warnings=True)
    weights = _detached(bridge.get_params())
    W_E = weights["embed.W_E"]
    with torch.no_grad():  # in blocks: one [block, d_model] slice of the vocabulary at a time
        rows = [bridge.embed(ids[None].to(W_E.device))[0]
                for ids in torch.arange(W_E.shape[0]).split(8192)]
    weights["embed.W_E"] = torch.cat(rows).to(W_E.dtype)
    return weights


def _process(weights: dict[str, Tensor], cfg: Any, space: ActivationSpace
             ) -> dict[str, Tensor]:
    """TransformerLens's own processing of unprocessed weights (as
    ``load_and_process_state_dict`` runs it)."""
    from transformer_lens.weight_processing import ProcessWeights

    sd = {k: v.detach().clone() for k, v in weights.items()}
    if space.fold_ln and cfg.normalization_type in ("LN", "RMS"):
        cfg.normalization_type += "Pre"
    out = ProcessWeights.process_weights(sd, cfg, **space.to_dict())
    return _detached(out)


def _detached(weights: Any) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in weights.items() if isinstance(v, Tensor)}
