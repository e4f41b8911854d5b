"""Runs of nnsight models as data: remote runs of the common front (:class:`RemoteModel`),
and :func:`steer` inside a user's own nnsight trace (prepared beforehand with
:func:`prepare_splice`/:func:`prepare_steer` for a remote one; ``sb.splice`` is
:mod:`.nnsight_latents`).

The engine compiles interventions to kernel steps
(:func:`saebridge.engine.compile_steps`): an SAE as its tensors and spec (each SAE once,
however many steps use it), a steering vector *copied* out of ``W_dec`` (a row is a view,
and pickling a view ships its whole storage), the space conversions as constants. This
module maps those steps onto the model's locations (:mod:`.nnsight_remote`) and sends
them. Conversions that need the raw residual mean rebuilt from other sites (an
``hf``-space SAE in a processed TransformerLens model) are refused, and so are hooks whose
edits need the backend's own code (a TransformerBridge's hook conversions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from nnsight import save

from saebridge.adapters.nnsight import NNsightAdapter, check_generated, is_a
from saebridge.adapters.nnsight_remote import Prepared, Visit, forward, generate, register
from saebridge.engine import ActivationCache, Compiled, compile_steps
from saebridge.errors import ArgumentTypeError, UnknownHookError, UnsupportedArchitectureError
from saebridge.interventions import Intervention, Positions, Splice, Steer
from saebridge.model import Model
from saebridge.sae.model import SAE
from saebridge.transcoders import expand

Tensor = torch.Tensor


def visits_of(adapter: NNsightAdapter, compiled: Compiled, where: str, remote: bool = True
              ) -> list[Visit]:
    """The compiled steps at the model's locations; refuses hooks that need the backend's
    own code (``where`` says for what, in the message): its own runs' arrangements
    always, its reshape objects when the run may leave this machine."""
    for name in compiled.sites:
        loc = adapter.locate(name)
        if loc.companion is not None:
            raise UnknownHookError(
                f"hook {name!r} of a {adapter.backend} model is not the value the model goes "
                f"on with (a TransformerBridge's hook_resid_mid is ln2's input, not the "
                f"residual the block adds to: an edit must also reach {loc.companion!r}), "
                f"which {where} cannot arrange. Use model.run_with_saes, or intervene at "
                "hook_resid_post.")
        if remote and loc.convert is not None:
            raise UnsupportedArchitectureError(
                f"hook {name!r} of a {adapter.backend} model converts its value with the "
                f"backend's own code, which {where} cannot carry; run it locally.")
    return adapter.visits(compiled.sites)


# ---- remote runs of the front ------------------------------------------------------------


def remote_kwargs(adapter: NNsightAdapter) -> dict[str, Any]:
    remote = adapter.remote
    if not isinstance(remote, (bool, str)):
        return {"backend": remote}  # an nnsight Backend object
    if not is_a(adapter.envoy, "nnsight.modeling.mixins.remotable.Remotable"):
        raise ArgumentTypeError(
            f"remote={remote!r} needs an nnsight model with a remote identity "
            f"(TransformersModel or LanguageModel); a {type(adapter.envoy).__name__} runs "
            "only locally. Wrap it without remote=, or pass an nnsight Backend.")
    return {"remote": remote}


def run_remote(adapter: NNsightAdapter, tokens_BP: Tensor, visits: list[Visit],
               store: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward as a remote request: logits and the steps' records."""
    register()
    envoy = adapter.envoy
    with envoy.trace(tokens_BP, **adapter.inner.call_kwargs, **remote_kwargs(adapter)
                     ) as tracer:
        logits = save(forward(tracer, envoy, visits))
        store = save(store)
    return logits, store


