"""The configuration of one SAE: its architecture, sizes, hook and preprocessing.

Field names and values follow SAELens 6 (``sae_lens.saes.sae.SAEConfig`` and its
per-architecture subclasses, read at SAELens 6.49). SAELens keeps ``hook_name``,
``model_name``, ``hook_head_index`` and ``model_from_pretrained_kwargs`` inside a free-form
``metadata`` object; here they are fields, because every backend needs them, and
``metadata`` holds the rest (``prepend_bos``, ``context_size``, ``dataset_path``,
``sae_lens_version``, …) verbatim so that a save/load round trip loses nothing.
"""

from __future__ import annotations

import copy
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from saebridge.errors import SAEConfigError, unknown
from saebridge.hookmap.space import FLAGS, ActivationSpace
from saebridge.sae.metadata import SAEMetadata

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu", "gated")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
RESHAPES = ("none", "hook_z")
DTYPES = ("float32", "float64", "float16", "bfloat16")
K_ARCHITECTURES = ("topk", "batchtopk")
"""Architectures that take ``k`` and ``rescale_acts_by_decoder_norm``."""

FIELD_METADATA_KEYS = ("hook_name", "hook_head_index", "model_name", "model_from_pretrained_kwargs")
"""Keys SAELens keeps in ``metadata`` that are fields here (``metadata`` must not repeat them)."""


