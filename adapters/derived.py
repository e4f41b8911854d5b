"""TransformerLens hooks that no module boundary of a Hugging Face model carries.

A :class:`~saebridge.hookmap.site.Site` with ``derive`` names the tensor such a hook is
computed from (:data:`~saebridge.hookmap.site.DERIVATIONS`); :func:`converter` gives the
read-only ``convert`` object a :class:`~saebridge.kernel.layout.Location` applies to it,
so the HF adapter and nnsight over HF (which uses the HF adapter's locations) produce the
same values with TransformerLens's shapes.

Attention scores, patterns and rotated q/k exist only inside HF's eager attention. A run
that reads them goes through :func:`eager_attention`: the model's attention implementation
is set, for that run only, to :data:`IMPLEMENTATION`, which calls the architecture's own
``eager_attention_forward`` (so the pattern is the one eager attention computes, and the
rest of the forward is exactly eager's) and records the q and k it is given (after rotary
embeddings) and the scores from them (grouped-query heads repeated, soft-capped where the
model caps, masked positions set to TransformerLens's ``IGNORE``, ``-inf``). The
implementation the model had is restored afterwards, also when the run raises. This is
exact where recomputing scores from ``hook_q``/``hook_k`` beside SDPA is not: that would
re-implement rotary embeddings, soft caps and sliding windows per architecture, and give
a pattern SDPA never used.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from saebridge.errors import UnknownHookError, UnsupportedArchitectureError
from saebridge.hookmap.site import DERIVATIONS, Site

Tensor = torch.Tensor

IMPLEMENTATION = "saebridge_eager"
"""The attention implementation a run reading scores or patterns uses: HF's eager one,
recording scores (registered with transformers' ``AttentionInterface`` on first use)."""

_SCORES: dict[int, dict[str, Tensor]] = {}
"""``id(attention module)`` → its ``scores``, ``rot_q`` and ``rot_k`` in the current run,
for the modules asked for."""
_LOCK = threading.Lock()


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
               attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """The architecture's own eager attention, recording the scores of wanted modules."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} has no eager_attention_forward in "
            f"{type(module).__module__}, so its attention scores and pattern cannot be "
            "computed; load the model with attn_implementation=\"eager\" to read them.")
    if id(module) in _SCORES:
        _SCORES[id(module)] = {
            "scores": attention_scores(query, key, attention_mask, kwargs.get("scaling"),
                                       kwargs.get("softcap")),
            # TransformerLens's layout [batch, pos, head, d_head]; k keeps its own heads.
            "rot_q": query.transpose(1, 2), "rot_k": key.transpose(1, 2)}
    return eager(module, query, key, value, attention_mask, **kwargs)


def attention_scores(query: Tensor, key: Tensor, mask: Tensor | None,
                     scaling: float | None = None, softcap: float | None = None) -> Tensor:
    """TransformerLens's ``hook_attn_scores`` ``[batch, head, q_pos, k_pos]`` from HF's
    per-head q and k (``[batch, head, pos, d_head]``, k with fewer heads under GQA) and
    eager attention's additive mask (0 where attended).

    >>> q = torch.ones(1, 2, 3, 4)
    >>> attention_scores(q, q[:, :1], None, scaling=0.5)[0, 1]
    tensor([[2., -inf, -inf],
            [2., 2., -inf],
            [2., 2., 2.]])
    """
    if key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (
        scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    n_q, n_k = scores.shape[-2:]
    if mask is None:
        attended = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
    else:
        mask = mask[..., :n_k]
        attended = mask if mask.dtype == torch.bool else mask == 0
    return scores.masked_fill(~attended, float("-inf"))


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, _attention)
        AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


@contextmanager
def eager_attention(model: nn.Module, scores_of: list[nn.Module]) -> Iterator[None]:
    """Run ``model`` with :data:`IMPLEMENTATION` (eager attention recording the scores of
    the attention modules ``scores_of``); its implementation is restored afterwards."""
    config: Any = model.config
    before = config._attn_implementation
    with _LOCK:
        _register()
        wanted = [id(m) for m in scores_of if id(m) not in _SCORES]
        _SCORES.update({i: {} for i in wanted})
    config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = before
        with _LOCK:
            for i in wanted:
                _SCORES.pop(i, None)


class _Derived:
    """A read-only ``convert`` (see :class:`~saebridge.kernel.layout.Location`)."""

    name = "derived"

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.convert = fn

    def revert(self, x: Tensor) -> Tensor:
        raise UnknownHookError(f"a computed hook ({self.name}) cannot be written; "
                               "intervene at the hook it is computed from.")


def repeat_heads(n: int) -> _Derived:
    """``[..., d]`` → ``[..., n, d]``, as TransformerLens's ``repeat_along_head_dimension``."""
    return _Derived(lambda x: x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).clone())


