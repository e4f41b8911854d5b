"""Streaming activation caching: a data set's activations and SAE latents to safetensors shards.

:func:`cache_activations` runs the model batch by batch and writes what it reads to
numbered shards, so memory holds one shard at a time however long the data set is. A shard
is written to a temporary file and renamed into place, so a shard file either is complete
or does not exist; a run that is interrupted (killed, out of time) resumes from the first
missing shard, with no shard lost or written twice. :class:`ActivationShards` reads the
shards back as a torch ``Dataset`` of tokens.

Layout of ``out_dir``::

    saebridge_cache.json        what is cached (hooks, SAE latents, shard size): a resumed
                                run must ask for the same
    shard_000000.safetensors    tensors, one row per token, in data order:
        "tokens"                    [n] int64 token ids
        "<hook>"                    [n, ...] activation (canonical space, as run_with_cache)
        "<hook>.hook_sae_acts_post.crow|col|values"
                                    SAE latents as CSR rows: token i's active latents are
                                    col[crow[i]:crow[i+1]] (int32) with their values
      metadata: batch_start, batch_end (which input batches), n_tokens
    latent_stats.safetensors    with latent_stats=True: per-SAE latent statistics (+ .json
                                manifest; latent_stats_<n>.safetensors: those of the first
                                n shards, for resuming)
    rank_<r>/                   under torch.distributed: rank r's manifest, shards, statistics

>>> import tempfile, saebridge as sb
>>> from saebridge.tiny import tiny_gpt2
>>> hf_model, tokenizer = tiny_gpt2()
>>> model = sb.wrap(hf_model, tokenizer=tokenizer)
>>> sae = sb.SAE.random("topk", 64, 256, "blocks.1.hook_resid_pre", k=8)
>>> batches = [model.to_tokens("Hello world"), model.to_tokens("The quick brown fox")]
>>> with tempfile.TemporaryDirectory() as out_dir:
...     shards = sb.cache_activations(model, batches, hooks=["blocks.1.hook_resid_pre"],
...                                   saes=[sae], out_dir=out_dir)
...     row = shards[0]
>>> len(shards), row["blocks.1.hook_resid_pre"].shape  # one row per token: 6 + 10
(16, torch.Size([64]))
>>> latents = row["blocks.1.hook_resid_pre.hook_sae_acts_post"]  # dense [d_sae]
>>> latents.shape, int((latents != 0).sum())  # TopK: k active
(torch.Size([256]), 8)
"""

from __future__ import annotations

import bisect
import json
import logging
import operator
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from saebridge.backends import wrap
from saebridge.errors import ArgumentTypeError, IndexOutOfRangeError
from saebridge.model import Model
from saebridge.sae import SAE
from saebridge.sae.foreign import as_sae
from saebridge.streaming import CacheDirError, StreamRun
from saebridge.streaming import read_batch as _read_batch

Tensor = torch.Tensor
SPEC_FILE = "saebridge_cache.json"
FORMAT_VERSION = 1
LATENTS = ".hook_sae_acts_post"
log = logging.getLogger(__name__)


