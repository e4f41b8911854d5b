"""Interventions compiled to data: what runs at a site inside an nnsight trace, here or on
a server without saebridge.

Each step is a named record of plain data (an SAE as :class:`~saebridge.kernel.sae.SAEData`,
a :class:`~saebridge.kernel.spaces.Conv`, a copied vector) with a ``run(x, site)`` method
that calls :mod:`saebridge.kernel.ops`. :class:`SiteSteps` runs one site's steps in order
and puts their records into ``site.store`` (one dict per run, saved by the caller). The
interventions build their steps (``Splice.step`` …, :mod:`saebridge.interventions`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from saebridge.kernel.indexing import Positions, add_vector
from saebridge.kernel.ops import edit_latents, splice, transcoder_read, transcoder_write
from saebridge.kernel.sae import SAEData
from saebridge.kernel.spaces import Conv, back, forward, resolve, track

Tensor = torch.Tensor


def _keep(site: Any, sae: SAEData, records: dict[str, Tensor]) -> None:
    for key, value in records.items():
        site.store[f"{sae.spec.hook_name}.{key}"] = value


class SpliceStep(NamedTuple):
    """:func:`saebridge.kernel.ops.splice`, recording as ``mode`` says."""

    sae: SAEData
    use_error_term: bool
    conv: Conv
    mode: str
    bypass: Tensor | None = None

    def run(self, x: Tensor, site: Any) -> Tensor:
        new, records = splice(self.sae, x, self.conv, self.use_error_term, self.mode,
                              site.name, bypass=self.bypass)
        _keep(site, self.sae, records)
        return new


class EditStep(NamedTuple):
    """:func:`saebridge.kernel.ops.edit_latents`: ablate (``value`` None) or clamp."""

    sae: SAEData
    features: list[int]
    positions: Positions
    value: float | None
    conv: Conv

    def run(self, x: Tensor, site: Any) -> Tensor:
        return edit_latents(self.sae, x, self.conv, self.features, self.positions,
                                self.value, site.name)


class SteerStep(NamedTuple):
    """``coef * vector`` added at ``positions`` (of head ``head``); with ``center``, the
    result written back mean-free (a LayerNorm output whose folded readers drop the mean)."""

    vector: Tensor
    coef: float
    positions: Positions
    head: int | None
    center: bool = False

    def run(self, x: Tensor, site: Any) -> Tensor:
        new = add_vector(x, self.vector, self.coef, self.positions, self.head, site.name)
        return back(Conv(center_writes=True), new, None) if self.center else new


class CacheStep(NamedTuple):
    """The activation, converted by ``conv`` (to the canonical space), stored as ``key``."""

    key: str
    conv: Conv

    def run(self, x: Tensor, site: Any) -> Tensor:
        site.store[self.key] = forward(self.conv, x).detach()
        return x


class ReadStep(NamedTuple):
    """A transcoder's input site: its prediction waits in ``site.store[slot]``."""

    sae: SAEData
    conv: Conv
    gain_bias: tuple[Tensor, Tensor] | None
    mode: str
    slot: str

    def run(self, x: Tensor, site: Any) -> Tensor:
        prediction, records = transcoder_read(self.sae, x, self.conv, self.gain_bias,
                                                  self.mode, site.name)
        _keep(site, self.sae, records)
        site.store[self.slot] = prediction
        return x


class WriteStep(NamedTuple):
    """A transcoder's output site, replaced by the prediction its :class:`ReadStep` made."""

    sae: SAEData
    conv: Conv
    use_error_term: bool
    mode: str
    slot: str
    bypass: Tensor | None = None

    def run(self, x: Tensor, site: Any) -> Tensor:
        new, records = transcoder_write(self.sae, x, self.conv, site.store.pop(
            self.slot, None), self.use_error_term, site.name, self.bypass)
        if self.mode != "none":
            _keep(site, self.sae, records)
        return new


class SiteSteps:
    """The steps at one site, run in order; records go to ``store`` (saved by the caller).

    ``state`` is shared by the sites of a run: the sums under ``keys`` of what this site's
    edits wrote into the residual stream (see :func:`saebridge.kernel.spaces.track`), which
    a centring conversion with ``acc`` adds back. The first site of a forward (``reset``)
    clears it, so each forward of a generation starts afresh.
    """

    def __init__(self, name: str, steps: list, store: dict, state: dict | None = None,
                 keys: tuple[str, ...] = (), reset: bool = False) -> None:
        self.name, self.steps, self.store = name, steps, store
        self.state = {} if state is None else state
        self.keys, self.reset = keys, reset

    def __call__(self, x: Tensor) -> Tensor:
        if self.reset:
            self.state.clear()
        for step in self.steps:
            conv = getattr(step, "conv", None)
            if conv is not None and conv.acc is not None:
                step = step._replace(conv=resolve(conv, x, self.state))
            new = step.run(x, self)
            if self.keys:
                track(self.state, self.keys, x, new)
            x = new
        return x
