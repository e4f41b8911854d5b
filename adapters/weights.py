"""Weights of a torch model one tensor at a time, wherever accelerate put them.

A model loaded with ``device_map=`` (``"auto"``, or a dict naming GPUs, ``"cpu"`` or
``"disk"``) is *dispatched*: accelerate attaches an ``AlignDevicesHook`` to its modules.
An offloaded module's parameters sit on the ``meta`` device between forwards; the hook's
``weights_map`` holds them (a CPU state dict, or files on disk) and loads them onto the
module's ``execution_device`` for its forward. saebridge reads the few weights it needs
(the constants of its activation-space conversions, a norm's gain to undo) through that
same map, one tensor at a time, so the model is never materialised.

A model that is not dispatched keeps its weights in its modules: they are read there (a
model kept wholly on ``meta``, to run remotely, gives ``meta`` tensors back).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from saebridge.errors import DeviceError, UnsupportedArchitectureError
from saebridge.hookmap.rawstats import RawStats

Tensor = torch.Tensor


def align_hooks(module: nn.Module | None) -> list[Any]:
    """The accelerate hooks on ``module`` (a ``SequentialHook`` holds several)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _ancestors(path: str) -> Iterator[str]:
    """``path``, its parents, and ``""`` (the root)."""
    while True:
        yield path
        if not path:
            return
        path = path.rpartition(".")[0]


class WeightReader:
    """Reads a model's state-dict entries with real values (see the module docstring).

    >>> from saebridge.tiny import tiny_gpt2
    >>> reader = WeightReader(tiny_gpt2()[0])
    >>> reader.dispatched, reader["transformer.h.0.ln_1.weight"].shape
    (False, torch.Size([64]))
    """

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module] | None = None
                 ) -> None:
        self.model = model
        self.modules = dict(modules) if modules is not None else dict(model.named_modules())
        self.dispatched = any(align_hooks(m) for m in self.modules.values())
        self._keysets: dict[int, set[str]] = {}

    def keys(self) -> list[str]:
        """Every state-dict key (meta entries cost nothing)."""
        return list(self.model.state_dict(keep_vars=True))

    def placeholder(self, name: str) -> Tensor:
        """An empty ``meta`` tensor of the entry's shape and dtype (for shape arithmetic)."""
        t = self._tensor(name)
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def device(self, path: str) -> torch.device | None:
        """The device module ``path`` computes on: its (or its nearest hooked parent's)
        accelerate ``execution_device``; else that of its first parameter or buffer."""
        for p in _ancestors(path):
            for hook in align_hooks(self.modules.get(p)):
                found = getattr(hook, "execution_device", None)
                if found is not None:
                    return torch.device(found)
        module = self.modules.get(path)
        tensors = [] if module is None else [*module.parameters(), *module.buffers()]
        return next((t.device for t in tensors if not t.is_meta), None)

    def __getitem__(self, name: str) -> Tensor:
        """State-dict entry ``name``, detached, on the device its module computes on.

        Raises:
            DeviceError: the entry is on ``meta`` in a dispatched model and no accelerate
                weights map holds it, or the offload files it lives in cannot be read.
        """
        t = self._tensor(name)
        if not t.is_meta or not self.dispatched:
            return t.detach()
        found = self._holder(name)
        if found is None:
            raise DeviceError(_unreachable([name]))
        hook, key = found
        try:
            value = hook.weights_map[key]
        except OSError as err:
            raise DeviceError(
                f"weight {name!r} is offloaded to disk, but its offload file cannot be read "
                f"({err}). The offload folder was moved or deleted after the model was "
                "loaded: load the model again with an offload_folder that stays in "
                "place.") from err
        device = getattr(hook, "execution_device", None)
        return value.detach().to(torch.device(device) if device is not None else value.device,
                                 t.dtype)

    def check(self) -> None:
        """Refuse a dispatched model that has weights on ``meta`` which no accelerate
        weights map holds (its forward would fail inside accelerate).

        Raises:
            DeviceError: naming the unreachable weights.
        """
        if not self.dispatched:
            return
        missing = [n for n, t in self._entries() if t.is_meta and self._holder(n) is None]
        if missing:
            raise DeviceError(_unreachable(missing))

    def _entries(self) -> Iterator[tuple[str, Tensor]]:
        for path, module in self.modules.items():
            for attr, t in [*module._parameters.items(), *module._buffers.items()]:
                if t is not None:
                    yield (f"{path}.{attr}" if path else attr), t

    def _holder(self, name: str) -> tuple[Any, str] | None:
        """The accelerate hook whose weights map holds ``name``, and its key there."""
        for p in _ancestors(name.rpartition(".")[0]):
            for hook in align_hooks(self.modules.get(p)):
                weights = getattr(hook, "weights_map", None)
                key = name[len(p) + 1:] if p else name
                if weights is not None and self._holds(weights, key):
                    return hook, key
        return None

    def _holds(self, weights: Mapping[str, Any], key: str) -> bool:
        """Whether ``weights`` has ``key``, by its keys alone (reading would load it):
        accelerate's ``PrefixedDataset`` prepends its prefix to a key and lists the
        underlying map's full keys."""
        base, full = weights, key
        while hasattr(base, "dataset") and hasattr(base, "prefix"):
            full, base = base.prefix + full, base.dataset
        keys = self._keysets.get(id(base))
        if keys is None:
            keys = self._keysets[id(base)] = set(base)
        return full in keys

    def _tensor(self, name: str) -> Tensor:
        path, _, attr = name.rpartition(".")
        module = self.modules.get(path)
        found = None if module is None else (
            module._parameters.get(attr) if attr in module._parameters
            else module._buffers.get(attr))
        if found is None:
            raise UnsupportedArchitectureError(f"the model has no weight {name!r}.")
        return found