def cache_activations(model: Any, token_batches: Iterable[Tensor], *, hooks: Sequence[str] = (),
                      saes: Sequence[SAE] = (), out_dir: str | os.PathLike[str],
                      tokens_per_shard: int = 2**14, dtype: torch.dtype | None = None,
                      progress: bool | None = None, context_size: int | None = None,
                      batch_size: int = 8, latent_stats: bool | int = False, **packing: Any
                      ) -> ActivationShards:
    """Stream activations at ``hooks`` and the latents of ``saes`` to safetensors shards.

    SAEs only read: each is spliced with its error term, so the model computes exactly its
    clean forward and every hook sees clean activations. Rerunning with the same arguments
    resumes an interrupted run (the batches of complete shards are skipped, unread), so
    ``token_batches`` must yield the same batches in the same order each time.

    Args:
        model: a :class:`saebridge.Model` or any object :func:`saebridge.wrap` accepts.
        token_batches: LongTensors ``[batch, pos]`` (with a ``len()``, the progress bar
            shows the total); or, with ``context_size``, texts (a list, an iterable, a
            ``datasets`` dataset, streaming too) packed as SAELens packs them, in batches of
            ``batch_size`` windows (``**packing``: :func:`saebridge.datasets.token_batches`).
        latent_stats: True (or a top-k count): statistics of every SAE latent, computed on
            the fly; under torch.distributed each rank takes its share of the batches
            (:mod:`saebridge.streaming`; read them with :func:`saebridge.load_stats`).
        hooks: canonical hook names whose activations (``[batch, pos, ...]``) are cached.
        saes: SAEs whose latents are cached, stored sparsely; at most one per hook.
        out_dir: folder of the shards (created if needed).
        tokens_per_shard: a shard is closed at the first batch boundary at or past this.
        dtype: store activations and latent values in this dtype (default: as computed).
        progress: show a tqdm bar; default only when stderr is a terminal (otherwise a
            log line per shard goes to the ``saebridge.cache`` logger).

    Returns:
        The shards as an :class:`ActivationShards` dataset.

    >>> import tempfile, torch
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf_model, _ = tiny_gpt2()  # a raw HF model is wrapped for you
    >>> batches = [torch.tensor([[0, 42]])] * 3
    >>> with tempfile.TemporaryDirectory() as out_dir:
    ...     shards = cache_activations(hf_model, batches, hooks=["blocks.0.hook_mlp_out"],
    ...                                out_dir=out_dir, tokens_per_shard=4)
    ...     len(shards), len(shards.paths)  # 3 batches of 2 tokens; shards close at >= 4
    (6, 2)
    """
    wrapped: Model = wrap(model)  # a Model comes back as it is
    hooks, saes = list(hooks), [as_sae(s) for s in saes]  # SAELens & co.: shared
    run = StreamRun(wrapped, token_batches, saes, context_size, batch_size, latent_stats, packing)
    out = run.folder(Path(out_dir))
    spec = {**_spec(wrapped, hooks, saes, tokens_per_shard, dtype), **run.spec}
    start_batch, n_shards = _prepare(out, spec)
    run.resume(out, n_shards)
    bar = _progress_bar(progress, token_batches, start_batch)
    try:
        n_shards = _fill(run, out, lambda t: _read_batch(wrapped, t, hooks, saes, dtype), bar,
                         start_batch, n_shards, tokens_per_shard)
    finally:
        bar.close()
    run.finish(Path(out_dir), out, n_shards)
    return ActivationShards(out)


def _fill(run: StreamRun, out: Path, read: Any, bar: Any, start_batch: int, n_shards: int,
          tokens_per_shard: int) -> int:
    """Read the batches from ``start_batch`` on into shards; the number of shards after."""
    buffer: list[dict[str, Tensor]] = []
    first = start_batch
    for index, tokens in enumerate(run.batches):
        if index < start_batch:
            continue  # written by an earlier run
        buffer.append(read(tokens))
        run.observe(index, tokens, buffer[-1])
        bar.update(1)
        if sum(b["tokens"].numel() for b in buffer) >= tokens_per_shard:
            run.commit(out, n_shards + 1, _write_shard, out, n_shards, buffer, first, index + 1)
            n_shards, first, buffer = n_shards + 1, index + 1, []
    if buffer:
        run.commit(out, n_shards + 1, _write_shard, out, n_shards, buffer, first,
                   first + len(buffer))
        n_shards += 1
    return n_shards


def _spec(model: Model, hooks: list[str], saes: list[SAE], tokens_per_shard: int,
          dtype: torch.dtype | None) -> dict[str, Any]:
    if not hooks and not saes:
        raise CacheDirError("cache_activations got neither hooks nor saes, so there is "
                            "nothing to cache. Pass hooks=[...] and/or saes=[...].")
    if isinstance(tokens_per_shard, bool) or not isinstance(tokens_per_shard, int) \
            or tokens_per_shard < 1:
        raise CacheDirError(f"tokens_per_shard must be a positive integer, got "
                            f"{tokens_per_shard!r}. Pass e.g. 16384.")
    for hook in hooks:
        model.adapter.kind(hook)  # unknown names fail before any forward
    sae_hooks = [sae.cfg.hook_name for sae in saes]
    if len(set(sae_hooks)) != len(sae_hooks):
        raise CacheDirError(f"cache_activations got several SAEs at one hook ({sae_hooks}); "
                            "their latents would share a key. Cache them in separate runs.")
    return {"format": FORMAT_VERSION, "hooks": hooks,
            "latents": [{"key": sae.cfg.hook_name + LATENTS, "d_sae": sae.cfg.d_sae,
                         "architecture": sae.cfg.architecture,
                         "checksum": float(sae.W_dec.detach().double().sum())} for sae in saes],
            "tokens_per_shard": tokens_per_shard,
            "dtype": None if dtype is None else str(dtype).removeprefix("torch.")}


