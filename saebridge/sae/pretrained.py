"""``SAE.from_pretrained(release, sae_id)``: SAELens release names through huggingface_hub.

A release is looked up in SAELens's own registry (``pretrained_saes.yaml``, read by
``sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory``) when SAELens is
installed: its ``repo_id`` and the ``path`` of ``sae_id`` inside the repository. Without
SAELens (or for a release it does not list that is spelled ``org/repo``), the release is the
hub repository and ``sae_id`` its subfolder. The files are fetched with huggingface_hub
(``HF_HUB_OFFLINE=1`` reads the local hub cache only) and loaded by :meth:`SAE.load`, whose
format detection reads SAELens, Gemma Scope, sparsify … folders. As in SAELens, a
``norm_scaling_factor`` the registry gives for an ``expected_average_only_in`` SAE is folded
into the weights, and ``config_overrides`` for the hook and the model's processing apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from saebridge.errors import SAEFormatError, unknown
from saebridge.sae.files import load as load_registered

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Release:
    """One SAELens release as far as loading needs it."""

    name: str
    repo_id: str
    saes_map: dict[str, str]
    """``sae_id`` → path inside the repository."""
    norm_scaling_factor: dict[str, float] = field(default_factory=dict)
    config_overrides: dict[str, Any] = field(default_factory=dict)


def saelens_directory() -> dict[str, Release] | None:
    """SAELens's registry of releases, or None when SAELens is not installed."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        return None
    return {name: Release(name, lookup.repo_id, dict(lookup.saes_map),
                          dict(lookup.norm_scaling_factor or {}),
                          dict(lookup.config_overrides or {}))
            for name, lookup in get_pretrained_saes_directory().items()}


def resolve(release: str, sae_id: str,
            directory: dict[str, Release] | None = None) -> tuple[str, str, Release | None]:
    """``(repo_id, path in the repository, release record)`` of ``release``/``sae_id``.

    Raises:
        SAEFormatError: an unknown release or ``sae_id``; the message lists the nearest.
    """
    for what, value in (("release", release), ("sae_id", sae_id)):
        if not isinstance(value, str) or not value:
            raise SAEFormatError(f"SAE.from_pretrained {what} must be a non-empty str, got "
                                 f"{value!r}.")
    if directory is None:
        directory = saelens_directory()
    entry = (directory or {}).get(release)
    if entry is None:
        if _REPO_ID.match(release) and not release.startswith("."):
            return release, sae_id, None  # a hub repository, sae_id its subfolder
        valid = list(directory) if directory else []
        hint = ("Pass a SAELens release name, or a hub repository 'org/repo' with sae_id its "
                "subfolder." if valid else "SAELens is not installed, so only hub repositories "
                "('org/repo', sae_id the subfolder) are known; pip install sae-lens for its "
                "release names.")
        if not valid:
            raise SAEFormatError(f"unknown SAE release {release!r}. {hint}")
        raise SAEFormatError(unknown("SAELens release", release, valid, hint))
    if sae_id not in entry.saes_map:
        raise SAEFormatError(unknown(f"sae_id of release {release!r}", sae_id,
                                     entry.saes_map, "Pass one of the release's sae_ids."))
    return entry.repo_id, entry.saes_map[sae_id], entry


def from_pretrained(release: str, sae_id: str, *, device: Any = None, dtype: Any = None,
                    directory: dict[str, Release] | None = None) -> Any:
    """The SAE ``sae_id`` of ``release`` (see the module docstring); an :class:`SAE`."""
    repo_id, path, entry = resolve(release, sae_id, directory)
    overrides = dict(entry.config_overrides) if entry else {}
    kwargs: dict[str, Any] = {}
    if isinstance(overrides.get("hook_name"), str):
        kwargs["hook_name"] = overrides["hook_name"]
    if isinstance(overrides.get("model_from_pretrained_kwargs"), dict):
        kwargs["activation_space"] = overrides["model_from_pretrained_kwargs"]
    sae = load_registered(repo_id, subfolder=path.strip("/") or None, device=device, dtype=dtype,
                     format=None, **kwargs)
    factor = entry.norm_scaling_factor.get(sae_id) if entry else None
    if factor is not None and sae.cfg.normalize_activations == "expected_average_only_in":
        sae.fold_activation_norm_scaling_factor(float(factor))
    sae.cfg.metadata.setdefault("release", release)
    sae.cfg.metadata.setdefault("sae_id", sae_id)
    return sae
