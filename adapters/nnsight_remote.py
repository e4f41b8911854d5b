"""The code that runs inside an nnsight trace, on this machine or on a remote server.

nnsight runs a trace body in a worker beside the model, and for ``remote=True`` it runs it
on an NDIF server that has no saebridge installed and lets a request import only torch,
numpy, einops, math, typing, collections and builtins. So everything a body calls lives
here as plain functions over tensors, tuples, dicts and primitives; :func:`register`
marks this module (and the pure SAE functions and error classes it reuses) for pickling
by value, so a request carries their source. An SAE travels as ``(params, cfg)`` — a
dict of its tensors and a dict of primitives — never as a module (the server's model has
no such module); a steering vector travels as one copied vector.

Shapes of the data (built by :mod:`saebridge.adapters.nnsight`):

- a *visit* ``(path, io, count, views, stash)``: the envoy at ``path`` ("" is the root),
  its ``"input"`` or ``"output"``, reached ``count`` times per forward; ``stash`` names
  the keyword of an input kept as the residual of a later site, or is None.
- a *view* ``(index, arg, kwarg, layout, residual, writable, fn)``: the tuple element or
  argument holding the site, the reshape into TransformerLens layout, the stashed path
  added to it (``hook_resid_mid``), and ``fn(x) -> x`` (a closure locally, a
  :class:`SiteOps` remotely).
- a *layout* ``(part, heads, interleaved, unnorm, n_heads, d_head)``: the fields of a
  :class:`saebridge.hookmap.layout.Layout` and the head sizes it reads with.
- an *op* (what :class:`SiteOps` applies) starts with the function applying it, so a
  request carries only the code it uses: ``(apply_splice, sae, use_error_term, conv,
  record)``, ``(apply_edit, sae, features, positions, value, conv)`` (value None ablates),
  ``(apply_steer, vector, coef, positions, head_index)``, ``(apply_cache, key, conv)``;
  ``conv`` is ``("identity",)``, ``("center",)`` or
  ``("shift", tensor)`` (per key/value head at ``v`` sites, repeated to the site's heads),
  the map from the model's space to the op's.
"""

from __future__ import annotations

from typing import Any

import torch

from saebridge.errors import ShapeError
from saebridge.indexing import add_vector, put_head, select_positions
from saebridge.indexing import head as head_of
from saebridge.sae.activations import flatten_heads, jumprelu, normalize_in, normalize_out
from saebridge.sae.blocked import encode_sae
from saebridge.sae.sparse import decode_sparse, needs_grad, topk_latents, try_decode

Tensor = torch.Tensor

SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
             "hook_sae_error", "hook_sae_output")
"""The cache keys a splice records, as :data:`saebridge.interventions.SAE_HOOKS` spells them."""


def register() -> None:
    """Mark the modules a trace body needs for pickling by value (``nnsight.register``)."""
    import sys

    from nnsight import register as nnsight_register

    for name in (__name__, "saebridge.indexing", "saebridge.sae.activations",
                 "saebridge.sae.sparse", "saebridge.sae.blocked", "saebridge.errors"):
        nnsight_register(sys.modules[name])


# ---- running a forward ------------------------------------------------------------------


def forward(tracer: Any, root: Any, visits: list) -> Tensor:
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


def run_visits(tracer: Any, root: Any, visits: list, step: int) -> None:
    """Visit every location in execution order; ``tracer.iter`` pins each visit to its
    occurrence, so a location reached several times per forward is handled every time."""
    stash: dict[str, Tensor] = {}
    for path, io, count, views, stash_as in visits:
        for j in range(count):
            for _ in tracer.iter[step * count + j]:
                visit(root, path, io, views, stash, stash_as)


def read_logits(tracer: Any, root: Any, step: int) -> Tensor:
    for _ in tracer.iter[step]:
        out = root.output
    return getattr(out, "logits", out)  # an HF ModelOutput, or TransformerLens's tensor


