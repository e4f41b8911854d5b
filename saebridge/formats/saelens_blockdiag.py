"""SAELens folders holding a block-diagonal per-head ``hook_z`` SAE, compacted on load.

The folder is an ordinary SAELens one (dense ``W_enc [d_in, d_sae]``, ``W_dec [d_sae,
d_in]``, so SAELens itself loads it), for an SAE over all heads of ``attn.hook_z`` whose
weights are exactly zero outside one diagonal block per head. Loading finds the blocks
(``metadata.block_diagonal_heads`` when present, else the finest exact split of the weights)
and returns a :class:`~saebridge.sae.blockdiag.BlockDiagSAE`; saving writes the dense
matrices back, zeros included, and records the number of heads, so ``load(save(x))`` is
exact.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import safe_open

import saebridge.formats.saelens as saelens  # the leaf, not the formats registry
from saebridge.errors import SAEBridgeError, SAEConfigError, SAEFormatError
from saebridge.formats._common import READ_ERRORS
from saebridge.sae.blockdiag import BlockDiagConfig, BlockDiagSAE, find_n_heads
from saebridge.sae.config import SAEConfig
from saebridge.sae.model import SAE

EXPECTS = ("a SAELens folder for attn.hook_z (all heads) whose W_enc and W_dec are "
           "block-diagonal over heads")
REFINES = "saelens"
HEADS_KEY = "block_diagonal_heads"


def detect(path: Path) -> bool:
    if not saelens.detect(path):
        return False
    try:
        cfg = saelens.read_config(path)
        return cfg.is_hook_z and _n_heads(saelens._folder(path), cfg) is not None
    except (SAEBridgeError, *READ_ERRORS):  # not readable as block-diagonal: load says why
        return False


def read_config(path: Path, hook_name: str | None = None) -> BlockDiagConfig:
    """The config; the weights are read only when cfg.json does not record the heads."""
    folder = saelens._folder(path)
    cfg = saelens.read_config(folder)
    return _blockdiag_config(cfg, folder, hook_name)


def load(path: Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, hook_name: str | None = None) -> BlockDiagSAE:
    folder = saelens._folder(path)
    dense = saelens.load(folder, device=device, dtype=dtype)
    cfg = _blockdiag_config(dense.cfg, folder, hook_name)
    dense = SAE(SAEConfig(**{k: v for k, v in cfg.to_dict().items() if k != "n_heads"}),
                {n: p.detach() for n, p in dense.named_parameters()})
    return BlockDiagSAE.from_dense(dense, cfg.n_heads)


def save(sae: SAE, path: Path) -> None:
    """Write the dense block-diagonal matrices in SAELens's layout, recording the heads.

    The heads chosen with ``splice_heads()`` are a choice made at splice time, not part of
    the SAE: the whole SAE is written."""
    if not isinstance(sae, BlockDiagSAE):
        raise SAEConfigError(f"the saelens-blockdiag format holds block-diagonal SAEs; got a "
                             f"{type(sae).__name__}. Save it as 'saelens'.")
    dense = sae.to_dense()
    dense.cfg.metadata = {**copy.deepcopy(dense.cfg.metadata), HEADS_KEY: sae.cfg.n_heads}
    saelens.save(dense, path)


def _blockdiag_config(cfg: SAEConfig, folder: Path, hook_name: str | None) -> BlockDiagConfig:
    n_heads = _n_heads(folder, cfg)
    if n_heads is None:
        raise SAEFormatError(f"the SAE in {str(folder)!r} is not block-diagonal over heads; "
                             "load it with format='saelens'.")
    meta = {k: v for k, v in cfg.metadata.items() if k != HEADS_KEY}
    fields = {**cfg.to_dict(), "metadata": meta}
    if hook_name is not None:
        fields["hook_name"] = hook_name
    return BlockDiagConfig(**fields, n_heads=n_heads)


def _n_heads(folder: Path, cfg: SAEConfig) -> int | None:
    recorded = cfg.metadata.get(HEADS_KEY)
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        return recorded
    try:
        with safe_open(str(folder / saelens.SAE_WEIGHTS_FILENAME), framework="pt") as f:
            W_enc, W_dec = f.get_tensor("W_enc"), f.get_tensor("W_dec")
    except READ_ERRORS as err:
        raise SAEFormatError(f"cannot read W_enc and W_dec from "
                             f"{str(folder / saelens.SAE_WEIGHTS_FILENAME)!r} "
                             f"({type(err).__name__}: {err}).") from err
    if W_enc.dim() != 2 or W_dec.shape != W_enc.T.shape:
        return None
    return find_n_heads(W_enc, W_dec)