def norm_scale(eps: float, centre: bool) -> _Derived:
    """A norm's scale of its input, ``[..., 1]``, in float32 then the input's dtype."""
    def fn(x: Tensor) -> Tensor:
        y = x.float()
        if centre:
            y = y - y.mean(-1, keepdim=True)
        return (y.pow(2).mean(-1, keepdim=True) + eps).sqrt().to(x.dtype)
    return _Derived(fn)


def head_result(out_proj: nn.Module, n_heads: int, offset: Callable[[], Tensor | float],
                weight: Callable[[], Tensor] | None = None) -> _Derived:
    """Each head's ``hook_z`` (``[..., head, d_head]``, less ``offset()``: the value bias
    the canonical space folds into ``b_O``) times its rows of ``out_proj``'s weight
    (``weight()``, where an offloaded module's own is on ``meta`` before its forward)."""
    def fn(z: Tensor) -> Tensor:
        w = out_proj.weight if weight is None else weight()
        w_in_out = w.T if isinstance(out_proj, nn.Linear) else w  # Conv1D: [in, out]
        w_HdM = w_in_out.reshape(n_heads, -1, w_in_out.shape[-1]).to(z.device, z.dtype)
        off = offset()
        z = z - (off.to(z) if isinstance(off, Tensor) else off)
        return torch.einsum("...hd,hdm->...hm", z, w_HdM)
    return _Derived(fn)


def recorded(attention: nn.Module, what: str) -> _Derived:
    """The ``scores``, ``rot_q`` or ``rot_k`` that :func:`eager_attention` recorded for
    ``attention`` in this run."""
    def fn(_pattern: Tensor) -> Tensor:
        found = _SCORES.get(id(attention), {}).get(what)
        if found is None:
            raise UnknownHookError(
                f"attention {what} were not recorded: this forward did not run under "
                "saebridge's eager attention (run the model through saebridge: "
                "run_with_cache, run_with_hooks or a trace).")
        return found
    return _Derived(fn)


def converter(site: Site, module: nn.Module, n_heads: int, n_kv_heads: int,
              offset: Callable[[], Tensor | float],
              weight: Callable[[], Tensor] | None = None) -> _Derived:
    """The ``convert`` of a derived ``site`` read at ``module`` (the module it names);
    ``weight()`` reads the module's weight where it is not in the module (offloaded)."""
    how = site.derive or ""
    if how in ("heads", "kv_heads"):
        return repeat_heads(n_heads if how == "heads" else n_kv_heads)
    if how.startswith("scale:"):
        eps = getattr(module, "eps", None)
        eps = getattr(module, "variance_epsilon", 1e-5) if eps is None else eps
        return norm_scale(float(eps), centre=how == "scale:LN")
    if how == "result":
        return head_result(module, n_heads, offset, weight)
    if how in ("scores", "rot_q", "rot_k"):
        return recorded(module, how)
    raise UnsupportedArchitectureError(f"hook map site {site.module!r} has derive={how!r}; "
                                       f"known: {', '.join(DERIVATIONS)}.")


class IgnoreMasked:
    """Masked attention scores as TransformerLens's ``IGNORE`` (``-inf``) where a backend
    fills them with its dtype's minimum (a TransformerBridge outside compatibility mode),
    and back again for a write."""

    @staticmethod
    def convert(x: Tensor) -> Tensor:
        return x.masked_fill(x <= torch.finfo(x.dtype).min / 2, float("-inf"))

    @staticmethod
    def revert(x: Tensor) -> Tensor:
        return x.masked_fill(x == float("-inf"), torch.finfo(x.dtype).min)

    @classmethod
    def around(cls, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """``fn`` run on the converted scores; its result reverted (``x`` when unchanged)."""
        def wrapped(x: Tensor) -> Tensor:
            view = cls.convert(x)
            new = fn(view)
            return x if new is view else cls.revert(new)
        return wrapped


def refuse_raw_result(name: str, space: Any) -> None:
    """Refuse ``attn.hook_result`` of a TransformerLens model that keeps the value bias in
    ``hook_z`` (unprocessed, or a raw TransformerBridge): its per-head results differ from
    the canonical ones by each head's ``b_V @ W_O``, which no shift of the activation
    alone can undo, so it cannot be given in the canonical space.

    Raises:
        UnknownHookError: naming the hook and where to read it instead.
    """
    if name.endswith("attn.hook_result") and not space.fold_value_biases:
        raise UnknownHookError(
            f"hook {name!r} of this unprocessed TransformerLens model holds each head's value "
            "bias times W_O, which the canonical space folds into b_O and no conversion of "
            "the activation can remove. Read it on a processed HookedTransformer, a "
            "TransformerBridge after enable_compatibility_mode(), or the Hugging Face "
            "model (where saebridge computes it), or use hook_z.")
