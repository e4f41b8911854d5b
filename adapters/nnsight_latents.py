"""The latents :func:`saebridge.splice` hands back inside your own nnsight trace, editable:
an in-place edit (``latents[..., f] = 0``) reaches the model, as in dictionary_learning's
``f = ae.encode(x); f[..., f] = 0; submodule.output = ae.decode(f)``.

The splice writes its reconstruction when the model reaches the SAE's hook (a
transcoder's: its output site) and returns the latents; the model stays paused there
until the trace body asks for anything else. nnsight flushes a pending write-back at that
moment (``nnsight.intervention.eproperty.WriteBack``, how its own reshaped views go back
to the model); ours adds what the edit changed in the reconstruction,
``recons(edited) - recons(latents)`` (:func:`saebridge.kernel.ops.latent_delta`), to the
value written there. Unedited latents leave that value as it is, bit for bit; gradients
of later values reach the latents either way (attribution through edited latents).

Edit them before the body reads anything later in the model: then the model has moved on,
as after any nnsight edit. Local traces only: a remote body cannot name saebridge, and
:func:`~saebridge.prepare_splice`'s latents are a record of the run, not a handle on it.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import torch

from saebridge.adapters.nnsight_plan import envoy_of, prepare_splice
from saebridge.adapters.nnsight_remote import Visit, pack, put, slot_of, take, unpack, visit
from saebridge.kernel.indexing import put_head
from saebridge.kernel.layout import Location, read, write
from saebridge.kernel.ops import latent_delta
from saebridge.kernel.sae import SAEData
from saebridge.kernel.spaces import Conv, back
from saebridge.sae import SAE
from saebridge.sae.foreign import as_sae

Tensor = torch.Tensor


def splice(model: Any, sae: SAE, use_error_term: bool = False) -> Tensor:
    """Splice ``sae`` in at its hook from inside an nnsight trace; its latents, whose
    in-place edits reach the model until the body reads anything later in it."""
    prepared = prepare_splice(model, sae, use_error_term)
    root = envoy_of(model)
    stash: dict[str, Tensor] = {}
    written = None
    for v in prepared.visits:
        written = visit(root, v, stash)
    latents = prepared.store[prepared.result]
    if written is not None:
        cfg = as_sae(sae).cfg  # the conversion Splice made (cached per object)
        sae_input = prepared.store[f"{cfg.hook_name}.hook_sae_input"]
        _bind(root, prepared.visits[-1], getattr(cfg, "hook_name_out", cfg.hook_name),
              written, partial(_native_delta, sae_input, latents.clone(), latents._version,
                               latents))
    return latents


def _bind(root: Any, v: Visit, site: str, written: Any, delta: Any) -> None:
    """Have nnsight swap ``written`` plus the edit's ``delta`` in at ``v``'s location when
    the body next moves on (``written`` itself when nothing was edited). ``site`` names the
    view whose last step wrote the reconstruction: its SAE data and conversion are the
    compiled ones."""
    try:
        from nnsight.intervention.eproperty import WriteBack
        from nnsight.intervention.interleaver import Mediator
    except ImportError:  # nnsight before 0.8 has no deferred write-backs
        warnings.warn(
            "this nnsight has no deferred write-backs (nnsight.intervention.eproperty."
            "WriteBack, 0.8+), so edits of the latents sb.splice returns do not reach the "
            "model. Upgrade nnsight, or edit with sb.Ablate/sb.Clamp.", stacklevel=3)
        return
    envoy = root.get(v.path) if v.path else root
    view = next(view for view in v.views if view.fn.name == site)
    step = view.fn.steps[-1]  # the SpliceStep (a transcoder's WriteStep)
    location = f"{envoy.path}.{v.side}"
    mediator = Mediator.current(location)
    fn = partial(_edited, envoy, view.location, step.sae, step.conv, v.side, written, delta)
    mediator.transform = WriteBack(fn, None, None, location, mediator.wanted(location))


def _edited(envoy: Any, loc: Location, sae: SAEData, conv: Conv, side: str, written: Any,
            delta: Any) -> Any:
    """``written`` with the edit's change added to ``loc``'s tensor in it."""
    items, kwargs = unpack(side, written)
    slot = slot_of(loc, side, items)
    t = take(items, kwargs, slot)
    change = delta(sae, loc, conv, t, envoy)
    if change is None:
        return written
    put(items, kwargs, slot, t + change)
    return pack(side, written, items, kwargs)


def _native_delta(sae_input: Tensor, before: Tensor, version: int, latents: Tensor,
                  sae: SAEData, loc: Location, conv: Conv, t: Tensor, norm: Any
                  ) -> Tensor | None:
    """What editing ``before`` into ``latents`` adds to ``t``, the native tensor holding
    the SAE's site; None when ``latents`` were not edited in place (still at ``version``).
    An edit that changed no value still goes through the change (zero), so gradients reach
    the edited latents."""
    if latents._version == version:
        return None
    flat = latent_delta(sae, sae_input, before, latents)
    site = read(loc.layout, t, loc.n_heads, loc.d_head, norm)
    if loc.convert is not None:
        site = loc.convert.convert(site)
    head = None if sae.spec.d_out is not None else sae.spec.hook_head_index
    part = site if head is None else site[..., head, :]
    change = put_head(torch.zeros_like(site), flat.to(site).reshape(part.shape), head)
    change = back(conv, change, None)  # a shift cancels in a difference; centring does not
    zero = torch.zeros_like(t)

    def native(canonical: Tensor) -> Tensor:
        if loc.convert is not None:
            canonical = loc.convert.revert(canonical)
        return write(loc.layout, zero, canonical, norm)

    return native(change) - native(torch.zeros_like(change))
