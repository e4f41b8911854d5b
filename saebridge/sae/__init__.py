"""SAE math: one ``nn.Module`` for every architecture, plus its config.

>>> from saebridge.sae import SAE
>>> SAE.random("standard", 4, 8, "blocks.0.hook_resid_pre").cfg.architecture
'standard'
"""

from __future__ import annotations

from saebridge.kernel.activations import SAEActivations
from saebridge.sae.config import ARCHITECTURES, NORMALIZATIONS, SAEConfig
from saebridge.sae.model import SAE
from saebridge.sae.params import parameter_shapes

__all__ = ["ARCHITECTURES", "NORMALIZATIONS", "SAE", "SAEActivations", "SAEConfig",
           "parameter_shapes"]
