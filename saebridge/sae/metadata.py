"""``cfg.metadata`` read the way SAELens 6 code reads it.

SAELens 6 keeps ``hook_name``, ``hook_head_index``, ``model_name``,
``model_from_pretrained_kwargs`` (and a transcoder's ``hook_name_out``) in
``cfg.metadata``, an object read by attribute (``sae.cfg.metadata.hook_name``) or by key,
which answers None for a key it does not hold. saebridge keeps those as config fields (every
backend needs them) and the rest of SAELens's metadata in a dict; :class:`SAEMetadata` is
that dict, answering SAELens's attribute paths too: the field keys read and write the
config's fields, other keys the dict.
"""

from __future__ import annotations

import copy
from typing import Any

FIELD_KEYS = ("hook_name", "hook_head_index", "model_name", "model_from_pretrained_kwargs",
              "hook_name_out")
"""Keys that SAELens keeps in ``metadata`` and saebridge in config fields."""


class SAEMetadata(dict):  # type: ignore[type-arg]
    """A dict of SAELens metadata that also reads like SAELens's ``SAEMetadata``.

    >>> from saebridge.sae.config import SAEConfig
    >>> cfg = SAEConfig(architecture="standard", d_in=4, d_sae=8, apply_b_dec_to_input=True,
    ...                 hook_name="blocks.0.hook_resid_pre", metadata={"context_size": 128})
    >>> cfg.metadata.hook_name, cfg.metadata.context_size, cfg.metadata.dataset_path
    ('blocks.0.hook_resid_pre', 128, None)
    """

    def __init__(self, data: Any = (), owner: Any = None) -> None:
        super().__init__(data)
        object.__setattr__(self, "_owner", owner)

    def _field(self, name: str) -> bool:
        owner = object.__getattribute__(self, "_owner")
        return owner is not None and name in FIELD_KEYS and hasattr(owner, name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self._field(name):
            return getattr(self._owner, name)
        return self.get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._field(name):
            setattr(self._owner, name, value)
        else:
            self[name] = value

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # Copied with its config (copy.deepcopy(cfg)): stays bound to the copy. Copied alone
        # (to_dict, a saved file): a plain dict, as JSON and SAEConfig(metadata=...) take it.
        data = {k: copy.deepcopy(v, memo) for k, v in self.items()}
        owner = memo.get(id(self._owner)) if self._owner is not None else None
        return SAEMetadata(data, owner) if owner is not None else data

    def __reduce__(self) -> Any:
        # Pickled (a remote request) as a plain dict: the receiver need not import saebridge.
        return (dict, (dict(self),))
