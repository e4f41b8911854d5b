"""Names, shapes and dtypes of SAE tensors, as SAELens 6 spells them."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from saebridge.errors import DeviceError, SAEFormatError, ShapeError
from saebridge.sae.config import SAEConfig

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
OPTIONAL_PARAMETERS = ("b_enc", "threshold", "b_gate", "b_mag", "r_mag")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"`` (SAELens's spelling in cfg.json)."""
    return str(dtype).removeprefix("torch.")


def torch_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` that can hold an SAE's weights on this machine.

    Raises:
        DeviceError: not a device, a device this machine does not have (``cuda:7`` on a
            machine without it), or ``meta``, which holds shapes but no data.

    >>> torch_device("cpu")
    device(type='cpu')
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"{device!r} is not a torch device ({err}). Use e.g. 'cpu', 'cuda' "
                          "or 'cuda:1'.") from err
    if dev.type == "meta":
        raise DeviceError(
            "an SAE cannot live on the meta device: meta tensors hold shapes but no data, so "
            "it could neither run nor be saved. Load or move it to 'cpu' or a GPU.")
    backend = getattr(torch, dev.type, None) if dev.type != "cpu" else None
    if backend is not None and hasattr(backend, "is_available"):
        count = getattr(backend, "device_count", lambda: 1)() if backend.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            have = f"devices {dev.type}:0 to {dev.type}:{count - 1}" if count else \
                f"no {dev.type} device"
            raise DeviceError(f"device {str(dev)!r} is not available: this machine has {have}. "
                              "Pass an available device, e.g. device='cpu'.")
    return dev


def parameter_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor an SAE of this config holds (SAELens's state-dict keys)."""
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes: dict[str, tuple[int, ...]] = {
        "W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if cfg.architecture == "gated":
        shapes.update(b_gate=(d_sae,), b_mag=(d_sae,), r_mag=(d_sae,))
    else:
        shapes["b_enc"] = (d_sae,)
    if cfg.architecture in ("jumprelu", "batchtopk"):
        shapes["threshold"] = (d_sae,)
    return shapes


def check_state_dict(cfg: SAEConfig, shapes: dict[str, tuple[int, ...]],
                     state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise unless ``state_dict`` holds exactly the tensors of ``shapes``, shaped so."""
    missing = [name for name in shapes if name not in state_dict]
    extra = [name for name in state_dict if name not in shapes]
    if missing or extra:
        raise SAEFormatError(
            f"a {cfg.architecture} SAE holds exactly {', '.join(shapes)}; the tensors given "
            f"lack {missing or 'nothing'} and add {extra or 'nothing'}. Check that the weights "
            "belong to this config's architecture.")
    for name, shape in shapes.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise ShapeError(
                f"tensor {name!r} has shape {got}, but a {cfg.architecture} SAE with "
                f"d_in={cfg.d_in}, d_sae={cfg.d_sae} needs {shape} (SAELens orientation: "
                "W_enc [d_in, d_sae], W_dec [d_sae, d_in]). Check d_in/d_sae in the config, "
                "or transpose the weights.")
