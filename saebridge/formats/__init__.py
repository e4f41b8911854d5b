"""SAE file formats: a registry keyed by format name, with detection, loading and saving.

A format is any object (a module will do) with ``detect(path) -> bool``,
``read_config(path) -> SAEConfig``, ``load(path, device=None, dtype=None) -> SAE`` and
``save(sae, path) -> None``. Add one with :func:`register_format`.

>>> from saebridge import formats
>>> formats.names()
['saelens']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from saebridge.errors import RegistryError, SAEFormatError, UnsupportedArchitectureError, unknown

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


def detect_format(path: PathLike) -> str:
    """The name of the first registered format that recognises ``path``.

    Raises:
        SAEFormatError: nothing exists at ``path``, or no format recognises it.
    """
    path = Path(os.fspath(path))
    if not path.exists():
        raise SAEFormatError(
            f"no file or folder at {str(path)!r}. Check the path; an SAE is loaded from the "
            "folder that holds its files (for SAELens: cfg.json and sae_weights.safetensors).")
    for name, fmt in _FORMATS.items():
        if fmt.detect(path):
            return name
    raise UnknownFormatError(
        f"no registered SAE format recognises {str(path)!r}; valid formats: "
        f"{', '.join(names())} (saelens: a folder with cfg.json and sae_weights.safetensors). "
        f"Pass format= to force one. {_ADD_ONE}")


def read_config(path: PathLike, format: str | None = None) -> SAEConfig:
    """The config of the SAE at ``path``, without reading its weights."""
    path = Path(os.fspath(path))
    return get(format or detect_format(path)).read_config(path)


def load(path: PathLike, format: str | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None) -> SAE:
    """Load the SAE at ``path`` in ``format`` (detected when None)."""
    path = Path(os.fspath(path))
    return get(format or detect_format(path)).load(path, device=device, dtype=dtype)


def save(sae: SAE, path: PathLike, format: str = "saelens") -> None:
    """Write ``sae`` to the folder ``path`` in ``format``."""
    get(format).save(sae, Path(os.fspath(path)))


def _register_builtin() -> None:
    from saebridge.formats import saelens

    register_format("saelens", saelens)


_register_builtin()

__all__ = ["Format", "UnknownFormatError", "detect_format", "get", "load", "names",
           "read_config", "register_format", "save"]
