"""Streaming a data set into token batches: texts (a list, any iterable, a Hugging Face
``datasets`` dataset, streaming too) tokenised and packed into ``context_size`` windows
with SAELens's BOS policy, then batched.

The policy is SAELens's ``ActivationsStore`` (``sae_lens/tokenization_and_batching.py``):
each text is tokenised without special tokens; texts are concatenated, a separator token
(``sequence_separator_token``: ``"bos"`` by default, ``"eos"``, ``"sep"``, an id, or None)
between two texts in one window; with ``prepend_bos`` every window starts with BOS (added
only where the first token is not BOS already); the last, incomplete window is dropped.
``disable_concat_sequences=True`` keeps one text per window instead (shorter ones are
dropped). A column of token ids (a pre-tokenised data set) is used as it is, each row cut
to ``context_size``, as SAELens does.

>>> from saebridge.tiny import tiny_gpt2
>>> import saebridge as sb
>>> hf_model, tokenizer = tiny_gpt2()
>>> model = sb.wrap(hf_model, tokenizer=tokenizer)
>>> batches = list(token_batches(model, ["Hello world"] * 6, context_size=8, batch_size=2))
>>> [tuple(b.shape) for b in batches], bool((batches[0][:, 0] == tokenizer.bos_token_id).all())
([(2, 8), (2, 8), (1, 8)], True)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from saebridge.errors import DatasetError
from saebridge.model import context_length

Tensor = torch.Tensor
SEPARATORS = ("bos", "eos", "sep")
TOKENIZE_CHUNK = 64
"""Texts tokenised per call (a fast tokenizer works on a list in parallel)."""


def is_text_source(data: Any) -> bool:
    """Whether ``data`` is plainly texts (a ``datasets`` dataset, a list of strings or row
    dicts) rather than token batches; never consumes an iterator."""
    if type(data).__module__.startswith("datasets."):
        return True
    return isinstance(data, (list, tuple)) and bool(data) and isinstance(data[0], (str, dict))


def settings(*, context_size: int, batch_size: int, column: str = "text",
             prepend_bos: bool = True, sequence_separator_token: int | str | None = "bos",
             disable_concat_sequences: bool = False) -> dict[str, Any]:
    """The packing settings as a manifest records them (a resumed run must match)."""
    return {"context_size": context_size, "batch_size": batch_size, "column": column,
            "prepend_bos": prepend_bos, "sequence_separator_token": sequence_separator_token,
            "disable_concat_sequences": disable_concat_sequences}


def token_batches(model: Any, data: Iterable[Any], *, context_size: int, batch_size: int = 8,
                  column: str = "text", prepend_bos: bool = True,
                  sequence_separator_token: int | str | None = "bos",
                  disable_concat_sequences: bool = False) -> Iterator[Tensor]:
    """LongTensors ``[batch_size, context_size]`` (the last may have fewer rows) packed from
    ``data`` for ``model`` (a :class:`saebridge.Model`: its tokenizer and ``n_ctx``).

    Raises:
        DatasetError: ``context_size`` over the model's ``n_ctx`` or not positive, a
            dataset without ``column`` (the columns found are named), no tokenizer.
    """
    opts = settings(context_size=context_size, batch_size=batch_size, column=column,
                    prepend_bos=prepend_bos, sequence_separator_token=sequence_separator_token,
                    disable_concat_sequences=disable_concat_sequences)
    tok = _check(model, opts)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    sep = _separator(tok, sequence_separator_token)
    rows = _rows(data, column)
    first = next(rows, None)
    if first is None:
        return
    rows = itertools.chain([first], rows)
    if isinstance(first, str):
        windows = pack(_tokenise(tok, rows), context_size, bos if prepend_bos else None, sep,
                       disable_concat_sequences)
    else:  # pre-tokenised rows, as SAELens uses them
        windows = ([int(t) for t in row[:context_size]] for row in rows)
    while chunk := list(itertools.islice(windows, batch_size)):
        yield torch.tensor(chunk, dtype=torch.long)


def _check(model: Any, opts: dict[str, Any]) -> Any:
    size, batch = opts["context_size"], opts["batch_size"]
    for name, value in (("context_size", size), ("batch_size", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DatasetError(f"{name} must be a positive integer, got {value!r}.")
    if size == 1 and opts["prepend_bos"]:
        raise DatasetError("context_size=1 with prepend_bos=True leaves no room for text "
                           "after the BOS token. Pass context_size >= 2.")
    n_ctx = context_length(model.adapter)
    if n_ctx is not None and size > n_ctx:
        raise DatasetError(f"context_size={size} is longer than the model's context "
                           f"(n_ctx={n_ctx}). Pass context_size <= {n_ctx}.")
    tok = model.adapter.tokenizer
    if tok is None:
        raise DatasetError("the model has no tokenizer, so texts cannot be tokenised. Wrap it "
                           "with sb.wrap(model, tokenizer=...), or pass token batches.")
    return tok


def _separator(tok: Any, token: int | str | None) -> int | None:
    if token is None or (isinstance(token, int) and not isinstance(token, bool)):
        return token
    if token not in SEPARATORS:
        raise DatasetError(f"sequence_separator_token={token!r} is not valid; pass one of "
                           f"{SEPARATORS}, a token id, or None.")
    found = getattr(tok, f"{token}_token_id")
    if found is None:
        raise DatasetError(f"sequence_separator_token={token!r}, but the tokenizer has no "
                           f"{token} token. Pass another one, a token id, or None.")
    return int(found)


def _rows(data: Iterable[Any], column: str) -> Iterator[Any]:
    """Each text (or row of token ids) of ``data``: strings as they are, ``row[column]``
    of dict rows; a missing column is refused with the columns there are."""
    names = getattr(data, "column_names", None)
    if isinstance(names, list) and column not in names:
        raise _no_column(column, names)
    for row in data:
        if isinstance(row, dict):
            if column not in row:
                raise _no_column(column, list(row))
            row = row[column]
        if not isinstance(row, (str, list, tuple, Tensor)):
            raise DatasetError(f"a data set row is a {type(row).__name__}; pass texts, rows "
                               f"with a {column!r} text column, or rows of token ids.")
        yield row


def _no_column(column: str, found: list[str]) -> DatasetError:
    return DatasetError(f"the data set has no column {column!r}; its columns are {found}. "
                        "Pass column=<the text column> (or one of token ids).")


def _tokenise(tok: Any, texts: Iterator[str]) -> Iterator[list[int]]:
    while chunk := list(itertools.islice(texts, TOKENIZE_CHUNK)):
        yield from tok(chunk, add_special_tokens=False)["input_ids"]


def pack(sequences: Iterable[list[int]], context_size: int, bos: int | None,
         separator: int | None, disable_concat: bool = False) -> Iterator[list[int]]:
    """Windows of ``context_size`` tokens packed as SAELens's ``concat_and_batch_sequences``
    packs them (``begin_batch_token_id=bos``, ``sequence_separator_token_id=separator``).

    >>> list(pack([[5, 6], [7, 8, 9]], 4, bos=0, separator=1))  # BOS 0, separator 1
    [[0, 5, 6, 1], [0, 7, 8, 9]]
    """
    if disable_concat:
        yield from _one_per_window(sequences, context_size, bos)
        return
    window: list[int] | None = None
    for seq in sequences:
        offset = 0
        while offset < len(seq):
            if window is None:
                prefix = [bos] if bos is not None and seq[offset] != bos else []
                take = max(context_size - len(prefix), 0)
                window = prefix[:context_size] + list(seq[offset:offset + take])
            else:
                prefix = [separator] if separator is not None and seq[offset] != separator \
                    else []
                room = max(context_size - len(window), 0)
                take = max(room - len(prefix), 0)
                window += prefix[:room] + list(seq[offset:offset + take])
            offset += take
            if len(window) == context_size:
                yield window
                window = None


def _one_per_window(sequences: Iterable[list[int]], context_size: int, bos: int | None
                    ) -> Iterator[list[int]]:
    for seq in sequences:
        seq = list(seq)
        if bos is not None and seq and len(seq) >= context_size - 1 and seq[0] != bos:
            seq = [bos, *seq[:context_size - 1]]
        if len(seq) >= context_size:
            yield seq[:context_size]
