"""Block-diagonal per-head attention SAEs on ``hook_z``.

Such an SAE reads all heads of ``attn.hook_z`` concatenated (``d_in = n_heads * d_head``),
but head ``h`` only ever talks to its own ``m = d_sae / n_heads`` latents: the dense
``W_enc [d_in, d_sae]`` and ``W_dec [d_sae, d_in]`` are block-diagonal, and latents
``[h*m, (h+1)*m)`` belong to head ``h``. Here only the blocks are stored
(``W_enc [n_heads, d_head, m]``, ``W_dec [n_heads, m, d_head]``) and the forward pass runs
per head, never materialising the dense matrices. Everything else (biases, thresholds,
activation, normalisation) is the dense SAE's, so the latents are exactly those of the
dense SAE the blocks came from (TopK still ranks across all heads).

Splicing a subset of heads (:meth:`BlockDiagSAE.splice_heads`) replaces only those heads'
``z`` with their reconstruction; the other heads pass through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from saebridge.errors import SAEConfigError, ShapeError
from saebridge.kernel.sae import SAEData, SAESpec
from saebridge.sae.config import SAEConfig
from saebridge.sae.model import SAE
from saebridge.sae.params import parameter_shapes

Tensor = torch.Tensor
_BLOCKS = {"W_enc_blocks": "W_enc", "W_dec_blocks": "W_dec"}
"""Block parameter → the name the kernel (and a dense SAE) gives it."""


@dataclass(kw_only=True)
class BlockDiagConfig(SAEConfig):
    """An :class:`SAEConfig` for a hook_z SAE whose weights are one block per head."""

    n_heads: int
    """Number of attention heads (blocks); ``d_in`` and ``d_sae`` are multiples of it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_heads
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 \
                or self.d_in % n or self.d_sae % n:
            raise SAEConfigError(
                f"block-diagonal SAE n_heads={n!r} must be a positive integer dividing both "
                f"d_in={self.d_in} and d_sae={self.d_sae}. Pass the model's number of heads.")
        if not self.is_hook_z:
            raise SAEConfigError(
                f"a block-diagonal per-head SAE reads all heads of attn.hook_z, but its "
                f"hook_name is {self.hook_name!r} (hook_head_index={self.hook_head_index}). "
                "Use a dense SAE for other sites.")

    @property
    def d_head(self) -> int:
        return self.d_in // self.n_heads

    @property
    def latents_per_head(self) -> int:
        return self.d_sae // self.n_heads