def _shard_path(out: Path, index: int) -> Path:
    return out / f"shard_{index:06d}.safetensors"


def _prepare(out: Path, spec: dict[str, Any]) -> tuple[int, int]:
    """Create or check ``out``; return (first batch to compute, number of shards on disk)."""
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / SPEC_FILE
    if spec_path.exists():
        found = _read_spec(spec_path)
        if found != spec:
            raise CacheDirError(
                f"{out} holds a cache of {found} but this run asks for {spec}. Resume with the "
                "same hooks, SAEs, tokens_per_shard and dtype, or use another out_dir.")
    else:
        _atomic_write(spec_path, json.dumps(spec, indent=1).encode())
    shards = _list_shards(out)
    # Shards are written one at a time, in order, each renamed into place before the next
    # starts: the only file an interrupted run can have left is the next shard's temporary
    # file. That one name is removed; nothing else in out_dir is touched (it may be yours).
    torn = _tmp_path(_shard_path(out, len(shards)))
    if torn.is_file():
        torn.unlink()
    if not shards:
        return 0, 0
    return int(_metadata(shards[-1])["batch_end"]), len(shards)


def _tmp_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(path.name + ".tmp")


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError) as err:
        raise CacheDirError(
            f"{str(path)!r} is not readable JSON ({type(err).__name__}: {err}), so what the "
            "cache in that folder holds is unknown. Restore the file, or start over in a new "
            "out_dir.") from err
    if not isinstance(found, dict) or not {"hooks", "latents"} <= found.keys():
        raise CacheDirError(
            f"{str(path)!r} holds {str(found)[:200]}, not what cache_activations writes (an "
            "object with hooks, latents, tokens_per_shard and dtype). Restore the file, or "
            "start over in a new out_dir.")
    return found


def _list_shards(out: Path) -> list[Path]:
    shards = sorted(out.glob("shard_*.safetensors"))
    for i, path in enumerate(shards):
        if path != _shard_path(out, i):
            raise CacheDirError(
                f"{out} has {path.name} but not {_shard_path(out, i).name}: a shard was deleted "
                "or moved, so the cache has a hole. Restore it, or start over in a new out_dir.")
    return shards


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        int(meta["batch_end"]), int(meta["n_tokens"])
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise _bad_shard(path, err) from err
    return meta