def generate_remote(adapter: NNsightAdapter, tokens_BP: Tensor, visits: list[Visit],
                    n_new: int) -> Tensor:
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
    :class:`~saebridge.Splice` (SAEs, transcoders, block-diagonal SAEs),
    :class:`~saebridge.Steer`, :class:`~saebridge.Ablate` and :class:`~saebridge.Clamp`,
    compiled to data by the engine; results match local runs. See ``docs/remote.md``.
    """

    def _execute(self, tokens_BP: Tensor, ops: list[Intervention],
                 cache: ActivationCache | None, names: list[str], stop: Any = None
                 ) -> Tensor:
        # stop: None here (saebridge.stop refuses stop_at_layer and stops nothing remotely)
        adapter: Any = self._adapter
        compiled = compile_steps(adapter, ops, names, record=cache is not None,
                                 tokens=tokens_BP)
        logits, store = run_remote(adapter, tokens_BP, visits_of(adapter, compiled,
                                                                 "a remote request"),
                                   compiled.store)
        if cache is not None:
            for key, value in store.items():
                cache.record(key, value)
        return logits

    def _generate(self, tokens: Any, max_new_tokens: int,
                 interventions: Sequence[Intervention] = (), saes: Sequence[SAE] = (),
                 use_error_term: bool = False) -> Tensor:
        """As :meth:`saebridge.Model.generate`, as one remote request."""
        adapter: Any = self._adapter
        toks, ops = self._generation_ops(tokens, max_new_tokens, interventions, saes,
                                         use_error_term)
        with self.lock, torch.no_grad():
            visits = visits_of(adapter, compile_steps(adapter, ops), "a remote request")
            if max_new_tokens == 0:
                return toks
            return generate_remote(adapter, toks, visits, max_new_tokens)


def adapter_for(obj: Any, **kwargs: Any) -> NNsightAdapter:
    """The registry's entry point: an adapter for an nnsight envoy; with ``remote=`` its
    front is :class:`RemoteModel`, so every run is a remote request."""
    adapter = NNsightAdapter(obj, **kwargs)
    if adapter.remote is not False:
        adapter.front = RemoteModel  # type: ignore[attr-defined]  # read by saebridge.wrap
    return adapter


# ---- inside a user's own trace -----------------------------------------------------------


def in_trace_adapter(model: Any) -> NNsightAdapter:
    if isinstance(model, Model):
        model = getattr(model.adapter, "envoy", model)
    if not is_a(model, "nnsight.intervention.envoy.Envoy"):
        raise ArgumentTypeError(
            f"sb.splice/sb.steer run inside an nnsight trace of an nnsight model, got a "
            f"{type(model).__name__}. For other backends use model.run_with_saes / "
            "run_with_interventions, or read and write sites in `with sb.trace(model, tokens)`.")
    return NNsightAdapter(model)


def _prepare(adapter: NNsightAdapter, ops: list[Intervention], result: str | None
             ) -> Prepared:
    compiled = compile_steps(adapter, ops, record=result is not None)
    register()  # a remote trace may carry it: its code then travels by value
    # A prepared trace body may run remotely, but a TransformerBridge (whose hook points
    # carry conversion objects) has no remote identity: only local traces reach it.
    return Prepared(visits_of(adapter, compiled, "your own nnsight trace", remote=False),
                    compiled.store, result)


def prepare_splice(model: Any, sae: SAE, use_error_term: bool = False) -> Prepared:
    """``sae`` spliced in at its hook (a transcoder: read at its input, written at its
    output), as data: call the result with the model inside its trace (locally or
    remotely); it returns the latents."""
    adapter = in_trace_adapter(model)
    splice = Splice(sae, use_error_term)  # a SAELens/dictionary_learning/sparsify object too
    return _prepare(adapter, expand([splice]), f"{splice.hook}.hook_sae_acts_post")


def prepare(model: Any, interventions: list[Intervention]) -> Prepared:
    """``interventions`` compiled together, as data: calling the result inside the model's
    trace applies them and returns their records (``{hook}.hook_sae_acts_post`` …). Edits
    compiled together see each other as a run does (a splice downstream of a steer sees
    the mean the steer wrote); separately prepared ones each see only their own."""
    return _prepare(in_trace_adapter(model), expand(list(interventions)), "*")


def prepare_steer(model: Any, hook: str, vector: Tensor, coef: float = 1.0,
                  positions: Positions = None) -> Prepared:
    """``coef * vector`` added at ``hook``, as data (one copied vector); call the result
    with the model inside its trace."""
    return _prepare(in_trace_adapter(model), [Steer(hook, vector, coef, positions)], None)


def envoy_of(model: Any) -> Any:
    """The nnsight envoy behind ``model`` (a wrapped nnsight model, or the envoy itself)."""
    return getattr(model.adapter, "envoy", model) if isinstance(model, Model) else model


def steer(model: Any, hook: str, vector: Tensor, coef: float = 1.0,
          positions: Positions = None) -> None:
    """Add ``coef * vector`` at ``hook`` (at ``positions``) from inside an nnsight trace."""
    prepare_steer(model, hook, vector, coef, positions)(envoy_of(model))
