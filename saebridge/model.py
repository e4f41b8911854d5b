"""The common front: one model API over every backend.

:class:`Model` never mutates the wrapped model. Attached SAEs live in the wrapper and
are applied by the engine on each forward pass, so there are no on/off flags to forget
and nothing to restore when a forward raises: every hook the adapter adds is removed in
a ``finally``. One forward pass runs at a time per wrapper (a lock); concurrent callers wait.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from saebridge.errors import (
    ModelMismatchWarning,
    SpaceConversionError,
    TokensError,
    UnknownHookError,
    unknown,
)
from saebridge.hookmap.convert import (
    TRACKED_SITES,
    Affine,
    RawMeanTracker,
    RawStats,
    conversion,
    needs_tracker,
)
from saebridge.hookmap.space import CANONICAL, ActivationSpace
from saebridge.interventions import Intervention, SiteContext, Splice, _Observe, expand

if TYPE_CHECKING:
    from saebridge.backends import Adapter, SiteFn
    from saebridge.sae import SAE

Tensor = torch.Tensor
TokensLike = Tensor | str | Sequence[str]


_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def underlying(adapter: Any) -> Any:
    """The object a backend hooks into: the torch module under an adapter (for nnsight,
    the module under its envoy tree), so wrappers of one model can share a lock."""
    inner = getattr(adapter, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    envoy = getattr(adapter, "envoy", None)
    return getattr(envoy, "_module", None) or inner or adapter


def lock_for(adapter: Any) -> threading.Lock:
    """One lock per hooked model, shared by every wrapper of it: hooks registered by two
    forwards at once on the same modules would run in each other's passes."""
    key = underlying(adapter)
    with _LOCKS_GUARD:
        try:
            return _LOCKS.setdefault(key, threading.Lock())
        except TypeError:  # not weakly referenceable: this wrapper's own lock
            return threading.Lock()


def same_model(a: str, b: str) -> bool:
    """Whether two model names (hub ids, paths, TransformerLens aliases) name one model.

    >>> same_model("gpt2-small", "openai-community/gpt2"), same_model("gpt2", "pythia-70m")
    (True, False)
    """
    def norm(name: str) -> str:
        base = name.rstrip("/").rsplit("/", 1)[-1].lower()
        return base.removesuffix("-small")  # TL calls HF's "gpt2" "gpt2-small"

    return norm(a) == norm(b)


class ActivationCache(dict[str, Tensor]):
    """Cache keyed by canonical hook names; an unknown key lists the nearest ones."""

    sparse: bool = False
    """SAE latents (``hook_sae_acts_post``) stored as sparse COO tensors, and the dense
    ``hook_sae_acts_pre`` left out (see :meth:`Model.run_with_cache_with_saes`)."""

    def record(self, key: str, value: Tensor) -> None:
        """Store one entry, as :attr:`sparse` asks."""
        if self.sparse and key.endswith(".hook_sae_acts_pre"):
            return
        self[key] = value.to_sparse() if self.sparse and key.endswith(
            ".hook_sae_acts_post") else value

    def __missing__(self, key: str) -> Tensor:
        if self.sparse and key.endswith(".hook_sae_acts_pre"):
            raise UnknownHookError(
                f"cache key {key!r} is not kept by run_with_cache_with_saes(sparse=True): SAE "
                "pre-activations are dense, d_sae wide per token. Run with sparse=False to "
                "cache them.")
        raise UnknownHookError(unknown("cache key", key, self.keys(),
                                       "Ask for the hook in names=... when running."))


