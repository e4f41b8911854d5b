"""One ``SAE`` module for every architecture, with SAELens 6 semantics.

Followed: SAELens 6.49 (``sae_lens/saes/{sae,standard_sae,topk_sae,batchtopk_sae,
jumprelu_sae,gated_sae}.py``). Parameter names and orientations are SAELens's:
``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``,
``threshold [d_sae]`` (jumprelu, batchtopk), ``b_gate``/``b_mag``/``r_mag [d_sae]`` (gated,
which has no ``b_enc``). A batchtopk SAE at inference is a JumpReLU over its learned
threshold, which is how SAELens 6 saves one after training.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from saebridge.errors import SAEConfigError, ShapeError
from saebridge.hookmap.space import ActivationSpace
from saebridge.sae import sparse
from saebridge.sae.activations import (
    NormStats,
    SAEActivations,
    flatten_heads,
    jumprelu,
    normalize_in,
    normalize_out,
)
from saebridge.sae.blocked import encode_sae
from saebridge.sae.config import SAEConfig
from saebridge.sae.params import (
    OPTIONAL_PARAMETERS,
    TORCH_DTYPES,
    check_state_dict,
    dtype_name,
    parameter_shapes,
)
from saebridge.sae.sparse import SparseLatents, needs_grad, topk_latents, try_decode

Tensor = torch.Tensor

class SAE(nn.Module):
    """A sparse autoencoder of any supported architecture.

    ``SAE(cfg)`` has all-zero parameters; ``SAE(cfg, state_dict)`` takes the given tensors
    (cast to ``cfg.dtype`` and ``cfg.device``; used without a copy when they already match).

    >>> sae = SAE.random("topk", d_in=8, d_sae=32, hook_name="blocks.0.hook_resid_pre", k=4)
    >>> x = torch.randn(2, 5, 8)
    >>> acts = sae.encode(x)
    >>> tuple(acts.shape), int((acts[0, 0] != 0).sum()) <= 4
    ((2, 5, 32), True)
    >>> torch.equal(sae(x), sae.decode(acts))
    True
    """

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    b_enc: nn.Parameter | None
    threshold: nn.Parameter | None
    b_gate: nn.Parameter | None
    b_mag: nn.Parameter | None
    r_mag: nn.Parameter | None
    blocked_encode: ClassVar[bool] = True
    """Whether :meth:`forward` may use the blocked encoder (:mod:`saebridge.sae.blocked`),
    which reads ``W_enc`` as a ``[d_in, d_sae]`` matrix."""

    def __init__(self, cfg: SAEConfig, state_dict: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        # A private copy: .to() rewrites cfg.device/dtype, which must not leak into
        # other SAEs built from the same config object.
        self.cfg = copy.deepcopy(cfg)
        shapes = self._parameter_shapes(cfg)
        dtype = TORCH_DTYPES[cfg.dtype]
        try:
            device = torch.device(cfg.device)
        except RuntimeError as err:
            raise SAEConfigError(f"SAE config device {cfg.device!r} is not a torch device "
                                 f"({err}). Use e.g. 'cpu', 'cuda' or 'cuda:1'.") from err
        if state_dict is None:
            state_dict = {name: torch.zeros(shape, dtype=dtype, device=device)
                          for name, shape in shapes.items()}
        check_state_dict(cfg, shapes, state_dict)
        for name in OPTIONAL_PARAMETERS:
            self.register_parameter(name, None)
        for name in shapes:
            tensor = state_dict[name].detach().to(device=device, dtype=dtype)
            self.register_parameter(name, nn.Parameter(tensor))
        self._norm_stats: NormStats | None = None

    # ---- constructors ---------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: SAEConfig, *, seed: int | None = None) -> SAE:
        """A freshly initialised SAE: unit-norm random decoder rows, ``W_enc = W_dec.T``,
        zero biases and thresholds (SAELens's inference initialisation, with unit rows).

        >>> cfg = SAEConfig(architecture="standard", d_in=4, d_sae=8,
        ...                 hook_name="blocks.0.hook_resid_pre", apply_b_dec_to_input=True)
        >>> SAE.from_config(cfg, seed=0).W_dec.norm(dim=-1).allclose(torch.ones(8))
        True
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec_FD = torch.randn(cfg.d_sae, cfg.d_in, generator=gen, dtype=torch.float64)
        W_dec_FD = W_dec_FD / W_dec_FD.norm(dim=-1, keepdim=True)
        sae = cls(cfg)
        with torch.no_grad():
            sae.W_dec.copy_(W_dec_FD)
            sae.W_enc.copy_(W_dec_FD.T)
        return sae

    @classmethod
    def random(cls, architecture: str, d_in: int, d_sae: int, hook_name: str, *,
               k: int | float | None = None, seed: int = 0,
               activation_space: ActivationSpace | str | None = None,
               **cfg_overrides: Any) -> SAE:
        """An SAE with every parameter random and non-trivial, for tests and examples.

        Unlike :meth:`from_config`, biases, thresholds and decoder norms are all non-zero
        and non-uniform, so every term of the forward pass matters. ``activation_space``
        (``"hf"``, ``"tl-unprocessed"``, ``"tl-processed"`` or an :class:`ActivationSpace`)
        is written into ``model_from_pretrained_kwargs`` as explicit flags.

        >>> sae = SAE.random("jumprelu", 4, 16, "blocks.1.hook_mlp_out", activation_space="hf")
        >>> sae.cfg.model_from_pretrained_kwargs["fold_ln"], sae.cfg.activation_space.name
        (False, 'hf')
        """
        if activation_space is not None:
            if "model_from_pretrained_kwargs" in cfg_overrides:
                raise SAEConfigError(
                    "SAE.random got both activation_space and model_from_pretrained_kwargs; "
                    "they say the same thing. Pass only one.")
            space = ActivationSpace.parse(activation_space)
            cfg_overrides["model_from_pretrained_kwargs"] = space.to_dict()
        cfg_overrides.setdefault("apply_b_dec_to_input", True)
        cfg = SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, hook_name=hook_name,
                        k=k, **cfg_overrides)
        sae = cls.from_config(cfg, seed=seed)
        gen = torch.Generator().manual_seed(seed + 1)

        def draw(*shape: int, scale: float = 0.1) -> Tensor:
            return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

        with torch.no_grad():
            row_norms_F1 = 0.5 + torch.rand(d_sae, 1, generator=gen, dtype=torch.float64)
            sae.W_dec.mul_(row_norms_F1.to(sae.W_dec.dtype))
            sae.W_enc.copy_(draw(d_in, d_sae, scale=d_in ** -0.5))
            sae.b_dec.copy_(draw(d_in))
            for name in ("b_enc", "b_gate", "b_mag", "r_mag"):
                param = getattr(sae, name)
                if param is not None:
                    param.copy_(draw(d_sae))
            if sae.threshold is not None:
                sae.threshold.copy_(0.5 * torch.rand(d_sae, generator=gen, dtype=torch.float64))
        return sae

    # ---- the forward pass -----------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations ``[..., d_sae]`` (SAELens ``hook_sae_acts_post``).

        Accepts ``[..., d_in]`` or, for hook_z SAEs, ``[..., n_heads, d_head]``. With
        ``constant_norm_rescale``/``layer_norm`` the input's statistics are kept for the
        next :meth:`decode`, as SAELens does.
        """
        _, _, acts_post_BF, stats, _ = self._encode(x)
        self._norm_stats = stats
        return acts_post_BF

    def decode(self, acts: Tensor) -> Tensor:
        """Reconstruction ``[..., d_in]`` of latent activations (flat, also for hook_z SAEs)."""
        if acts.shape[-1:] != (self.cfg.d_sae,):
            raise ShapeError(
                f"decode() takes latents of shape [..., {self.cfg.d_sae}] (d_sae), got "
                f"{tuple(acts.shape)}. Pass the output of encode().")
        recons_BD = self._decode_linear(acts.to(self.W_dec.dtype))
        return normalize_out(self.cfg.normalize_activations, recons_BD, self._norm_stats)

    def forward(self, x: Tensor) -> Tensor:
        """``decode(encode(x))`` in the input's shape (SAELens ``hook_sae_output``).

        Without autograd this never builds the dense ``[..., d_sae]`` latents (see
        :meth:`forward_sparse`); the result equals ``run(x).recons`` within the dtype's
        rounding.
        """
        fast = self.forward_sparse(x)
        return self.run(x).recons if fast is None else fast[2]

    def forward_sparse(self, x: Tensor) -> tuple[Tensor, SparseLatents, Tensor] | None:
        """``(hook_sae_input, active latents, reconstruction)`` without the dense latents, or
        None where those are needed: under autograd, for SAEs with a weight layout of their
        own, and when the latents are denser than ``sparse.MAX_SPARSE_DENSITY``.

        The encoder runs in blocks that keep only the active latents
        (:mod:`saebridge.sae.blocked`) and the decoder gathers their rows.

        >>> sae = SAE.random("topk", 8, 512, "blocks.0.hook_resid_pre", k=4)
        >>> with torch.no_grad():
        ...     sae_input, latents, recons = sae.forward_sparse(torch.randn(2, 3, 8))
        >>> latents.nnz, tuple(latents.to_sparse_coo(sae_input.shape[:-1]).shape)
        (24, (2, 3, 512))
        """
        if not self.blocked_encode or needs_grad(x, *self.parameters()):
            return None
        cfg = self.cfg
        norms_F = self._decoder_norms() if cfg.rescale_acts_by_decoder_norm else None
        sae_input_BD, sae_in_BD, stats = self._prepare(x)
        latents = encode_sae(sae_in_BD.reshape(-1, cfg.d_in), dict(self.named_parameters()),
                             cfg.architecture, cfg.k, norms_F)
        if latents is None:
            return None
        decoded_RD = sparse.decode_sparse(latents, self.W_dec, None if norms_F is None else
                                          1 / norms_F).add_(self.b_dec)
        decoded_BD = decoded_RD.reshape(*sae_input_BD.shape[:-1], decoded_RD.shape[-1])
        return sae_input_BD, latents, self._finish(x, sae_input_BD, decoded_BD, stats)

    def run(self, x: Tensor) -> SAEActivations:
        """Every intermediate of one pass, named after SAELens's hook points.

        >>> sae = SAE.random("standard", 4, 8, "blocks.0.hook_resid_pre")
        >>> x = torch.randn(3, 4)
        >>> out = sae.run(x)
        >>> tuple(out.acts_post.shape), torch.equal(out.recons, sae(x))
        ((3, 8), True)
        """
        sae_input_BD, acts_pre_BF, acts_post_BF, stats, latents = self._encode(x)
        recons = self._finish(x, sae_input_BD, self._decode_linear(acts_post_BF, latents), stats)
        return SAEActivations(sae_input_BD, acts_pre_BF, acts_post_BF, recons)

    def _finish(self, x: Tensor, sae_input_BD: Tensor, decoded_BD: Tensor,
                stats: NormStats | None) -> Tensor:
        """The reconstruction from ``latents @ W_dec + b_dec``: normalisation undone, and
        (hook_z) back to ``[..., n_heads, d_head]`` when that is what came in."""
        return normalize_out(self.cfg.normalize_activations, decoded_BD, stats).reshape(x.shape)

    def _prepare(self, x: Tensor) -> tuple[Tensor, Tensor, NormStats | None]:
        """``(hook_sae_input, encoder input, norm stats)``: flattened, normalised, ``b_dec``
        subtracted."""
        cfg = self.cfg
        sae_input_BD = flatten_heads(x.to(self.W_enc.dtype), cfg.d_in, cfg.is_hook_z,
                                     cfg.hook_name)
        sae_in_BD, stats = normalize_in(cfg.normalize_activations, sae_input_BD)
        if cfg.apply_b_dec_to_input:
            sae_in_BD = sae_in_BD - self.b_dec
        return sae_input_BD, sae_in_BD, stats

    def _encode(self, x: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, NormStats | None, SparseLatents | None]:
        # The last item: TopK's latents as found by topk, so decode need not search them.
        cfg = self.cfg
        sae_input_BD, sae_in_BD, stats = self._prepare(x)
        if cfg.architecture == "gated":
            assert self.b_gate is not None and self.b_mag is not None and self.r_mag is not None
            # One matmul for both paths: x @ (W_enc * exp(r_mag)) == (x @ W_enc) * exp(r_mag).
            lin_BF = self._enc(sae_in_BD)
            gate_BF = ((lin_BF + self.b_gate) > 0).to(sae_in_BD.dtype)
            acts_pre_BF = lin_BF.mul_(self.r_mag.exp()).add_(self.b_mag)
            return sae_input_BD, acts_pre_BF, gate_BF * acts_pre_BF.relu(), stats, None
        assert self.b_enc is not None  # every non-gated architecture has one
        # In place: _enc returns a fresh [..., d_sae] tensor, and allocating and first
        # touching another that size costs ~5 % of an SAE pass on CPU. Same values.
        acts_pre_BF = self._enc(sae_in_BD).add_(self.b_enc)
        ranked_BF = acts_pre_BF
        if cfg.rescale_acts_by_decoder_norm:
            ranked_BF = acts_pre_BF * self._decoder_norms()
        latents = None
        if cfg.architecture == "topk":
            acts_post_BF, latents = topk_latents(ranked_BF, int(cfg.k))  # type: ignore[arg-type]
        elif cfg.architecture in ("jumprelu", "batchtopk"):
            assert self.threshold is not None
            acts_post_BF = jumprelu(ranked_BF, self.threshold)
        else:
            acts_post_BF = ranked_BF.relu()
        return sae_input_BD, acts_pre_BF, acts_post_BF, stats, latents

    def _decode_linear(self, acts_BF: Tensor, latents: SparseLatents | None = None) -> Tensor:
        scale_F = 1 / self._decoder_norms() if self.cfg.rescale_acts_by_decoder_norm else None
        # Sparse decode (saebridge.sae.sparse) gathers rows of a [d_sae, d_out] W_dec; other
        # layouts (per-head blocks) decode densely through _dec.
        if self.W_dec.dim() == 2 and self.W_dec.shape[0] == self.cfg.d_sae:
            recons_BD = try_decode(acts_BF, self.W_dec, latents, scale_F)
            if recons_BD is not None:
                return recons_BD + self.b_dec
        if scale_F is not None:
            acts_BF = acts_BF * scale_F
        return self._dec(acts_BF) + self.b_dec

    # The weight layout lives in these four methods, so that SAEs storing their weights
    # differently (per-head blocks, see saebridge.sae.blockdiag) share the forward pass.

    def _parameter_shapes(self, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        return parameter_shapes(cfg)

    def _enc(self, x_BD: Tensor) -> Tensor:
        """``x @ W_enc``, without the bias (a fresh tensor: callers work in place)."""
        return x_BD @ self.W_enc

    def _dec(self, acts_BF: Tensor) -> Tensor:
        """``acts @ W_dec``, without the bias."""
        return acts_BF @ self.W_dec

    def _decoder_norms(self) -> Tensor:
        """The norm of each latent's decoder direction, ``[d_sae]``."""
        return self.W_dec.norm(dim=-1)

    def decoder_direction(self, feature: int) -> Tensor:
        """The decoder direction of latent ``feature``, ``[d_in]`` (what steering adds)."""
        return self.W_dec[feature]

    # ---- weight surgery -------------------------------------------------------------

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold an ``expected_average_only_in`` scaling factor into the weights.

        SAELens 6 trains on ``x * scaling_factor`` and, at the end of training, folds the
        factor in exactly like this (``W_enc *= s``, ``W_dec /= s``, ``b_dec /= s``) and
        sets ``normalize_activations`` to ``"none"``; the SAE then takes raw activations.
        """
        self.W_enc.mul_(scaling_factor)
        self.W_dec.div_(scaling_factor)
        self.b_dec.div_(scaling_factor)
        self.cfg.normalize_activations = "none"

    # ---- files ----------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, format: str | None = None,
             device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, hook_name: str | None = None,
             subfolder: str | None = None) -> SAE:
        """Load an SAE saved on disk; ``format`` is detected when None (see saebridge.formats).

        ``device`` defaults to ``"cpu"`` (SAELens's default, whatever cfg.json says) and
        ``dtype`` to the saved config's. ``hook_name`` states the canonical site, for files
        that do not record it or record it wrongly (every format). ``path`` may be a Hugging
        Face hub id (``"org/repo"``, with ``subfolder``), fetched with huggingface_hub.

        >>> import tempfile
        >>> sae = SAE.random("gated", 4, 8, "blocks.0.hook_resid_post")
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     sae.save(folder)
        ...     torch.equal(SAE.load(folder).r_mag, sae.r_mag)
        True
        """
        from saebridge import formats  # formats imports this module: import it lazily

        return formats.load(path, format=format, device=device, dtype=dtype,
                            hook_name=hook_name, subfolder=subfolder)

    def save(self, path: str | os.PathLike[str], *, format: str = "saelens") -> None:
        """Write this SAE to the folder ``path`` (created if needed) in ``format``."""
        from saebridge import formats

        formats.save(self, path, format=format)

    # ---- nn.Module plumbing ---------------------------------------------------------

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SAE:
        # .to(), .cuda(), .half() … all go through here: keep cfg telling the truth.
        super()._apply(fn, recurse)
        self.cfg.dtype = dtype_name(self.W_enc.dtype)
        self.cfg.device = str(self.W_enc.device)
        self._norm_stats = None
        return self

    def extra_repr(self) -> str:
        cfg = self.cfg
        k = f", k={cfg.k}" if cfg.k is not None else ""
        return (f"{cfg.architecture}, d_in={cfg.d_in}, d_sae={cfg.d_sae}{k}, "
                f"hook_name={cfg.hook_name!r}")
