"""Streaming a data set: SAELens's packing, Hugging Face datasets (streaming too), texts in
``cache_activations`` giving the same shards as the same windows passed as tokens, and
clear errors for bad input."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset

import saebridge as sb
from saebridge.cache import CacheDirError, cache_activations
from saebridge.datasets import pack, token_batches
from saebridge.errors import DatasetError
from saebridge.tiny import tiny_gpt2

TEXTS = [f"Sentence number {i} says the quick brown fox {'jumps ' * (i % 5)}over it."
         for i in range(40)]


@pytest.fixture(scope="module")
def model():
    hf, tok = tiny_gpt2()
    return sb.wrap(hf, tokenizer=tok)


def test_packing_is_saelens_packing():
    """300 random cases against SAELens's own ``concat_and_batch_sequences``."""
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    rng = random.Random(0)
    for _ in range(300):
        seqs = [[rng.randrange(6) for _ in range(rng.randint(1, 12))]
                for _ in range(rng.randint(1, 8))]
        ctx, bos, sep = rng.randint(2, 9), rng.choice([None, 0]), rng.choice([None, 0, 1])
        disable = rng.random() < 0.3
        ref = concat_and_batch_sequences(iter(torch.tensor(s) for s in seqs), ctx, bos, None,
                                         sep, disable)
        assert [w.tolist() for w in ref] == list(pack(seqs, ctx, bos, sep, disable)), \
            (seqs, ctx, bos, sep, disable)


def test_hf_dataset_in_memory_and_streaming(model):
    ds = Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
    plain = list(token_batches(model, TEXTS, context_size=16, batch_size=4))
    for source in (ds, ds.to_iterable_dataset(), ({"text": t} for t in TEXTS)):
        got = list(token_batches(model, source, context_size=16, batch_size=4))
        assert len(got) == len(plain)
        assert all(torch.equal(a, b) for a, b in zip(got, plain, strict=True))
    bos = model.tokenizer.bos_token_id
    assert all(bool((b[:, 0] == bos).all()) and b.shape[1] == 16 for b in plain)
    # Pre-tokenised rows are used as they are, cut to context_size.
    rows = Dataset.from_dict({"input_ids": [list(range(20))] * 3})
    (batch,) = token_batches(model, rows, context_size=8, batch_size=4, column="input_ids")
    assert batch.tolist() == [list(range(8))] * 3


def test_bad_input_is_refused(model, tmp_path):
    ds = Dataset.from_dict({"content": TEXTS})
    with pytest.raises(DatasetError, match=r"no column 'text'; its columns are \['content'\]"):
        list(token_batches(model, ds, context_size=8))
    with pytest.raises(DatasetError, match=r"columns are \['content'\]"):
        list(token_batches(model, ds.to_iterable_dataset(), context_size=8))
    with pytest.raises(DatasetError, match=r"context_size=65 is longer .*n_ctx=64"):
        list(token_batches(model, TEXTS, context_size=65))
    with pytest.raises(DatasetError, match="sequence_separator_token"):
        list(token_batches(model, TEXTS, context_size=8, sequence_separator_token="cls"))
    with pytest.raises(DatasetError, match="without context_size"):
        cache_activations(model, TEXTS, hooks=["blocks.0.hook_resid_post"], out_dir=tmp_path)


def test_texts_cache_like_their_windows(model, tmp_path):
    sae = sb.SAE.random("topk", 64, 128, "blocks.0.hook_resid_post", k=4)
    kw = dict(hooks=["blocks.0.hook_mlp_out"], saes=[sae], tokens_per_shard=64)
    from_texts = cache_activations(model, TEXTS, out_dir=tmp_path / "a", context_size=16,
                                   batch_size=2, **kw)
    windows = list(token_batches(model, TEXTS, context_size=16, batch_size=2))
    from_tokens = cache_activations(model, windows, out_dir=tmp_path / "b", **kw)
    assert len(from_texts.paths) == len(from_tokens.paths) > 1
    for i in range(len(from_texts.paths)):
        a, b = from_texts.shard(i), from_tokens.shard(i)
        assert torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["blocks.0.hook_mlp_out"], b["blocks.0.hook_mlp_out"])
    # Resuming with other packing settings than the folder's manifest is refused.
    with pytest.raises(CacheDirError, match="context_size"):
        cache_activations(model, TEXTS, out_dir=tmp_path / "a", context_size=8,
                          batch_size=2, **kw)
