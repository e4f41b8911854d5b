"""Streaming activation caching: shards, the dataset, progress, and resuming after a kill."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import saebridge as sb
from saebridge import cache as cache_mod
from saebridge.cache import ActivationShards, CacheDirError, cache_activations

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
SAE_HOOK = "blocks.1.hook_resid_pre"
LATENTS = SAE_HOOK + ".hook_sae_acts_post"
N_BATCHES, BATCH, POS = 12, 2, 8

WORKER = f"""
import sys, time, torch
import saebridge as sb
from saebridge.tiny import tiny_gpt2
out, delay = sys.argv[1], float(sys.argv[2])
hf, _ = tiny_gpt2(seed=0)
sae = sb.SAE.random("topk", 64, 512, {SAE_HOOK!r}, k=8, seed=1, activation_space="hf")
def batches():
    for i in range({N_BATCHES}):
        time.sleep(delay)
        yield torch.randint(0, 300, ({BATCH}, {POS}), generator=torch.Generator().manual_seed(i))
sb.cache_activations(hf, batches(), hooks={HOOKS!r}, saes=[sae], out_dir=out,
                     tokens_per_shard={BATCH * POS})
"""


def batches(n: int = N_BATCHES) -> list[torch.Tensor]:
    return [torch.randint(0, 300, (BATCH, POS), generator=torch.Generator().manual_seed(i))
            for i in range(n)]


def worker_sae() -> sb.SAE:
    return sb.SAE.random("topk", 64, 512, SAE_HOOK, k=8, seed=1, activation_space="hf")


def same_shards(a: Path, b: Path) -> None:
    names_a = sorted(p.name for p in a.iterdir())
    assert names_a == sorted(p.name for p in b.iterdir())
    for name in names_a:
        if name.endswith(".safetensors"):
            ta, tb = load_file(str(a / name)), load_file(str(b / name))
            assert ta.keys() == tb.keys()
            for key in ta:
                torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=1e-6)
            assert cache_mod._metadata(a / name) == cache_mod._metadata(b / name)


def test_shards_hold_what_run_with_cache_gives(models, tmp_path, backend):
    model = models(*backend)
    sae = sb.SAE.random("topk", 64, 512, SAE_HOOK, k=8, seed=1,
                        activation_space=model.space.name).to(backend.device)
    data = batches(5)
    ds = cache_activations(model, data, hooks=HOOKS, saes=[sae], out_dir=tmp_path,
                           tokens_per_shard=3 * BATCH * POS)
    assert [p.name for p in ds.paths] == ["shard_000000.safetensors", "shard_000001.safetensors"]
    assert len(ds) == 5 * BATCH * POS
    for b in (0, 4):
        _, want = model.run_with_cache_with_saes(data[b], saes=[sae], names=HOOKS,
                                                 use_error_term=True)
        for pos in (0, POS - 1):
            item = ds[b * BATCH * POS + pos]
            assert int(item["tokens"]) == int(data[b][0, pos])
            for hook in HOOKS:
                torch.testing.assert_close(item[hook], want[hook][0, pos], rtol=0, atol=1e-6)
            torch.testing.assert_close(item[LATENTS], want[LATENTS][0, pos], rtol=0, atol=1e-6)
    shard = ds.shard(1)
    assert shard[LATENTS].layout == torch.sparse_csr and shard[LATENTS].shape == (2 * 16, 512)
    assert int((shard[LATENTS].to_dense() != 0).sum(-1).max()) <= 8
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    first = next(iter(loader))
    assert first[HOOKS[1]].shape == (16, 4, 16) and first[LATENTS].shape == (16, 512)


def test_resume_after_kill_loses_and_repeats_nothing(models, tmp_path, monkeypatch):
    hf = models("hf")
    reference = tmp_path / "reference"
    cache_activations(hf, batches(), hooks=HOOKS, saes=[worker_sae()], out_dir=reference,
                      tokens_per_shard=BATCH * POS)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(out), "0.4"],
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("shard_*.safetensors"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the worker wrote no shards in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("shard_*.safetensors")))
    assert proc.returncode == -signal.SIGKILL and 3 <= done < N_BATCHES
    (out / f"shard_{done:06d}.safetensors.tmp").write_bytes(b"torn write")  # as if mid-save

    computed = []
    real = cache_mod._read_batch
    monkeypatch.setattr(cache_mod, "_read_batch",
                        lambda m, t, *a: computed.append(t) or real(m, t, *a))
    ds = cache_activations(hf, batches(), hooks=HOOKS, saes=[worker_sae()], out_dir=out,
                           tokens_per_shard=BATCH * POS)
    assert len(computed) == N_BATCHES - done  # the finished batches were not run again
    assert not list(out.glob("*.tmp"))
    same_shards(out, reference)
    starts = [int(cache_mod._metadata(p)["batch_start"]) for p in ds.paths]
    assert starts == list(range(N_BATCHES))
    # Resuming a complete cache computes nothing and changes nothing.
    computed.clear()
    cache_activations(hf, batches(), hooks=HOOKS, saes=[worker_sae()], out_dir=out,
                      tokens_per_shard=BATCH * POS)
    assert not computed
    same_shards(out, reference)


def test_progress_bar_only_when_asked_or_on_a_terminal(models, tmp_path, capsys, caplog):
    model = models("hf")
    with caplog.at_level(logging.INFO, logger="saebridge.cache"):
        cache_activations(model, batches(2), hooks=HOOKS[:1], out_dir=tmp_path / "a")
    assert "caching activations" not in capsys.readouterr().err  # stderr is not a terminal
    assert "wrote shard_000000.safetensors" in caplog.text
    cache_activations(model, batches(2), hooks=HOOKS[:1], out_dir=tmp_path / "b",
                      progress=True)
    err = capsys.readouterr().err
    assert "caching activations" in err and "2/2" in err


def test_dtype_and_sparse_storage(models, tmp_path):
    model = models("hf")
    sae = worker_sae()
    ds = cache_activations(model, batches(2), hooks=HOOKS[:1], saes=[sae], out_dir=tmp_path,
                           dtype=torch.float16)
    raw = load_file(str(ds.paths[0]))
    assert raw[HOOKS[0]].dtype == torch.float16 and raw[LATENTS + ".values"].dtype == torch.float16
    assert raw[LATENTS + ".col"].dtype == torch.int32
    assert raw[LATENTS + ".col"].numel() <= 8 * 2 * BATCH * POS  # k per token, not d_sae


def test_bad_requests_fail_before_any_forward(models, tmp_path):
    model = models("hf")
    with pytest.raises(CacheDirError, match="nothing to cache"):
        cache_activations(model, batches(1), out_dir=tmp_path / "none")
    with pytest.raises(KeyError, match=re.escape("blocks.0.hook_resid_pre")):
        cache_activations(model, batches(1), hooks=["blocks.0.hook_resid_pr"],
                          out_dir=tmp_path / "typo")
    with pytest.raises(CacheDirError, match="several SAEs at one hook"):
        cache_activations(model, batches(1), saes=[worker_sae(), worker_sae()],
                          out_dir=tmp_path / "two")
    with pytest.raises(CacheDirError, match="positive integer"):
        cache_activations(model, batches(1), hooks=HOOKS, out_dir=tmp_path / "zero",
                          tokens_per_shard=0)
    with pytest.raises(CacheDirError, match="per token"):
        cache_activations(model, batches(1), hooks=["blocks.0.attn.hook_pattern"],
                          out_dir=tmp_path / "pattern")


def test_resume_refuses_a_different_request_or_a_hole(models, tmp_path):
    model = models("hf")
    cache_activations(model, batches(3), hooks=HOOKS[:1], out_dir=tmp_path,
                      tokens_per_shard=BATCH * POS)
    with pytest.raises(CacheDirError, match="same hooks"):
        cache_activations(model, batches(3), hooks=HOOKS, out_dir=tmp_path,
                          tokens_per_shard=BATCH * POS)
    (tmp_path / "shard_000001.safetensors").unlink()
    with pytest.raises(CacheDirError, match="hole"):
        ActivationShards(tmp_path)
    with pytest.raises(CacheDirError, match="not a cache"):
        ActivationShards(tmp_path / "nowhere")
