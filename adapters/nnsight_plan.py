"""Interventions compiled to data for the trace kernel: remote runs of the common front
(:class:`RemoteModel`), and :func:`splice`/:func:`steer` inside a user's own nnsight trace
(prepared beforehand with :func:`prepare_splice`/:func:`prepare_steer` for a remote one).

The front's interventions hold SAE modules; a remote request (and the kernel,
:mod:`saebridge.adapters.nnsight_remote`) takes data instead: an SAE as ``(params, cfg)``
(each SAE once, however many ops use it), a steering vector *copied* out of ``W_dec`` (a
row is a view, and pickling a view ships its whole storage: all of ``W_dec``), and the
space conversions as constants. Conversions that need the raw residual mean rebuilt from
other sites (an ``hf``-space SAE in a processed TransformerLens model) are refused here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from nnsight import save

from saebridge.adapters.nnsight import NNsightAdapter, Visits, _is, check_generated
from saebridge.adapters.nnsight_remote import (
    Prepared,
    SiteOps,
    apply_cache,
    apply_edit,
    apply_splice,
    apply_steer,
    forward,
    generate,
    register,
)
from saebridge.errors import (
    SAEConfigError,
    SpaceConversionError,
    UnknownHookError,
    UnsupportedArchitectureError,
)
from saebridge.hookmap import split
from saebridge.hookmap.space import CANONICAL, ActivationSpace
from saebridge.interventions import (
    Ablate,
    Clamp,
    Intervention,
    Positions,
    Splice,
    Steer,
    expand,
)
from saebridge.model import ActivationCache, Model, TokensLike
from saebridge.sae import SAE

Tensor = torch.Tensor
SAEData = tuple[dict[str, Tensor], dict[str, Any]]


def sae_data(sae: SAE) -> SAEData:
    """An SAE as the kernel takes it: its tensors and the config fields its forward reads."""
    if type(sae) is not SAE:
        raise SAEConfigError(
            f"a {type(sae).__name__} cannot run inside an nnsight trace body or remotely: the "
            "trace kernel computes the plain SAE forward only. Use model.run_with_saes on a "
            "local model for it.")
    c = sae.cfg
    params = {name: p.detach() for name, p in sae.named_parameters()}
    return params, {
        "architecture": c.architecture, "d_in": c.d_in, "k": c.k, "hook_name": c.hook_name,
        "hook_head_index": c.hook_head_index, "is_hook_z": c.is_hook_z,
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": c.normalize_activations,
        "rescale_acts_by_decoder_norm": c.rescale_acts_by_decoder_norm}


def conv_spec(adapter: NNsightAdapter, name: str, dst: ActivationSpace) -> tuple:
    """The kernel's conversion from the model's space to ``dst`` at ``name``, following
    :func:`saebridge.hookmap.convert.conversion` rule for rule."""
    kind, src = adapter.kind(name), adapter.space
    if kind in ("resid", "write"):
        if dst.center_writing_weights:
            return ("center",)
        if not src.center_writing_weights:
            return ("identity",)
        raise SpaceConversionError(
            f"converting {name!r} from {src.name!r} to {dst.name!r} needs the raw residual "
            "mean, rebuilt from every earlier attention and MLP output; an nnsight trace "
            "body here (and a remote request) does not rebuild it. Wrap an unprocessed "
            "TransformerLens model, or run it with model.run_with_saes without remote=.")
    if kind == "plain" or not (src.fold_value_biases or dst.fold_value_biases):
        return ("identity",)
    stats, layer = adapter.raw_stats(), split(name)[0]
    if kind != "v" or stats is None or layer is None:
        raise SpaceConversionError(
            f"cannot convert {name!r} (a {kind!r} site) from {src.name!r} to {dst.name!r}: "
            "the constants of the unprocessed weights are unknown. Use an SAE trained in the "
            "model's own space.")
    shift = stats.value_offset(layer, src) - stats.value_offset(layer, dst)
    if not isinstance(shift, Tensor) or shift.is_meta:
        raise SpaceConversionError(
            f"converting {name!r} to {dst.name!r} needs the value biases, but the model's "
            "weights are on the meta device. Dispatch the model, or use an SAE trained in the "
            f"model's own space ({src.name!r}).")
    return ("shift", shift.detach())


def _positions(positions: Positions) -> Any:
    if positions is None or isinstance(positions, (int, slice)):
        return positions
    return [int(p) for p in positions]


def compile_op(adapter: NNsightAdapter, op: Intervention, data: Callable[[SAE], SAEData],
               record: bool) -> tuple:
    """One front intervention as a kernel op (see :mod:`saebridge.adapters.nnsight_remote`)."""
    name = op.hook
    if type(op) is Splice:
        return (apply_splice, data(op.sae), op.use_error_term,
                conv_spec(adapter, name, op.sae.cfg.activation_space), record)
    if type(op) in (Ablate, Clamp):
        edit: Any = op
        features = [edit.features] if isinstance(edit.features, int) else list(edit.features)
        return (apply_edit, data(edit.sae), features, _positions(edit.positions),
                edit.value if type(op) is Clamp else None,
                conv_spec(adapter, name, edit.sae.cfg.activation_space))
    if type(op) is Steer:
        # A copy: a row of W_dec is a view, and pickling a view ships all of its storage.
        vector = op.vector.detach().clone(memory_format=torch.contiguous_format)
        return (apply_steer, vector, float(op.coef), _positions(op.positions), op.head_index)
    raise TypeError(
        f"{type(op).__name__} cannot run inside an nnsight trace kernel (remote runs): it is "
        "code, not data the server can run. Remote runs take Splice, Steer, Ablate and Clamp.")


def compile_ops(adapter: NNsightAdapter, ops: Sequence[Intervention], cache: Iterable[str],
                record: bool) -> tuple[Visits, dict[str, Tensor]]:
    """Visits running ``ops`` (then caching ``cache`` in the canonical space) and the dict
    their records land in."""
    if adapter.flavour == "bridge":
        raise UnsupportedArchitectureError(
            "remote runs of an nnsight model over a TransformerBridge are not supported (a "
            "bridge's hook_resid_mid needs a second site fixed up); run it locally.")
    store: dict[str, Tensor] = {}
    saes: dict[int, SAEData] = {}

    def data(sae: SAE) -> SAEData:  # each SAE ships once, however many ops use it
        if id(sae) not in saes:
            saes[id(sae)] = sae_data(sae)
        return saes[id(sae)]

    by_site: dict[str, list[tuple]] = {}
    for op in ops:
        by_site.setdefault(op.hook, []).append(compile_op(adapter, op, data, record))
    for name in cache:
        to_canonical = conv_spec(adapter, name, CANONICAL)
        by_site.setdefault(name, []).append((apply_cache, name, to_canonical))
    return adapter.visits({n: SiteOps(n, o, store) for n, o in by_site.items()}), store


# ---- remote runs of the front ------------------------------------------------------------


def remote_kwargs(adapter: NNsightAdapter) -> dict[str, Any]:
    remote = adapter.remote
    if not isinstance(remote, (bool, str)):
        return {"backend": remote}  # an nnsight Backend object
    if not _is(adapter.envoy, "nnsight.modeling.mixins.remotable.Remotable"):
        raise TypeError(
            f"remote={remote!r} needs an nnsight model with a remote identity "
            f"(TransformersModel or LanguageModel); a {type(adapter.envoy).__name__} runs "
            "only locally. Wrap it without remote=, or pass an nnsight Backend.")
    return {"remote": remote}


def run_remote(adapter: NNsightAdapter, tokens_BP: Tensor, visits: Visits,
               store: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward as a remote request: logits and the ops' records."""
    register()
    envoy = adapter.envoy
    with envoy.trace(tokens_BP, **adapter.forward_kwargs(), **remote_kwargs(adapter)) as tracer:
        logits = save(forward(tracer, envoy, visits))
        store = save(store)
    return logits, store