def _unreachable(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return (
        f"weights {shown}{more} of this dispatched model are on the meta device and no "
        "accelerate weights map holds them, so they cannot be read (its forward would fail "
        "too). The device_map left them unloaded: load the model with a device_map that "
        "covers every module (device_map='auto' does) and the checkpoint that has them.")


def lazy_raw_stats(reader: WeightReader,
                   tl_weights: Callable[[dict[str, Tensor], int], dict[str, Tensor]],
                   n_heads: int, blocks: Sequence[str], embeds: Sequence[str]) -> RawStats:
    """:class:`RawStats` whose layer ``i`` is computed, on first use, from the weights
    under module ``blocks[i]`` alone (read through ``reader``, so on the device that layer
    computes on), and the embeddings' from those under ``embeds``.

    ``tl_weights`` (a hook map's HF → TransformerLens converter) is given one block at a
    time, renamed to block 0, with every weight outside the blocks as an empty ``meta``
    tensor of its shape: the converters only reshape, so the block's own weights come
    out exact and nothing else is read.
    """
    keys = reader.keys()
    first = blocks[0] + "."
    outside = [k for k in keys if not any(k.startswith(b + ".") for b in blocks)]

    def converted(real: dict[str, Tensor], empty: list[str]) -> dict[str, Tensor]:
        return tl_weights({**{k: reader.placeholder(k) for k in empty}, **real}, n_heads)

    def layer_weights(i: int) -> dict[str, Tensor]:
        own = blocks[i] + "."
        real = {first + k[len(own):]: reader[k] for k in keys if k.startswith(own)}
        w = converted(real, outside)
        return {k.removeprefix("blocks.0."): v for k, v in w.items() if k.startswith("blocks.0.")}

    def embed_weights() -> dict[str, Tensor]:
        real = {k: reader[k] for k in outside if any(k.startswith(e + ".") for e in embeds)}
        return converted(real, [k for k in keys if k.startswith(first) or k in outside])

    return RawStats.lazy(len(blocks), layer_weights, embed_weights)


__all__ = ["WeightReader", "align_hooks", "lazy_raw_stats"]
