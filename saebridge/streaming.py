"""What :func:`saebridge.cache_activations` adds over token batches: a data set of texts
packed into windows (:mod:`saebridge.datasets`), latent statistics on the fly
(:mod:`saebridge.latent_stats`), and data-parallel runs under ``torch.distributed``.

Under ``torchrun`` / ``accelerate launch`` (a process group initialised) rank ``r`` of
``world`` takes batches ``r, r + world, …`` of the one stream every rank packs alike, and
writes its shards and statistics under ``out_dir/rank_{r:03d}``; at the end rank 0 merges
every rank's statistics into ``out_dir/latent_stats.safetensors`` (+ ``.json``). Batch
indices in the statistics are global, so the merge equals a one-process run exactly.

Statistics survive a kill exactly: before shard ``n`` is renamed into place, the
statistics through it are written to ``latent_stats_{n+1:06d}.safetensors``; once the
shard is in place the previous file is removed. A resumed run with ``S`` shards on disk
loads ``latent_stats_{S:06d}`` (the statistics of exactly those shards) and removes any
other, so no batch is counted twice or lost.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from saebridge.datasets import is_text_source, settings, token_batches
from saebridge.errors import DatasetError, SAEBridgeError
from saebridge.latent_stats import LatentStats, load_stats, save_stats

Tensor = torch.Tensor
LATENTS = ".hook_sae_acts_post"
STATS_FILE = "latent_stats.safetensors"


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without a process group)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CacheDirError(SAEBridgeError, ValueError):
    """An activation-cache folder that does not hold what the caller asks for."""


class StreamRun:
    """One :func:`~saebridge.cache_activations` run's batches, statistics and rank."""

    def __init__(self, model: Any, data: Iterable[Any], saes: list[Any],
                 context_size: int | None, batch_size: int, latent_stats: bool | int,
                 packing: dict[str, Any]) -> None:
        self.rank, self.world = rank_and_world()
        self.top_k = _top_k(latent_stats, saes)
        self.saes = {sae.cfg.hook_name: sae.cfg.d_sae for sae in saes} if self.top_k else {}
        self.stats: dict[str, LatentStats] = {}
        self.spec: dict[str, Any] = {}
        if context_size is None:
            if packing or is_text_source(data):
                raise DatasetError(
                    "cache_activations got texts (or packing options) without context_size, "
                    "so it cannot pack them into windows. Pass context_size=<tokens per "
                    "window> (and batch_size=), or pass LongTensor batches [batch, pos].")
            batches: Iterable[Tensor] = data
        else:
            batches = token_batches(model, data, context_size=context_size,
                                    batch_size=batch_size, **packing)
            self.spec["dataset"] = settings(context_size=context_size, batch_size=batch_size,
                                            **packing)
        if self.top_k:
            self.spec["latent_stats"] = {"top_k": self.top_k}
        if self.world > 1:
            self.spec["ranks"] = {"rank": self.rank, "world": self.world}
        self.batches: Iterator[Tensor] = itertools.islice(iter(batches), self.rank, None,
                                                          self.world)

    def folder(self, out: Path) -> Path:
        """Where this rank's shards go."""
        return out / f"rank_{self.rank:03d}" if self.world > 1 else out

    def resume(self, out: Path, n_shards: int) -> None:
        """Load the statistics of the ``n_shards`` shards on disk; remove any other."""
        if not self.top_k:
            return
        keep = _stats_path(out, n_shards)
        for path in out.glob("latent_stats_*.safetensors"):
            if path != keep:
                path.unlink()
        if n_shards and not keep.is_file():
            raise DatasetError(
                f"{out} holds {n_shards} shards but not {keep.name}, the statistics of exactly "
                "those shards, so they cannot be resumed without counting some batches twice "
                "or not at all. Start over in a new out_dir.")
        self.stats = load_stats(keep) if n_shards else {}

    def observe(self, index: int, tokens: Tensor, rows: dict[str, Tensor]) -> None:
        """Add the latents of local batch ``index`` (rows as the cache stores them)."""
        if not self.top_k:
            return
        tokens_BP = rows["tokens"].reshape(-1, tokens.shape[-1])
        n_pos = tokens_BP.shape[1]
        for hook, d_sae in self.saes.items():
            key = hook + LATENTS
            crow = rows[key + ".crow"]
            token_Z = torch.repeat_interleave(torch.arange(len(crow) - 1), crow.diff())
            if hook not in self.stats:
                self.stats[hook] = LatentStats(d_sae, top_k=self.top_k, context_size=n_pos)
            self.stats[hook].update(index * self.world + self.rank, tokens_BP,
                                    token_Z // n_pos, token_Z % n_pos, rows[key + ".col"],
                                    rows[key + ".values"])

    def commit(self, out: Path, n_after: int, write: Callable[..., None], *args: Any) -> None:
        """``write(*args)`` (which renames shard ``n_after - 1`` into place), with the
        statistics through it written before and the previous ones removed after."""
        if self.top_k:
            save_stats(_stats_path(out, n_after), self.stats)
        write(*args)
        if self.top_k:
            _stats_path(out, n_after - 1).unlink(missing_ok=True)

    def finish(self, root: Path, out: Path, n_shards: int) -> None:
        """Write the finished statistics (rank 0: merged over every rank)."""
        if not self.top_k:
            return
        extra = {"n_shards": n_shards, "ranks": self.world}
        save_stats(out / STATS_FILE, self.stats, extra)
        if self.world == 1:
            return
        torch.distributed.barrier()  # every rank's statistics are on disk
        if self.rank == 0:
            merged = load_stats(self.folder(root) / STATS_FILE)
            for r in range(1, self.world):
                for hook, part in load_stats(root / f"rank_{r:03d}" / STATS_FILE).items():
                    merged[hook] = merged[hook].merge(part) if hook in merged else part
            save_stats(root / STATS_FILE, merged, {"ranks": self.world})
        torch.distributed.barrier()  # the merged file exists for every rank


