"""Helpers for testing code that uses saebridge, and for saebridge's own tests.

>>> # out = {}; model.run_with_interventions(tokens, [Record("blocks.0.hook_resid_pre", out)])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saebridge.hookmap.space import ActivationSpace
from saebridge.interventions import SiteContext
from saebridge.model import underlying

Tensor = torch.Tensor


class Record:
    """A read-only intervention: stores the activation at ``hook`` in ``out[hook]``.

    The native value by default; with ``space``, the value converted to that space.
    """

    writes = False

    def __init__(self, hook: str, out: dict[str, Tensor],
                 space: ActivationSpace | None = None) -> None:
        self.hook, self.out, self.space = hook, out, space

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        self.out[self.hook] = x if self.space is None else ctx.convert(self.space, x).forward(x)
        return x


class RaiseAt:
    """An intervention that raises ``error`` at ``hook``: user code failing mid-forward."""

    writes = True

    def __init__(self, hook: str, error: Exception | None = None) -> None:
        self.hook = hook
        self.error = error if error is not None else RuntimeError(f"raised at {hook}")

    def apply(self, x: Tensor, ctx: SiteContext) -> Tensor:
        raise self.error


def hooks_left(model: Any) -> int:
    """How many forward hooks are registered anywhere in ``model`` — a wrapped
    :class:`~saebridge.Model` or a torch module: torch hooks on every submodule, and
    TransformerLens hook-point hooks. saebridge leaves the count as it found it after any
    run, also one that raised (zero on HF and HookedTransformer; a TransformerBridge wires
    permanent capture hooks of its own on its first forward)."""
    module = torch_module(model)
    count = 0
    for sub in module.modules():
        count += len(sub._forward_hooks) + len(sub._forward_pre_hooks)
        count += len(getattr(sub, "fwd_hooks", ()))
    return count


def torch_module(obj: Any) -> torch.nn.Module:
    """The torch module under a wrapped model (or ``obj`` itself when it is one)."""
    adapter = getattr(obj, "adapter", None)
    return obj if adapter is None else underlying(adapter)


def assert_round_trip(sae: Any, folder: str | Path) -> None:
    """Saving ``sae`` (as SAELens) and loading it back loses nothing: same class, config and
    bitwise-equal tensors."""
    from saebridge.sae import SAE

    sae.save(folder)
    back = SAE.load(folder)
    assert type(back) is type(sae), (type(back), type(sae))
    assert back.cfg == sae.cfg, (back.cfg, sae.cfg)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