def visit(root: Any, path: str, io: str, views: list, stash: dict, stash_as: str | None
          ) -> None:
    """Read one location, run each view's function on it, write it back when changed."""
    envoy = root.get(path) if path else root
    kwargs: dict = {}
    if io == "output":
        value = envoy.output
        items = list(value) if isinstance(value, tuple) else [value]
    else:
        args, kwargs = envoy.inputs
        items, kwargs = list(args), dict(kwargs)
    changed = False
    for index, arg, kwarg, layout, residual, writable, fn in views:
        slot = (index or 0) if io == "output" else (arg if len(items) > arg else kwarg)
        t = kwargs[slot] if isinstance(slot, str) else items[slot]
        view = read_layout(t, layout, envoy)
        res = stash[residual] if residual is not None else None
        if res is not None:
            view = view + res
        new = fn(view)
        if new is view or not writable:
            continue
        if res is not None:
            new = new - res
        new = write_layout(t, new, layout, envoy)
        if isinstance(slot, str):
            kwargs[slot] = new
        else:
            items[slot] = new
        changed = True
    if stash_as is not None:
        stash[path] = items[0] if items else kwargs[stash_as]
    if not changed:
        return
    if io == "input":
        envoy.inputs = (tuple(items), kwargs)
    else:
        envoy.output = tuple(items) if isinstance(value, tuple) else items[0]


def read_layout(t: Tensor, layout: tuple, envoy: Any) -> Tensor:
    """The canonical view of ``t``, as :meth:`saebridge.hookmap.layout.Layout.read`."""
    part, heads, interleaved, unnorm, n_heads, d_head = layout
    if unnorm is not None:  # TransformerLens's hook_normalized is before the norm's gain
        gain, bias = _gain_bias(envoy, unnorm)
        return (t - bias) / gain
    if interleaved:
        return t.unflatten(-1, (n_heads, 3, -1))[..., part, :]
    if part is not None:
        t = t.chunk(3, dim=-1)[part]
    if not heads:
        return t
    return t.unflatten(-1, (-1, d_head) if d_head else (n_heads, -1))


def write_layout(t: Tensor, new: Tensor, layout: tuple, envoy: Any) -> Tensor:
    """``t`` with its canonical view replaced by ``new``, as ``Layout.write``."""
    part, heads, interleaved, unnorm, _, _ = layout
    if unnorm is not None:
        gain, bias = _gain_bias(envoy, unnorm)
        return new * gain + bias
    if interleaved:
        parts = list(t.unflatten(-1, (new.shape[-2], 3, -1)).unbind(-2))
        parts[part] = new
        return torch.stack(parts, dim=-2).flatten(-3)
    new = new.flatten(-2) if heads else new
    if part is None:
        return new
    parts = list(t.chunk(3, dim=-1))
    parts[part] = new
    return torch.cat(parts, dim=-1)


def _gain_bias(envoy: Any, kind: str) -> tuple[Any, Any]:
    weight = envoy.weight  # the norm module's own parameters (the server's, remotely)
    if kind == "affine":
        return weight, envoy.bias
    return (1.0 + weight, 0.0) if kind == "scale+1" else (weight, 0.0)


# ---- interventions as data ----------------------------------------------------------------


class Prepared:
    """Interventions compiled for one model: ``prepared(model)`` applies them from inside a
    trace of that model (locally or remotely) and returns the latents of a splice."""

    def __init__(self, visits: list, store: dict, result: str | None) -> None:
        self.visits, self.store, self.result = visits, store, result

    def __call__(self, root: Any) -> Any:
        stash: dict[str, Tensor] = {}
        for path, io, _, views, stash_as in self.visits:
            visit(root, path, io, views, stash, stash_as)
        return None if self.result is None else self.store[self.result]



class SiteOps:
    """The ops at one site, applied in order; records go to ``store`` (saved by the caller)."""

    def __init__(self, name: str, ops: list, store: dict) -> None:
        self.name, self.ops, self.store = name, ops, store

    def __call__(self, x: Tensor) -> Tensor:
        for op in self.ops:
            x = op[0](op, x, self)
        return x


