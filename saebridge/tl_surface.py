"""TransformerLens's model surface on every backend: hooks, outputs, tokens, generation.

:class:`TLSurface` is a mixin of :class:`saebridge.Model` (with
:class:`~saebridge.tl_weights.TLWeights` for ``cfg`` and the weights), so research code
written against a ``HookedTransformer`` or SAELens's ``HookedSAETransformer`` runs with
``sb.wrap(model)`` in its place: ``run_with_hooks(tokens, fwd_hooks=[(name, hook_fn)])``
with TransformerLens hook functions (:mod:`saebridge.hooks`: activations in the canonical
space, a returned tensor replaces the activation), ``hooks()``, ``add_hook`` /
``reset_hooks``, ``return_type=`` (``"logits"``, ``"loss"``, ``"both"``, None) with
TransformerLens's loss, ``to_str_tokens`` / ``to_string`` / ``to_single_token``, and
``generate`` with TransformerLens's arguments (greedy decoding only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from saebridge.activation_cache import ActivationCache
from saebridge.errors import (
    ArgumentTypeError,
    OptionError,
    TokensError,
    UnsupportedError,
)
from saebridge.hooks import (
    HookFn,
    HookFunction,
    HookPoint,
    NameFilter,
    hook_names,
    latent_base,
)
from saebridge.kernel.ops import SAE_HOOKS

Tensor = torch.Tensor
RETURN_TYPES = ("logits", "loss", "both", None)


class Output(NamedTuple):
    """What ``return_type="both"`` returns, as TransformerLens's ``Output``."""

    logits: Tensor
    loss: Tensor