def generate_remote(adapter: NNsightAdapter, tokens_BP: Tensor, visits: Visits, n_new: int
                    ) -> Tensor:
    register()
    envoy = adapter.envoy
    call, kwargs = adapter.generate_call(tokens_BP, n_new)
    with envoy.trace(tokens_BP, fn=call, **kwargs, **remote_kwargs(adapter)) as tracer:
        tracked = save(generate(tracer, envoy, visits, tokens_BP, n_new))
        result = save(tracer.result)
    return check_generated(result, tracked)


class RemoteModel(Model):
    """The common front over an nnsight model whose every run is a remote request.

    Made by ``sb.wrap(model, remote=True)`` (NDIF), ``remote="local"`` (nnsight's local
    simulation of the remote path), a host URL, or an nnsight ``Backend``. Runs take
    :class:`~saebridge.Splice`, :class:`~saebridge.Steer`, :class:`~saebridge.Ablate` and
    :class:`~saebridge.Clamp` of plain SAEs, as data; results match local runs.

    >>> # model = sb.wrap(LanguageModel("openai-community/gpt2"), remote=True)
    >>> # logits = model.run_with_saes("Hello", saes=[sae])
    """

    def _run(self, tokens: TokensLike, ops: Sequence[Intervention],
             names: Iterable[str] | None = None, cache: bool = False, sparse: bool = False
             ) -> tuple[Tensor, ActivationCache]:
        adapter: Any = self._adapter
        toks = self._tokens(tokens)
        all_ops = expand([*self._attached, *ops])
        self._check_model_name(all_ops)
        cached = (self.hook_names() if names is None else list(names)) if cache else []
        with self._lock, torch.no_grad():
            self._plan(toks, all_ops, None, [])  # the engine's checks: unknown, read-only hooks
            for name in cached:
                adapter.kind(name)
            visits, store = compile_ops(adapter, all_ops, cached, record=cache)
            logits, store = run_remote(adapter, toks, visits, store)
        out = ActivationCache()
        out.sparse = sparse
        for key, value in store.items():
            out.record(key, value)
        return logits, out

    def generate(self, tokens: TokensLike, max_new_tokens: int,
                 interventions: Sequence[Intervention] = (), saes: Sequence[SAE] = (),
                 use_error_term: bool = False) -> Tensor:
        """As :meth:`saebridge.Model.generate`, as one remote request."""
        adapter: Any = self._adapter
        toks, ops = self._generation_ops(tokens, max_new_tokens, interventions, saes,
                                         use_error_term)
        with self._lock, torch.no_grad():
            self._plan(toks, ops, None, [])
            visits, _ = compile_ops(adapter, ops, [], record=False)
            if max_new_tokens == 0:
                return toks
            return generate_remote(adapter, toks, visits, max_new_tokens)


