"""The engine: which edit runs at which canonical hook, in which order, for one forward.

Every runner executes the engine's plan and none re-implements it: :class:`saebridge.Model`
(runs, ``generate``), :class:`saebridge.Trace`, the remote front and
:func:`saebridge.cache_activations`. :func:`plan` turns interventions, attached SAEs and
a cache request into a :class:`Plan` (a function per hook, run by the adapter's
``run(tokens, plan.sites)``); :func:`compile_steps` turns the same interventions into data
(:mod:`saebridge.kernel.steps`) for a run inside an nnsight trace, here or on a server.

A run means what SAELens computes on a TransformerLens model in the SAE's space (see
DESIGN.md): each SAE's input is converted from the model's space by
:func:`saebridge.hookmap.convert.conversion`; converting a centred stream back to the raw
one needs the raw mean, which a :class:`~saebridge.hookmap.convert.RawMeanTracker`
rebuilds from every attention and MLP output during the same forward.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from saebridge.activation_cache import ActivationCache
from saebridge.errors import (
    ArgumentTypeError,
    SAEConfigError,
    SpaceConversionError,
    TraceOrderError,
    UnknownHookError,
)
from saebridge.hookmap.convert import (
    TRACKED_SITES,
    RawMeanTracker,
    RawStats,
    conversion,
    edit_keys,
    needs_tracker,
)
from saebridge.hookmap.site import Kind
from saebridge.hookmap.space import CANONICAL, ActivationSpace
from saebridge.interventions import Intervention, Observe, SiteContext, bypass_mask
from saebridge.kernel import steps as S
from saebridge.kernel.sae import SAEData
from saebridge.kernel.spaces import Conv, forward, resolve, track
from saebridge.transcoders import ln_gain_bias

Tensor = torch.Tensor
SiteFn = Callable[[Tensor], Tensor]
"""Called with a site's activation (native space, TransformerLens layout); returns the
value the model goes on with (the same object when unchanged)."""


# ---- the lock: one forward at a time per hooked model -------------------------------------


class RunLock:
    """One per hooked model, shared by every wrapper of it (hooks registered by two
    forwards at once on the same modules would run in each other's passes).

    While a ``with sb.trace(...)`` block holds it (:meth:`paused`), running the model from
    that block's thread would wait forever for the paused forward: that is refused with
    :class:`~saebridge.errors.TraceOrderError`; other threads wait.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paused_by: int | None = None

    def __enter__(self) -> RunLock:
        if self._paused_by == threading.get_ident():
            raise TraceOrderError(
                "the model is paused in this thread's `with sb.trace(...)` block, so running "
                "it here (through this or any other wrapper of the same model) would wait "
                "forever for the traced forward. Run it before or after the block.")
        self._lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    @contextmanager
    def paused(self):
        """Hold the lock for a traced forward that pauses at hooks for this thread's block."""
        with self:
            self._paused_by = threading.get_ident()
            try:
                yield self
            finally:
                self._paused_by = None


_LOCKS: weakref.WeakKeyDictionary[Any, RunLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def underlying(adapter: Any) -> Any:
    """The object a backend hooks into: the torch module under an adapter (for nnsight,
    the module under its envoy tree), so wrappers of one model share a lock."""
    inner = getattr(adapter, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    envoy = getattr(adapter, "envoy", None)
    return getattr(envoy, "_module", None) or inner or adapter


def lock_for(adapter: Any) -> RunLock:
    """The :class:`RunLock` of the model under ``adapter``."""
    key = underlying(adapter)
    with _LOCKS_GUARD:
        try:
            return _LOCKS.setdefault(key, RunLock())
        except TypeError:  # not weakly referenceable: this wrapper's own lock
            return RunLock()


# ---- planning a local forward -------------------------------------------------------------


@dataclass
class Plan:
    """One forward's work: the function to run at each canonical hook."""

    sites: dict[str, SiteFn]
    cache: ActivationCache | None = None
    state: dict[str, Any] = field(default_factory=dict)
    """Per-forward state shared by the sites (a transcoder's prediction)."""


def check(adapter: Any, ops: Iterable[Intervention], names: Iterable[str] = ()) -> None:
    """Refuse unknown hooks, and writes at read-only ones, before anything runs."""
    for op in ops:
        kind = adapter.kind(op.hook)  # unknown hooks fail here, before the forward
        if op.writes and not adapter.writable(op.hook):
            raise UnknownHookError(
                f"hook {op.hook!r} can be read but not written on the {adapter.backend} "
                "backend (no module boundary carries it). Intervene at another hook.")
        if kind == "normed" and op.writes:
            _check_normed_write(adapter, op)
    for name in names:
        adapter.kind(name)


def _check_normed_write(adapter: Any, op: Intervention) -> None:
    """Refuse an unfolded-space SAE's write at a LayerNorm output of a ``fold_ln`` model:
    the folded model reads it through centred weights and drops the mean the SAE's own
    space would keep, which no value at that site can restore."""
    sae: Any = getattr(op, "sae", None)
    unchanged = getattr(op, "use_error_term", False) and not getattr(op, "latent_hooks", ())
    if sae is None or unchanged or not adapter.space.fold_ln:
        return  # no SAE space, or the (mean-free) value itself written back
    if sae.cfg.activation_space.fold_ln:
        return
    raise SpaceConversionError(
        f"SAE at {op.hook!r} was trained in space {sae.cfg.activation_space.name!r} (LayerNorm "
        f"not folded), but this {adapter.backend} model is {adapter.space.name!r}: fold_ln "
        "centred the weights that read this LayerNorm output, so the mean of what the SAE "
        "writes here would be dropped. Splice it into an unfolded model (the HF model, or "
        "saebridge.adapters.transformer_lens.from_hf(..., fold_ln=False)), use "
        "use_error_term=True, or use an SAE trained on the folded model.")


def _tracker(adapter: Any, ops: Sequence[Intervention], stats: RawStats | None,
             tokens: Tensor) -> RawMeanTracker | None:
    """A raw-mean tracker when some SAE's space needs the raw stream of a centred model."""
    needy = [op for op in ops if hasattr(op, "sae") and needs_tracker(
        adapter.kind(op.hook), adapter.space, op.sae.cfg.activation_space)]  # type: ignore[attr-defined]
    if not needy:
        return None
    if stats is None:
        sae: Any = needy[0].sae  # type: ignore[attr-defined]
        raise SpaceConversionError(
            f"SAE at {needy[0].hook!r} was trained in space "
            f"{sae.cfg.activation_space.name!r} but the {adapter.backend} model is "
            f"{adapter.space.name!r} and its unprocessed weights are unknown, so the raw "
            "residual mean cannot be rebuilt. Build the model with "
            "saebridge.adapters.transformer_lens.from_hf() or "
            "saebridge.adapters.tl_bridge.bridge_from_hf() (they record them), or "
            "wrap an unprocessed one.")
    return RawMeanTracker(stats, adapter.space, tokens, _has_resid_mid(adapter))


def _has_resid_mid(adapter: Any) -> bool:
    """Whether blocks run attention before the MLP (no parallel residual): then
    ``hook_mlp_in`` is ``hook_resid_mid``'s value, else the block input's."""
    try:
        adapter.kind("blocks.0.hook_resid_mid")
    except UnknownHookError:
        return False
    return True


def plan(adapter: Any, tokens_BP: Tensor, ops: Sequence[Intervention],
         cache: ActivationCache | None = None, names: Iterable[str] = ()) -> Plan:
    """The functions at each hook running ``ops`` (in the model's execution order) and,
    with a ``cache``, storing ``names`` in the canonical space after any edit there."""
    names = list(names) if cache is not None else []
    check(adapter, ops, names)
    by_site: dict[str, list[Any]] = {}
    for op in ops:
        by_site.setdefault(op.hook, []).append(op)
    stats = adapter.raw_stats()
    tracker = _tracker(adapter, ops, stats, tokens_BP)
    if tracker is not None:
        for layer in range(adapter.n_layers):
            for rel in TRACKED_SITES:
                name = f"blocks.{layer}.{rel}"
                by_site.setdefault(name, []).append(Observe(name, tracker.observe))
    result = Plan({}, cache)
    if cache is not None:
        def store(name: str, x: Tensor) -> None:
            conv = conversion(name, adapter.kind(name), adapter.space, CANONICAL, stats)
            cache[name] = forward(resolve(conv, x, result.state), x).detach()

        for name in names:
            by_site.setdefault(name, []).append(Observe(name, store))
    for name, site_ops in by_site.items():
        ctx = _context(adapter, name, cache, stats, tracker, result.state, tokens_BP)
        result.sites[name] = _site_fn(site_ops, ctx, tokens_BP.shape[0],
                                      tracked(adapter, name))
    return result


def tracked(adapter: Any, name: str) -> tuple[str, ...]:
    """The sums in a run's state an edit at ``name`` adds to
    (:func:`~saebridge.hookmap.convert.edit_keys`): only an uncentred model's conversions
    to a centred space read them."""
    return () if adapter.space.center_writing_weights else edit_keys(name, adapter.kind(name))


def _context(adapter: Any, name: str, cache: ActivationCache | None, stats: RawStats | None,
             tracker: RawMeanTracker | None, state: dict[str, Any], tokens_BP: Tensor
             ) -> SiteContext:
    kind = adapter.kind(name)

    def convert(space: ActivationSpace, x: Tensor) -> Conv:
        return resolve(conversion(name, kind, adapter.space, space, stats, tracker), x, state)

    return SiteContext(name=name, kind=kind, convert=convert,
                       record=cache.record if cache is not None else (lambda k, v: None),
                       mode=cache.mode if cache is not None else "none", raw_stats=stats,
                       state=state, tokens=tokens_BP)


def _site_fn(site_ops: list[Any], ctx: SiteContext, batch: int, keys: tuple[str, ...]
             ) -> SiteFn:
    def fn(x: Tensor) -> Tensor:
        # The canonical layout has the batch first everywhere; a native value shared by the
        # batch (HF's position embeddings are [1, pos, d]) is broadcast.
        y = start = x.expand(batch, *x.shape[1:]) if x.dim() > 1 and x.shape[0] == 1 \
            and batch > 1 else x
        for op in site_ops:
            before, y = y, op.apply(y, ctx)
            if keys and op.writes:
                track(ctx.state, keys, before, y)
        return x if y is start else y
    return fn


# ---- compiling to data: runs inside an nnsight trace, here or remotely ---------------------


@dataclass
class Compiled:
    """Interventions as data: the steps at each hook, and the dict their records land in."""

    sites: dict[str, S.SiteSteps]
    store: dict[str, Tensor]


class _Compiler:
    """:class:`saebridge.interventions.StepCompiler` over an adapter: constant conversions
    only (a remote body cannot rebuild the raw mean from other sites)."""

    def __init__(self, adapter: Any, mode: str, tokens: Tensor | None) -> None:
        self.adapter, self.mode, self.tokens = adapter, mode, tokens
        self.stats = adapter.raw_stats()
        self._saes: dict[int, SAEData] = {}

    def sae(self, sae: Any) -> SAEData:
        if id(sae) not in self._saes:  # each SAE ships once, however many steps use it
            _refuse_own_math(sae)
            data = sae.data()
            self._saes[id(sae)] = data._replace(
                params={k: v.detach() for k, v in data.params.items()})
        return self._saes[id(sae)]

    def conv(self, name: str, space: ActivationSpace) -> Conv:
        a = self.adapter
        kind = a.kind(name)
        if needs_tracker(kind, a.space, space):
            raise SpaceConversionError(
                f"converting {name!r} from {a.space.name!r} to {space.name!r} needs the raw "
                "residual mean, rebuilt from every earlier attention and MLP output; an "
                "nnsight trace body here (and a remote request) does not rebuild it. Wrap an "
                "unprocessed TransformerLens model, or run it with model.run_with_saes "
                "without remote=.")
        conv = conversion(name, kind, a.space, space, self.stats)
        if conv.shift is not None and conv.shift.is_meta:
            raise SpaceConversionError(
                f"converting {name!r} to {space.name!r} needs the value biases, but the "
                "model's weights are on the meta device. Dispatch the model, or use an SAE "
                f"trained in the model's own space ({a.space.name!r}).")
        return conv if conv.shift is None else conv._replace(shift=conv.shift.detach())

    def kind(self, name: str) -> Kind:
        return self.adapter.kind(name)

    def gain_bias(self, name: str, affine: str) -> tuple[Tensor, Tensor]:
        gain, bias = ln_gain_bias(self.stats, name, affine)
        return gain.detach(), bias.detach()

    def bypass(self, token_ids: tuple[int, ...]) -> Tensor | None:
        return bypass_mask(token_ids, self.tokens)


FORWARD_METHODS = ("encode", "decode", "forward", "run", "forward_sparse")


def _refuse_own_math(sae: Any) -> None:
    """A subclass that computes its own forward cannot run as the kernel's data."""
    base = next(c for c in type(sae).__mro__ if c.__module__.startswith("saebridge."))
    own = [m for m in FORWARD_METHODS if getattr(type(sae), m) is not getattr(base, m)]
    if own:
        raise SAEConfigError(
            f"a {type(sae).__name__} overrides {', '.join(own)}, so it cannot run inside an "
            "nnsight trace body or remotely: there the kernel computes the SAE from its "
            f"parameters and {base.__name__}'s spec. Use model.run_with_saes on a local model "
            "for it, or express it through SAE.spec().")


def compile_steps(adapter: Any, ops: Sequence[Intervention], names: Iterable[str] = (),
                  record: bool = False, tokens: Tensor | None = None) -> Compiled:
    """``ops`` (then caching ``names`` in the canonical space) as data; ``tokens``, where
    known, are the one forward's (for ``exclude_special_tokens``).

    Raises:
        TypeError: an intervention that is code, not data (it has no ``step``).
    """
    names = list(names)
    check(adapter, ops, names)
    compiler = _Compiler(adapter, "dense" if record else "none", tokens)
    store: dict[str, Tensor] = {}
    by_site: dict[str, list[Any]] = {}
    for op in ops:
        step = getattr(op, "step", None)
        if step is None:
            raise ArgumentTypeError(
                f"{type(op).__name__} cannot run inside an nnsight trace kernel (remote runs): "
                "it is code, not data the server can run. Remote runs take Splice, Steer, "
                "Ablate and Clamp.")
        by_site.setdefault(op.hook, []).append(step(compiler))
    for name in names:
        by_site.setdefault(name, []).append(S.CacheStep(name, compiler.conv(name, CANONICAL)))
    state: dict[str, Tensor] = {}
    order = {n: i for i, n in enumerate(adapter.hook_names())}
    first = min(by_site, key=lambda n: order.get(n, len(order)), default=None)
    return Compiled({n: S.SiteSteps(n, steps, store, state, tracked(adapter, n),
                                    reset=n == first)
                     for n, steps in by_site.items()}, store)