def _load_shard(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _bad_shard(path, err) from err


def _bad_shard(path: Path, err: BaseException) -> CacheDirError:
    return CacheDirError(
        f"cache shard {str(path)!r} is truncated or corrupt ({type(err).__name__}: {err}). "
        "Delete it and every later shard, then rerun cache_activations with the same "
        "arguments: it resumes from the first missing shard.")


def _write_shard(out: Path, index: int, batches: list[dict[str, Tensor]], batch_start: int,
                 batch_end: int) -> None:
    tensors: dict[str, Tensor] = {}
    for key in batches[0]:
        if key.endswith(".crow"):  # concatenated CSR: shift each batch's row offsets
            parts, offset = [batches[0][key][:1]], 0
            for b in batches:
                parts.append(b[key][1:] + offset)
                offset += int(b[key][-1])
            tensors[key] = torch.cat(parts)
        else:
            tensors[key] = torch.cat([b[key] for b in batches])
    n_tokens = tensors["tokens"].numel()
    meta = {"batch_start": str(batch_start), "batch_end": str(batch_end),
            "n_tokens": str(n_tokens)}
    path = _shard_path(out, index)
    tmp = _tmp_path(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    _fsync(tmp)
    os.replace(tmp, path)  # atomic: the shard appears complete or not at all
    _fsync(out)
    log.info("wrote %s: batches %d-%d, %d tokens", path.name, batch_start, batch_end - 1,
             n_tokens)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _tmp_path(path)
    tmp.write_bytes(data)
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _progress_bar(progress: bool | None, batches: Iterable[Tensor], start: int) -> Any:
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    return tqdm(total=total, initial=start, disable=not show, unit="batch",
                desc="caching activations", file=sys.stderr)


class ActivationShards(Dataset):
    """The shards :func:`cache_activations` wrote, as a map-style dataset of tokens.

    Item ``i`` is a dict: ``"tokens"`` (the token id), each hook's activation, and each
    SAE's latents as a dense ``[d_sae]`` row. One shard is kept in memory at a time, so read
    in order (or shuffle within shards); :meth:`shard` gives a whole shard with its latents
    as sparse CSR tensors.

    >>> import tempfile, torch, saebridge as sb
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf_model, tokenizer = tiny_gpt2()
    >>> model = sb.wrap(hf_model, tokenizer=tokenizer)
    >>> with tempfile.TemporaryDirectory() as out_dir:
    ...     _ = sb.cache_activations(model, [model.to_tokens("Hello world")] * 2,
    ...                              hooks=["blocks.1.hook_resid_post"], out_dir=out_dir)
    ...     ds = ActivationShards(out_dir)  # reopened, e.g. by the training job
    ...     batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    >>> batch["tokens"].shape, batch["blocks.1.hook_resid_post"].shape
    (torch.Size([4]), torch.Size([4, 64]))
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.root = Path(out_dir)
        spec_path = self.root / SPEC_FILE
        if not spec_path.exists():
            raise CacheDirError(f"{self.root} has no {SPEC_FILE}, so it is not a cache that "
                                "cache_activations wrote. Pass the out_dir of such a run.")
        self.spec = _read_spec(spec_path)
        self.paths = _list_shards(self.root)
        sizes = [int(_metadata(p)["n_tokens"]) for p in self.paths]
        self._starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self._loaded: tuple[int, dict[str, Tensor]] | None = None

    def __len__(self) -> int:
        return self._starts[-1]

    def shard(self, index: int) -> dict[str, Tensor]:
        """All of shard ``index``: activations ``[n, ...]``; latents as sparse CSR
        ``[n, d_sae]``."""
        raw = _load_shard(self.paths[index])
        out = {k: v for k, v in raw.items() if not k.endswith((".crow", ".col", ".values"))}
        for lat in self.spec["latents"]:
            key = lat["key"]
            with warnings.catch_warnings():  # "CSR support is in beta": it is what we need
                warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
                out[key] = torch.sparse_csr_tensor(
                    raw[key + ".crow"], raw[key + ".col"].long(), raw[key + ".values"],
                    (raw["tokens"].numel(), lat["d_sae"]), check_invariants=True)
        return out

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        i = _as_index(i)
        if not -len(self) <= i < len(self):
            raise IndexOutOfRangeError(f"token index {i!r} is out of range for {len(self)} "
                                       f"cached tokens (valid: -{len(self)} to "
                                       f"{len(self) - 1}, as for a list).")
        i %= len(self)
        index = bisect.bisect_right(self._starts, i) - 1
        if self._loaded is None or self._loaded[0] != index:
            self._loaded = (index, _load_shard(self.paths[index]))
        raw, row = self._loaded[1], i - self._starts[index]
        item = {"tokens": raw["tokens"][row]}
        item.update({hook: raw[hook][row] for hook in self.spec["hooks"]})
        for lat in self.spec["latents"]:
            key = lat["key"]
            lo, hi = int(raw[key + ".crow"][row]), int(raw[key + ".crow"][row + 1])
            dense = raw[key + ".values"].new_zeros(lat["d_sae"])
            dense[raw[key + ".col"][lo:hi].long()] = raw[key + ".values"][lo:hi]
            item[key] = dense
        return item


def _as_index(i: Any) -> int:
    """``i`` as a Python int: ints and one-element integer tensors; never a float or a bool."""
    if isinstance(i, Tensor):
        if i.numel() == 1 and not i.dtype.is_floating_point and i.dtype != torch.bool:
            return int(i)
    elif not isinstance(i, bool) and hasattr(type(i), "__index__"):  # int, numpy integers
        return operator.index(i)
    raise ArgumentTypeError(f"token index must be an integer, got {i!r} ({type(i).__name__}).")
