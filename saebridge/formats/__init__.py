"""SAE file formats: a registry keyed by format name, with detection, loading and saving.

A format is any object (a module will do) with ``detect(path) -> bool``,
``read_config(path) -> SAEConfig``, ``load(path, device=None, dtype=None) -> SAE`` and
``save(sae, path) -> None``; ``read_config``/``load`` may take ``hook_name=`` (formats whose
files do not record their site need it), an ``EXPECTS`` string says what it looks for, and
``REFINES = "other"`` marks a special case of another format that wins detection over it.
Add one with :func:`register_format`; detection tries formats in registration order.

>>> from saebridge import formats
>>> "sparsify" in formats.names()
True
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from saebridge.errors import (
    DeviceError,
    RegistryError,
    SAEBridgeError,
    SAEConfigError,
    SAEFormatError,
    SAESaveError,
    UnsupportedArchitectureError,
    unknown,
)
from saebridge.formats._common import READ_ERRORS, as_path, path_exists
from saebridge.hookmap.space import NAMED_SPACES, ActivationSpace
from saebridge.sae import files as sae_files

if TYPE_CHECKING:
    from saebridge.sae import SAE, SAEConfig

PathLike = str | os.PathLike[str]


class Format(Protocol):
    """What a registered format provides."""

    def detect(self, path: Path) -> bool: ...

    def read_config(self, path: Path) -> SAEConfig: ...

    def load(self, path: Path, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> SAE: ...

    def save(self, sae: SAE, path: Path) -> None: ...


class UnknownFormatError(SAEFormatError, UnsupportedArchitectureError):
    """A format name with no registered entry, or a path no registered format recognises.

    Both an :class:`SAEFormatError` (a ``ValueError``) and an
    :class:`UnsupportedArchitectureError` (a ``KeyError``), so either ``except`` catches it.
    """


_FORMATS: dict[str, Format] = {}
_ADD_ONE = ("To add a format, call saebridge.formats.register_format(name, module) with a "
            "module defining detect, read_config, load and save.")


def register_format(name: str, fmt: Format) -> None:
    """Register ``fmt`` under ``name``; a name is never registered twice."""
    if name in _FORMATS:
        raise RegistryError(
            f"SAE format {name!r} is already registered; registering it again would silently "
            "change how files load. Pick a new name, or extend the existing format.")
    _FORMATS[name] = fmt


def names() -> list[str]:
    """The registered format names."""
    return sorted(_FORMATS)


def get(name: str) -> Format:
    """The format registered as ``name``."""
    if name not in _FORMATS:
        raise UnknownFormatError(unknown("SAE format", name, _FORMATS, _ADD_ONE))
    return _FORMATS[name]


_DEFAULT_EXPECTS = {"saelens": "a folder with cfg.json and sae_weights.safetensors"}


def _expects(name: str) -> str:
    return getattr(_FORMATS[name], "EXPECTS", _DEFAULT_EXPECTS.get(name, "(no description)"))


def detect_format(path: PathLike) -> str:
    """The name of the registered format that recognises ``path``.

    A format that refines another (``REFINES``) wins over it when both match.

    Raises:
        SAEFormatError: nothing exists at ``path``, no format recognises it, or several
            unrelated formats do (the message lists each format and what it looks for).
    """
    path = as_path(path)
    if not path_exists(path):
        raise SAEFormatError(
            f"no file or folder at {str(path)!r}. Check the path; an SAE is loaded from the "
            "folder that holds its files (for SAELens: cfg.json and sae_weights.safetensors).")
    matches = [name for name, fmt in _FORMATS.items() if fmt.detect(path)]
    refined = {getattr(_FORMATS[name], "REFINES", None) for name in matches}
    matches = [name for name in matches if name not in refined]
    if len(matches) == 1:
        return matches[0]
    tried = "; ".join(f"{name}: {_expects(name)}" for name in _FORMATS)
    if matches:
        raise UnknownFormatError(
            f"{str(path)!r} is ambiguous: it matches the SAE formats {', '.join(matches)}. "
            f"Pass format= to pick one. Formats tried: {tried}.")
    raise UnknownFormatError(
        f"no registered SAE format recognises {str(path)!r}. Formats tried, and what each "
        f"expects: {tried}. Pass format= to force one. {_ADD_ONE}")


def _call(fn: Any, path: Path, hook_name: str | None, **kwargs: Any) -> Any:
    """Call a format's read_config/load, passing ``hook_name`` when it takes one.

    Files on disk are untrusted input: a value of the wrong type or shape deep in a loader
    (a scalar where a matrix belongs, a list where a name belongs) becomes an
    :class:`SAEFormatError` naming the file and the cause, never an unrelated crash; a
    saebridge error that does not name the file (a bad config value) is raised again, of
    the same class, with the file named.
    """
    if hook_name is not None and "hook_name" in inspect.signature(fn).parameters:
        kwargs["hook_name"] = hook_name
    try:
        return fn(path, **kwargs)
    except DeviceError:
        raise  # about the device asked for, not about the file
    except SAEBridgeError as err:
        named = None if str(path) in str(err) else _naming(err, path)
        if named is None:
            raise
        raise named from err
    except READ_ERRORS as err:
        name = fn.__module__.rsplit(".", 1)[-1]
        raise SAEFormatError(
            f"{str(path)!r} is not a readable {name} SAE: its files do not have the layout and "
            f"types that format writes ({type(err).__name__}: {err}). Check the files, or "
            "pass format= if another format was meant.") from err


def _naming(err: SAEBridgeError, path: Path) -> SAEBridgeError | None:
    """``err`` again, of its own class, its message prefixed by the SAE's path (None for a
    class built from other arguments than one message: it is raised as it is)."""
    try:
        new = type(err)(f"cannot load the SAE at {str(path)!r}: {err}")
    except TypeError:
        return None
    new.__dict__.update(err.__dict__)
    return new


def stated_space(cfg: SAEConfig, activation_space: Any) -> SAEConfig:
    """``cfg`` with the activation space a user stated (a name such as ``"tl-processed"`` or
    ``"hf"``, a mapping of the four TransformerLens processing flags, or an
    :class:`~saebridge.hookmap.space.ActivationSpace`) written into its
    ``model_from_pretrained_kwargs``, as SAELens reads that key; None leaves it as read.

    Raises:
        SAEConfigError: an unknown space name (the valid ones listed) or a non-bool flag.
    """
    if activation_space is None:
        return cfg
    kwargs = {**(cfg.model_from_pretrained_kwargs or {}), **parse_space(activation_space).to_dict()}
    return dataclasses.replace(cfg, model_from_pretrained_kwargs=kwargs)


def parse_space(value: Any) -> ActivationSpace:
    """A stated activation space (see :func:`stated_space`), checked."""
    if not isinstance(value, (str, Mapping, ActivationSpace)):
        raise SAEConfigError(
            f"activation_space must be a space name ({', '.join(NAMED_SPACES)}), a mapping of "
            f"TransformerLens processing flags or an ActivationSpace; got {value!r}.")
    return ActivationSpace.parse(value)


def read_config(path: PathLike, format: str | None = None, *, hook_name: str | None = None,
                subfolder: str | None = None, activation_space: Any = None) -> SAEConfig:
    """The config of the SAE at ``path``, without reading its weights where the format
    allows (see :func:`saebridge.formats.inspect.inspect`); ``hook_name`` and
    ``activation_space`` (see :func:`stated_space`) override what the file says."""
    from saebridge.formats import hub

    path = hub.resolve(path, subfolder)
    cfg = _call(get(format or detect_format(path)).read_config, path, hook_name)
    if hook_name is not None and cfg.hook_name != hook_name:
        cfg = dataclasses.replace(cfg, hook_name=hook_name)
    return stated_space(cfg, activation_space)


def load(path: PathLike, format: str | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, *, hook_name: str | None = None,
         subfolder: str | None = None, activation_space: Any = None) -> SAE:
    """Load the SAE at ``path`` (a local path, or a hub id with ``subfolder``) in ``format``
    (detected when None); ``hook_name`` overrides the canonical site it reads, and
    ``activation_space`` the space it was trained in (see :func:`stated_space`)."""
    from saebridge.formats import hub

    if activation_space is not None:
        parse_space(activation_space)  # a bad space fails before any file is read
    path = hub.resolve(path, subfolder)
    sae = _call(get(format or detect_format(path)).load, path, hook_name, device=device,
                dtype=dtype)
    cfg = sae.cfg
    if hook_name is not None and cfg.hook_name != hook_name:
        # Formats that record their site take no hook_name: rebuild with the stated one.
        cfg = dataclasses.replace(cfg, hook_name=hook_name)
    cfg = stated_space(cfg, activation_space)
    if cfg is not sae.cfg:
        sae = type(sae)(cfg, {n: p.detach() for n, p in sae.named_parameters()})
    return sae


def save(sae: SAE, path: PathLike, format: str = "saelens") -> None:
    """Write ``sae`` to the folder ``path`` in ``format``. ``"saelens"`` picks the SAELens
    layout for the SAE's kind (transcoder, block-diagonal, plain)."""
    if format == "saelens":
        format = getattr(sae, "saelens_format", "saelens")
    fmt = get(format)
    folder = as_path(path, "save path")
    _check_destination(folder, format)
    fmt.save(sae, folder)