class Model:
    """A wrapped model of any backend (see :func:`saebridge.wrap`)."""

    def __init__(self, adapter: Adapter) -> None:
        self._adapter = adapter
        self._attached: list[Splice] = []
        self._lock = lock_for(adapter)
        self._warned: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return (f"saebridge.Model(backend={self.backend!r}, space={self.space.name!r}, "
                f"saes={[s.hook for s in self._attached]})")

    @property
    def backend(self) -> str:
        """Name of the backend, e.g. ``"hf"`` or ``"transformer_lens"``."""
        return self._adapter.backend

    @property
    def space(self) -> ActivationSpace:
        """The activation space this model computes in."""
        return self._adapter.space

    @property
    def adapter(self) -> Adapter:
        return self._adapter

    def hook_names(self) -> list[str]:
        """Canonical (TransformerLens) hook names of this model, in execution order."""
        return self._adapter.hook_names()

    # ---- tokens -----------------------------------------------------------------------

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool = True) -> Tensor:
        """Token ids ``[batch, pos]``, with the BOS token first (the policy of every backend).

        >>> # model.to_tokens("Hello world")  # tensor([[bos, ...]])
        """
        tok = self._adapter.tokenizer
        if tok is None:
            raise TokensError(f"the {self.backend} model has no tokenizer, so text {text!r} "
                              "cannot be tokenised. Pass token ids, or wrap(model, tokenizer=...).")
        texts = [text] if isinstance(text, str) else list(text)
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if prepend_bos:
            ids = [[bos, *row] for row in ids]
        if len({len(row) for row in ids}) != 1:
            raise TokensError(f"texts tokenise to different lengths {[len(r) for r in ids]}; "
                              "pass them one at a time or as an equal-length token tensor.")
        return torch.tensor(ids, dtype=torch.long, device=self._adapter.device)

    def _tokens(self, tokens: TokensLike) -> Tensor:
        if isinstance(tokens, str) or (isinstance(tokens, Sequence) and tokens
                                       and isinstance(tokens[0], str)):
            return self.to_tokens(tokens)  # type: ignore[arg-type]
        if not isinstance(tokens, Tensor):
            raise TokensError(f"tokens must be a LongTensor [batch, pos] or text, got "
                              f"{type(tokens).__name__}.")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TokensError(f"tokens must be integer ids, got dtype {tokens.dtype}. "
                              "Pass token ids (torch.long), not embeddings or floats.")
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() != 2 or tokens.numel() == 0:
            raise TokensError(f"tokens must have shape [batch, pos], got {tuple(tokens.shape)}.")
        bad = (tokens < 0) | (tokens >= self._adapter.d_vocab)
        if bad.any():
            raise TokensError(f"token id {int(tokens[bad][0])} is out of the vocabulary "
                              f"[0, {self._adapter.d_vocab}). Tokenise with this model's "
                              "tokenizer.")
        return tokens.long().to(self._adapter.device)

    # ---- the engine ---------------------------------------------------------------------

    def _plan(self, tokens: Tensor, ops: list[Intervention], cache: ActivationCache | None,
              names: Iterable[str]) -> dict[str, SiteFn]:
        a = self._adapter
        by_site: dict[str, list[Any]] = {}
        for op in ops:
            a.kind(op.hook)  # unknown hooks fail here, before the forward
            if op.writes and not a.writable(op.hook):
                raise UnknownHookError(
                    f"hook {op.hook!r} can be read but not written on the {a.backend} backend "
                    "(no module boundary carries it). Intervene at another hook.")
            by_site.setdefault(op.hook, []).append(op)
        stats = a.raw_stats()
        tracker = None
        needy = [op for op in ops if hasattr(op, "sae")
                 and needs_tracker(a.kind(op.hook), a.space, op.sae.cfg.activation_space)]
        if needy:
            if stats is None:
                raise SpaceConversionError(
                    f"SAE at {needy[0].hook!r} was trained in space "
                    f"{needy[0].sae.cfg.activation_space.name!r} but the {a.backend} model is "
                    f"{a.space.name!r} and its unprocessed weights are unknown, so the raw "
                    "residual mean cannot be rebuilt. Build the model with "
                    "saebridge.adapters.transformer_lens.from_hf() or "
                    "saebridge.adapters.tl_bridge.bridge_from_hf() (they record them), or "
                    "wrap an unprocessed one.")
            tracker = RawMeanTracker(stats, a.space, tokens)
            for layer in range(a.n_layers):
                for rel in TRACKED_SITES:
                    name = f"blocks.{layer}.{rel}"
                    by_site.setdefault(name, []).append(_Observe(name, tracker.observe))
        if cache is not None:
            store = self._cacher(cache, stats)
            for name in names:
                a.kind(name)  # validates the name before the run starts
                by_site.setdefault(name, []).append(_Observe(name, store))

        batch = tokens.shape[0]

        def site_fn(name: str, site_ops: list[Any]) -> SiteFn:
            kind = a.kind(name)

            def convert(space: ActivationSpace, x: Tensor) -> Affine:
                return conversion(name, kind, a.space, space, x, stats, tracker)

            record = cache.record if cache is not None else (lambda k, v: None)
            ctx = SiteContext(name=name, kind=kind, convert=convert, record=record,
                              recording=cache is not None,
                              sparse_latents=cache is not None and cache.sparse,
                              raw_stats=stats)

            def fn(x: Tensor) -> Tensor:
                # The canonical layout has the batch first everywhere; a native value shared
                # by the batch (HF's position embeddings are [1, pos, d]) is broadcast.
                y = start = x.expand(batch, *x.shape[1:]) if x.dim() > 1 and \
                    x.shape[0] == 1 and batch > 1 else x
                for op in site_ops:
                    y = op.apply(y, ctx)
                return x if y is start else y
            return fn

        return {name: site_fn(name, site_ops) for name, site_ops in by_site.items()}

    def _cacher(self, cache: ActivationCache, stats: RawStats | None):
        a = self._adapter

        def store(name: str, x: Tensor) -> None:
            conv = conversion(name, a.kind(name), a.space, CANONICAL, x, stats)
            cache[name] = conv.forward(x).detach()
        return store

    def _check_model_name(self, ops: Iterable[Intervention]) -> None:
        mine = self._adapter.model_name
        for op in ops:
            sae = getattr(op, "sae", None)
            theirs = sae.cfg.model_name if sae is not None else None
            if mine and theirs and not same_model(mine, theirs) \
                    and (theirs, mine) not in self._warned:
                self._warned.add((theirs, mine))
                warnings.warn(
                    f"SAE at {op.hook!r} was made for model {theirs!r}, but it is used with "
                    f"{mine!r}. Its latents may mean nothing here; load the SAE made for this "
                    "model, or ignore this warning if the names differ only in spelling.",
                    ModelMismatchWarning, stacklevel=4)

    def _run(self, tokens: TokensLike, ops: Sequence[Intervention],
             names: Iterable[str] | None = None, cache: bool = False, sparse: bool = False
             ) -> tuple[Tensor, ActivationCache]:
        toks = self._tokens(tokens)
        store = ActivationCache() if cache else None
        if store is not None:
            store.sparse = sparse
        # Resolving every hook name costs ~2 ms on a 12-layer model: only when caching all.
        if names is None:
            names = self.hook_names() if cache else []
        # expand(): a transcoder splice reads one site and writes another.
        all_ops: list[Intervention] = expand([*self._attached, *ops])
        self._check_model_name(all_ops)
        with self._lock, torch.no_grad():
            edits = self._plan(toks, all_ops, store, list(names))
            logits = self._adapter.run(toks, edits)
        return logits, store if store is not None else ActivationCache()

    # ---- the public runs ------------------------------------------------------------------

    def __call__(self, tokens: TokensLike) -> Tensor:
        """Logits ``[batch, pos, d_vocab]`` (native), with any attached SAEs spliced in."""
        return self._run(tokens, [])[0]

    def run_with_saes(self, tokens: TokensLike, saes: Sequence[SAE] = (),
                      use_error_term: bool = False) -> Tensor:
        """Logits with ``saes`` spliced in for this call only (on top of attached ones).

        >>> # logits = model.run_with_saes(tokens, saes=[sae])
        """
        return self._run(tokens, [Splice(s, use_error_term) for s in saes])[0]

    def run_with_cache(self, tokens: TokensLike, names: Iterable[str] | None = None
                       ) -> tuple[Tensor, ActivationCache]:
        """Logits and a cache of ``names`` (default: every hook), keyed canonically and
        holding values in the canonical space (TransformerLens-processed), whatever the
        backend. A value is the one the model goes on with, after any edit at that hook."""
        return self._run(tokens, [], names, cache=True)

    def run_with_cache_with_saes(self, tokens: TokensLike, saes: Sequence[SAE] = (),
                                 names: Iterable[str] | None = None,
                                 use_error_term: bool = False, sparse: bool = False
                                 ) -> tuple[Tensor, ActivationCache]:
        """Like :meth:`run_with_cache`, with SAEs spliced in; each adds
        ``f"{hook}.hook_sae_input|acts_pre|acts_post|recons|error|output"`` (in the SAE's
        own space) to the cache.

        With ``sparse=True`` the latents ``hook_sae_acts_post`` are coalesced sparse COO
        tensors of the same shape ``[batch, pos, d_sae]`` (``.to_dense()`` restores them;
        ``.indices()`` / ``.values()`` list the active ones), and ``hook_sae_acts_pre``,
        dense by nature, is not kept: for a TopK k=32 SAE the latents take ~1/100 of the
        dense memory.

        >>> # _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], sparse=True)
        >>> # cache[f"{sae.cfg.hook_name}.hook_sae_acts_post"].indices()  # [3, nnz]
        """
        return self._run(tokens, [Splice(s, use_error_term) for s in saes], names, cache=True,
                         sparse=sparse)

    def run_with_interventions(self, tokens: TokensLike,
                               interventions: Sequence[Intervention]) -> Tensor:
        """Logits with ``interventions`` (Steer, Ablate, Clamp, Splice, …) applied.

        They run in the model's execution order, whatever order they are given in.
        """
        return self._run(tokens, list(interventions))[0]

    def _generation_ops(self, tokens: TokensLike, max_new_tokens: int,
                        interventions: Sequence[Intervention], saes: Sequence[SAE],
                        use_error_term: bool) -> tuple[Tensor, list[Intervention]]:
        """Validated tokens and the op list every step of a generation applies."""
        toks = self._tokens(tokens)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 0:
            raise TokensError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
        ops = expand([*self._attached, *(Splice(s, use_error_term) for s in saes),
                      *interventions])
        self._check_model_name(ops)
        return toks, ops

    def generate(self, tokens: TokensLike, max_new_tokens: int,
                 interventions: Sequence[Intervention] = (), saes: Sequence[SAE] = (),
                 use_error_term: bool = False) -> Tensor:
        """Greedy continuation ``[batch, pos + max_new_tokens]``, with ``saes`` spliced in
        and ``interventions`` applied at every step.

        Decodes through the backend's own generation where it carries every hook (HF
        ``generate`` with hooks, nnsight ``tracer.iter``), else a loop of forwards. Each
        step is a whole forward over the sequence so far (no KV cache), so positions and
        activation spaces mean what they mean in one run; it does not stop at EOS.

        >>> # model.generate("Hello", 5, interventions=[sb.Steer.from_sae(sae, 3, coef=8.0)])
        """
        from saebridge.generate import greedy

        toks, ops = self._generation_ops(tokens, max_new_tokens, interventions, saes,
                                         use_error_term)

        def edits_for(tokens_BP: Tensor) -> dict[str, SiteFn]:
            return self._plan(tokens_BP, ops, None, [])

        a = self._adapter
        with self._lock, torch.no_grad():
            edits_for(toks)  # unknown or read-only hooks fail before decoding
            if max_new_tokens == 0:
                return toks
            decode = getattr(a, "generate", None)
            if decode is not None:
                return decode(toks, edits_for, max_new_tokens)
            return greedy(lambda t: a.run(t, edits_for(t)), toks, max_new_tokens)

    # ---- stateful SAEs ------------------------------------------------------------------

    def add_sae(self, sae: SAE, use_error_term: bool = False) -> None:
        """Attach an SAE: every later run through this wrapper splices it in."""
        for hook in {sae.cfg.hook_name, getattr(sae.cfg, "hook_name_out", sae.cfg.hook_name)}:
            self._adapter.kind(hook)  # unknown hooks fail now, not mid-forward
        splice = Splice(sae, use_error_term)
        self._check_model_name([splice])
        self._attached.append(splice)

    def reset_saes(self) -> None:
        """Detach every attached SAE."""
        self._attached.clear()

    @contextmanager
    def saes(self, saes: Sequence[SAE], use_error_term: bool = False) -> Iterator[Model]:
        """Attach ``saes`` inside a ``with`` block; they are detached on exit, even on error."""
        before = list(self._attached)
        try:
            for sae in saes:
                self.add_sae(sae, use_error_term)
            yield self
        finally:
            self._attached[:] = before