def read_batch(model: Any, tokens: Tensor, hooks: list[str], saes: list[Any],
               dtype: torch.dtype | None) -> dict[str, Tensor]:
    """One batch as a shard stores it: flat tokens, each hook's activations per token, each
    SAE's latents as CSR rows (``.crow``/``.col``/``.values``)."""
    tokens = model.tokens(tokens)  # the same checks as every run
    _, cache = model.run_with_cache_with_saes(tokens, saes=saes, names=hooks, return_type=None,
                                              use_error_term=True, sparse=True)  # stops early
    n_batch, n_pos = tokens.shape
    rows: dict[str, Tensor] = {"tokens": tokens.reshape(-1).cpu()}
    for hook in hooks:
        acts = cache[hook]
        if tuple(acts.shape[:2]) != (n_batch, n_pos):
            raise CacheDirError(
                f"hook {hook!r} gives activations of shape {tuple(acts.shape)}, not "
                f"[batch, pos, ...] = [{n_batch}, {n_pos}, ...], so they cannot be stored per "
                "token. Cache per-token hooks only (attention patterns are per query and key).")
        rows[hook] = _cast(acts.reshape(n_batch * n_pos, *acts.shape[2:]), dtype).cpu()
    for sae in saes:
        key = sae.cfg.hook_name + LATENTS
        coo = cache[key].coalesce()
        batch_Z, pos_Z, col_Z = coo.indices()
        crow = torch.zeros(n_batch * n_pos + 1, dtype=torch.long)
        crow[1:] = torch.bincount(batch_Z * n_pos + pos_Z, minlength=n_batch * n_pos).cumsum(0)
        rows[key + ".crow"] = crow
        rows[key + ".col"] = col_Z.to(torch.int32).cpu()
        rows[key + ".values"] = _cast(coo.values(), dtype).cpu()
    return rows


def _cast(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    return x.detach().to(dtype) if dtype is not None else x.detach()


def _stats_path(out: Path, n_shards: int) -> Path:
    return out / f"latent_stats_{n_shards:06d}.safetensors"


def _top_k(latent_stats: bool | int, saes: list[Any]) -> int:
    if latent_stats is False or latent_stats == 0:
        return 0
    top_k = 10 if latent_stats is True else latent_stats
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise DatasetError(f"latent_stats must be True, False or a top-k count >= 1, got "
                           f"{latent_stats!r}.")
    if not saes:
        raise DatasetError("latent_stats=True needs saes=[...]: statistics are per SAE latent.")
    return top_k