def shift_of(conv: tuple, x: Tensor) -> Tensor | None:
    """The shift taking ``x`` from the model's space to the op's (None: the same space)."""
    if conv[0] == "center":
        return -x.mean(-1, keepdim=True)
    if conv[0] != "shift":
        return None
    shift = conv[1]
    if x.dim() >= 4 and shift.dim() >= 2 and shift.shape[-2] != x.shape[-2]:
        shift = shift.repeat_interleave(x.shape[-2] // shift.shape[-2], dim=-2)  # GQA
    return shift


def _sae_input(sae: tuple, x: Tensor, conv: tuple, name: str
               ) -> tuple[Tensor | None, Tensor, Tensor]:
    params, cfg = sae
    head = cfg["hook_head_index"]
    if head is not None and (x.dim() < 4 or not 0 <= head < x.shape[-2]):
        raise ShapeError(
            f"SAE with hook_head_index={head} at {name!r}: the site has "
            f"{x.shape[-2] if x.dim() >= 4 else 'no'} heads. Use a head index in range, or an "
            "SAE for the whole site.")
    width = head_of(x, head).shape[-1]
    flat = x.shape[-2] * x.shape[-1] if x.dim() >= 4 and head is None else width
    if cfg["d_in"] not in (width, flat):
        raise ShapeError(
            f"SAE d_in={cfg['d_in']} does not fit hook {name!r}, whose activations have width "
            f"{flat}. Load the SAE made for this site and model.")
    shift = shift_of(conv, x)
    x_full = x if shift is None else x + shift
    w = params["W_dec"]
    return shift, x_full, head_of(x_full, head).to(w.device, w.dtype)


def _write_back(sae: tuple, x: Tensor, shift: Tensor | None, x_full: Tensor, new: Tensor
                ) -> Tensor:
    out = put_head(x_full, new.to(x.device, x.dtype), sae[1]["hook_head_index"])
    return out if shift is None else out - shift


def apply_splice(op: tuple, x: Tensor, site: SiteOps) -> Tensor:
    _, sae, use_error_term, conv, record = op
    shift, x_full, x_sae = _sae_input(sae, x, conv, site.name)
    if record:
        sae_input, acts_pre, acts_post, recons = sae_run(sae, x_sae)
    else:  # no dense latents, as Splice skips them when nothing is cached
        recons = sae_forward(sae, x_sae)
    error = x_sae - recons
    out = recons + error if use_error_term else recons
    if record:
        values = (sae_input, acts_pre, acts_post, recons, error, out)
        for key, value in zip(SAE_HOOKS, values, strict=True):
            site.store[f"{site.name}.{key}"] = value
    return _write_back(sae, x, shift, x_full, out)


def apply_edit(op: tuple, x: Tensor, site: SiteOps) -> Tensor:
    """Ablate (value None) or clamp latents; the SAE error is kept, so only they change."""
    _, sae, features, positions, value, conv = op
    shift, x_full, x_sae = _sae_input(sae, x, conv, site.name)
    _, _, acts, stats, _ = sae_encode(sae, x_sae)
    edited = acts.clone()
    idx = (*select_positions(acts, positions), ...)
    sub = edited[idx]
    chosen = sub[..., features]
    sub[..., features] = torch.zeros_like(chosen) if value is None else torch.full_like(
        chosen, value)
    edited[idx] = sub
    delta = sae_decode(sae, edited, stats) - sae_decode(sae, acts, stats)
    return _write_back(sae, x, shift, x_full, x_sae + delta.reshape(x_sae.shape))


def apply_steer(op: tuple, x: Tensor, site: SiteOps) -> Tensor:
    _, vector, coef, positions, head = op
    return add_vector(x, vector, coef, positions, head, site.name)


def apply_cache(op: tuple, x: Tensor, site: SiteOps) -> Tensor:
    _, key, conv = op
    shift = shift_of(conv, x)
    site.store[key] = (x if shift is None else x + shift).detach()
    return x


# ---- the SAE as (params, cfg) ---------------------------------------------------------------


def _prepare(sae: tuple, x: Tensor) -> tuple[Tensor, Tensor, Any]:
    p, c = sae
    sae_input_BD = flatten_heads(x.to(p["W_enc"].dtype), c["d_in"], c["is_hook_z"],
                                 c["hook_name"])
    sae_in_BD, stats = normalize_in(c["normalize_activations"], sae_input_BD)
    if c["apply_b_dec_to_input"]:
        sae_in_BD = sae_in_BD - p["b_dec"]
    return sae_input_BD, sae_in_BD, stats


def _rank_scale(sae: tuple) -> Tensor | None:
    p, c = sae
    return p["W_dec"].norm(dim=-1) if c["rescale_acts_by_decoder_norm"] else None


def sae_encode(sae: tuple, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Any, Any]:
    """``(sae_input, acts_pre, acts_post, norm stats, TopK's sparse latents or None)``, as
    :meth:`saebridge.SAE.run` computes them (SAELens 6 semantics)."""
    p, c = sae
    sae_input_BD, sae_in_BD, stats = _prepare(sae, x)
    arch = c["architecture"]
    if arch == "gated":
        lin_BF = sae_in_BD @ p["W_enc"]
        gate_BF = ((lin_BF + p["b_gate"]) > 0).to(sae_in_BD.dtype)
        pre_BF = lin_BF.mul_(p["r_mag"].exp()).add_(p["b_mag"])
        return sae_input_BD, pre_BF, gate_BF * pre_BF.relu(), stats, None
    pre_BF = (sae_in_BD @ p["W_enc"]).add_(p["b_enc"])
    scale_F = _rank_scale(sae)
    ranked_BF = pre_BF if scale_F is None else pre_BF * scale_F
    if arch == "topk":
        post_BF, latents = topk_latents(ranked_BF, int(c["k"]))
        return sae_input_BD, pre_BF, post_BF, stats, latents
    if arch in ("jumprelu", "batchtopk"):
        return sae_input_BD, pre_BF, jumprelu(ranked_BF, p["threshold"]), stats, None
    return sae_input_BD, pre_BF, ranked_BF.relu(), stats, None


def sae_decode(sae: tuple, acts_BF: Tensor, stats: Any, latents: Any = None) -> Tensor:
    p, c = sae
    acts_BF = acts_BF.to(p["W_dec"].dtype)
    scale_F = _rank_scale(sae)
    inv_F = None if scale_F is None else 1 / scale_F
    recons_BD = try_decode(acts_BF, p["W_dec"], latents, inv_F)
    if recons_BD is None:
        recons_BD = (acts_BF if inv_F is None else acts_BF * inv_F) @ p["W_dec"]
    return normalize_out(c["normalize_activations"], recons_BD + p["b_dec"], stats)


def sae_run(sae: tuple, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    sae_input, acts_pre, acts_post, stats, latents = sae_encode(sae, x)
    recons = sae_decode(sae, acts_post, stats, latents).reshape(x.shape)
    return sae_input, acts_pre, acts_post, recons


def sae_forward(sae: tuple, x: Tensor) -> Tensor:
    """The reconstruction alone, as :meth:`saebridge.SAE.forward` computes it: the blocked
    encoder keeps only the active latents (:mod:`saebridge.sae.blocked`)."""
    p, c = sae
    sae_input_BD, sae_in_BD, stats = _prepare(sae, x)
    scale_F = _rank_scale(sae)
    latents = None if needs_grad(x) else encode_sae(
        sae_in_BD.reshape(-1, c["d_in"]), p, c["architecture"], c["k"], scale_F)
    if latents is None:
        return sae_run(sae, x)[3]
    decoded_RD = decode_sparse(latents, p["W_dec"], None if scale_F is None else 1 / scale_F)
    recons_BD = decoded_RD.add_(p["b_dec"]).reshape(sae_input_BD.shape)
    return normalize_out(c["normalize_activations"], recons_BD, stats).reshape(x.shape)