def _family(name: str) -> str:
    return getattr(_FORMATS[name], "REFINES", None) or name


def _check_destination(folder: Path, format: str) -> None:
    """Refuse to save where the result could not be loaded back: onto a file, or into a
    folder that holds an SAE of another format (the two formats' files would mix)."""
    if path_exists(folder) and not folder.is_dir():
        raise SAESaveError(
            f"cannot save the SAE to {str(folder)!r}: a file is there, and an SAE is saved as a "
            "folder. Pass a new folder path, or move the file away.")
    if not folder.is_dir():
        return
    others = [n for n, fmt in _FORMATS.items() if _family(n) != _family(format)
              and fmt.detect(folder)]
    if others:
        raise SAESaveError(
            f"{str(folder)!r} already holds an SAE in the {', '.join(others)} format; saving a "
            f"{format} SAE there would mix two formats' files and leave a folder that no "
            "loader can read. Save into a new or empty folder, or delete the old SAE first.")


def _register_builtin() -> None:
    from saebridge.formats import (
        dictionary_learning,
        gemma_scope,
        kissane,
        openai,
        saelens,
        saelens_blockdiag,
        saelens_transcoder,
        sparsify,
    )

    register_format("saelens", saelens)
    register_format("saelens-transcoder", saelens_transcoder)
    register_format("saelens-blockdiag", saelens_blockdiag)
    register_format("sparsify", sparsify)
    register_format("dictionary_learning", dictionary_learning)
    register_format("gemma_scope", gemma_scope)
    register_format("openai", openai)
    register_format("kissane", kissane)


_register_builtin()
sae_files.register(load, save)  # SAE.load / SAE.save call these (the sae package sits below)

__all__ = ["Format", "UnknownFormatError", "detect_format", "get", "load", "names",
           "read_config", "register_format", "save"]
