"""Helpers for testing code that uses saebridge, and for saebridge's own tests.

>>> # out = {}; model.run_with_interventions(tokens, [Record("blocks.0.hook_resid_pre", out)])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saebridge.engine import underlying
from saebridge.hookmap.space import ActivationSpace
from saebridge.interventions import SiteContext
from saebridge.kernel.spaces import forward

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
        self.out[self.hook] = x if self.space is None else forward(ctx.convert(self.space, x), x)
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


def sparse_random_sae(architecture: str, d_in: int, d_sae: int, hook_name: str, *, l0: int,
                      inputs: Tensor | None = None, seed: int = 0,
                      dtype: torch.dtype = torch.float64, **cfg_overrides: Any) -> Any:
    """:meth:`SAE.random <saebridge.SAE.random>` with its biases or thresholds set so that
    about ``l0`` latents fire per row of ``inputs`` (default: 256 standard-normal rows), as
    in a trained SAE; a random one fires half of them. TopK SAEs get ``k = l0``.

    >>> sae = sparse_random_sae("jumprelu", 16, 2048, "blocks.0.hook_resid_pre", l0=12)
    >>> x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> 6 < float((sae.encode(x) != 0).sum(-1).float().mean()) < 24
    True
    """
    from saebridge.sae import SAE

    k = l0 if architecture == "topk" else None
    sae: Any = SAE.random(architecture, d_in, d_sae, hook_name, k=k, seed=seed,
                          **cfg_overrides).to(dtype)
    if inputs is None:
        inputs = torch.randn(256, d_in, generator=torch.Generator().manual_seed(seed),
                             dtype=dtype)
    with torch.no_grad():
        pre = ((inputs.to(dtype).reshape(-1, d_in) - sae.b_dec) @ sae.W_enc).flatten()
        cut = pre.kthvalue(max(1, pre.numel() - l0 * (pre.numel() // d_sae))).values
        if architecture == "gated":
            sae.b_gate.copy_(-cut)
        elif architecture in ("jumprelu", "batchtopk"):
            sae.b_enc.zero_()
            sae.threshold.copy_(cut.expand(d_sae))
        elif architecture == "standard":
            sae.b_enc.copy_(-cut)
    return sae
