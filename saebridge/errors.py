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
    (a hook name that is not valid at that point of the block); or a run of a model that
    an open ``with sb.trace(...)`` block of the same thread holds paused."""


class ArgumentTypeError(SAEBridgeError, TypeError):
    """An argument of the wrong type: a float or bool where an integer index belongs,
    ``None`` where a path belongs."""


class BackendError(SAEBridgeError, RuntimeError):
    """A backend that did something saebridge cannot work with (a ``generate`` that chose
    other tokens than the greedy ones its interventions were planned for)."""


class IndexOutOfRangeError(SAEBridgeError, IndexError):
    """A feature, position, head or row index outside its range (negative indices are
    refused, not read from the end)."""


class DeviceError(SAEConfigError):
    """A device that is not a torch device, is not available on this machine, or holds no
    data (``meta``)."""


class SAESaveError(SAEBridgeError, FileExistsError):
    """Where an SAE is saved holds something else: a file, or an SAE of another format."""


class OptionError(SAEBridgeError, ValueError):
    """An option outside its valid values (``return_type``, ``padding_side``, …)."""


class DatasetError(SAEBridgeError, ValueError):
    """A data set a run cannot read as asked: no text column, windows longer than the
    model's context, a resumption with other settings than the folder's manifest."""


class UnsupportedError(SAEBridgeError, NotImplementedError):
    """A TransformerLens or SAELens feature saebridge does not provide (on this backend):
    backward hooks, sampling in ``generate``, hook functions that edit a remote run."""


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
