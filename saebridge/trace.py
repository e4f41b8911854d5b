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

from saebridge.backends import wrap
from saebridge.engine import Plan, tracked
from saebridge.errors import ArgumentTypeError, OptionError, ShapeError, TraceOrderError, unknown
from saebridge.hookmap.convert import RawStats, conversion
from saebridge.hookmap.space import CANONICAL
from saebridge.hooks import HookFn, HookPoint, latent_base
from saebridge.kernel.ops import SAE_HOOKS
from saebridge.kernel.spaces import IDENTITY, Conv, back, forward, resolve, shift_for, track
from saebridge.model import Model, TokensLike
from saebridge.stop import reached, refuse_past, run_reading, stop_point

Tensor = torch.Tensor
SPACES = ("canonical", "native")


class _Aborted(BaseException):
    """Unwinds the forward thread when the block raised (BaseException: no handler eats it)."""


def trace(model: Any, tokens: TokensLike, *, space: str = "canonical",
          stop_at_layer: int | None = None) -> Trace:
    """Trace one forward pass of ``model`` (any backend, wrapped or not) on ``tokens``.

    ``space`` is ``"canonical"`` (TransformerLens-processed values, the same on every
    backend) or ``"native"`` (the model's own activations). ``stop_at_layer``: the forward
    stops there and ``t.logits`` is the residual stream there (:mod:`saebridge.stop`).

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
        raise OptionError(f"trace space {space!r} is unknown; pass one of {SPACES}.")
    model = wrap(model)
    if getattr(model.adapter, "remote", False) is not False:
        raise ArgumentTypeError("sb.trace runs the forward here, beside the block; a remote front "
                        "(wrap(..., remote=...)) cannot. Trace the model wrapped without "
                        "remote=, or use the front's run methods.")
    return Trace(model, tokens, space, stop_at_layer)


class Trace:
    """One traced forward pass (see :func:`trace`). Not reentrant; one block per trace."""

    def __init__(self, model: Model, tokens: TokensLike, space: str,
                 stop_at_layer: int | None = None) -> None:
        self.model, self.space, self._stop = model, space, stop_point(model.adapter, stop_at_layer)
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
        self._plan: Plan | None = None
        self._hold: Any = None

    # ---- the block's side ---------------------------------------------------------------

    def __enter__(self) -> Trace:
        if self._thread is not None:
            raise TraceOrderError("a Trace runs once; call sb.trace(model, tokens) again.")
        a = self.model.adapter
        self._stats = a.raw_stats()
        # SAEs attached to the wrapper are spliced in as in every run; reads see their output.
        self._plan = self.model.plan(self._tokens, self._latent_ops())
        attached = self._plan.sites
        names = reached(a, self._stop, a.hook_names(), [op.hook for op in self.model.ops()])
        edits = {name: self._site(name, attached.get(name)) for name in names}
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
        if latent_base(name) is None and not self.model.adapter.writable(name):
            raise TraceOrderError(f"hook {name!r} can be read but not written on the "
                                  f"{self.model.backend} backend. Write another hook.")
        self._ask(("write", name, value))

    def save(self, value: Any) -> Any:
        """``value`` itself: values read here stay valid after the block (nnsight-style code
        may keep its ``.save()`` calls)."""
        return value

    @property
    def logits(self) -> Tensor:
        """The logits (residual for stop_at_layer); in the block, runs the rest first."""
        if not self._done:
            self._finish()
        if self._error is not None:
            raise self._error
        assert self._logits is not None
        return self._logits

    def _latent_ops(self) -> list[HookFn]:
        """Functions at the attached SAEs' own hook points (``{hook}.hook_sae_acts_post`` …)
        that pause there for the block, as the model's hooks do."""
        return [HookFn(name, lambda act, point: self._site(point.name, None)(act),
                       HookPoint(name, None))
                for name in self._latent_names()]

    def _latent_names(self) -> list[str]:
        return [f"{s.hook}.{k}" for s in self.model.attached
                if getattr(s.sae.cfg, "hook_name_out", None) is None for k in SAE_HOOKS]

    def _check(self, name: str) -> str:
        if latent_base(name) is not None and name in self._latent_names():
            return name
        refuse_past(self.model.adapter, self._stop, [name])
        if name not in (names := self.model.hook_names()):
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
                logits = run_reading(self.model.adapter, self._tokens, edits, self._stop,
                                     self._read)
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
        return forward(self._to(name, x), x).detach().clone()

    def _write(self, name: str, x: Tensor, value: Tensor) -> Tensor:
        if tuple(value.shape) != tuple(x.shape):
            raise ShapeError(f"value of shape {tuple(value.shape)} written to hook {name!r}, "
                             f"whose activations are {tuple(x.shape)}. Write a tensor of that "
                             "shape.")
        conv = self._to(name, x)
        new = back(conv, value.to(x.device, x.dtype), shift_for(conv, x))  # minus the read's shift
        assert self._plan is not None
        if latent_base(name) is None:
            track(self._plan.state, tracked(self.model.adapter, name), x, new)
        return new

    def _to(self, name: str, x: Tensor) -> Conv:
        a = self.model.adapter
        if latent_base(name) is not None:  # an SAE's own value, in the SAE's space
            return IDENTITY
        dst = CANONICAL if self.space == "canonical" else a.space
        assert self._plan is not None
        return resolve(conversion(name, a.kind(name), a.space, dst, self._stats), x,
                       self._plan.state)
