"""Per-latent statistics of an SAE over a data set, computed on the fly and merged exactly.

For each latent: how many tokens it fires on (``frequency``), the sum and the largest of
its activations (``mean``, ``mean_when_firing``, ``max``), a histogram of its nonzero
activations over fixed log-spaced bins (:data:`EDGES`), and its top-``k`` activating
windows (the window's token ids, the position of the peak, the value, and which batch and
row of the run it came from). Every part merges exactly, whatever the split of the data
(batches, resumptions, ranks): counts and histograms are integers, sums are kept in fixed
point (units of 2**-24, so a split changes no bit), maxima are maxima, and top-k entries
are ordered by (value desc, batch, row, position): one strict order, so the top-k of the
union is the top-k of the parts' top-k.

Saved as safetensors (every tensor, per SAE ``"<hook>/<name>"``) plus a small JSON
manifest; :func:`load_stats` reads them back, :meth:`LatentStats.show` prints one
latent's top windows as text.

>>> import torch
>>> stats = LatentStats(d_sae=4, top_k=2, context_size=3)
>>> tokens = torch.tensor([[7, 8, 9], [7, 5, 6]])
>>> acts = torch.zeros(2, 3, 4); acts[0, 1, 2] = 1.5; acts[1, 2, 2] = 3.0
>>> stats.update(0, tokens, *acts.to_sparse().indices(), acts.to_sparse().values())
>>> stats.frequency.tolist(), stats.top_tokens[2, 0].tolist(), int(stats.top_keys[2, 0, 2])
([0.0, 0.0, 0.3333333432674408, 0.0], [7, 5, 6], 2)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saebridge.errors import DatasetError

Tensor = torch.Tensor
SCALE = 2.0**24
"""Fixed-point unit of the activation sums: exact integer addition in any order."""
EDGES = torch.logspace(-4, 2, 25)
"""Histogram bin edges (1e-4 … 1e2, 4 bins a decade); bin 0 holds smaller values, the
last bin larger ones."""
NO_KEY = torch.iinfo(torch.int64).max
STATE = ("n_tokens", "fire_count", "sum_fixed", "max", "hist", "top_values", "top_keys",
         "top_tokens")


class Example(NamedTuple):
    """One of a latent's top activating windows."""

    value: float
    """The latent's activation at ``position``."""
    tokens: list[int]
    """The window's token ids."""
    position: int
    """Where in the window the latent peaks."""
    batch: int
    """Which batch of the run (global: across ranks) the window came from."""
    row: int
    """Which row of that batch."""