# ---- inside a user's own trace -----------------------------------------------------------


def in_trace_adapter(model: Any) -> NNsightAdapter:
    if isinstance(model, Model):
        model = getattr(model.adapter, "envoy", model)
    if not _is(model, "nnsight.intervention.envoy.Envoy"):
        raise TypeError(
            f"sb.splice/sb.steer run inside an nnsight trace of an nnsight model, got a "
            f"{type(model).__name__}. For other backends use model.run_with_saes / "
            "run_with_interventions, or read and write sites in `with sb.trace(model, tokens)`.")
    return NNsightAdapter(model)


def _prepare(adapter: NNsightAdapter, name: str, ops: list[tuple], result: str | None
             ) -> Prepared:
    if not adapter.writable(name):
        raise UnknownHookError(f"hook {name!r} can be read but not written on the "
                               f"{adapter.backend} backend. Intervene at another hook.")
    if adapter.flavour == "bridge" and split(name)[1] == "hook_resid_mid":
        raise UnknownHookError(
            f"hook {name!r} of a TransformerBridge is ln2's input, not the residual the block "
            "adds to: an edit there inside your own trace would not reach the block output. "
            "Use model.run_with_saes, or intervene at hook_resid_post.")
    store: dict[str, Tensor] = {}
    register()  # a remote trace may carry it: its code then travels by value
    return Prepared(adapter.visits(adapter.site_fns({name: SiteOps(name, ops, store)})),
                    store, result)


def prepare_splice(model: Any, sae: SAE, use_error_term: bool = False) -> Prepared:
    """``sae`` spliced in at its hook, as data: call the result with the model inside its
    trace (locally or remotely); it returns the latents."""
    adapter = in_trace_adapter(model)
    name = sae.cfg.hook_name
    op = (apply_splice, sae_data(sae), use_error_term,
          conv_spec(adapter, name, sae.cfg.activation_space), True)
    return _prepare(adapter, name, [op], f"{name}.hook_sae_acts_post")


def prepare_steer(model: Any, hook: str, vector: Tensor, coef: float = 1.0,
                  positions: Positions = None) -> Prepared:
    """``coef * vector`` added at ``hook``, as data (one copied vector); call the result
    with the model inside its trace."""
    adapter = in_trace_adapter(model)
    vector = vector.detach().clone(memory_format=torch.contiguous_format)
    return _prepare(adapter, hook, [(apply_steer, vector, float(coef), _positions(positions),
                                     None)], None)


def _envoy(model: Any) -> Any:
    return getattr(model.adapter, "envoy", model) if isinstance(model, Model) else model


def splice(model: Any, sae: SAE, use_error_term: bool = False) -> Tensor:
    """Splice ``sae`` in at its hook from inside an nnsight trace; its latents."""
    return prepare_splice(model, sae, use_error_term)(_envoy(model))


def steer(model: Any, hook: str, vector: Tensor, coef: float = 1.0,
          positions: Positions = None) -> None:
    """Add ``coef * vector`` at ``hook`` (at ``positions``) from inside an nnsight trace."""
    prepare_steer(model, hook, vector, coef, positions)(_envoy(model))
