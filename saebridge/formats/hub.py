"""Hugging Face hub ids as SAE sources: ``SAE.load("org/repo", subfolder=...)``.

A source that exists on disk is used as is (``subfolder`` joined to it). Otherwise a
source spelled like a hub id is fetched with ``huggingface_hub.snapshot_download`` (only
``subfolder``'s files when given) and the local copy is loaded; the hub cache keeps the
repository's name in its path (``models--org--repo``), which formats that read their site
from the path (Gemma Scope) rely on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from saebridge.errors import BackendNotInstalledError, SAEFormatError
from saebridge.formats._common import as_path, path_exists

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def looks_like_repo_id(source: str) -> bool:
    """``org/repo`` with nothing else (no leading ``/``, ``./`` or extra segments).

    >>> looks_like_repo_id("google/gemma-scope-2b-pt-res"), looks_like_repo_id("./a/b")
    (True, False)
    """
    return bool(_REPO_ID.match(source)) and not source.startswith(".")


def resolve(source: str | os.PathLike[str], subfolder: str | None = None) -> Path:
    """A local path for ``source`` (downloaded when it is a hub id not found on disk).

    Raises:
        SAEFormatError: nothing at the local path, or the hub fetch failed.
        BackendNotInstalledError: a hub id, but huggingface_hub is not installed.
    """
    path = as_path(source)
    if subfolder is not None:
        as_path(subfolder, "subfolder")
    if path_exists(path) or not looks_like_repo_id(os.fsdecode(os.fspath(source))):
        return path / subfolder if subfolder else path
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise BackendNotInstalledError(
            f"{os.fspath(source)!r} is not a local path and looks like a hub id, but "
            f"huggingface_hub is not installed ({err}). Install it with: pip install "
            "huggingface_hub") from err
    patterns = [f"{subfolder.strip('/')}/*"] if subfolder else None
    try:
        local = Path(snapshot_download(repo_id=os.fspath(source), allow_patterns=patterns))
    except (OSError, ValueError) as err:  # hub HTTP, offline and not-found errors are OSErrors
        where = f" (subfolder {subfolder!r})" if subfolder else ""
        raise SAEFormatError(
            f"could not fetch {os.fspath(source)!r}{where} "
            f"from the Hugging Face hub ({type(err).__name__}: {err}). Check the id and your "
            "connection, or download the files and load the local folder.") from err
    return local / subfolder if subfolder else local