class LatentStats:
    """Statistics of one SAE's ``d_sae`` latents (see the module docstring)."""

    def __init__(self, d_sae: int, *, top_k: int = 10, context_size: int) -> None:
        self.d_sae, self.top_k, self.context_size = d_sae, top_k, context_size
        self.n_tokens = torch.zeros(1, dtype=torch.int64)
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64)
        self.sum_fixed = torch.zeros(d_sae, dtype=torch.int64)
        self.max = torch.zeros(d_sae)
        self.hist = torch.zeros(d_sae, len(EDGES) + 1, dtype=torch.int64)
        self.top_values = torch.full((d_sae, top_k), -torch.inf)
        self.top_keys = torch.full((d_sae, top_k, 3), NO_KEY, dtype=torch.int64)
        self.top_tokens = torch.full((d_sae, top_k, context_size), -1, dtype=torch.int32)

    # ---- reading ------------------------------------------------------------------------

    @property
    def frequency(self) -> Tensor:
        """Fraction of tokens each latent fires on."""
        return self.fire_count.float() / max(int(self.n_tokens), 1)

    @property
    def mean(self) -> Tensor:
        """Mean activation over every token."""
        return (self.sum_fixed.double() / SCALE / max(int(self.n_tokens), 1)).float()

    @property
    def mean_when_firing(self) -> Tensor:
        """Mean activation over the tokens a latent fires on (0 where it never fires)."""
        return (self.sum_fixed.double() / SCALE / self.fire_count.clamp_min(1)).float()

    def examples(self, latent: int) -> list[Example]:
        """Latent ``latent``'s top windows, strongest first."""
        out = []
        for j in range(self.top_k):
            if self.top_values[latent, j] == -torch.inf:
                break
            batch, row, pos = (int(x) for x in self.top_keys[latent, j])
            out.append(Example(float(self.top_values[latent, j]),
                               self.top_tokens[latent, j].tolist(), pos, batch, row))
        return out

    def show(self, latent: int, tokenizer: Any, width: int = 12) -> str:
        """Latent ``latent``'s top windows as text, the peak token in «», ``width`` tokens
        either side of it."""
        if not 0 <= latent < self.d_sae:
            raise DatasetError(f"latent {latent} is out of range: this SAE has {self.d_sae} "
                               f"latents (0 to {self.d_sae - 1}).")
        lines = [f"latent {latent}: fires on {float(self.frequency[latent]):.3%} of "
                 f"{int(self.n_tokens)} tokens, max {float(self.max[latent]):.4g}"]
        for ex in self.examples(latent):
            toks = ex.tokens[max(ex.position - width, 0):ex.position + width + 1]
            at = min(ex.position, width)
            text = [tokenizer.decode([t]) for t in toks if t >= 0]
            text[at] = f"«{text[at]}»"
            lines.append(f"  {ex.value:9.4g}  {''.join(text)!r}")
        return "\n".join(lines)

    # ---- accumulating -------------------------------------------------------------------

    def update(self, batch: int, tokens_BP: Tensor, batch_Z: Tensor, pos_Z: Tensor,
               latent_Z: Tensor, value_Z: Tensor) -> None:
        """Add one batch of the run (its index ``batch``, tokens ``[rows, context]``) whose
        nonzero latents are the entries ``(row, position, latent, value)``."""
        if tokens_BP.shape[1] != self.context_size:
            raise DatasetError(
                f"a batch of {tokens_BP.shape[1]} positions reached statistics kept for windows "
                f"of {self.context_size}; statistics need one window length. Pack the data "
                "with context_size= (or pass batches of one length).")
        fire = value_Z > 0
        b, p, j, v = batch_Z[fire], pos_Z[fire], latent_Z[fire].long(), value_Z[fire].float()
        self.n_tokens += tokens_BP.numel()
        self.fire_count += torch.bincount(j, minlength=self.d_sae)
        self.sum_fixed.index_add_(0, j, torch.round(v.double() * SCALE).long())
        self.max.scatter_reduce_(0, j, v, "amax")
        bucket = torch.bucketize(v, EDGES)
        self.hist.view(-1).index_add_(0, j * self.hist.shape[1] + bucket,
                                      torch.ones_like(j))
        # One candidate per (latent, window): its peak (the first position on ties).
        order = _lexsort([p, -v, b, j])
        b, p, j, v = b[order], p[order], j[order], v[order]
        first = torch.ones_like(j, dtype=torch.bool)
        first[1:] = (j[1:] != j[:-1]) | (b[1:] != b[:-1])
        b, p, j, v = b[first], p[first], j[first], v[first]
        keys = torch.stack([torch.full_like(b, batch), b, p], dim=1)
        self._merge_top(j, v, keys, tokens_BP[b].to(torch.int32))

    def merge(self, other: LatentStats) -> LatentStats:
        """Add ``other`` (the same SAE over other data) into these statistics, exactly."""
        if (other.d_sae, other.top_k, other.context_size) != \
                (self.d_sae, self.top_k, self.context_size):
            raise DatasetError(
                f"cannot merge statistics of (d_sae, top_k, context_size) = "
                f"{(other.d_sae, other.top_k, other.context_size)} into "
                f"{(self.d_sae, self.top_k, self.context_size)}: they describe other runs.")
        self.n_tokens += other.n_tokens
        self.fire_count += other.fire_count
        self.sum_fixed += other.sum_fixed
        self.max = torch.maximum(self.max, other.max)
        self.hist += other.hist
        kept = other.top_values > -torch.inf
        j = torch.arange(self.d_sae)[:, None].expand_as(kept)[kept]
        self._merge_top(j, other.top_values[kept], other.top_keys[kept],
                        other.top_tokens[kept])
        return self

    def _merge_top(self, j: Tensor, v: Tensor, keys: Tensor, tokens: Tensor) -> None:
        kept = self.top_values > -torch.inf
        old_j = torch.arange(self.d_sae)[:, None].expand_as(kept)[kept]
        j = torch.cat([old_j, j])
        v = torch.cat([self.top_values[kept], v])
        keys = torch.cat([self.top_keys[kept], keys])
        tokens = torch.cat([self.top_tokens[kept], tokens])
        order = _lexsort([keys[:, 2], keys[:, 1], keys[:, 0], -v, j])
        j, v, keys, tokens = j[order], v[order], keys[order], tokens[order]
        starts = torch.searchsorted(j, j, side="left")
        rank = torch.arange(len(j)) - starts
        top = rank < self.top_k
        j, rank = j[top], rank[top]
        self.top_values[j, rank] = v[top]
        self.top_keys[j, rank] = keys[top]
        self.top_tokens[j, rank] = tokens[top]

    # ---- saving -------------------------------------------------------------------------

    def state(self, prefix: str = "") -> dict[str, Tensor]:
        return {prefix + name: getattr(self, name).contiguous() for name in STATE}

    def info(self) -> dict[str, Any]:
        return {"d_sae": self.d_sae, "top_k": self.top_k, "context_size": self.context_size,
                "n_tokens": int(self.n_tokens), "sum_scale": SCALE, "edges": EDGES.tolist()}

    @classmethod
    def from_state(cls, info: dict[str, Any], tensors: dict[str, Tensor], prefix: str = ""
                   ) -> LatentStats:
        stats = cls(info["d_sae"], top_k=info["top_k"], context_size=info["context_size"])
        for name in STATE:
            setattr(stats, name, tensors[prefix + name])
        return stats


