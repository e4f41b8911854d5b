"""Stopping a forward early: TransformerLens's ``stop_at_layer``, and the automatic stop of a
run whose outputs need nothing past its last hook.

Every backend stops the same way, the way nnsight's own ``tracer.stop()`` does: the site
function of the stop hook raises a private signal right after it ran, the forward unwinds
(each adapter's ``run`` removes its hooks in a ``finally``, or its nnsight trace exits) and
:func:`run` catches the signal. Nothing after the stop hook is computed.

``stop_at_layer=L`` means what it means in TransformerLens: the blocks before ``L`` run
(``0``: only the embeddings; negative values count from the end, ``-1`` skips the last
block), and the run returns the residual stream there, ``blocks.{L}.hook_resid_pre`` (the
last block's ``hook_resid_post`` for ``L = n_layers``), in the canonical space as a cache
holds it. Hooks from that point on never run, so interventions there are refused.

>>> import saebridge as sb
>>> from saebridge.tiny import tiny_gpt2
>>> hf_model, tokenizer = tiny_gpt2()  # 2 layers, d_model 64
>>> model = sb.wrap(hf_model, tokenizer=tokenizer)
>>> tokens = model.to_tokens("Hello world")
>>> resid = model(tokens, stop_at_layer=1)
>>> _, cache = model.run_with_cache(tokens, names=["blocks.1.hook_resid_pre"])
>>> resid.shape[-1], torch.equal(resid, cache["blocks.1.hook_resid_pre"])
(64, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch

from saebridge.engine import SiteFn
from saebridge.errors import OptionError, UnsupportedError
from saebridge.hookmap.lookup import split

Tensor = torch.Tensor


class _StopForward(Exception):
    """The private signal a stop hook raises once it ran; :func:`run` catches it."""


class StopPoint(NamedTuple):
    """Where a run stops."""

    hook: str
    """The stop hook: the forward ends right after its site function ran."""
    first_past: int
    """Index in ``adapter.hook_names()`` of the first hook that never runs."""
    returns: bool
    """Whether the stop hook's canonical value is the run's output (``stop_at_layer``)."""


def stop_point(adapter: Any, stop_at_layer: int | None) -> StopPoint | None:
    """The stop of ``stop_at_layer`` (None: the whole forward), checked.

    Raises:
        OptionError: ``stop_at_layer`` is not an integer in ``[-n_layers, n_layers]``.
        UnsupportedError: a remote front, or a model without the residual hook there.
    """
    if stop_at_layer is None:
        return None
    n = adapter.n_layers
    if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, int) \
            or not -n <= stop_at_layer <= n:
        raise OptionError(
            f"stop_at_layer={stop_at_layer!r} is out of range for this {n}-layer model; valid: "
            f"an integer from {-n} to {n} (the blocks before it run: 0 runs only the "
            "embeddings, negative values count from the end, as in TransformerLens), or None "
            "for the whole forward.")
    if getattr(adapter, "remote", False) is not False:
        raise UnsupportedError(
            "stop_at_layer is not supported on a remote front (wrap(..., remote=...)): the "
            "request runs the whole forward. Cache blocks.{L}.hook_resid_pre with "
            "run_with_cache instead, or wrap the model without remote=.")
    layer = stop_at_layer + n if stop_at_layer < 0 else stop_at_layer
    hook = f"blocks.{layer}.hook_resid_pre" if layer < n else f"blocks.{n - 1}.hook_resid_post"
    names = adapter.hook_names()
    if hook not in names:
        raise UnsupportedError(
            f"stop_at_layer={stop_at_layer} returns the residual stream at {hook!r}, which this "
            f"{adapter.backend} model does not provide. Add that hook to its hook map, or "
            "run the whole forward.")
    return StopPoint(hook, names.index(hook) + (layer == n), True)


def auto_stop(adapter: Any, needed: Iterable[str]) -> StopPoint | None:
    """The earliest safe stop for a run whose outputs are only what the hooks ``needed``
    compute (its logits unused): right after the block output of the last layer among them
    (a whole block has run by then, whatever order its hooks fire in); None when a needed
    hook comes after the blocks, or on a remote front."""
    if getattr(adapter, "remote", False) is not False:
        return None
    names = adapter.hook_names()
    index = {n: i for i, n in enumerate(names)}
    start = index.get("blocks.0.hook_resid_pre", -1)
    last = -1
    for name in needed:
        layer = split(name)[0]
        if layer is None and index.get(name, len(names)) > start:
            return None  # after the blocks (ln_final, unembed): the whole forward runs
        last = max(last, -1 if layer is None else layer)
    hook = f"blocks.{last}.hook_resid_post" if last >= 0 else "blocks.0.hook_resid_pre"
    if hook not in index:
        return None
    return StopPoint(hook, index[hook] + (last >= 0), False)


def refuse_past(adapter: Any, point: StopPoint | None, hooks: Iterable[str]) -> None:
    """Refuse interventions at hooks the stopped forward never reaches (None: no stop).

    Raises:
        OptionError: naming the first such hook and where the run stops.
    """
    if point is None:
        return
    index = {n: i for i, n in enumerate(adapter.hook_names())}
    late = [h for h in hooks if index.get(h, -1) >= point.first_past]
    if late:
        raise OptionError(
            f"a read, intervention or hook function at {late[0]!r} comes after the stop of this "
            f"run (it ends at {point.hook!r}), so it would never run. Stop later (a larger "
            "stop_at_layer, or None), or remove the intervention or hook there (attached "
            "SAEs too: model.reset_saes()).")


def reached(adapter: Any, point: StopPoint | None, names: Iterable[str],
            op_hooks: Iterable[str] = ()) -> list[str]:
    """``names`` the stopped forward reaches (TransformerLens caches only those), after
    refusing interventions at ``op_hooks`` past the stop (:func:`refuse_past`)."""
    if point is None:
        return list(names)
    refuse_past(adapter, point, op_hooks)
    index = {n: i for i, n in enumerate(adapter.hook_names())}
    return [n for n in names if index.get(n, -1) < point.first_past]


class Prepared(NamedTuple):
    """A run's stop and what it caches."""

    point: StopPoint | None
    names: list[str]
    """The hooks to cache: those reached, plus the stop hook where it is the output."""
    added: bool
    """Whether the stop hook was added to ``names`` only to be the output."""


