"""The common front: one model API over every backend.

:class:`Model` never mutates the wrapped model. Attached SAEs live in the wrapper and
are applied by the engine on each forward pass, so there are no on/off flags to forget
and nothing to restore when a forward raises: every hook the adapter adds is removed in
a ``finally``. One forward pass runs at a time per wrapper (a lock); concurrent callers wait.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from saebridge.attach import AttachedSAEs, ExcludeSpecialTokens, one_per_hook
from saebridge.engine import (
    ActivationCache,
    Plan,
    RunLock,
    SiteFn,
    lock_for,
    plan,
    underlying,
)
from saebridge.errors import ModelMismatchWarning, TokensError
from saebridge.hookmap.space import ActivationSpace
from saebridge.hooks import fold_latent_hooks
from saebridge.interventions import Intervention, Splice
from saebridge.stop import StopPoint
from saebridge.stop import output as stop_output
from saebridge.stop import prepare as prepare_stop
from saebridge.stop import run as run_stopped
from saebridge.tl_surface import TLSurface
from saebridge.tl_weights import TLWeights
from saebridge.transcoders import expand

if TYPE_CHECKING:
    from saebridge.backends import Adapter
    from saebridge.sae.model import SAE

Tensor = torch.Tensor
TokensLike = Tensor | str | Sequence[str]


def same_model(a: str, b: str) -> bool:
    """Whether two model names (hub ids, paths, TransformerLens aliases) name one model.

    >>> same_model("gpt2-small", "openai-community/gpt2"), same_model("gpt2", "pythia-70m")
    (True, False)
    """
    def norm(name: str) -> str:
        base = name.rstrip("/").rsplit("/", 1)[-1].lower()
        return base.removesuffix("-small")  # TL calls HF's "gpt2" "gpt2-small"

    return norm(a) == norm(b)


def context_length(adapter: Adapter) -> int | None:
    """The longest sequence the model under ``adapter`` takes (TransformerLens ``n_ctx``,
    an HF config's ``n_positions``/``max_position_embeddings``); None when it says none."""
    module = underlying(adapter)
    for holder, attrs in ((getattr(module, "cfg", None), ("n_ctx",)),
                          (getattr(module, "config", None),
                           ("n_positions", "max_position_embeddings", "n_ctx"))):
        for attr in attrs:
            value = getattr(holder, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


class Model(AttachedSAEs, TLSurface, TLWeights):
    """A wrapped model of any backend (see :func:`saebridge.wrap`); with TransformerLens's
    surface (:mod:`saebridge.tl_surface`, :mod:`saebridge.tl_weights`)."""

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

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool = True,
                  padding_side: str | None = None) -> Tensor:
        """Token ids ``[batch, pos]``, with the BOS token first (the policy of every backend);
        texts of different lengths padded as TransformerLens pads them (:meth:`_pad`).

        >>> import saebridge as sb
        >>> from saebridge.tiny import tiny_gpt2
        >>> hf_model, tokenizer = tiny_gpt2()  # 2 layers, d_model 64, random weights
        >>> model = sb.wrap(hf_model, tokenizer=tokenizer)
        >>> tokens = model.to_tokens("Hello world")
        >>> tokens.shape[0], int(tokens[0, 0]) == model.adapter.tokenizer.bos_token_id
        (1, True)
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
        return torch.tensor(self._pad(ids, padding_side), dtype=torch.long,
                            device=self._adapter.device)

    def tokens(self, tokens: TokensLike) -> Tensor:
        """``tokens`` checked and on the model's device: text is tokenised (BOS first), a
        1-D tensor becomes one batch row, ids must be in the vocabulary."""
        if isinstance(tokens, str) or (isinstance(tokens, Sequence) and tokens
                                       and isinstance(tokens[0], str)):
            return self._fits(self.to_tokens(tokens), 0)  # type: ignore[arg-type]
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
        return self._fits(tokens.long().to(self._adapter.device), 0)

    def _fits(self, tokens_BP: Tensor, n_new: int) -> Tensor:
        """``tokens_BP``, refused when it (with ``n_new`` generated tokens) is longer than
        the model's context (``n_ctx``), past which backends fail each in their own way."""
        n_ctx = context_length(self._adapter)
        if n_ctx is not None and tokens_BP.shape[1] + n_new > n_ctx:
            asked = f"{tokens_BP.shape[1]} tokens" + (f" + {n_new} new" if n_new else "")
            raise TokensError(
                f"{asked} is longer than the model's context of n_ctx={n_ctx} positions. "
                f"Pass at most {n_ctx} positions in all (truncate the input, or generate "
                "fewer tokens).")
        return tokens_BP

    # ---- the engine ---------------------------------------------------------------------

    @property
    def lock(self) -> RunLock:
        """The lock every run of the model under this wrapper holds (shared by all its
        wrappers): one forward at a time; ``sb.trace`` holds it while its block runs."""
        return self._lock

    @property
    def attached(self) -> list[Splice]:
        """The splices of the attached SAEs (a copy), in the order they were attached."""
        return list(self._attached)

    def plan(self, tokens_BP: Tensor, ops: Sequence[Intervention] = (),
             cache: ActivationCache | None = None, names: Iterable[str] = ()) -> Plan:
        """The engine's plan for one forward: the attached SAEs, then ``ops`` (transcoders
        expanded), with ``names`` cached (see :func:`saebridge.engine.plan`)."""
        return plan(self._adapter, tokens_BP, self.ops(ops), cache, names)

    def ops(self, ops: Sequence[Intervention] = (), saes: Sequence[Splice] = ()
            ) -> list[Intervention]:
        """What a run applies: the attached SAEs' splices (one per hook: each of ``saes``
        replaces the one at its hook for this run, as in SAELens), then ``ops``, each
        transcoder splice expanded into a read and a write (model-name mismatches warned)."""
        attached = one_per_hook(self._attached, saes)
        all_ops: list[Intervention] = expand(fold_latent_hooks([*attached, *self._hook_fns,
                                                                 *ops]))
        self._check_model_name(all_ops)
        return all_ops

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
             names: Iterable[str] | None = None, cache: bool = False, sparse: bool = False,
             saes: Sequence[Splice] = (), stop_at_layer: int | None = None,
             need_output: bool = True) -> tuple[Any, ActivationCache]:
        """Logits (the residual at ``stop_at_layer``: :mod:`saebridge.stop`; None where
        ``need_output`` is False and the run stopped after its last hook) and the cache."""
        toks = self.tokens(tokens)
        # Resolving every hook name costs ~2 ms on a 12-layer model: only when caching all.
        if names is None:
            names = self.hook_names() if cache else []
        all_ops = self.ops(ops, saes)
        stop = prepare_stop(self._adapter, stop_at_layer, need_output,
                            [op.hook for op in all_ops], names)
        store = ActivationCache() if cache or stop.added else None
        if store is not None:
            store.sparse = sparse
        with self._lock, torch.no_grad():
            logits = self._execute(toks, all_ops, store, stop.names, stop.point)
        store = store if store is not None else ActivationCache()
        return stop_output(stop, store, logits), store

    def _execute(self, tokens_BP: Tensor, ops: list[Intervention],
                 cache: ActivationCache | None, names: list[str],
                 stop: StopPoint | None = None) -> Tensor | None:
        """One forward of the engine's plan (the lock held), ending after ``stop``'s hook;
        a remote front sends it."""
        return run_stopped(self._adapter, tokens_BP,
                           plan(self._adapter, tokens_BP, ops, cache, names).sites, stop)

    # ---- the public runs ------------------------------------------------------------------

    def __call__(self, tokens: TokensLike, return_type: str | None = "logits",
                 loss_per_token: bool = False, *, stop_at_layer: int | None = None) -> Any:
        """Logits ``[batch, pos, d_vocab]`` (native), with any attached SAEs spliced in
        (or, per ``return_type``, TransformerLens's loss: :meth:`_tl_out`); with
        ``stop_at_layer``, the residual stream there (:mod:`saebridge.stop`)."""
        toks = self.tokens(tokens)
        out = self._run(toks, [], stop_at_layer=stop_at_layer,
                        need_output=return_type is not None)[0]
        return self._out(toks, out, return_type, loss_per_token, stop_at_layer)

    def _out(self, toks: Tensor, out: Any, return_type: str | None, loss_per_token: bool,
             stop_at_layer: int | None) -> Any:
        """As TransformerLens: the residual stream for ``stop_at_layer``, else ``return_type``."""
        return out if stop_at_layer is not None else self._tl_out(toks, out, return_type,
                                                                   loss_per_token)

    def run_with_saes(self, tokens: TokensLike, saes: Sequence[SAE] | SAE = (),
                      use_error_term: bool | None = None, *, return_type: str | None = "logits",
                      loss_per_token: bool = False, stop_at_layer: int | None = None,
                      exclude_special_tokens: ExcludeSpecialTokens = False) -> Any:
        """Logits with ``saes`` spliced in for this call only: on top of attached ones, each
        replacing an attached SAE at its hook for the run (one SAE per hook, as SAELens).
        ``exclude_special_tokens`` (True, or token ids) bypasses them at those tokens.

        >>> import saebridge as sb
        >>> from saebridge.tiny import tiny_gpt2
        >>> hf_model, tokenizer = tiny_gpt2()  # 2 layers, d_model 64, random weights
        >>> model = sb.wrap(hf_model, tokenizer=tokenizer)
        >>> sae = sb.SAE.random("topk", 64, 256, "blocks.1.hook_resid_pre", k=8)
        >>> tokens = model.to_tokens("Hello world")
        >>> spliced = model.run_with_saes(tokens, saes=[sae])
        >>> torch.equal(model(tokens), model(tokens)), torch.equal(spliced, model(tokens))
        (True, False)
        """
        toks = self.tokens(tokens)
        logits = self._run(toks, [], saes=self._splices(saes, use_error_term,
                                                        exclude_special_tokens),
                           stop_at_layer=stop_at_layer, need_output=return_type is not None)[0]
        return self._out(toks, logits, return_type, loss_per_token, stop_at_layer)

    def run_with_cache(self, tokens: TokensLike, names: Iterable[str] | None = None, *,
                       names_filter: Any = None, return_type: str | None = "logits",
                       loss_per_token: bool = False, remove_batch_dim: bool = False,
                       stop_at_layer: int | None = None,
                       interventions: Sequence[Intervention] = ()
                       ) -> tuple[Any, ActivationCache]:
        """Logits and a cache of ``names`` (default: every hook), keyed canonically and
        holding values in the canonical space (TransformerLens-processed), whatever the
        backend. A value is the one the model goes on with, after any edit at that hook.
        ``names_filter``, ``return_type``, ``remove_batch_dim``: as TransformerLens's;
        ``interventions`` (Steer, Ablate, Splice …) run while caching."""
        toks, (names, keep) = self.tokens(tokens), self._tl_names(names, names_filter)
        logits, cache = self._run(toks, list(interventions), names, cache=True,
                                  stop_at_layer=stop_at_layer,
                                  need_output=return_type is not None)
        return (self._out(toks, logits, return_type, loss_per_token, stop_at_layer),
                self._tl_cache(cache, keep, remove_batch_dim))

    def run_with_cache_with_saes(self, tokens: TokensLike, saes: Sequence[SAE] = (),
                                 names: Iterable[str] | None = None,
                                 use_error_term: bool | None = None, sparse: bool = False, *,
                                 names_filter: Any = None, return_type: str | None = "logits",
                                 loss_per_token: bool = False, remove_batch_dim: bool = False,
                                 exclude_special_tokens: ExcludeSpecialTokens = False,
                                 stop_at_layer: int | None = None
                                 ) -> tuple[Any, ActivationCache]:
        """Like :meth:`run_with_cache`, with SAEs spliced in as :meth:`run_with_saes` does;
        each adds
        ``f"{hook}.hook_sae_input|acts_pre|acts_post|recons|error|output"`` (in the SAE's
        own space) to the cache.

        With ``sparse=True`` the latents ``hook_sae_acts_post`` are coalesced sparse COO
        tensors of the same shape ``[batch, pos, d_sae]`` (``.to_dense()`` restores them;
        ``.indices()`` / ``.values()`` list the active ones), and ``hook_sae_acts_pre``,
        dense by nature, is not kept: for a TopK k=32 SAE the latents take ~1/100 of the
        dense memory.

        >>> import saebridge as sb
        >>> from saebridge.tiny import tiny_gpt2
        >>> hf_model, tokenizer = tiny_gpt2()  # 2 layers, d_model 64, random weights
        >>> model = sb.wrap(hf_model, tokenizer=tokenizer)
        >>> sae = sb.SAE.random("topk", 64, 256, "blocks.1.hook_resid_pre", k=8)
        >>> _, cache = model.run_with_cache_with_saes("Hello world", saes=[sae], sparse=True)
        >>> latents = cache["blocks.1.hook_resid_pre.hook_sae_acts_post"]
        >>> n_tokens = latents.shape[1]
        >>> latents.is_sparse, latents.indices().shape[0], latents.values().numel() <= 8 * n_tokens
        (True, 3, True)
        """
        toks, (names, keep) = self.tokens(tokens), self._tl_names(names, names_filter)
        logits, cache = self._run(toks, [], names, cache=True, sparse=sparse,
                                  saes=self._splices(saes, use_error_term,
                                                     exclude_special_tokens),
                                  stop_at_layer=stop_at_layer,
                                  need_output=return_type is not None)
        return (self._out(toks, logits, return_type, loss_per_token, stop_at_layer),
                self._tl_cache(cache, keep, remove_batch_dim))

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
        toks = self.tokens(tokens)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 0:
            raise TokensError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
        self._fits(toks, max_new_tokens)
        return toks, self.ops(list(interventions), self._splices(saes, use_error_term))

    def _generate(self, tokens: TokensLike, max_new_tokens: int,
                  interventions: Sequence[Intervention] = (), saes: Sequence[SAE] = (),
                  use_error_term: bool | None = None) -> Tensor:
        """Greedy continuation ``[batch, pos + max_new_tokens]``, with ``saes`` spliced in
        and ``interventions`` applied at every step.

        Decodes through the backend's own generation where it carries every hook (HF
        ``generate`` with hooks, nnsight ``tracer.iter``), else a loop of forwards. Each
        step is a whole forward over the sequence so far (no KV cache), so positions and
        activation spaces mean what they mean in one run; it does not stop at EOS.

        >>> import saebridge as sb
        >>> from saebridge.tiny import tiny_gpt2
        >>> hf_model, tokenizer = tiny_gpt2()  # 2 layers, d_model 64, random weights
        >>> model = sb.wrap(hf_model, tokenizer=tokenizer)
        >>> sae = sb.SAE.random("standard", 64, 256, "blocks.1.hook_resid_pre")
        >>> steer = sb.Steer.from_sae(sae, 3, coef=8.0)
        >>> prompt = model.to_tokens("Hello")
        >>> model.generate(prompt, 5, interventions=[steer]).shape[1] - prompt.shape[1]
        5
        """
        from saebridge.generate import greedy

        toks, ops = self._generation_ops(tokens, max_new_tokens, interventions, saes,
                                         use_error_term)

        def edits_for(tokens_BP: Tensor) -> dict[str, SiteFn]:
            return plan(self._adapter, tokens_BP, ops).sites

        a = self._adapter
        with self._lock, torch.no_grad():
            edits_for(toks)  # unknown or read-only hooks fail before decoding
            if max_new_tokens == 0:
                return toks
            decode = getattr(a, "generate", None)
            if decode is not None:
                return decode(toks, edits_for, max_new_tokens)
            return greedy(lambda t: a.run(t, edits_for(t)), toks, max_new_tokens)
