"""Pieces every family loader shares: safe file reading, device/dtype, site overrides."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from saebridge.errors import ArgumentTypeError, SAEFormatError, UnknownHookError
from saebridge.hookmap.aliases import AliasSite, Sides, resolve
from saebridge.hookmap.space import HF
from saebridge.sae.params import TORCH_DTYPES, dtype_name, torch_device

Tensor = torch.Tensor

READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, ValueError, RuntimeError, KeyError, IndexError, TypeError,
    AttributeError, NotImplementedError, OverflowError, zipfile.BadZipFile, zlib.error,
    struct.error, pickle.UnpicklingError, SafetensorError)
"""What parsing an untrusted file can raise in the libraries a loader calls (JSON, zip,
zlib, numpy headers, torch's weights-only unpickler, safetensors; ``RecursionError`` is a
``RuntimeError``). A loader turns each into an :class:`SAEFormatError` naming the file and
chaining the cause. ``MemoryError`` is not among them: headers are checked against the
file's size first, so one that remains is a real shortage, not a corrupt file."""

PATH_MAX = 4096
"""The longest path Linux accepts (``PATH_MAX``); ``NAME_MAX`` is 255 bytes per name."""
NAME_MAX = 255


def as_path(source: Any, what: str = "SAE path") -> Path:
    """``source`` as a :class:`Path`, refusing what no file system call should see: a
    non-path (``None``), an empty path, a NUL byte, a path or name longer than the OS
    allows.

    >>> as_path("sae/folder").name
    'folder'
    """
    if isinstance(source, bytes):
        source = os.fsdecode(source)
    if not isinstance(source, str | os.PathLike):
        raise ArgumentTypeError(
            f"{what} must be a str or os.PathLike, got {source!r} ({type(source).__name__}). "
            "Pass the folder or file that holds the SAE.")
    text = os.fsdecode(os.fspath(source))
    shown = text if len(text) <= 80 else f"{text[:60]}...{text[-12:]}"
    if not text or "\0" in text:
        raise SAEFormatError(f"{what} {shown!r} is empty or contains a NUL byte. Pass the "
                             "folder or file that holds the SAE.")
    longest = max((len(os.fsencode(part)) for part in Path(text).parts), default=0)
    if len(text) > PATH_MAX or longest > NAME_MAX:
        raise SAEFormatError(
            f"{what} {shown!r} is {len(text)} characters long with a name of {longest} bytes; "
            f"the OS allows at most {PATH_MAX} characters in a path and {NAME_MAX} bytes in "
            "one name. Check how the path was built.")
    return Path(text)

RAW_SPACE: dict[str, bool] = HF.to_dict()
"""``model_from_pretrained_kwargs`` of an SAE trained on unprocessed activations (every
TransformerLens processing flag off), as SAELens writes it for such SAEs."""


def path_exists(path: Path) -> bool:
    """``path.exists()``, with an OS refusal (a folder that may not be listed) raised as an
    :class:`SAEFormatError` naming the path and the cause."""
    try:
        return path.exists()
    except OSError as err:
        raise SAEFormatError(f"cannot look at {str(path)!r} ({type(err).__name__}: {err}). "
                             "Check the path and its permissions.") from err


def read_json(path: Path, what: str) -> Any:
    """``path`` parsed as JSON; a missing or broken file raises :class:`SAEFormatError`."""
    if not path.is_file():
        raise SAEFormatError(f"no {path.name} in {str(path.parent)!r}: {what}. Check the path.")
    return parse_json(path, "Fix or re-download it.")


def parse_json(path: Path, todo: str) -> Any:
    """``path`` parsed as JSON; unreadable, invalid or absurdly nested JSON raises
    :class:`SAEFormatError` naming the file and the cause."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except RecursionError as err:  # "[[[[…" 100,000 deep: json recurses per level
        raise SAEFormatError(f"{str(path)!r} nests JSON deeper than Python can parse "
                             f"({err}). {todo}") from err
    except (ValueError, OSError) as err:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise SAEFormatError(f"{str(path)!r} is not valid JSON ({err}). {todo}") from err


def torch_load(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """A ``torch.save``d mapping, unpickled only with ``weights_only=True``.

    ``mmap=True`` maps the tensors instead of reading them (config inspection reads no
    weight bytes). Anything but a mapping, or any object a weights-only load refuses,
    raises :class:`SAEFormatError`.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except READ_ERRORS as err:  # the weights-only unpickler raises KeyError on bad opcodes
        if mmap and "mmap" in str(err):  # legacy (non-zip) torch.save files cannot be mapped
            return torch_load(path)
        raise SAEFormatError(
            f"cannot read {str(path)!r} as a torch state dict with weights_only=True "
            f"({type(err).__name__}: {err}). saebridge never unpickles arbitrary objects; "
            "re-save the file as a plain dict of tensors, or check that it is not truncated."
        ) from err
    if not isinstance(obj, Mapping):
        raise SAEFormatError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict. "
                             "Save the module's state_dict(), not the module.")
    return dict(obj)


def device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None,
                 stored: torch.dtype) -> tuple[str, str]:
    """The device string (default cpu) and dtype name (default: the stored tensors')."""
    dev = str(torch_device(device or "cpu"))
    if dtype is None:
        dtype = stored if stored in TORCH_DTYPES.values() else torch.float32
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype)
    return dev, name.removeprefix("torch.")


def require(mapping: Mapping[str, Any], keys: tuple[str, ...], where: str, what: str) -> None:
    """Raise :class:`SAEFormatError` unless every key is in ``mapping``."""
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise SAEFormatError(
            f"{where} lacks {', '.join(map(repr, missing))} ({what}); it holds "
            f"{', '.join(map(repr, sorted(mapping)[:12]))}. The file is not of this format or "
            "is incomplete; pass format= to pick another.")


def alias_sides(family: str, name: str | None, hook_name: str | None,
                convention: str, model_name: str | None = None) -> Sides:
    """The canonical sites of a family's site name; ``hook_name`` (when given) wins for the
    input side of a transcoder and the only side of an SAE."""
    if hook_name is not None:
        if name is not None:
            try:
                sides = resolve(family, name, model_name)
            except UnknownHookError:
                return Sides(AliasSite(hook_name), AliasSite(hook_name))
            return Sides(sides.output if sides.output else AliasSite(hook_name),
                         AliasSite(hook_name))
        return Sides(AliasSite(hook_name), AliasSite(hook_name))
    if name is None:
        raise UnknownHookError(
            f"the {family} file does not say which site it was trained on, and its path does "
            f"not follow the convention ({convention}). Pass hook_name= with the canonical "
            "(TransformerLens) hook name, e.g. SAE.load(path, hook_name='blocks.5.hook_mlp_out').")
    return resolve(family, name, model_name)


def output_site(family: str, name: str | None, hook_name: str | None, convention: str) -> str:
    """The canonical hook an SAE (which reads one site) of this family reads."""
    if hook_name is not None:
        return hook_name
    sides = alias_sides(family, name, None, convention)
    if sides.output is None or sides.output.affine is not None:
        raise UnknownHookError(
            f"{family} site {name!r} has no canonical hook ({sides.why_not or 'not mapped'}). "
            "Pass hook_name= if you know where the SAE belongs.")
    return sides.output.name
