"""Equivalence tolerances, written down once: max |Δ log-prob| allowed between backends.

fp32 backends differ only by summation order (expect ~1e-5): a fixed bound. Half
precisions round every activation, and how far that moves the log-probs grows with depth
and with the logits' spread, so no fixed bound fits every model: cross-backend
validation in bf16/fp16 compares with the precision's own error, measured on the same
model (:func:`low_precision_tolerance`). :data:`LOGPROB_ATOL`'s half-precision entries
bound one tiny model's rounding (an SAE in another dtype than the model).
"""

from __future__ import annotations

import torch

LOGPROB_ATOL: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.bfloat16: 1e-1,
    torch.float16: 2e-2,
}


def logprob_atol(dtype: torch.dtype) -> float:
    """The named tolerance for ``dtype`` (fp32's for dtypes not listed)."""
    return LOGPROB_ATOL.get(dtype, LOGPROB_ATOL[torch.float32])


PRECISION_MULTIPLE: dict[torch.dtype, float] = {
    torch.bfloat16: 3.0,
    torch.float16: 3.0,
}
"""Cross-backend validation in a low precision: max |Δ log-prob| between two backends' runs
may be this multiple of the precision's own error, measured as the reference backend's
run against its own fp32 run (see README, "Low precision"). Any two runs each within ε of
their exact result differ by at most 2ε plus the backends' fp32 difference, so a multiple
below 2 fails a backend whose rounding error is out of proportion with the reference's."""

ACTIVE_AGREEMENT: dict[torch.dtype, float] = {
    torch.bfloat16: 0.9,
    torch.float16: 0.9,
}
"""Low precision: the overlap (intersection over union) two backends' SAE latent active
sets must reach; rounding flips latents that sit near their threshold."""


def is_low_precision(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is validated relative to its fp32 run (:data:`PRECISION_MULTIPLE`)."""
    return dtype in PRECISION_MULTIPLE


def low_precision_tolerance(dtype: torch.dtype, precision_error: float) -> float:
    """The bound on max |Δ log-prob| between two backends' runs in ``dtype``, given the
    precision's own error there; never tighter than fp32's (identical computations agree).

    >>> low_precision_tolerance(torch.bfloat16, 0.1), low_precision_tolerance(torch.float16, 0.0)
    (0.30000000000000004, 0.0001)
    """
    return max(PRECISION_MULTIPLE[dtype] * precision_error, LOGPROB_ATOL[torch.float32])
