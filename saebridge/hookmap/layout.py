"""The named layouts hook maps refer to (the reshapes themselves: :mod:`saebridge.kernel.layout`).

>>> LAYOUTS["qkv-interleaved:2"]
Layout(part=2, heads=True, interleaved=True, unnorm=None)
"""

from __future__ import annotations

from saebridge.kernel.layout import Layout

LAYOUTS: dict[str, Layout] = {
    "flat": Layout(),
    "heads": Layout(heads=True),
    "unaffine": Layout(unnorm="affine"),
    "unscale": Layout(unnorm="scale"),
    "unscale+1": Layout(unnorm="scale+1"),
    **{f"qkv:{i}": Layout(part=i, heads=True) for i in range(3)},
    **{f"qkv-interleaved:{i}": Layout(part=i, heads=True, interleaved=True) for i in range(3)},
}

__all__ = ["LAYOUTS", "Layout"]
