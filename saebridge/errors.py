"""One error hierarchy for saebridge.

Every error subclasses :class:`SAEBridgeError` *and* the builtin a caller would
naturally catch (``KeyError`` for an unknown name, ``ValueError`` for a bad value,
``ImportError`` for a missing backend), so existing ``except`` clauses keep working.
Messages say what failed, the bad value, what is valid, and what to do.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SAEBridgeError(Exception):
    """Base class of every error raised by saebridge."""

    def __str__(self) -> str:
        # KeyError.__str__ repr()s its argument, which mangles multi-line messages.
        return str(self.args[0]) if self.args else ""


class UnknownHookError(SAEBridgeError, KeyError):
    """A hook name that the model's hook map does not define."""


class UnsupportedArchitectureError(SAEBridgeError, KeyError):
    """A model architecture, backend or format that has no registered entry."""


class RegistryError(SAEBridgeError, ValueError):
    """A registry was asked to register a key twice."""


class SAEConfigError(SAEBridgeError, ValueError):
    """An SAE configuration that is missing keys, has unknown keys or wrong types."""


class SAEFormatError(SAEBridgeError, ValueError):
    """An SAE file that cannot be read: truncated, corrupt, or of an unknown layout."""


class ShapeError(SAEBridgeError, ValueError):
    """A tensor whose shape does not fit where it is used."""


class SpaceConversionError(SAEBridgeError, ValueError):
    """Activations that cannot be converted between two activation spaces."""


class TokensError(SAEBridgeError, ValueError):
    """Tokens of the wrong type, rank, dtype or out of the vocabulary."""


class BackendNotInstalledError(SAEBridgeError, ImportError):
    """A backend whose optional package is not installed."""


class TraceOrderError(SAEBridgeError, ValueError):
    """A hook asked for in a trace after the forward pass went past it, or never reached
    (a hook name that is not valid at that point of the block)."""


class ModelMismatchWarning(UserWarning):
    """An SAE recorded a different ``model_name`` from the model it is used with."""


def nearest(name: str, valid: Iterable[str], n: int = 5) -> list[str]:
    """The ``n`` valid names closest to ``name`` (for "did you mean" messages)."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.5)
    return close or valid[:n]


def unknown(kind: str, name: str, valid: Iterable[str], hint: str) -> str:
    """A message for an unknown key: what, the bad value, the nearest valid ones, what to do."""
    valid = sorted(valid)
    suggestions = ", ".join(repr(v) for v in nearest(name, valid))
    return (
        f"unknown {kind} {name!r}. Nearest valid: {suggestions} "
        f"({len(valid)} valid in all). {hint}"
    )
