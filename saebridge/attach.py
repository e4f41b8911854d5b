"""SAELens's rules for the SAEs a run splices in: one SAE per hook, and special tokens.

``HookedSAETransformer`` keeps one SAE per hook: ``add_sae`` overwrites the one there,
``run_with_saes``/``saes()`` replace an attached SAE at the same hook for the run and
restore it after. Stacking two SAEs at one hook is an explicit
``run_with_interventions([Splice(a), Splice(b)])``. ``exclude_special_tokens`` bypasses an
SAE at special-token positions: ``True`` means the tokenizer's structural special tokens
(``bos/eos/pad/sep/decoder_start_token_id``, as SAELens's ``get_special_token_ids``), a
list means those token ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from saebridge.errors import ArgumentTypeError, TokensError
from saebridge.interventions import Splice
from saebridge.sae.foreign import is_sae_like

SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
                       "decoder_start_token_id")
"""The tokenizer attributes SAELens reads for ``exclude_special_tokens=True``."""

ExcludeSpecialTokens = bool | Sequence[int]


def hooks_of(splice: Splice) -> set[str]:
    """The hooks an SAE occupies: its hook, and a transcoder's output hook."""
    cfg = splice.sae.cfg
    return {cfg.hook_name, getattr(cfg, "hook_name_out", None) or cfg.hook_name}


def one_per_hook(attached: Sequence[Splice], new: Sequence[Splice]) -> list[Splice]:
    """``attached`` with each of ``new`` in turn replacing whatever sits at its hooks (a
    later one in ``new`` replaces an earlier one at the same hook, as SAELens does)."""
    out = list(attached)
    for splice in new:
        taken = hooks_of(splice)
        out = [s for s in out if not hooks_of(s) & taken] + [splice]
    return out


def special_token_ids(value: Any, tokenizer: Any, d_vocab: int) -> tuple[int, ...]:
    """The token ids ``exclude_special_tokens=value`` bypasses.

    Raises:
        ArgumentTypeError: ``value`` is neither a bool nor a list of integers.
        TokensError: an id outside the vocabulary, or ``True`` without a tokenizer.
    """
    if value is False or value is None:
        return ()
    if value is True:
        if tokenizer is None:
            raise TokensError(
                "exclude_special_tokens=True reads the special tokens from the tokenizer, and "
                "this model has none. Pass sb.wrap(model, tokenizer=...) or a list of token ids.")
        ids = {getattr(tokenizer, a, None) for a in SPECIAL_TOKEN_ATTRS}
        return tuple(sorted(i for i in ids if isinstance(i, int)))
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ArgumentTypeError(
            f"exclude_special_tokens must be a bool or a list of token ids (ints), got "
            f"{value!r}. Pass True for the tokenizer's special tokens, or the ids to bypass.")
    bad = [i for i in value if not 0 <= i < d_vocab]
    if bad:
        raise TokensError(
            f"exclude_special_tokens holds token ids {bad} outside this model's vocabulary "
            f"[0, {d_vocab}). Pass ids the tokenizer produces.")
    return tuple(dict.fromkeys(value))


class AttachedSAEs:
    """The stateful SAE methods of :class:`saebridge.Model` (SAELens's spelling): the SAEs
    in ``self._attached`` are spliced into every run, one per hook."""

    _attached: list[Splice]
    _adapter: Any
    if TYPE_CHECKING:
        def _check_model_name(self, ops: Any) -> None: ...

    def _splices(self, saes: Any, use_error_term: bool | None,
                 exclude_special_tokens: ExcludeSpecialTokens = False) -> list[Splice]:
        """``saes`` (one SAE, as SAELens also takes; saebridge's or another library's, see
        :mod:`saebridge.sae.foreign`) as checked splices. ``use_error_term=None`` takes each
        SAE's own ``use_error_term``, as SAELens does."""
        listed = [saes] if is_sae_like(saes) or hasattr(saes, "cfg") else list(saes)
        ids = special_token_ids(exclude_special_tokens, self._adapter.tokenizer,
                                self._adapter.d_vocab)
        splices = [Splice(s, use_error_term, exclude_tokens=ids) for s in listed]
        for splice in splices:
            for hook in hooks_of(splice):
                self._adapter.kind(hook)  # unknown hooks fail now, not mid-forward
        self._check_model_name(splices)
        return splices

    def add_sae(self, sae: Any, use_error_term: bool | None = None,
                exclude_special_tokens: ExcludeSpecialTokens = False) -> None:
        """Attach an SAE: every later run through this wrapper splices it in. As in SAELens,
        it replaces an SAE already attached at its hook."""
        self._attached[:] = one_per_hook(
            self._attached, self._splices([sae], use_error_term, exclude_special_tokens))

    def reset_saes(self, act_names: str | Sequence[str] | None = None) -> None:
        """Detach the SAEs at hooks ``act_names`` (default: every attached SAE)."""
        if act_names is None:
            self._attached.clear()
            return
        names = {act_names} if isinstance(act_names, str) else set(act_names)
        self._attached[:] = [s for s in self._attached if s.hook not in names]

    @contextmanager
    def saes(self, saes: Any = (), use_error_term: bool | None = None,
             exclude_special_tokens: ExcludeSpecialTokens = False) -> Iterator[Any]:
        """Attach ``saes`` inside a ``with`` block (each replacing the SAE at its hook); the
        SAEs attached before are restored on exit, even on error."""
        before = list(self._attached)
        try:
            self._attached[:] = one_per_hook(
                self._attached, self._splices(saes, use_error_term, exclude_special_tokens))
            yield self
        finally:
            self._attached[:] = before
