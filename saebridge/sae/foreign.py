"""SAE objects of other libraries, used wherever a saebridge :class:`SAE` goes.

:func:`as_sae` turns a SAELens ``sae_lens.SAE`` (``StandardSAE``, ``TopKSAE``,
``JumpReLUSAE``, ``GatedSAE``, SAELens 6's saved BatchTopK — a ``JumpReLUSAE`` with
``metadata.training_architecture == "batchtopk"`` —, ``Transcoder``, ``SkipTranscoder``,
``JumpReLUTranscoder``, ``JumpReLUSkipTranscoder``), a dictionary_learning dictionary
(``AutoEncoder``, ``AutoEncoderNew``, ``GatedAutoEncoder``, ``JumpReluAutoEncoder``,
``AutoEncoderTopK``, ``BatchTopKSAE``, ``MatryoshkaBatchTopKSAE``) or a sparsify
``SparseCoder``/``Sae`` into a saebridge SAE, once per object (a weak-keyed cache: the
conversion lives as long as the object). The other library is never imported: an object
is recognised by ``type(obj).__module__`` and its class names.

**Storage is shared**: the saebridge SAE's parameters are the object's tensors, so an edit
of either (``sae.W_dec.data[3] = 0``, training on) is seen by both. Layouts are SAELens's
(``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``); where a library stores an
``nn.Linear`` (``weight [out, in]``) the parameter is its transposed *view*, never a copy:
dictionary_learning's ``encoder.weight``/``decoder.weight`` (all classes but
``JumpReluAutoEncoder`` and ``MatryoshkaBatchTopKSAE``) and sparsify's ``encoder.weight``.
Copies happen only where the math needs a different tensor: a scalar ``threshold``
expanded to ``[d_sae]`` is a broadcast view, a dictionary_learning ``AutoEncoder`` with
non-unit decoder rows is rescaled as ``load_dictionary`` does (new tensors).

**Metadata**: SAELens objects keep theirs (``cfg.metadata.hook_name``, ``hook_head_index``,
``model_name``, ``model_from_pretrained_kwargs`` → the activation space, ``hook_name_out``).
dictionary_learning and sparsify objects do not know their site: convert them once with
``as_sae(obj, hook_name=...)`` (a canonical hook, or the library's own name such as
``resid_3`` or ``layers.5.mlp``); afterwards the object itself is accepted everywhere.
"""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path
from typing import Any

import torch

from saebridge.errors import ArgumentTypeError, SAEConfigError
from saebridge.hookmap.space import ActivationSpace
from saebridge.sae.model import SAE

Tensor = torch.Tensor

SAELENS_ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
SAELENS_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder",
                       "jumprelu_skip_transcoder")
SPARSIFY_CLASSES = ("SparseCoder", "Sae")
SUPPORTED = (
    "a saebridge SAE; SAELens SAEs and transcoders (StandardSAE, TopKSAE, JumpReLUSAE, "
    "GatedSAE, BatchTopK saved as JumpReLUSAE, Transcoder, SkipTranscoder, "
    "JumpReLUTranscoder, JumpReLUSkipTranscoder); dictionary_learning AutoEncoder, "
    "AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE, "
    "MatryoshkaBatchTopKSAE; sparsify SparseCoder/Sae (topk)")
"""What :func:`as_sae` takes, for error messages."""

_CACHE: weakref.WeakKeyDictionary[Any, SAE] = weakref.WeakKeyDictionary()