def _lexsort(keys: list[Tensor]) -> Tensor:
    """The order sorting by ``keys[-1]``, then ``keys[-2]``, … (stable sorts, least
    significant key first)."""
    order = torch.arange(len(keys[0]))
    for key in keys:
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def save_stats(path: str | os.PathLike[str], stats: dict[str, LatentStats],
               extra: dict[str, Any] | None = None) -> None:
    """Write ``stats`` (hook → statistics) to ``path`` (safetensors, the manifest in its
    metadata) atomically, and the manifest beside it as ``<path>.json`` when ``extra``
    is given (a finished run)."""
    path = Path(path)
    manifest = {"saes": {hook: s.info() for hook, s in stats.items()}, **(extra or {})}
    tensors = {k: v for hook, s in stats.items() for k, v in s.state(hook + "/").items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"manifest": json.dumps(manifest)})
    os.replace(tmp, path)
    if extra is not None:
        json_tmp = path.with_suffix(".json.tmp")
        json_tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        os.replace(json_tmp, path.with_suffix(".json"))


def load_stats(path: str | os.PathLike[str]) -> dict[str, LatentStats]:
    """The statistics :func:`save_stats` wrote to ``path`` (a ``.safetensors`` file, or
    the folder of a run: its ``latent_stats.safetensors``), by hook name."""
    path = Path(path)
    if path.is_dir():
        path = path / "latent_stats.safetensors"
    if not path.is_file():
        raise DatasetError(f"no latent statistics at {str(path)!r}. Pass the out_dir of a "
                           "finished cache_activations(..., latent_stats=True) run.")
    with safe_open(str(path), "pt") as f:
        manifest = json.loads((f.metadata() or {})["manifest"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {hook: LatentStats.from_state(info, tensors, hook + "/")
            for hook, info in manifest["saes"].items()}
