"""Equivalence tolerances, written down once: max |Δ log-prob| allowed between backends.

fp32 backends differ only by summation order (expect ~1e-5); half precisions round every
activation, so their bounds are set by the format's epsilon times the depth of the model.
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