def prepare(adapter: Any, stop_at_layer: int | None, need_output: bool,
            op_hooks: Iterable[str], names: Iterable[str]) -> Prepared:
    """The stop of a run with interventions at ``op_hooks`` caching ``names``: the one
    ``stop_at_layer`` asks for, else (``need_output`` False: its logits go unused) the
    automatic one, else none."""
    op_hooks, names = list(op_hooks), list(names)
    point = stop_point(adapter, stop_at_layer)
    if point is not None:
        refuse_past(adapter, point, op_hooks)
        names = reached(adapter, point, names)
        added = point.hook not in names
        return Prepared(point, [*names, point.hook] if added else names, added)
    if not need_output:
        return Prepared(auto_stop(adapter, [*op_hooks, *names]), names, False)
    return Prepared(None, names, False)


def output(prepared: Prepared, cache: dict[str, Tensor], logits: Tensor | None) -> Any:
    """A run's output: the residual stream at the stop for ``stop_at_layer`` (taken out of
    ``cache`` where it was added for it), else ``logits``."""
    point = prepared.point
    if point is None or not point.returns:
        return logits
    return cache.pop(point.hook) if prepared.added else cache[point.hook]


def run(adapter: Any, tokens_BP: Tensor, sites: Mapping[str, SiteFn],
        point: StopPoint | None) -> Tensor | None:
    """``adapter.run(tokens_BP, sites)``, stopped right after ``point``'s hook: the logits,
    or None when it stopped (what it computed is in the sites' records)."""
    if point is None:
        return adapter.run(tokens_BP, sites)
    fns = dict(sites)
    fns[point.hook] = _stopping(fns.get(point.hook))
    try:
        return adapter.run(tokens_BP, fns)
    except _StopForward:
        return None


def run_reading(adapter: Any, tokens_BP: Tensor, sites: Mapping[str, SiteFn],
                point: StopPoint | None, read: Callable[[str, Tensor], Tensor]) -> Tensor:
    """:func:`run`, whose output where it stopped is ``read(hook, value)`` of the stop
    hook's value after its site function (how ``sb.trace`` gets its output)."""
    if point is None:
        return adapter.run(tokens_BP, sites)
    fns, box = dict(sites), []
    inner = fns.get(point.hook)

    def keep(x: Tensor) -> Tensor:
        y = x if inner is None else inner(x)
        box.append(read(point.hook, y))
        return y

    fns[point.hook] = keep
    out = run(adapter, tokens_BP, fns, point)
    return box[-1] if out is None and point.returns else out  # type: ignore[return-value]


def _stopping(fn: SiteFn | None) -> SiteFn:
    def stop(x: Tensor) -> Tensor:
        if fn is not None:
            fn(x)  # its records and hook functions run; the value goes nowhere
        raise _StopForward
    return stop
