"""``UnifiedTransformer``: an nnsight model over a TransformerLens ``HookedTransformer``.

nnsight removed its ``UnifiedTransformer`` in 0.4, and people pin nnsight 0.2 to keep it;
this is its role on nnsight 0.8: TransformerLens hook points are the envoys, text is
tokenised with saebridge's one BOS policy, and ``generate`` traces every step. Importable
as ``saebridge.adapters.nnsight.UnifiedTransformer``; ``sb.wrap(ut)`` gives the common front.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from nnsight import NNsight
from nnsight.intervention.envoy import traceable

from saebridge.errors import ArgumentTypeError, TokensError

Tensor = torch.Tensor


def _is_hooked_transformer(obj: object) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}"
               == "transformer_lens.HookedTransformer.HookedTransformer"
               for c in type(obj).__mro__)


class UnifiedTransformer(NNsight):
    """An nnsight model over a TransformerLens ``HookedTransformer``.

    Given a Hugging Face model, builds the HookedTransformer offline first
    (:func:`saebridge.adapters.transformer_lens.from_hf`, which takes the processing flags).
    Text is tokenised with saebridge's one BOS policy; TransformerLens hook points are the
    envoys (``ut.blocks[0].hook_resid_pre.output``).

    >>> from saebridge.tiny import tiny_gpt2
    >>> hf_model, tok = tiny_gpt2()
    >>> ut = UnifiedTransformer(hf_model, tokenizer=tok)
    >>> with ut.trace("Hello world"):
    ...     resid = ut.blocks[1].hook_resid_pre.output.save()
    >>> tuple(resid.shape) == (1, ut.to_tokens("Hello world").shape[1], 64)
    True
    >>> with ut.generate("Hello", max_new_tokens=5, do_sample=False) as tracer:
    ...     tokens = tracer.result.save()
    >>> tokens.shape[1] == ut.to_tokens("Hello").shape[1] + 5
    True
    """

    def __init__(self, model: Any, tokenizer: Any | None = None, **from_hf_kwargs: Any) -> None:
        if not _is_hooked_transformer(model):
            from saebridge.adapters.transformer_lens import from_hf

            model = from_hf(model, tokenizer=tokenizer, **from_hf_kwargs)
        elif from_hf_kwargs:
            raise ArgumentTypeError(f"{sorted(from_hf_kwargs)} apply when building from a Hugging "
                                    "Face model; this is already a HookedTransformer. Drop them.")
        super().__init__(model)
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer

    def to_tokens(self, text: str | list[str], prepend_bos: bool = True) -> Tensor:
        """Token ids ``[batch, pos]`` under saebridge's BOS policy (BOS first)."""
        from saebridge.model import Model

        device = next(self._module.parameters()).device
        return Model(cast(Any, _Tokenizing(self.tokenizer, device))).to_tokens(text, prepend_bos)

    @traceable
    def generate(self, *inputs: Any, **kwargs: Any) -> Any:
        """``HookedTransformer.generate``; ``with ut.generate(...) as tracer:`` traces every
        step (``for step in tracer.iter[:n]``). Text is tokenised with the BOS policy."""
        kwargs.setdefault("verbose", False)
        return self._module.generate(*inputs, **kwargs)

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        if not inputs:
            return 0
        data = inputs[0]
        if isinstance(data, (list, tuple)) and data and isinstance(data[0], str):
            return len(data)
        if isinstance(data, Tensor) and data.dim() == 2:
            return int(data.shape[0])
        return 1

    def _batch(self, invokes: list, fn: Any) -> tuple:
        rows, merged = [], {}
        for inputs, kwargs in invokes:
            data = inputs[0]
            text = isinstance(data, str) or (isinstance(data, (list, tuple)) and data
                                             and isinstance(data[0], str))
            ids = self.to_tokens(data) if text else torch.as_tensor(data)
            rows.append(ids.reshape(-1, ids.shape[-1]).cpu())  # interleave moves them
            merged.update(kwargs)
        if len({row.shape[1] for row in rows}) != 1:
            raise TokensError(f"invokes of lengths {[row.shape[1] for row in rows]} cannot be "
                              "batched without padding; give them equal lengths or trace them "
                              "one at a time.")
        return (torch.cat(rows),), merged


class _Tokenizing:
    """What :meth:`saebridge.Model.to_tokens` reads of an adapter: the BOS policy lives there."""

    backend = "nnsight-tl"

    def __init__(self, tokenizer: Any, device: torch.device) -> None:
        self.tokenizer, self.device = tokenizer, device
