"""The cache a run returns, with TransformerLens's ``ActivationCache`` API.

Keys are canonical (TransformerLens) hook names and values are in the canonical space
(TransformerLens-processed) on every backend, so TransformerLens's helpers give its numbers
here too: ``cache["resid_pre", 0]`` (:func:`get_act_name`'s shorthand),
:meth:`~ActivationCache.accumulated_resid`, :meth:`~ActivationCache.decompose_resid`,
:meth:`~ActivationCache.stack_head_results`, :meth:`~ActivationCache.apply_ln_to_stack`,
:meth:`~ActivationCache.logit_attrs`. The helpers that need the model's weights or sizes
read them from :attr:`ActivationCache.model`, the :class:`saebridge.Model` that filled the
cache (its ``cfg`` and its weights in the canonical space). A LayerNorm scale that was not
cached (``ln*.hook_scale``) is recomputed from the residual stream the norm reads, as the
norm computes it.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from saebridge.errors import ShapeError, UnknownHookError, unknown

Tensor = torch.Tensor

_LAYER_TYPES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q",
            "value": "v", "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_ATTN = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_MLP = ("pre", "post", "mid", "pre_linear")


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None
                 ) -> str:
    """A full hook name from TransformerLens's shorthand (``utils.get_act_name``'s rules).

    >>> get_act_name("resid_pre", 0), get_act_name("k6"), get_act_name("scale4ln1")
    ('blocks.0.hook_resid_pre', 'blocks.6.attn.hook_k', 'blocks.4.ln1.hook_scale')
    >>> get_act_name("normalized"), get_act_name("blocks.1.hook_mlp_out")
    ('ln_final.hook_normalized', 'blocks.1.hook_mlp_out')
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)  # type: ignore[assignment]
    name = _ALIASES.get(name, name)
    full = "" if layer is None else f"blocks.{layer}."
    if name in _ATTN:
        layer_type = "attn"
    elif name in _MLP:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPES:
        layer_type = _LAYER_TYPES[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


def _slice(spec: Any, t: Tensor, dim: int) -> Tensor:
    """TransformerLens's ``Slice`` semantics: None keeps ``t``, an int indexes (dropping
    the dimension), a tuple is ``slice(*spec)``, a list or tensor gathers those indices."""
    spec = getattr(spec, "slice", spec)  # a transformer_lens.utils.Slice
    if spec is None:
        return t
    if isinstance(spec, tuple):
        spec = slice(*spec)
    elif not isinstance(spec, (int, slice)):
        spec = torch.as_tensor(spec, device=t.device)
    index: list[Any] = [slice(None)] * t.dim()
    index[dim] = spec
    return t[tuple(index)]


class ActivationCache(dict[str, Tensor]):
    """Cache keyed by canonical hook names; an unknown key lists the nearest ones.

    A ``dict`` with TransformerLens's ``ActivationCache`` methods.

    >>> import saebridge as sb
    >>> from saebridge.tiny import tiny_gpt2
    >>> hf_model, tokenizer = tiny_gpt2()  # 2 layers, d_model 64, random weights
    >>> model = sb.wrap(hf_model, tokenizer=tokenizer)
    >>> _, cache = model.run_with_cache("Hello world")
    >>> torch.equal(cache["resid_pre", 1], cache["blocks.1.hook_resid_pre"])
    True
    >>> cache.accumulated_resid(apply_ln=True).shape  # n_layers + 1 streams
    torch.Size([3, 1, 6, 64])
    """

    sparse: bool = False
    """SAE latents (``hook_sae_acts_post``) stored as sparse COO tensors, and the dense
    ``hook_sae_acts_pre`` left out (see :meth:`Model.run_with_cache_with_saes`)."""
    model: Any = None
    """The :class:`saebridge.Model` whose run filled the cache: the helpers read its
    ``cfg`` and canonical weights (``W_O``, ``W_U``)."""
    has_batch_dim: bool = True

    def record(self, key: str, value: Tensor) -> None:
        """Store one entry, as :attr:`sparse` asks."""
        if self.sparse and key.endswith(".hook_sae_acts_pre"):
            return
        self[key] = value.to_sparse() if self.sparse and key.endswith(
            ".hook_sae_acts_post") and not value.is_sparse else value

    @property
    def mode(self) -> str:
        """The record mode an SAE splice uses for this cache (kernel ``ops.MODES``)."""
        return "sparse" if self.sparse else "dense"

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.keys())}"

    def __missing__(self, key: Any) -> Tensor:
        full = self._full_name(key)
        if full != key and dict.__contains__(self, full):
            return dict.__getitem__(self, full)
        if self.sparse and full.endswith(".hook_sae_acts_pre"):
            raise UnknownHookError(
                f"cache key {full!r} is not kept by run_with_cache_with_saes(sparse=True): SAE "
                "pre-activations are dense, d_sae wide per token. Run with sparse=False to "
                "cache them.")
        raise UnknownHookError(unknown(
            "cache key", full, self.keys(),
            "Ask for the hook in names=... when running; model.hook_names() lists what this "
            "backend runs, and `saebridge hooks MODEL` why a hook is not produced."))

    def _full_name(self, key: Any) -> str:
        """``key`` as a hook name: a name, shorthand, or ``(name, layer[, layer_type])``
        with a negative layer counted from the end."""
        if isinstance(key, str):
            return get_act_name(key)
        if isinstance(key, tuple) and key and isinstance(key[0], str):
            name, layer, *rest = (*key, None) if len(key) == 1 else key
            if isinstance(layer, int) and layer < 0:
                layer += self.cfg.n_layers
            return get_act_name(name, layer, *rest[:1])
        raise UnknownHookError(f"cache key {key!r} is neither a hook name nor a "
                               "(name, layer[, layer_type]) tuple such as ('resid_pre', 0).")

    # ---- the model behind the cache ---------------------------------------------------------

    @property
    def cfg(self) -> Any:
        if self.model is None:
            raise UnknownHookError(
                "this ActivationCache records no model (it was built by hand), so its "
                "TransformerLens helpers cannot read the model's sizes or weights. Use a cache "
                "returned by model.run_with_cache, or set cache.model = model.")
        return self.model.cfg

    def _layer(self, layer: int | None) -> int:
        return self.cfg.n_layers if layer is None or layer == -1 else int(layer)

    def to(self, device: str | torch.device) -> ActivationCache:
        """Move every entry to ``device`` (in place, as TransformerLens does)."""
        for key, value in self.items():
            self[key] = value.to(device)
        return self

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch dimension of a batch of one (in place; returns the cache)."""
        if not self.has_batch_dim:
            return self
        sizes = {v.shape[0] for v in self.values() if v.dim() > 0}
        if sizes - {1}:
            raise ShapeError(f"cannot remove the batch dimension of a cache with batch sizes "
                             f"{sorted(sizes)}: only a batch of one has none to lose. Run "
                             "one prompt, or index the batch yourself.")
        for key, value in self.items():
            if value.dim() > 0:
                self[key] = value[0]
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> ActivationCache:
        """A new cache with ``batch_slice`` (TransformerLens ``Slice`` input) applied."""
        out = ActivationCache({k: _slice(batch_slice, v, 0) for k, v in self.items()})
        spec = getattr(batch_slice, "slice", batch_slice)
        out.model, out.sparse = self.model, self.sparse
        out.has_batch_dim = self.has_batch_dim and not isinstance(spec, int)
        return out

    # ---- stacks of the residual stream ------------------------------------------------------

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False,
                          apply_ln: bool = False, pos_slice: Any = None,
                          mlp_input: bool = False, return_labels: bool = False) -> Any:
        """The residual stream before each layer up to ``layer`` (default: every layer and
        the final ``resid_post``), stacked: the logit lens's input. As TransformerLens's."""
        layer = self._layer(layer)
        n_layers = self.cfg.n_layers
        parts, labels = [], []
        for i in range(layer + 1):
            if i == n_layers:
                parts.append(self["resid_post", n_layers - 1])
                labels.append("final_post")
                continue
            parts.append(self["resid_pre", i])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append(self["resid_mid", i])
                labels.append(f"{i}_mid")
        stack = torch.stack([_slice(pos_slice, p, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice,
                                           has_batch_dim=self.has_batch_dim,
                                           recompute_ln=layer == n_layers)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False,
                        mode: str = "all", apply_ln: bool = False, pos_slice: Any = None,
                        incl_embeds: bool = True, return_labels: bool = False) -> Any:
        """What each earlier component wrote into the residual stream before ``layer``
        (embeddings, then each ``attn_out`` and ``mlp_out``), stacked. As TransformerLens's."""
        layer = self._layer(layer)
        attn, mlp = mode != "mlp", mode != "attn" and not getattr(self.cfg, "attn_only", False)
        parts, labels = [], []
        if incl_embeds:
            for key, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
                if key in self:
                    parts.append(self[key])
                    labels.append(label)
        for i in range(layer):
            for on, name in ((attn, "attn_out"), (mlp, "mlp_out")):
                if on:
                    parts.append(self[name, i])
                    labels.append(f"{i}_{name}")
        if mlp_input and attn:
            parts.append(self["attn_out", layer])
            labels.append(f"{layer}_attn_out")
        stack = torch.stack([_slice(pos_slice, p, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_activation(self, activation_name: str, layer: int = -1,
                         sublayer_type: str | None = None) -> Tensor:
        """``activation_name`` of every layer before ``layer`` (default: all), stacked."""
        return torch.stack([self[activation_name, i, sublayer_type]
                            for i in range(self._layer(layer))])

    def compute_head_results(self) -> None:
        """Add ``blocks.L.attn.hook_result`` (each head's write into the residual stream,
        ``[batch, pos, head, d_model]``, without ``b_O``) from ``hook_z`` and the canonical
        ``W_O``, as TransformerLens does; kept where already cached per head."""
        for i in range(self.cfg.n_layers):
            key = f"blocks.{i}.attn.hook_result"
            if key in self and self[key].dim() >= 4 - (not self.has_batch_dim):
                continue
            z = self["z", i, "attn"]
            W_O = self.model.W_O[i].to(z.device, z.dtype)
            self[key] = (z.unsqueeze(-1) * W_O).sum(-2)

    def stack_head_results(self, layer: int = -1, return_labels: bool = False,
                           incl_remainder: bool = False, pos_slice: Any = None,
                           apply_ln: bool = False) -> Any:
        """Every head's write into the residual stream before ``layer``, stacked
        ``[layer * head, ..., d_model]`` (labels ``L0H0`` …). As TransformerLens's."""
        layer = self._layer(layer)
        self.compute_head_results()
        parts, labels = [], []
        for i in range(layer):
            parts.append(_slice(pos_slice, self["result", i, "attn"], -3))
            labels += [f"L{i}H{h}" for h in range(self.cfg.n_heads)]
        if parts:
            stack = torch.cat(parts, dim=-2).movedim(-2, 0)
            if incl_remainder:
                rest = _slice(pos_slice, self["resid_post", layer - 1], -2) - stack.sum(0)
                stack = torch.cat([stack, rest[None]])
                labels.append("remainder")
        elif incl_remainder:
            stack = _slice(pos_slice, self["resid_post", layer - 1], -2)[None]
            labels.append("remainder")
        else:
            embed = _slice(pos_slice, self["hook_embed"], -2)
            stack = embed.new_zeros(0, *embed.shape)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # ---- LayerNorm and logits ---------------------------------------------------------------

    def ln_scale(self, layer: int | None = None, mlp_input: bool = False) -> Tensor:
        """The scale ``[..., pos, 1]`` of the norm before ``layer`` (``ln_final`` for
        ``n_layers``/None; ``ln2`` with ``mlp_input``): the cached ``hook_scale``, else
        recomputed from the residual stream that norm reads."""
        layer = self._layer(layer)
        n_layers = self.cfg.n_layers
        key = "ln_final.hook_scale" if layer == n_layers else \
            f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        if key in self:
            return self[key]
        if layer == n_layers:
            resid = self["resid_post", n_layers - 1]
        else:
            resid = self["resid_mid" if mlp_input else "resid_pre", layer]
        if self.cfg.normalization_type in ("LN", "LNPre"):
            resid = resid - resid.mean(-1, keepdim=True)
        return (resid.pow(2).mean(-1, keepdim=True) + self.cfg.eps).sqrt()

    def apply_ln_to_stack(self, residual_stack: Tensor, layer: int | None = None,
                          mlp_input: bool = False, pos_slice: Any = None,
                          batch_slice: Any = None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> Tensor:
        """Scale a stack of residual-stream parts as the norm before ``layer`` scales the
        whole stream (its cached scale), or, with ``recompute_ln`` at the final layer,
        normalise each part on its own. As TransformerLens's on a processed model."""
        norm = self.cfg.normalization_type
        if norm not in ("LN", "LNPre", "RMS", "RMSPre"):
            return residual_stack
        layer = self._layer(layer)
        if has_batch_dim:
            residual_stack = _slice(batch_slice, residual_stack, 1)
        if norm in ("LN", "LNPre"):
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        if recompute_ln and layer == self.cfg.n_layers:
            return residual_stack / (residual_stack.pow(2).mean(-1, keepdim=True)
                                     + self.cfg.eps).sqrt()
        scale = _slice(pos_slice, self.ln_scale(layer, mlp_input), -2)
        if self.has_batch_dim:
            scale = _slice(batch_slice, scale, 0)
        return residual_stack / scale

    def logit_attrs(self, residual_stack: Tensor, tokens: Any, incorrect_tokens: Any = None,
                    pos_slice: Any = None, batch_slice: Any = None,
                    has_batch_dim: bool = True) -> Tensor:
        """How much each part of ``residual_stack`` adds to the logit of ``tokens`` (minus
        that of ``incorrect_tokens``), through the final norm's scale and ``W_U``."""
        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self.model.tokens_to_residual_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise ShapeError(
                    f"tokens and incorrect_tokens must have the same shape, got "
                    f"{tuple(directions.shape[:-1])} and {tuple(wrong.shape[:-1])}. Pass one "
                    "incorrect token per correct one.")
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice,
                                        batch_slice=batch_slice, has_batch_dim=has_batch_dim)
        return (scaled * directions).sum(-1)
