"""The code that runs inside an nnsight trace, on this machine or on a remote server.

nnsight runs a trace body in a worker beside the model, and for ``remote=True`` it runs it
on an NDIF server that has no saebridge installed and lets a request import only torch,
numpy, einops, math, typing, collections and builtins. So a body calls only plain
functions over named tuples, dicts and tensors: this module's visits and the kernel
(:mod:`saebridge.kernel`: the SAE math, layouts, conversions, interventions as
:mod:`~saebridge.kernel.steps`). :func:`register` marks them for pickling by value, so a
request carries their source. An SAE travels as :class:`~saebridge.kernel.sae.SAEData`
(its tensors and a spec of primitives), never as a module; a steering vector as one
copied vector.

A :class:`Visit` is one location of the model (an envoy's input or output) reached
``count`` times per forward, with the :class:`View` of each hook there: its
:class:`~saebridge.kernel.layout.Location` (as the wrapped model's adapter ``locate``\\ s it)
and the function run on it (a closure locally, a :class:`~saebridge.kernel.steps.SiteSteps`
remotely).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from saebridge.kernel.layout import Location, apply_at

Tensor = torch.Tensor

KERNEL = ("saebridge.kernel.activations", "saebridge.kernel.sparse", "saebridge.kernel.blocked",
          "saebridge.kernel.indexing", "saebridge.kernel.sae", "saebridge.kernel.spaces",
          "saebridge.kernel.layout", "saebridge.kernel.ops", "saebridge.kernel.steps",
          "saebridge.errors")
"""The modules a trace body may call, shipped by value with this one."""


class View(NamedTuple):
    """One hook at a visited location: where its value is, and what runs on it."""

    location: Location
    fn: Any


class Visit(NamedTuple):
    """One location, in execution order: the envoy at ``path`` (``""`` is the root), its
    ``side`` (``"input"``/``"output"``), reached ``count`` times per forward; ``stash`` names
    the keyword of an input kept as the residual of a later view, or is None."""

    path: str
    side: str
    count: int
    views: list[View]
    stash: str | None = None
    at: tuple[int, ...] = ()
    """Where each occurrence falls among a forward's module events (from a probe), so that
    occurrences of locations inside a module run several times (TransformerLens's ``ln1``,
    once for each of q, k, v) are visited interleaved, as they happen."""


def register() -> None:
    """Mark the modules a trace body needs for pickling by value (``nnsight.register``)."""
    import sys

    from nnsight import register as nnsight_register

    for name in (__name__, *KERNEL):
        nnsight_register(sys.modules[name])


# ---- running a forward ------------------------------------------------------------------


def forward(tracer: Any, root: Any, visits: list[Visit]) -> Tensor:
    """Apply ``visits`` during one traced forward; the logits."""
    run_visits(tracer, root, visits, 0)
    return read_logits(tracer, root, 0)


def generate(tracer: Any, root: Any, plan: Any, tokens_BP: Tensor, n_new: int) -> Tensor:
    """Apply the visits of ``plan`` (a list, or ``plan(tokens) -> list``) at every step of a
    greedy generation without a KV cache, tracking the tokens each forward sees."""
    for step in range(n_new):
        visits = plan(tokens_BP) if callable(plan) else plan
        run_visits(tracer, root, visits, step)
        logits_BPV = read_logits(tracer, root, step)
        next_B1 = logits_BPV[:, -1].argmax(-1, keepdim=True).to(tokens_BP.device)
        tokens_BP = torch.cat([tokens_BP, next_B1], dim=1)
    return tokens_BP


def run_visits(tracer: Any, root: Any, visits: list[Visit], step: int) -> None:
    """Visit every location in execution order; ``tracer.iter`` pins each visit to its
    occurrence, so a location reached several times per forward is handled every time."""
    stash: dict[str, Tensor] = {}
    order = [(v.at[j] if len(v.at) == v.count else i, i, j)
             for i, v in enumerate(visits) for j in range(v.count)]
    if any(len(v.at) != v.count for v in visits):
        order = [(i, i, j) for i, v in enumerate(visits) for j in range(v.count)]
    for _, i, j in sorted(order):
        v = visits[i]
        for _ in tracer.iter[step * v.count + j]:
            visit(root, v, stash)


def read_logits(tracer: Any, root: Any, step: int) -> Tensor:
    for _ in tracer.iter[step]:
        out = root.output
    return getattr(out, "logits", out)  # an HF ModelOutput, or TransformerLens's tensor


def visit(root: Any, v: Visit, stash: dict[str, Tensor]) -> Any:
    """Read one location, run each view's function on it, write it back when changed; the
    value written (an output, or the ``(args, kwargs)`` of an input), None if unchanged."""
    envoy = root.get(v.path) if v.path else root
    value = envoy.output if v.side == "output" else envoy.inputs
    items, kwargs = unpack(v.side, value)
    changed = False
    for loc, fn in v.views:
        slot = slot_of(loc, v.side, items)
        residual = stash[loc.residual] if loc.residual is not None else None
        new = apply_at(loc, take(items, kwargs, slot), fn, residual, envoy)
        if new is None:
            continue
        put(items, kwargs, slot, new)
        changed = True
    if v.stash is not None:
        stash[v.path] = items[0] if items else kwargs[v.stash]
    if not changed:
        return None
    written = pack(v.side, value, items, kwargs)
    if v.side == "input":
        envoy.inputs = written
    else:
        envoy.output = written
    return written


def unpack(side: str, value: Any) -> tuple[list, dict]:
    """The positional items and keywords of a location's value: an output (a tuple or
    one tensor) or an input's ``(args, kwargs)``."""
    if side == "output":
        return (list(value) if isinstance(value, tuple) else [value]), {}
    args, kwargs = value
    return list(args), dict(kwargs)


def pack(side: str, value: Any, items: list, kwargs: dict) -> Any:
    """:func:`unpack` undone, shaped like the location's original ``value``."""
    if side == "input":
        return tuple(items), kwargs
    return tuple(items) if isinstance(value, tuple) else items[0]


def slot_of(loc: Location, side: str, items: list) -> int | str:
    """Where ``loc``'s tensor sits: an output's index, an input's position or keyword."""
    if side == "output":
        return loc.index or 0
    return loc.arg if len(items) > loc.arg else loc.kwarg  # type: ignore[return-value]


def take(items: list, kwargs: dict, slot: int | str) -> Tensor:
    """The tensor at ``slot`` (:func:`slot_of`) of an unpacked value."""
    return kwargs[slot] if isinstance(slot, str) else items[slot]


def put(items: list, kwargs: dict, slot: int | str, value: Tensor) -> None:
    """Replace the tensor at ``slot`` of an unpacked value."""
    if isinstance(slot, str):
        kwargs[slot] = value
    else:
        items[slot] = value


class Prepared:
    """Interventions compiled for one model: ``prepared(model)`` applies them from inside a
    trace of that model (locally or remotely) and returns the latents of a splice
    (``result`` names the record; ``"*"``: the whole store; None: nothing)."""

    def __init__(self, visits: list[Visit], store: dict, result: str | None) -> None:
        self.visits, self.store, self.result = visits, store, result

    def __call__(self, root: Any) -> Any:
        stash: dict[str, Tensor] = {}
        for v in self.visits:
            visit(root, v, stash)
        if self.result == "*":  # every record of the run
            return self.store
        return None if self.result is None else self.store[self.result]