class BlockDiagSAE(SAE):
    """A hook_z SAE stored and computed per head.

    The blocks are the parameters ``W_enc_blocks [n_heads, d_head, m]`` and ``W_dec_blocks
    [n_heads, m, d_head]``; ``W_enc``/``W_dec`` are the dense matrices as SAELens code
    indexes them (``W_dec[feature]`` is ``[d_in]``), built from the blocks on first use and
    rebuilt after an edit of them: a read-only copy (edit the blocks), never used by the
    forward pass.

    >>> dense = block_diagonal(SAE.random("topk", 8, 16, "blocks.0.attn.hook_z", k=3), 2)
    >>> sae = BlockDiagSAE.from_dense(dense, n_heads=2)
    >>> tuple(sae.W_enc_blocks.shape), tuple(sae.W_dec.shape), sae.head_of(9)
    ((2, 4, 8), (16, 8), 1)
    >>> torch.equal(sae.W_dec, dense.W_dec), torch.equal(sae.W_enc[:, 9], dense.W_enc[:, 9])
    (True, True)
    """

    cfg: BlockDiagConfig
    saelens_format: ClassVar[str] = "saelens-blockdiag"
    """The format that ``save(format="saelens")`` writes this kind of SAE in."""
    W_enc_blocks: nn.Parameter
    W_dec_blocks: nn.Parameter

    def __init__(self, cfg: BlockDiagConfig, state_dict: dict[str, Tensor] | None = None
                 ) -> None:
        if not isinstance(cfg, BlockDiagConfig):
            raise SAEConfigError(f"a BlockDiagSAE needs a BlockDiagConfig, got "
                                 f"{type(cfg).__name__}.")
        if state_dict is not None:  # blocks given under the kernel's names W_enc/W_dec
            dense_names = {v: k for k, v in _BLOCKS.items()}
            state_dict = {dense_names.get(n, n): t for n, t in state_dict.items()}
        super().__init__(cfg, state_dict)
        self.spliced_heads: tuple[int, ...] | None = None
        self._dense: dict[str, tuple[tuple[int, int], Tensor]] = {}

    def _parameter_shapes(self, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        assert isinstance(cfg, BlockDiagConfig)  # __init__ checked it
        H, D, M = cfg.n_heads, cfg.d_head, cfg.latents_per_head
        shapes = {k: v for k, v in parameter_shapes(cfg).items() if k not in _BLOCKS.values()}
        return {**shapes, "W_enc_blocks": (H, D, M), "W_dec_blocks": (H, M, D)}

    def spec(self) -> SAESpec:
        """The dense spec, with the per-head blocks (the kernel's linear maps run per head)."""
        return super().spec()._replace(n_heads=self.cfg.n_heads, spliced_heads=self.spliced_heads)

    def data(self) -> SAEData:
        """The kernel's view: the blocks under the names W_enc/W_dec (see :meth:`spec`)."""
        params = dict(self.named_parameters())
        for ours, kernels in _BLOCKS.items():
            params[kernels] = params.pop(ours)
        return SAEData(params, self.spec())

    def _flat(self, name: str) -> Tensor:
        blocks = getattr(self, f"{name}_blocks")
        key = (blocks.data_ptr(), blocks._version)
        held = self._dense.get(name)
        if held is None or held[0] != key or held[1].device != blocks.device \
                or held[1].dtype != blocks.dtype:
            held = (key, torch.block_diag(*blocks.detach()))
            self._dense[name] = held
        return held[1]

    @property
    def W_enc(self) -> Tensor:  # type: ignore[override]
        """The dense ``[d_in, d_sae]`` encoder (a read-only copy; see the class docstring)."""
        return self._flat("W_enc")

    @property
    def W_dec(self) -> Tensor:  # type: ignore[override]
        """The dense ``[d_sae, d_in]`` decoder (a read-only copy; see the class docstring)."""
        return self._flat("W_dec")

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """:meth:`SAE.fold_activation_norm_scaling_factor` on the blocks."""
        self.W_enc_blocks.mul_(scaling_factor)
        self.W_dec_blocks.div_(scaling_factor)
        self.b_dec.div_(scaling_factor)
        self.cfg.normalize_activations = "none"

    def decoder_direction(self, feature: int) -> Tensor:
        """Latent ``feature``'s direction in the concatenated ``hook_z`` space, ``[d_in]``
        (zero outside its head)."""
        head, row = divmod(self._check_feature(feature), self.cfg.latents_per_head)
        out_HD = self.W_dec_blocks.new_zeros(self.cfg.n_heads, self.cfg.d_head)
        out_HD[head] = self.W_dec_blocks[head, row]
        return out_HD.flatten()

    # ---- heads ------------------------------------------------------------------------

    def head_of(self, feature: int | Tensor) -> int | Tensor:
        """The head that latent ``feature`` belongs to (elementwise for a tensor)."""
        if isinstance(feature, Tensor):
            return torch.div(feature, self.cfg.latents_per_head, rounding_mode="floor")
        return self._check_feature(feature) // self.cfg.latents_per_head

    def features_of(self, head: int) -> range:
        """The latents that belong to ``head``."""
        m = self.cfg.latents_per_head
        return range(self._check_head(head) * m, (head + 1) * m)

    def splice_heads(self, heads: Iterable[int]) -> BlockDiagSAE:
        """This SAE (sharing its weights) splicing only ``heads``: their ``z`` becomes the
        reconstruction, every other head passes through unchanged. Latents are computed for
        all heads, exactly as in the full SAE.

        >>> dense = SAE.random("standard", 8, 16, "blocks.0.attn.hook_z")
        >>> sae = BlockDiagSAE.from_dense(block_diagonal(dense, 2), 2).splice_heads([1])
        >>> x = torch.randn(3, 2, 4)
        >>> torch.equal(sae(x)[:, 0], x[:, 0])
        True
        """
        chosen = tuple(sorted({self._check_head(h) for h in heads}))
        if not chosen:
            raise SAEConfigError("splice_heads() got no heads. Name at least one head.")
        sae = type(self)(self.cfg, {n: p.detach() for n, p in self.named_parameters()})
        sae.spliced_heads = chosen
        return sae

    # ---- dense <-> blocks -------------------------------------------------------------

    @classmethod
    def from_dense(cls, sae: SAE, n_heads: int) -> BlockDiagSAE:
        """Compact a dense hook_z SAE whose weights are exactly block-diagonal.

        Raises:
            ShapeError: some weight outside the diagonal blocks is not exactly zero.
        """
        cfg = BlockDiagConfig(**sae.cfg.to_dict(), n_heads=n_heads)
        if not is_block_diagonal(sae.W_enc, sae.W_dec, n_heads):
            raise ShapeError(
                f"the SAE at {sae.cfg.hook_name!r} is not block-diagonal over {n_heads} heads "
                "(some weight outside the diagonal blocks is non-zero). Use it as a dense SAE.")
        H, D, M = n_heads, cfg.d_head, cfg.latents_per_head
        idx = torch.arange(H, device=sae.W_enc.device)
        tensors = {n: p.detach() for n, p in sae.named_parameters()}
        tensors["W_enc"] = sae.W_enc.detach().reshape(H, D, H, M)[idx, :, idx]
        tensors["W_dec"] = sae.W_dec.detach().reshape(H, M, H, D)[idx, :, idx]
        return cls(cfg, tensors)

    def to_dense(self) -> SAE:
        """The equivalent dense SAE (block-diagonal ``W_enc``/``W_dec``), e.g. for saving."""
        cfg = SAEConfig(**{k: v for k, v in self.cfg.to_dict().items() if k != "n_heads"})
        tensors = {n: p.detach() for n, p in self.named_parameters()}
        for ours, dense in _BLOCKS.items():
            tensors[dense] = torch.block_diag(*tensors.pop(ours))
        return SAE(cfg, tensors)

    def _check_feature(self, feature: int) -> int:
        if not 0 <= int(feature) < self.cfg.d_sae:
            raise ShapeError(f"latent {feature} is out of range for an SAE with d_sae="
                             f"{self.cfg.d_sae}. Use 0 <= feature < {self.cfg.d_sae}.")
        return int(feature)

    def _check_head(self, head: int) -> int:
        if not 0 <= int(head) < self.cfg.n_heads:
            raise ShapeError(f"head {head} is out of range for an SAE over {self.cfg.n_heads} "
                             f"heads. Use 0 <= head < {self.cfg.n_heads}.")
        return int(head)


def is_block_diagonal(W_enc_DF: Tensor, W_dec_FD: Tensor, n_heads: int) -> bool:
    """Whether both dense matrices are exactly zero outside ``n_heads`` diagonal blocks."""
    d_in, d_sae = W_enc_DF.shape
    if n_heads < 1 or d_in % n_heads or d_sae % n_heads:
        return False
    H, D, M = n_heads, d_in // n_heads, d_sae // n_heads
    off_HH = ~torch.eye(H, dtype=torch.bool, device=W_enc_DF.device)
    enc_HH = W_enc_DF.reshape(H, D, H, M).ne(0).any(dim=(1, 3))
    dec_HH = W_dec_FD.reshape(H, M, H, D).ne(0).any(dim=(1, 3))
    return not bool((enc_HH & off_HH).any() or (dec_HH & off_HH).any())


def find_n_heads(W_enc_DF: Tensor, W_dec_FD: Tensor) -> int | None:
    """The finest block-diagonal split of a dense SAE's weights (> 1 block), or None.

    Candidates are the common divisors of ``d_in`` and ``d_sae``, tried from the largest.
    """
    d_in, d_sae = W_enc_DF.shape
    g = math.gcd(d_in, d_sae)
    for n in sorted((n for n in range(2, g + 1) if g % n == 0), reverse=True):
        if is_block_diagonal(W_enc_DF, W_dec_FD, n):
            return n
    return None


def block_diagonal(sae: SAE, n_heads: int) -> SAE:
    """A copy of a dense hook_z SAE with every weight outside the head blocks set to zero
    (for tests and examples; the result is exactly block-diagonal)."""
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    mask_DF = torch.block_diag(*[torch.ones(d_in // n_heads, d_sae // n_heads)] * n_heads)
    tensors = {n: p.detach().clone() for n, p in sae.named_parameters()}
    tensors["W_enc"] = tensors["W_enc"] * mask_DF.to(tensors["W_enc"])
    tensors["W_dec"] = tensors["W_dec"] * mask_DF.T.to(tensors["W_dec"])
    return SAE(sae.cfg, tensors)