@dataclass(kw_only=True)
class SAEConfig:
    """Everything needed to build an SAE and to know where and how it reads activations.

    >>> cfg = SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4,
    ...                 hook_name="blocks.0.hook_resid_pre", apply_b_dec_to_input=True)
    >>> cfg.activation_space.name
    'tl-processed'
    """

    architecture: str
    """One of ``standard``, ``topk``, ``batchtopk``, ``jumprelu``, ``gated``."""
    d_in: int
    """Width of the activations the SAE reads (``n_heads * d_head`` for a hook_z SAE)."""
    d_sae: int
    """Number of latents."""
    hook_name: str
    """TransformerLens hook name, e.g. ``blocks.3.hook_resid_pre`` or ``blocks.2.attn.hook_z``."""
    hook_head_index: int | None = None
    """For an SAE trained on one attention head: that head's index; else None."""
    model_name: str | None = None
    """Name of the model the SAE was trained on, when known."""
    dtype: str = "float32"
    """Parameter dtype: ``float32``, ``float64``, ``float16`` or ``bfloat16``."""
    device: str = "cpu"
    """Device the parameters live on."""
    k: int | float | None = None
    """Active latents per token (topk, an int); batchtopk's batch average (informative only:
    at inference a batchtopk SAE applies its ``threshold``, as SAELens 6 does)."""
    apply_b_dec_to_input: bool
    """Subtract ``b_dec`` from the input before encoding."""
    normalize_activations: str = "none"
    """``none``, ``expected_average_only_in``, ``constant_norm_rescale`` or ``layer_norm``."""
    rescale_acts_by_decoder_norm: bool = False
    """topk/batchtopk: rank pre-activations scaled by the decoder row norms."""
    reshape_activations: str = "none"
    """``hook_z``: an SAE over all heads of ``attn.hook_z`` (input ``[..., n_heads, d_head]``)."""
    model_from_pretrained_kwargs: dict[str, Any] | None = None
    """SAELens's record of how the model was loaded; its TransformerLens processing flags
    give :attr:`activation_space`. ``None`` means the key was absent (older SAEs, trained
    on TransformerLens's default processing); a mapping is applied over no processing,
    as SAELens's ``load_model`` does (``from_pretrained_no_processing(**kwargs)``)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Every other SAELens metadata key, kept verbatim."""

    def __post_init__(self) -> None:
        _validate(self)
        # SAELens 6 code reads cfg.metadata.hook_name & co.: answered from the fields.
        self.metadata = SAEMetadata(self.metadata, self)

    @property
    def activation_space(self) -> ActivationSpace:
        """The TransformerLens processing the SAE's training activations went through."""
        return ActivationSpace.parse(self.model_from_pretrained_kwargs)

    @property
    def is_hook_z(self) -> bool:
        """True when the SAE reads all heads of ``attn.hook_z`` flattened to ``d_in``."""
        return self.reshape_activations == "hook_z" or (
            self.hook_name.endswith("attn.hook_z") and self.hook_head_index is None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy, keyed by field name."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """The inverse of :meth:`to_dict`; unknown or missing keys raise :class:`SAEConfigError`.

        >>> SAEConfig.from_dict({"architecture": "standard", "d_in": 4, "d_sae": 8,
        ...     "hook_name": "blocks.0.hook_mlp_out", "apply_b_dec_to_input": False}).d_sae
        8
        """
        if not isinstance(data, dict):
            raise SAEConfigError(
                f"an SAE config must be a mapping of field names to values, got "
                f"{type(data).__name__}. Pass the dict that SAEConfig.to_dict() returns.")
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise SAEConfigError(unknown(
                    "SAE config key", str(key), names,
                    "Remove it, or put free-form information under 'metadata'."))
        required = [f.name for f in fields(cls) if _is_required(f)]
        missing = [name for name in required if name not in data]
        if missing:
            raise SAEConfigError(
                f"SAE config is missing {', '.join(map(repr, missing))}; required keys are "
                f"{', '.join(required)}. Add the missing keys.")
        return cls(**copy.deepcopy(data))


def _is_required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _fail(name: str, value: Any, valid: str, todo: str = "") -> SAEConfigError:
    todo = f" {todo}" if todo else ""
    return SAEConfigError(
        f"SAE config field {name!r} is {value!r} ({type(value).__name__}); {valid}.{todo}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise _fail(name, value, f"it must be one of {', '.join(choices)}")
    if value not in choices:
        raise SAEConfigError(unknown(f"{name}", value, choices, f"Set {name} to one of these."))


def _check_int(name: str, value: Any, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    # bool is an int subclass, but True is never a meaningful width or index.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        none = " or null" if optional else ""
        raise _fail(name, value, f"it must be an integer >= {minimum}{none}")


def _validate(cfg: SAEConfig) -> None:
    _check_choice("architecture", cfg.architecture, ARCHITECTURES)
    _check_int("d_in", cfg.d_in, minimum=1)
    _check_int("d_sae", cfg.d_sae, minimum=1)
    if not isinstance(cfg.hook_name, str) or not cfg.hook_name:
        raise _fail("hook_name", cfg.hook_name, "it must be a TransformerLens hook name such as "
                    "'blocks.3.hook_resid_pre'")
    _check_int("hook_head_index", cfg.hook_head_index, minimum=0, optional=True)
    if cfg.model_name is not None and not isinstance(cfg.model_name, str):
        raise _fail("model_name", cfg.model_name, "it must be a string or null")
    _check_choice("dtype", cfg.dtype, DTYPES)
    if not isinstance(cfg.device, str) or not cfg.device:
        raise _fail("device", cfg.device, "it must be a device string such as 'cpu' or 'cuda:0'")
    for name in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
        if not isinstance(getattr(cfg, name), bool):
            raise _fail(name, getattr(cfg, name), "it must be true or false")
    _check_choice("normalize_activations", cfg.normalize_activations, NORMALIZATIONS)
    _check_choice("reshape_activations", cfg.reshape_activations, RESHAPES)
    if cfg.reshape_activations == "hook_z" and not cfg.hook_name.endswith("hook_z"):
        raise _fail("reshape_activations", "hook_z", f"hook_z reshaping needs a hook_z hook, "
                    f"but hook_name is {cfg.hook_name!r}", "Set reshape_activations to 'none'.")
    _validate_k(cfg)
    for name in ("model_from_pretrained_kwargs", "metadata"):
        value = getattr(cfg, name)
        if value is None and name == "model_from_pretrained_kwargs":
            continue
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise _fail(name, value, "it must be a mapping with string keys")
    _validate_flags(cfg.model_from_pretrained_kwargs)
    clash = [key for key in FIELD_METADATA_KEYS if key in cfg.metadata]
    if clash:
        raise SAEConfigError(
            f"SAE config metadata repeats {', '.join(map(repr, clash))}, which are fields of "
            "SAEConfig. Set the fields and drop these keys from metadata.")


def _validate_flags(kwargs: dict[str, Any] | None) -> None:
    """The TransformerLens processing flags in ``model_from_pretrained_kwargs`` are bools:
    checked here, at load, rather than when a run first reads the activation space."""
    for flag in FLAGS:
        value = (kwargs or {}).get(flag, False)
        if not isinstance(value, bool):
            raise _fail(f"model_from_pretrained_kwargs.{flag}", value,
                        "it must be true or false (a TransformerLens processing flag)",
                        f"Write \"{flag}\": true or \"{flag}\": false.")


def _validate_k(cfg: SAEConfig) -> None:
    if cfg.architecture == "topk":
        if isinstance(cfg.k, bool) or not isinstance(cfg.k, int) or not 1 <= cfg.k <= cfg.d_sae:
            raise _fail("k", cfg.k, f"a topk SAE needs an integer k with 1 <= k <= d_sae "
                        f"({cfg.d_sae})", "Set k to the number of latents kept per token.")
    elif cfg.architecture == "batchtopk":
        if cfg.k is not None and (isinstance(cfg.k, bool) or not isinstance(cfg.k, int | float)
                                  or not math.isfinite(cfg.k) or cfg.k <= 0):
            raise _fail("k", cfg.k, "a batchtopk SAE's k must be a finite positive number or "
                        "null")
    else:
        if cfg.k is not None:
            raise _fail("k", cfg.k, f"a {cfg.architecture} SAE has no k", "Set k to null.")
        if cfg.rescale_acts_by_decoder_norm:
            raise _fail("rescale_acts_by_decoder_norm", True,
                        f"only {' and '.join(K_ARCHITECTURES)} SAEs rescale by decoder norm",
                        "Set it to false, or fold the norms into W_enc and W_dec.")
