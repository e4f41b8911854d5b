"""TransformerLens hook functions on every backend.

A TransformerLens hook function is ``hook_fn(act, hook)``: ``act`` the activation at a
hook point, ``hook`` the :class:`HookPoint` (``.name``, ``.layer()``, ``.ctx``); it returns
a replacement, or None to leave the activation as it is (changing ``act`` in place also
counts). :class:`HookFn` runs one as an :class:`~saebridge.interventions.Intervention`:
the function sees the activation in the canonical space, the value a cache shows (what
TransformerLens-processed computes there), and what it returns is converted back to the
model's own space with the same shift, as a splice writes back its reconstruction. So the
same hook function does the same on every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from saebridge.errors import ArgumentTypeError, ShapeError, UnknownHookError
from saebridge.hookmap.space import CANONICAL
from saebridge.interventions import SiteContext, Splice
from saebridge.kernel.ops import SAE_HOOKS
from saebridge.kernel.spaces import back, shift_for

Tensor = torch.Tensor
HookFunction = Callable[[Tensor, "HookPoint"], "Tensor | None"]
NameFilter = str | Iterable[str] | Callable[[str], bool]
"""A hook name, a list of them, or a predicate over names (TransformerLens's ``names_filter``
and the first element of a ``fwd_hooks`` pair)."""


class HookPoint:
    """What a hook function receives as ``hook``: the hook point's ``name``, its
    ``layer()``, and ``ctx``, a dict kept between calls (until
    ``model.reset_hooks(clear_contexts=True)``), as on a TransformerLens ``HookPoint``.
    ``add_hook``/``remove_hooks`` act on the model it belongs to."""

    def __init__(self, name: str, model: Any) -> None:
        self.name = name
        self.ctx: dict[Any, Any] = {}
        self._model = model

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"

    def layer(self) -> int:
        """The block index in the name (``blocks.3.attn.hook_z`` → 3).

        >>> HookPoint("blocks.3.attn.hook_z", None).layer()
        3
        """
        parts = self.name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise UnknownHookError(f"hook {self.name!r} is not in a block, so it has no layer. "
                                   "Call layer() on the hook points of blocks.L.*.")
        return int(parts[1])

    def add_hook(self, hook: HookFunction, dir: str = "fwd", is_permanent: bool = False,
                 prepend: bool = False) -> None:
        self._model.add_hook(self.name, hook, dir=dir, is_permanent=is_permanent,
                             prepend=prepend)

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False) -> None:
        self._model.remove_hooks_at(self.name, including_permanent)

    def clear_context(self) -> None:
        self.ctx.clear()


def _describe(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


@dataclass
class HookFn:
    """A TransformerLens hook function at one canonical hook, as an intervention.

    ``writes`` is False at hooks a backend can only read (attention patterns on a
    TransformerBridge): a function there may read, and returning a replacement is refused.
    """

    hook: str
    fn: HookFunction
    point: HookPoint
    writes: bool = True
    permanent: bool = field(default=False, kw_only=True)
    """Kept by ``reset_hooks()`` (TransformerLens's ``is_permanent``)."""

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        conv = ctx.convert(CANONICAL, x)
        shift = shift_for(conv, x)
        act = x if shift is None else x + shift
        version = act._version
        out = self.fn(act, self.point)
        if out is None or out is act:
            if act._version == version:
                return x
            out = act  # edited in place
        self._check(out, act)
        if out is x:  # a new object, so that every backend writes it back
            out = out.clone()
        return back(conv, out.to(x.dtype), shift)

    def _check(self, out: Any, act: Tensor) -> None:
        what = f"hook function {_describe(self.fn)} at {self.hook!r}"
        if not self.writes:
            raise UnknownHookError(
                f"{what} changed the activation, but this backend can only read that hook "
                "(no module boundary carries it). Return None there, or edit another hook.")
        if not isinstance(out, Tensor):
            raise ShapeError(f"{what} returned a {type(out).__name__}; a hook function returns "
                             "a tensor of the activation's shape, or None to leave it unchanged.")
        if out.shape != act.shape:
            raise ShapeError(
                f"{what} returned shape {tuple(out.shape)}, but the activation there has "
                f"shape {tuple(act.shape)}. Return a tensor of the activation's shape (edit "
                "it, or a copy), or None to leave it unchanged.")


def hook_names(spec: NameFilter, valid: list[str], check: Callable[[str], Any]) -> list[str]:
    """The hook names ``spec`` selects: itself, its members, or those of ``valid`` (in
    execution order) it accepts; named hooks are checked with ``check`` (which raises
    :class:`~saebridge.errors.UnknownHookError` listing the nearest names).

    >>> hook_names(lambda n: n.endswith("hook_z"), ["a.hook_z", "b.hook_q"], print)
    ['a.hook_z']
    """
    if callable(spec) and not isinstance(spec, str):
        return [n for n in valid if spec(n)]
    names = [spec] if isinstance(spec, str) else list(spec)
    for name in names:
        if not isinstance(name, str):
            raise ArgumentTypeError(f"hook names are strings, got {name!r} "
                                    f"({type(name).__name__}) in {spec!r}.")
        check(name)
    return names


def latent_base(name: str) -> str | None:
    """The hook of the SAE whose own hook point ``name`` is (``blocks.1.hook_resid_pre``
    for ``blocks.1.hook_resid_pre.hook_sae_acts_post``); None for a model hook.

    >>> latent_base("blocks.1.hook_resid_pre.hook_sae_acts_post"), latent_base("hook_embed")
    ('blocks.1.hook_resid_pre', None)
    """
    base, _, key = name.rpartition(".")
    return base if base and key in SAE_HOOKS else None


def _latent_call(h: HookFn) -> Callable[[Tensor], Tensor]:
    def call(value: Tensor) -> Tensor:
        out = h.fn(value, h.point)
        if out is None or out is value:
            return value  # unchanged, or edited in place
        if not isinstance(out, Tensor) or out.shape != value.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ShapeError(
                f"hook function {_describe(h.fn)} at {h.hook!r} returned {shape}, but the value "
                f"there has shape {tuple(value.shape)}. Return a tensor of that shape, or None.")
        return out
    return call


def fold_latent_hooks(ops: list[Any]) -> list[Any]:
    """``ops`` with each hook function at an SAE's own hook point (``{hook}.hook_sae_*``)
    moved into the splice of the SAE at ``hook`` (the last one there), which calls it
    inside the SAE, as SAELens's hook points fire.

    Raises:
        UnknownHookError: such a hook with no SAE spliced in at its ``hook``.
    """
    last = {op.hook: op for op in ops if isinstance(op, Splice)}
    moved: dict[str, list[tuple[str, Callable[[Tensor], Tensor]]]] = {}
    kept = []
    for op in ops:
        base = latent_base(op.hook) if isinstance(op, HookFn) else None
        if base is None:
            kept.append(op)
            continue
        if base not in last:
            raise UnknownHookError(
                f"hook {op.hook!r} is an SAE's hook point, but no SAE is spliced in at "
                f"{base!r} in this run. Attach one there (add_sae, saes(), run_with_saes, "
                "run_with_hooks_with_saes) or hook the model's own hook.")
        moved.setdefault(base, []).append((op.hook.rpartition(".")[2], _latent_call(op)))
    return [replace(op, latent_hooks=op.latent_hooks + tuple(moved[op.hook]))
            if isinstance(op, Splice) and op.hook in moved and last[op.hook] is op else op
            for op in kept]