def library_of(obj: Any) -> str | None:
    """``"saelens"``, ``"dictionary_learning"`` or ``"sparsify"`` for an object of that
    library (by the module its class is defined in), else None."""
    module = type(obj).__module__ or ""
    for prefix, name in (("sae_lens", "saelens"), ("dictionary_learning", "dictionary_learning"),
                         ("sparsify", "sparsify")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return None


def is_sae_like(obj: Any) -> bool:
    """Whether ``obj`` is one SAE (saebridge's or another library's), not a list of them."""
    return isinstance(obj, SAE) or library_of(obj) is not None


def as_sae(obj: Any, hook_name: str | None = None, *,
           activation_space: ActivationSpace | str | None = None) -> SAE:
    """``obj`` as a saebridge :class:`SAE` sharing its weights (``obj`` itself when it is one).

    Converted once per object: later calls (and every ``add_sae``/``Splice``/… given the
    object) return the same SAE, unless ``hook_name``/``activation_space`` ask for another.

    Raises:
        ArgumentTypeError: ``obj`` is no SAE of a supported library (the message lists them).
        SAEConfigError: the object's configuration has no saebridge equivalent, or its site
            is unknown (dictionary_learning, sparsify) and ``hook_name`` was not given.

    >>> sae = SAE.random("standard", 4, 8, "blocks.0.hook_resid_pre")
    >>> as_sae(sae) is sae
    True
    """
    if isinstance(obj, SAE):
        return obj
    library = library_of(obj)
    if library is None:
        raise ArgumentTypeError(
            f"expected an SAE, got {type(obj).__module__}.{type(obj).__qualname__}. "
            f"Supported: {SUPPORTED}. Load other SAEs with sb.SAE.load(path).")
    held = _CACHE.get(obj)
    if held is not None and _fits(held, hook_name, activation_space):
        return held
    converter = {"saelens": _from_saelens, "dictionary_learning": _from_dictionary_learning,
                 "sparsify": _from_sparsify}[library]
    sae = converter(obj, hook_name)
    if activation_space is not None:
        sae.cfg.model_from_pretrained_kwargs = ActivationSpace.parse(activation_space).to_dict()
    sae.use_error_term = bool(getattr(obj, "use_error_term", False))
    _CACHE[obj] = sae
    return sae


def _fits(sae: SAE, hook_name: str | None, space: ActivationSpace | str | None) -> bool:
    if hook_name is not None and hook_name != sae.cfg.hook_name \
            and hook_name != sae.cfg.metadata.get("hookpoint"):
        return False
    return space is None or ActivationSpace.parse(space) == sae.cfg.activation_space


def _tensors_of(obj: Any) -> dict[str, Tensor]:
    """The object's parameters and buffers by state-dict name, detached (no copy)."""
    out = {name: t.detach() for name, t in obj.named_buffers()}
    out.update({name: p.detach() for name, p in obj.named_parameters()})
    return out


def _placed(cfg: Any, like: Tensor) -> Any:
    """``cfg`` saying the device and dtype ``like`` has: no cast, so no copy, in SAE()."""
    return dataclasses.replace(cfg, device=str(like.device),
                               dtype=str(like.dtype).removeprefix("torch."))


def _unsupported(what: str, why: str) -> SAEConfigError:
    return SAEConfigError(f"{what} cannot be used as a saebridge SAE: {why}. Supported: "
                          f"{SUPPORTED}.")


# ---- SAELens ---------------------------------------------------------------------------

def _from_saelens(obj: Any, hook_name: str | None) -> SAE:
    import saebridge.formats.saelens as saelens
    import saebridge.formats.saelens_transcoder as transcoder
    from saebridge.sae.transcoder import Transcoder

    name = type(obj).__name__
    to_dict = getattr(getattr(obj, "cfg", None), "to_dict", None)
    if "Training" in name or not callable(to_dict):
        raise _unsupported(f"SAELens {name}", "only inference SAEs are converted (a "
                           "TrainingSAE's parameters are still being trained)"
                           if callable(to_dict) else "it has no cfg.to_dict()")
    raw = to_dict()
    arch = raw.get("architecture")
    tensors = _tensors_of(obj)
    if arch in SAELENS_TRANSCODERS:
        cfg = _placed(transcoder._parse(raw, hook_name), tensors["W_enc"])
        return Transcoder(cfg, tensors)
    if arch not in SAELENS_ARCHITECTURES:
        raise _unsupported(f"SAELens {name} (architecture {arch!r})",
                           "its encoder has no saebridge kernel")
    cfg, _ = saelens._parse(raw)
    if hook_name is not None:
        cfg = dataclasses.replace(cfg, hook_name=hook_name)
    cfg = _placed(cfg, tensors["W_enc"])
    return SAE(cfg, saelens._convert_legacy_tensors(cfg, tensors, finetuning=False))


# ---- dictionary_learning ---------------------------------------------------------------

def _class_in(obj: Any, names: tuple[str, ...] | dict[str, Any]) -> str | None:
    """The first class in ``obj``'s MRO named one of ``names`` (subclasses convert too)."""
    return next((c.__name__ for c in type(obj).__mro__ if c.__name__ in names), None)


def _need_site(what: str, hook_name: str | None, example: str) -> str:
    if hook_name is None:
        raise SAEConfigError(
            f"a {what} does not record which site it reads. Convert it once with "
            f"sb.as_sae(obj, hook_name={example!r}) (a canonical hook or the library's own "
            "site name); after that the object itself is accepted everywhere.")
    if not isinstance(hook_name, str):
        raise ArgumentTypeError(f"hook_name must be a str, got {hook_name!r}.")
    return hook_name


def _canonical(name: str) -> bool:
    return name.startswith(("blocks.", "hook_"))


def _from_dictionary_learning(obj: Any, hook_name: str | None) -> SAE:
    import saebridge.formats.dictionary_learning as dl

    dict_class = _class_in(obj, dl.CLASSES)
    if dict_class is None:
        raise _unsupported(f"dictionary_learning {type(obj).__name__}",
                           "it is not one of the dictionary classes saebridge reads")
    site = _need_site(f"dictionary_learning {dict_class}", hook_name, "resid_3")
    sd = _tensors_of(obj)
    if "k" in sd or hasattr(obj, "k"):
        sd["k"] = sd.get("k", getattr(obj, "k", None))
    trainer = {"dict_class": dict_class,
               **({"submodule_name": site} if not _canonical(site) else {})}
    cfg = dl._config(trainer, sd, Path(site), site if _canonical(site) else None)
    tensors = dl._tensors(dict_class, sd, cfg.d_sae)  # .contiguous(): undone below
    for key, value in _views(dict_class, sd, cfg.d_sae).items():
        if key in tensors and torch.equal(tensors[key], value):
            tensors[key] = value
    return SAE(_placed(cfg, tensors["W_enc"]), tensors)


def _views(dict_class: str, sd: dict[str, Tensor], d_sae: int) -> dict[str, Tensor]:
    """The shared-storage tensors of a dictionary (views of its parameters)."""
    views: dict[str, Tensor] = {}
    if "encoder.weight" in sd:
        views["W_enc"] = sd["encoder.weight"].T
    if "decoder.weight" in sd:
        views["W_dec"] = sd["decoder.weight"].T
    for ours, theirs in (("b_enc", "encoder.bias"), ("b_dec", "bias"), ("b_dec", "b_dec"),
                         ("b_dec", "decoder.bias"), ("b_dec", "decoder_bias"),
                         ("b_gate", "gate_bias"), ("b_mag", "mag_bias"), ("r_mag", "r_mag"),
                         *((n, n) for n in ("W_enc", "b_enc", "W_dec"))):
        if theirs in sd:
            views[ours] = sd[theirs]
    if "threshold" in sd:
        threshold = sd["threshold"].reshape(-1)
        views["threshold"] = threshold.expand(d_sae) if threshold.numel() == 1 else threshold
    return views


# ---- sparsify ----------------------------------------------------------------------------

def _from_sparsify(obj: Any, hook_name: str | None) -> SAE:
    import saebridge.formats.sparsify as sparsify
    from saebridge.sae.transcoder import Transcoder, TranscoderConfig

    if _class_in(obj, SPARSIFY_CLASSES) is None:
        raise _unsupported(f"sparsify {type(obj).__name__}", "it is not a SparseCoder")
    if getattr(obj, "W_dec", None) is None:
        raise _unsupported("a sparsify coder built with decoder=False",
                           "it has no decoder to reconstruct with")
    site = _need_site("sparsify SparseCoder", hook_name, "layers.5.mlp")
    raw = {**_sparsify_cfg(obj.cfg), "d_in": int(obj.d_in), "num_latents": obj.num_latents}
    enc = obj.encoder.weight.detach()
    folder = Path(site if not _canonical(site) else "hookpoint")
    cfg = sparsify._config(raw, folder, site if _canonical(site) else None, enc.dtype)
    state = {"W_enc": enc.T, "b_enc": obj.encoder.bias.detach(), "W_dec": obj.W_dec.detach(),
             "b_dec": obj.b_dec.detach()}
    if getattr(obj, "W_skip", None) is not None:
        state["W_skip"] = obj.W_skip.detach()
    cfg = _placed(cfg, enc)
    return Transcoder(cfg, state) if isinstance(cfg, TranscoderConfig) else SAE(cfg, state)


def _sparsify_cfg(cfg: Any) -> dict[str, Any]:
    """A ``SparseCoderConfig`` (a simple_parsing dataclass) as cfg.json's dict."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, dict):
        return dict(cfg)
    return dict(vars(cfg))
