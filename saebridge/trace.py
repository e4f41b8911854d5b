"""nnsight-style tracing on every backend: read and write canonical hooks as the model runs.

``with sb.trace(model, tokens) as t:`` runs the forward pass beside the block, in a second
thread, and pauses it at each hook the block asks for: ``x = t["blocks.1.hook_resid_pre"]``
waits until the model gets there and returns the activation (canonical space and
TransformerLens layout, whatever the backend); ``t[name] = y`` replaces it (converted back
to the model's own space), and an in-place edit of a value read (``x[:, 0] = 0``) goes back
too. As in nnsight, hooks must be asked for in the order the model reaches them; asking
for one the model went past raises :class:`~saebridge.errors.TraceOrderError`. Values
read are real tensors and stay valid after the block; ``t.logits`` is the output. SAEs
attached to the model (``model.add_sae``) are spliced in, and reads see their output.

The forward runs through the backend adapter's one primitive (``run(tokens, edits)``) with
a function at every hook, so the same block works on HF, TransformerLens and nnsight
models (not a remote front: the forward runs here). Inside a user's own nnsight trace,
:func:`splice` and :func:`steer` do the same job for nnsight models; in a trace that runs
remotely, :func:`prepare_splice`/:func:`prepare_steer` compile them beforehand (see
``docs/remote.md``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Literal

import torch

from saebridge.backends import entry, wrap
from saebridge.errors import ShapeError, TraceOrderError, unknown
from saebridge.hookmap.convert import RawStats, conversion
from saebridge.hookmap.space import CANONICAL
from saebridge.kernel.indexing import Positions
from saebridge.kernel.spaces import Conv, forward, shift_for
from saebridge.model import Model, TokensLike
from saebridge.sae import SAE

Tensor = torch.Tensor
SPACES = ("canonical", "native")


def splice(model: Any, sae: SAE, use_error_term: bool = False) -> Tensor:
    """Splice ``sae`` in at its hook from inside your own nnsight trace; its latents
    (``hook_sae_acts_post``), real and saveable.

    ``model`` is the nnsight model being traced (``LanguageModel``, ``NNsight`` over an HF
    model or a HookedTransformer, :class:`~saebridge.adapters.nnsight.UnifiedTransformer`).
    Call it where the model has not yet reached the SAE's hook. In a trace that runs
    remotely, prepare it beforehand with :func:`prepare_splice`: a remote body may not
    name ``saebridge`` or an SAE module.

    >>> import saebridge as sb
    >>> from nnsight import LanguageModel
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf, tok = tiny_gpt2()
    >>> lm = LanguageModel(hf, tokenizer=tok)
    >>> sae = sb.SAE.random("topk", 64, 256, "blocks.1.hook_resid_pre", k=8)
    >>> tokens = sb.wrap(lm).to_tokens("Hello world")
    >>> with lm.trace(tokens):
    ...     latents = sb.splice(lm, sae, use_error_term=False).save()
    ...     logits = lm.output.logits.save()
    >>> latents.shape[-1], torch.allclose(logits, sb.wrap(lm).run_with_saes(tokens, [sae]),
    ...                                   atol=1e-5)
    (256, True)
    """
    return entry("nnsight", "splice")(model, sae, use_error_term)


def steer(model: Any, hook: str, vector: Tensor, coef: float = 1.0,
          positions: Positions = None) -> None:
    """Add ``coef * vector`` at canonical ``hook`` (at ``positions``) from inside your own
    nnsight trace of ``model`` (see :func:`splice`).

    >>> import saebridge as sb
    >>> from nnsight import LanguageModel
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf, tok = tiny_gpt2()
    >>> lm = LanguageModel(hf, tokenizer=tok)
    >>> sae = sb.SAE.random("topk", 64, 256, "blocks.1.hook_resid_pre", k=8)
    >>> tokens = sb.wrap(lm).to_tokens("Hello world")
    >>> with lm.trace(tokens):
    ...     sb.steer(lm, "blocks.1.hook_resid_pre", sae.W_dec[12], coef=4.0)
    ...     logits = lm.output.logits.save()
    >>> steered = sb.wrap(lm).run_with_interventions(
    ...     tokens, [sb.Steer("blocks.1.hook_resid_pre", sae.W_dec[12], 4.0)])
    >>> torch.equal(logits, steered)
    True
    """
    entry("nnsight", "steer")(model, hook, vector, coef, positions)


def prepare_splice(model: Any, sae: SAE, use_error_term: bool = False) -> Any:
    """:func:`splice` compiled to data beforehand, for a trace that runs remotely: the
    body then names only the result (the server has no saebridge and no SAE module).

    >>> import saebridge as sb
    >>> from nnsight import LanguageModel
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf, tok = tiny_gpt2()
    >>> lm = LanguageModel(hf, tokenizer=tok)
    >>> sae = sb.SAE.random("topk", 64, 256, "blocks.1.hook_resid_pre", k=8)
    >>> splicer = sb.prepare_splice(lm, sae)
    >>> with lm.trace("Hello world", remote="local"):  # remote=True sends it to NDIF
    ...     latents = splicer(lm).save()
    >>> latents.shape[-1]
    256
    """
    return entry("nnsight", "prepare_splice")(model, sae, use_error_term)


def prepare_steer(model: Any, hook: str, vector: Tensor, coef: float = 1.0,
                  positions: Positions = None) -> Any:
    """:func:`steer` compiled to data beforehand (one copied vector), for a remote trace.

    >>> import saebridge as sb
    >>> from nnsight import LanguageModel
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf, tok = tiny_gpt2()
    >>> lm = LanguageModel(hf, tokenizer=tok)
    >>> sae = sb.SAE.random("topk", 64, 256, "blocks.1.hook_resid_pre", k=8)
    >>> steerer = sb.prepare_steer(lm, "blocks.1.hook_resid_post", sae.W_dec[12], 8.0)
    >>> with lm.trace("Hello world", remote="local"):  # remote=True sends it to NDIF
    ...     steerer(lm)
    ...     logits = lm.output.logits.save()
    >>> logits.shape[-1] == hf.config.vocab_size
    True
    """
    return entry("nnsight", "prepare_steer")(model, hook, vector, coef, positions)


class _Aborted(BaseException):
    """Unwinds the forward thread when the block raised (BaseException: no handler eats it)."""


def trace(model: Any, tokens: TokensLike, *, space: str = "canonical") -> Trace:
    """Trace one forward pass of ``model`` (any backend, wrapped or not) on ``tokens``.

    ``space`` is ``"canonical"`` (TransformerLens-processed values, the same on every
    backend) or ``"native"`` (the model's own activations).

    >>> import saebridge as sb
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf_model, tokenizer = tiny_gpt2()
    >>> model = sb.wrap(hf_model, tokenizer=tokenizer)
    >>> with sb.trace(model, "Hello world") as t:
    ...     resid = t["blocks.1.hook_resid_pre"]
    ...     t["blocks.1.hook_resid_pre"] = resid * 0.5
    ...     pattern = t["blocks.1.attn.hook_pattern"]
    >>> tuple(pattern.shape[:2]), torch.equal(t.logits, model("Hello world"))
    ((1, 4), False)
    """
    if space not in SPACES:
        raise ValueError(f"trace space {space!r} is unknown; pass one of {SPACES}.")
    model = wrap(model)
    if getattr(model.adapter, "remote", False) is not False:
        raise TypeError("sb.trace runs the forward here, beside the block; a remote front "
                        "(wrap(..., remote=...)) cannot. Trace the model wrapped without "
                        "remote=, or use the front's run methods.")
    return Trace(model, tokens, space)


class Trace:
    """One traced forward pass (see :func:`trace`). Not reentrant; one block per trace."""

    def __init__(self, model: Model, tokens: TokensLike, space: str) -> None:
        self.model, self.space = model, space
        self._tokens = model.tokens(tokens)
        self._cond = threading.Condition()
        self._request: tuple | None = None
        self._response: tuple | None = None
        self._passed: set[str] = set()
        self._written: dict[str, Tensor] = {}
        self._view: tuple[str, Tensor, int] | None = None
        self._done = False
        self._logits: Tensor | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stats: RawStats | None = None
        self._hold: Any = None

    # ---- the block's side ---------------------------------------------------------------

    def __enter__(self) -> Trace:
        if self._thread is not None:
            raise RuntimeError("a Trace runs once; call sb.trace(model, tokens) again.")
        a = self.model.adapter
        self._stats = a.raw_stats()
        # SAEs attached to the wrapper are spliced in as in every run; reads see their output.
        attached = self.model.plan(self._tokens).sites
        edits = {name: self._site(name, attached.get(name)) for name in a.hook_names()}
        # Held until the block ends; running the model from the block would wait on the
        # paused forward, so the lock refuses that (for every wrapper of this model).
        self._hold = self.model.lock.paused()
        self._hold.__enter__()
        self._thread = threading.Thread(target=self._forward, args=(edits,), daemon=True,
                                        name="saebridge-trace")
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        assert self._thread is not None
        try:
            if exc_type is None:
                self._finish()
            else:
                self._post(("abort",))
        finally:
            if not self._done:  # _finish raised: unwind the forward rather than wait on it
                self._post(("abort",))
            self._thread.join()
            self._hold.__exit__(None, None, None)
        if exc_type is None and self._error is not None:
            raise self._error
        return False

    def __getitem__(self, name: str) -> Tensor:
        """The activation at hook ``name``, once the model reaches it."""
        value = self._ask(("read", self._check(name)))
        # A tensor's version counter moves on every in-place edit: how _flush sees one.
        self._view = (name, value, value._version)
        return value

    def __setitem__(self, name: str, value: Tensor) -> None:
        """Replace the activation at hook ``name`` (every time the model reaches it)."""
        name = self._check(name)
        if not self.model.adapter.writable(name):
            raise TraceOrderError(f"hook {name!r} can be read but not written on the "
                                  f"{self.model.backend} backend. Write another hook.")
        self._ask(("write", name, value))

    def save(self, value: Any) -> Any:
        """``value`` itself: values read here stay valid after the block (nnsight-style code
        may keep its ``.save()`` calls)."""
        return value

    @property
    def logits(self) -> Tensor:
        """The logits; inside the block, runs the rest of the forward first."""
        if not self._done:
            self._finish()
        if self._error is not None:
            raise self._error
        assert self._logits is not None
        return self._logits

    def _check(self, name: str) -> str:
        names = self.model.hook_names()
        if name not in names:
            from saebridge.errors import UnknownHookError

            raise UnknownHookError(unknown("hook", name, names, "Trace a hook of this model."))
        return name

    def _finish(self) -> None:
        self._flush()
        self._post(("finish",))
        with self._cond:
            self._cond.wait_for(lambda: self._done)

    def _flush(self) -> None:
        """Send back an in-place edit of the last value read, as nnsight does."""
        view, self._view = self._view, None
        if view is not None and view[1]._version != view[2] and not self._done:
            self._ask(("write", view[0], view[1]))

    def _post(self, request: tuple) -> None:
        with self._cond:
            self._request, self._response = request, None
            self._cond.notify_all()

    def _ask(self, request: tuple) -> Any:
        self._flush()
        name = request[1]
        with self._cond:
            if self._error is not None:
                raise self._error
            if name in self._passed or self._done:
                raise TraceOrderError(
                    f"hook {name!r} was requested but the model already ran past it. Ask for "
                    "hooks in the order the model reaches them (model.hook_names()), or trace "
                    "again.")
            self._request, self._response = request, None
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._response is not None or self._done)
            if self._response is not None:
                response, self._response = self._response, None
                return response[0]
            if self._error is not None:
                raise self._error
            raise TraceOrderError(f"hook {name!r} was never reached in this forward pass.")

    # ---- the forward's side --------------------------------------------------------------

    def _forward(self, edits: dict) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread; the front runs without it
                logits = self.model.adapter.run(self._tokens, edits)
            with self._cond:
                self._logits = logits
        except _Aborted:
            pass
        except BaseException as error:  # handed to the block's thread, raised there
            with self._cond:
                self._error = error
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _site(self, name: str, engine: Any):
        def fn(x: Tensor) -> Tensor:
            if threading.current_thread() is not self._thread:
                return x  # a forward of the same model object elsewhere is not this trace
            if engine is not None:
                x = engine(x)
            with self._cond:
                if name in self._passed:  # a later visit of the same hook in this forward
                    return self._write(name, x, self._written[name]) if name in self._written \
                        else x
                for request in self._requests(name):
                    if request[0] == "read":
                        self._respond(self._read(name, x))
                    else:
                        x = self._write(name, x, request[2])
                        self._written[name] = request[2]
                        self._respond(None)
                self._passed.add(name)
                return x
        return fn

    def _requests(self, name: str) -> Iterator[tuple]:
        """The block's requests for hook ``name``, where the forward waits; ends when the
        block asks for another hook or for the rest of the forward."""
        while True:
            self._cond.wait_for(lambda: self._request is not None)
            request = self._request
            assert request is not None
            if request[0] == "abort":
                raise _Aborted
            if request[0] == "finish" or request[1] != name:
                return
            self._request = None
            yield request

    def _respond(self, value: Any) -> None:
        self._response = (value,)
        self._cond.notify_all()

    def _read(self, name: str, x: Tensor) -> Tensor:
        return forward(self._to(name), x).detach().clone()

    def _write(self, name: str, x: Tensor, value: Tensor) -> Tensor:
        if tuple(value.shape) != tuple(x.shape):
            raise ShapeError(f"value of shape {tuple(value.shape)} written to hook {name!r}, "
                             f"whose activations are {tuple(x.shape)}. Write a tensor of that "
                             "shape.")
        shift = shift_for(self._to(name), x)  # the write goes back minus the read's shift
        value = value.to(x.device, x.dtype)
        return value if shift is None else value - shift

    def _to(self, name: str) -> Conv:
        a = self.model.adapter
        dst = CANONICAL if self.space == "canonical" else a.space
        return conversion(name, a.kind(name), a.space, dst, self._stats)