def lm_cross_entropy_loss(logits: Tensor, tokens: Tensor, per_token: bool = False) -> Tensor:
    """TransformerLens's next-token loss: the mean (or, ``per_token``, each ``[batch,
    pos - 1]``) negative log-probability of every next token.

    >>> logits = torch.zeros(1, 3, 4)
    >>> round(float(lm_cross_entropy_loss(logits, torch.tensor([[0, 1, 2]]))), 4)  # log(4)
    1.3863
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1).to(logits.dtype)
    predicted = log_probs[..., :-1, :].gather(-1, tokens[..., 1:, None].to(logits.device))[..., 0]
    return -predicted if per_token else -predicted.mean()


class TLSurface:
    """Mixin of :class:`saebridge.Model`: TransformerLens's hooks, outputs and tokens."""

    _adapter: Any

    # ---- hook points and persistent hooks ---------------------------------------------------

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook point of the model by canonical name, in execution order."""
        points: dict[str, HookPoint] = self.__dict__.setdefault("_tl_points", {})
        return {n: points.setdefault(n, HookPoint(n, self))
                for n in self.hook_names()}  # type: ignore[attr-defined]

    @property
    def _hook_fns(self) -> list[HookFn]:
        """The hooks every run applies (after attached SAEs), in the order added."""
        return self.__dict__.setdefault("_tl_hooks", [])

    def _point(self, name: str) -> HookPoint:
        points: dict[str, HookPoint] = self.__dict__.setdefault("_tl_points", {})
        return points.setdefault(name, HookPoint(name, self))

    def _hook_fns_for(self, spec: NameFilter, fn: HookFunction, dir: str = "fwd",
                      permanent: bool = False) -> list[HookFn]:
        if dir != "fwd":
            raise UnsupportedError(
                f"backward hooks (dir={dir!r}) are not supported: saebridge runs forwards "
                "without gradients. Use forward hooks (dir='fwd'), or the backend's own "
                "model for gradient work.")
        if not callable(fn):
            raise ArgumentTypeError(f"a hook function must be callable as fn(act, hook), got "
                                    f"{type(fn).__name__} for {spec!r}.")
        if getattr(self._adapter, "remote", False) is not False:
            raise UnsupportedError(
                "hook functions are code, and a remote nnsight run carries only data "
                "(Splice, Steer, Ablate, Clamp). Use run_with_hooks, which runs read-only "
                "hook functions here on the values a remote run caches, or wrap the model "
                "without remote=.")
        a = self._adapter
        # An attached SAE's own hook points (``{hook}.hook_sae_acts_post`` …) are hook points
        # too, as on a HookedSAETransformer; the SAE must be spliced in when the hook runs.
        valid = self.hook_names() + [  # type: ignore[attr-defined]
            f"{s.hook}.{k}" for s in self._attached for k in SAE_HOOKS]  # type: ignore[attr-defined]
        names = hook_names(spec, valid, lambda n: a.kind(latent_base(n) or n))
        return [HookFn(n, fn, self._point(n), latent_base(n) is not None or a.writable(n),
                       permanent=permanent)
                for n in names]

    def add_hook(self, name: NameFilter, hook: HookFunction, dir: str = "fwd",
                 is_permanent: bool = False, level: int | None = None,
                 prepend: bool = False) -> None:
        """Run ``hook(act, hook_point)`` at ``name`` (a name, names, or a filter) in every
        later run, until :meth:`reset_hooks` (``is_permanent``: until
        ``reset_hooks(including_permanent=True)``)."""
        new = self._hook_fns_for(name, hook, dir, is_permanent)
        if prepend:
            self._hook_fns[:0] = new
        else:
            self._hook_fns.extend(new)

    def add_perma_hook(self, name: NameFilter, hook: HookFunction, dir: str = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def remove_hooks_at(self, name: str, including_permanent: bool = False) -> None:
        """Remove the hooks at ``name`` (permanent ones too with ``including_permanent``)."""
        self._hook_fns[:] = [h for h in self._hook_fns
                             if h.hook != name or (h.permanent and not including_permanent)]

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both",
                    including_permanent: bool = False, level: int | None = None) -> None:
        """Remove every hook added with :meth:`add_hook` (not permanent ones, unless
        ``including_permanent``), and clear the hook points' ``ctx``."""
        self._hook_fns[:] = [h for h in self._hook_fns if h.permanent and not including_permanent]
        if clear_contexts:
            for point in self.__dict__.get("_tl_points", {}).values():
                point.clear_context()

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[NameFilter, HookFunction]] = (),
              bwd_hooks: Sequence[Any] = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False) -> Iterator[Any]:
        """``fwd_hooks`` applied to every run inside the ``with`` block, removed on exit
        (also when the block raises) unless ``reset_hooks_end=False``."""
        if bwd_hooks:
            self._hook_fns_for("", lambda a, h: None, "bwd")  # raises
        added = [h for spec, fn in fwd_hooks for h in self._hook_fns_for(spec, fn)]
        self._hook_fns.extend(added)
        try:
            yield self
        finally:
            if reset_hooks_end:
                self._hook_fns[:] = [h for h in self._hook_fns if all(h is not a for a in added)]
                if clear_contexts:
                    for h in added:
                        h.point.clear_context()

    def run_with_hooks(self, *model_args: Any,
                       fwd_hooks: Sequence[tuple[NameFilter, HookFunction]] = (),
                       bwd_hooks: Sequence[Any] = (), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **model_kwargs: Any) -> Any:
        """A run (``model(*model_args, **model_kwargs)``: ``return_type=`` and all) with
        ``fwd_hooks``, pairs of a hook name (or names, or a filter ``name -> bool``) and a
        TransformerLens hook function ``fn(act, hook)``. ``act`` is in the canonical space,
        as a cache shows it; a returned tensor of its shape replaces it. The hooks are
        removed afterwards, also when a function raises.

        >>> import saebridge as sb
        >>> from saebridge.tiny import tiny_gpt2
        >>> hf_model, tokenizer = tiny_gpt2()  # 2 layers, d_model 64, random weights
        >>> model = sb.wrap(hf_model, tokenizer=tokenizer)
        >>> def ablate_head(z, hook):
        ...     z[:, :, 0] = 0.0
        ...     return z
        >>> loss = model.run_with_hooks("Hello world", return_type="loss",
        ...                             fwd_hooks=[("blocks.0.attn.hook_z", ablate_head)])
        >>> bool(loss != model("Hello world", return_type="loss"))
        True
        """
        if getattr(self._adapter, "remote", False) is not False:
            return self._remote_hooks(model_args, model_kwargs, fwd_hooks, bwd_hooks)
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*model_args, **model_kwargs)  # type: ignore[operator]

    def _remote_hooks(self, model_args: tuple, model_kwargs: dict[str, Any],
                      fwd_hooks: Sequence[tuple[NameFilter, HookFunction]],
                      bwd_hooks: Sequence[Any]) -> Any:
        """A remote request carries data, not code: the hooked sites are cached remotely
        and read-only hook functions run here on them, in execution order."""
        if bwd_hooks:
            self._hook_fns_for("", lambda a, h: None, "bwd")  # raises
        order = self.hook_names()  # type: ignore[attr-defined]
        pairs = [(n, fn) for spec, fn in fwd_hooks
                 for n in hook_names(spec, order, self._adapter.kind)]
        pairs.sort(key=lambda p: order.index(p[0]))
        out, cache = self.run_with_cache(  # type: ignore[attr-defined]
            *model_args, names=sorted({n for n, _ in pairs}, key=order.index), **model_kwargs)
        for name, fn in pairs:
            act = cache[name]
            version = act._version
            result = fn(act, self._point(name))
            if (result is not None and result is not act) or act._version != version:
                raise UnsupportedError(
                    f"hook function {getattr(fn, '__qualname__', fn)!r} at {name!r} changed the "
                    "activation, which a remote run cannot do: it carries data, not code, so "
                    "hook functions run here, after the remote forward, and may only read. "
                    "Express the edit as Steer/Ablate/Clamp/Splice (run_with_interventions), "
                    "or run without remote=.")
        return out

    def run_with_hooks_with_saes(self, *model_args: Any, saes: Sequence[Any] = (),
                                 reset_saes_end: bool = True, use_error_term: bool | None = None,
                                 fwd_hooks: Sequence[tuple[NameFilter, HookFunction]] = (),
                                 bwd_hooks: Sequence[Any] = (), reset_hooks_end: bool = True,
                                 clear_contexts: bool = False, **model_kwargs: Any) -> Any:
        """:meth:`run_with_hooks` with ``saes`` attached for the run (SAELens's)."""
        with self.saes(saes, use_error_term):  # type: ignore[attr-defined]
            return self.run_with_hooks(*model_args, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks,
                                       reset_hooks_end=reset_hooks_end,
                                       clear_contexts=clear_contexts, **model_kwargs)

    # ---- outputs ----------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The same as calling the model (TransformerLens's ``forward``)."""
        return self(*args, **kwargs)  # type: ignore[operator]

    def loss_fn(self, logits: Tensor, tokens: Tensor, per_token: bool = False) -> Tensor:
        """TransformerLens's next-token cross-entropy (:func:`lm_cross_entropy_loss`)."""
        return lm_cross_entropy_loss(logits, tokens, per_token)

    def _tl_out(self, tokens_BP: Tensor, logits: Tensor, return_type: str | None,
                loss_per_token: bool) -> Any:
        """A run's result as ``return_type`` asks (TransformerLens's values)."""
        if return_type not in RETURN_TYPES:
            raise OptionError(f"unknown return_type {return_type!r}; valid: "
                              f"{list(RETURN_TYPES)}.")
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        loss = lm_cross_entropy_loss(logits, tokens_BP, loss_per_token)
        return loss if return_type == "loss" else Output(logits, loss)

    def _tl_names(self, names: Any, names_filter: NameFilter | None
                  ) -> tuple[list[str] | None, Callable[[str], bool] | None]:
        """The model hooks to cache for ``names_filter``, and which cache keys to keep
        (SAE keys ``{hook}.hook_sae_*`` are filtered after the run; None: keep all)."""
        if names_filter is None:
            return names, None
        if names is not None:
            raise OptionError("pass names= or names_filter=, not both (they are one "
                              "setting: names_filter is TransformerLens's spelling).")
        if callable(names_filter) and not isinstance(names_filter, str):
            return hook_names(names_filter, self.hook_names(), self._adapter.kind), names_filter  # type: ignore[attr-defined]
        wanted = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        model_names = [n for n in wanted if ".hook_sae_" not in n]
        hook_names(model_names, [], self._adapter.kind)
        keep = set(wanted)
        return model_names, keep.__contains__

    def _tl_cache(self, cache: ActivationCache, keep: Callable[[str], bool] | None,
                  remove_batch_dim: bool = False) -> ActivationCache:
        """The cache of a run, filtered by ``keep``, with the model recorded for its
        TransformerLens helpers."""
        if keep is not None:
            for key in [k for k in cache if not keep(k)]:
                del cache[key]
        cache.model = self
        return cache.remove_batch_dim() if remove_batch_dim else cache

    # ---- tokens -----------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (None where it has none)."""
        return self._adapter.tokenizer

    def to_str_tokens(self, input: Any, prepend_bos: bool = True,
                      padding_side: str | None = None) -> Any:
        """Each token as its string: a list for one text or token row, a list of lists
        for a list of texts."""
        if isinstance(input, list) and input and isinstance(input[0], str):
            return [self.to_str_tokens(t, prepend_bos, padding_side) for t in input]
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos, padding_side)[0]  # type: ignore[attr-defined]
        else:
            tokens = torch.as_tensor(input).squeeze()
            tokens = tokens.reshape(1) if tokens.dim() == 0 else tokens
            if tokens.dim() != 1:
                raise TokensError(f"to_str_tokens takes one row of tokens, got shape "
                                  f"{tuple(torch.as_tensor(input).shape)}; pass rows one by one.")
        return self._need_tokenizer().batch_decode(tokens[:, None].tolist(),
                                                   clean_up_tokenization_spaces=False)

    def to_string(self, tokens: Any) -> str | list[str]:
        """Tokens decoded to text: one string for a row, a list for a batch."""
        tokens = torch.as_tensor(tokens)
        tok = self._need_tokenizer()
        if tokens.dim() == 2:
            return tok.batch_decode(tokens.tolist(), clean_up_tokenization_spaces=False)
        return tok.decode(tokens.reshape(-1).tolist(), clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of the one token ``string`` is (no BOS)."""
        ids = self.to_tokens(string, prepend_bos=False)[0]  # type: ignore[attr-defined]
        if ids.numel() != 1:
            raise TokensError(f"{string!r} is {ids.numel()} tokens, not one: "
                              f"{self.to_str_tokens(ids)}. Pass a string that is one token.")
        return int(ids[0])

    def _need_tokenizer(self) -> Any:
        if self._adapter.tokenizer is None:
            raise TokensError(f"the {self._adapter.backend} model has no tokenizer. Wrap it "
                              "with wrap(model, tokenizer=...).")
        return self._adapter.tokenizer

    def _pad(self, ids: list[list[int]], padding_side: str | None) -> list[list[int]]:
        """Rows of token ids padded to one length, as TransformerLens's ``to_tokens`` pads
        (with the pad token, else EOS; on the right unless ``padding_side="left"``)."""
        side = padding_side or "right"
        if side not in ("left", "right"):
            raise OptionError(f"padding_side must be 'left' or 'right', got {side!r}.")
        tok = self._need_tokenizer()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(row) for row in ids)
        fill = [[pad or 0] * (width - len(row)) for row in ids]
        return [row + f if side == "right" else f + row for row, f in zip(ids, fill, strict=True)]

    # ---- generation -------------------------------------------------------------------------

    def generate(self, input: Any = "", max_new_tokens: int = 10,
                 interventions: Sequence[Any] = (), saes: Sequence[Any] = (),
                 use_error_term: bool | None = None, *, stop_at_eos: bool = False,
                 eos_token_id: int | Sequence[int] | None = None, do_sample: bool = False,
                 return_type: str | None = "input", verbose: bool = False,
                 prepend_bos: bool = True, padding_side: str | None = None,
                 use_past_kv_cache: bool = True, **sampling: Any) -> Any:
        """Greedy continuation of ``input`` (text or tokens ``[batch, pos]``), with ``saes``
        spliced in and ``interventions`` applied at every step (see :meth:`_generate`).

        TransformerLens's arguments: ``return_type`` (``"input"``: text for text, tokens for
        tokens; ``"str"``; ``"tokens"``), ``stop_at_eos`` (finished rows are padded with EOS,
        and decoding stops once every row finished), ``eos_token_id``; ``verbose`` and
        ``use_past_kv_cache`` are accepted and change nothing (no progress bar; every step
        is a whole forward). Sampling (``do_sample=True``) is not supported.
        """
        if do_sample or sampling:
            raise UnsupportedError(
                f"saebridge generates greedily; do_sample={do_sample!r}, "
                f"{sorted(sampling)} asked for sampling. Pass do_sample=False (and no "
                "top_k/top_p/temperature), or sample from model(tokens) logits yourself.")
        if return_type not in ("input", "str", "tokens"):
            raise OptionError(f"unknown return_type {return_type!r}; valid: 'input', 'str', "
                              "'tokens'.")
        text = isinstance(input, str) or (isinstance(input, list) and bool(input)
                                          and isinstance(input[0], str))
        tokens = self.to_tokens(input, prepend_bos, padding_side) if text \
            else input  # type: ignore[attr-defined]
        if text and not isinstance(input, str) and len({len(self.to_tokens(t, prepend_bos)[0])
                                                        for t in input}) > 1:  # type: ignore[attr-defined]
            raise TokensError("texts of different lengths cannot be generated from together "
                              "(no attention mask is passed); generate them one at a time.")
        out = self._generate(tokens, max_new_tokens, interventions, saes,  # type: ignore[attr-defined]
                             use_error_term)
        if stop_at_eos:
            out = _stop_at_eos(out, out.shape[1] - max_new_tokens, self._eos(eos_token_id))
        if return_type == "tokens" or (return_type == "input" and not text):
            return out
        decoded = self._need_tokenizer().batch_decode(out.tolist(), skip_special_tokens=True)
        return decoded[0] if len(decoded) == 1 else decoded

    def _eos(self, eos_token_id: int | Sequence[int] | None) -> list[int]:
        if eos_token_id is None:
            eos_token_id = self._need_tokenizer().eos_token_id
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])


def _stop_at_eos(tokens_BP: Tensor, n_prompt: int, eos: list[int]) -> Tensor:
    """Greedy tokens as TransformerLens's ``stop_at_eos`` leaves them: after a row's first
    EOS every token is ``eos[0]``, and decoding ends once every row has finished.

    >>> _stop_at_eos(torch.tensor([[5, 1, 0, 3], [5, 2, 4, 0]]), 1, [0])
    tensor([[5, 1, 0, 0],
            [5, 2, 4, 0]])
    >>> _stop_at_eos(torch.tensor([[5, 0, 3, 4]]), 1, [0])
    tensor([[5, 0]])
    """
    new = tokens_BP[:, n_prompt:]
    hit = torch.isin(new, torch.tensor(eos, device=new.device))
    after = (hit.long().cumsum(1) - hit.long()) > 0
    new = new.masked_fill(after, eos[0])
    if new.shape[1] and bool(hit.any(1).all()):
        new = new[:, :int(hit.long().argmax(1).max()) + 1]
    return torch.cat([tokens_BP[:, :n_prompt], new], dim=1)
