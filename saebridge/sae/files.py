"""Where :meth:`SAE.load` and :meth:`SAE.save` find the file formats.

The formats sit above the SAE module (each builds SAEs), so this package never imports
them; :mod:`saebridge.formats` registers its loader and saver here when it is imported,
and ``import saebridge`` imports it, so the slot is always filled for users.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from saebridge.errors import SAEBridgeError

# SAEs are typed Any here: saebridge.sae.model imports this module, so naming its SAE class
# (even for type checkers) would close an import cycle. SAE.load/SAE.save carry the types.
Loader = Callable[..., Any]
"""``load(path, *, format, device, dtype, hook_name, subfolder) -> SAE``."""
Saver = Callable[..., None]
"""``save(sae, path, *, format) -> None``."""


class NoFormatsError(SAEBridgeError, ImportError):
    """SAE.load/SAE.save called before any module registered the file formats."""


_SLOT: dict[str, Any] = {"load": None, "save": None}


def register(load: Loader, save: Saver) -> None:
    """Install the functions :meth:`SAE.load`/:meth:`SAE.save` call (saebridge.formats does
    this on import; a later call replaces them, as re-importing formats must)."""
    _SLOT["load"], _SLOT["save"] = load, save


def _get(name: str) -> Any:
    fn = _SLOT[name]
    if fn is None:
        raise NoFormatsError(
            f"SAE.{name} found no file formats: saebridge.formats, which registers them, was "
            "never imported. Import saebridge (or saebridge.formats) first, or register a "
            "loader and saver with saebridge.sae.files.register(load, save).")
    return fn


def load(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Load the SAE at ``path`` with the registered loader (see :meth:`SAE.load`)."""
    return _get("load")(path, **kwargs)


def save(sae: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Write ``sae`` to ``path`` with the registered saver (see :meth:`SAE.save`)."""
    _get("save")(sae, path, **kwargs)
