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
from typing import Any

import torch
from torch import nn

from saebridge.errors import ArgumentTypeError, SAEConfigError, ShapeError
from saebridge.hookmap.space import ActivationSpace
from saebridge.kernel import sae as kernel
from saebridge.kernel.activations import NormStats, SAEActivations
from saebridge.kernel.sae import SAEData, SAESpec, SparseForward
from saebridge.sae.config import SAEConfig
from saebridge.sae.params import (
    OPTIONAL_PARAMETERS,
    TORCH_DTYPES,
    check_state_dict,
    dtype_name,
    parameter_shapes,
    torch_device,
)

Tensor = torch.Tensor

def _tensor(x: object, method: str) -> Tensor:
    """``x`` if it is a tensor; anything else is refused by name (not an AttributeError deep
    in the kernel)."""
    if not isinstance(x, Tensor):
        raise ArgumentTypeError(f"SAE.{method}() takes a torch.Tensor, got {type(x).__name__}. "
                                "Pass activations as a tensor (torch.as_tensor(...) converts).")
    return x


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
    use_error_term: bool = False
    """SAELens's switch: ``add_sae``/``run_with_saes``/``saes()`` called without
    ``use_error_term`` splice this SAE with its error added back when True."""

    def __init__(self, cfg: SAEConfig, state_dict: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        # A private copy: .to() rewrites cfg.device/dtype, which must not leak into
        # other SAEs built from the same config object.
        self.cfg = copy.deepcopy(cfg)
        shapes = self._parameter_shapes(cfg)
        dtype = TORCH_DTYPES[cfg.dtype]
        device = torch_device(cfg.device)
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

    # ---- the forward pass (the math: saebridge.kernel.sae) -----------------------------

    def spec(self) -> SAESpec:
        """The config fields the forward reads, as plain data (see :mod:`saebridge.kernel.sae`)."""
        c = self.cfg
        return SAESpec(c.architecture, c.d_in, c.d_sae, c.k, c.hook_name, c.hook_head_index,
                       c.is_hook_z, c.apply_b_dec_to_input, c.normalize_activations,
                       c.rescale_acts_by_decoder_norm)

    def data(self) -> SAEData:
        """This SAE as the kernel takes it: its parameters (not copied) and :meth:`spec`."""
        return SAEData(dict(self.named_parameters()), self.spec())

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations ``[..., d_sae]`` (SAELens ``hook_sae_acts_post``).

        Accepts ``[..., d_in]`` or, for hook_z SAEs, ``[..., n_heads, d_head]``. With
        ``constant_norm_rescale``/``layer_norm`` the input's statistics are kept for the
        next :meth:`decode`, as SAELens does.
        """
        enc = kernel.encode(self.data(), _tensor(x, "encode"))
        self._norm_stats = enc.stats
        return enc.acts_post

    def decode(self, acts: Tensor) -> Tensor:
        """Reconstruction ``[..., d_in]`` of latent activations (flat, also for hook_z SAEs)."""
        if _tensor(acts, "decode").shape[-1:] != (self.cfg.d_sae,):
            raise ShapeError(
                f"decode() takes latents of shape [..., {self.cfg.d_sae}] (d_sae), got "
                f"{tuple(acts.shape)}. Pass the output of encode().")
        return kernel.decode(self.data(), acts, self._norm_stats)

    def forward(self, x: Tensor) -> Tensor:
        """``decode(encode(x))`` in the input's shape (SAELens ``hook_sae_output``).

        Without autograd this never builds the dense ``[..., d_sae]`` latents (see
        :meth:`forward_sparse`); the result equals ``run(x).recons`` within the dtype's
        rounding.
        """
        return kernel.forward(self.data(), _tensor(x, "forward"))

    def forward_sparse(self, x: Tensor) -> SparseForward | None:
        """``(hook_sae_input, active latents, reconstruction)`` without the dense latents, or
        None where those are needed: under autograd, for SAEs with a weight layout of their
        own, and when the latents are denser than ``sparse.MAX_SPARSE_DENSITY``.

        The encoder runs in blocks that keep only the active latents
        (:mod:`saebridge.kernel.blocked`) and the decoder gathers their rows.

        >>> sae = SAE.random("topk", 8, 512, "blocks.0.hook_resid_pre", k=4)
        >>> with torch.no_grad():
        ...     sae_input, latents, recons = sae.forward_sparse(torch.randn(2, 3, 8))
        >>> latents.nnz, tuple(latents.to_sparse_coo(sae_input.shape[:-1]).shape)
        (24, (2, 3, 512))
        """
        return kernel.forward_sparse(self.data(), _tensor(x, "forward_sparse"))

    def run(self, x: Tensor) -> SAEActivations:
        """Every intermediate of one pass, named after SAELens's hook points.

        >>> sae = SAE.random("standard", 4, 8, "blocks.0.hook_resid_pre")
        >>> x = torch.randn(3, 4)
        >>> out = sae.run(x)
        >>> tuple(out.acts_post.shape), torch.equal(out.recons, sae(x))
        ((3, 8), True)
        """
        return kernel.run(self.data(), _tensor(x, "run"))

    # The weight layout lives in the parameter shapes (and the kernel's linear maps, chosen
    # by SAESpec.n_heads), so SAEs storing their weights differently (per-head blocks, see
    # saebridge.sae.blockdiag) share the forward pass.

    def _parameter_shapes(self, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        return parameter_shapes(cfg)

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
             subfolder: str | None = None, activation_space: Any = None) -> SAE:
        """Load an SAE saved on disk; ``format`` is detected when None (see saebridge.formats).

        ``device`` defaults to ``"cpu"`` (SAELens's default, whatever cfg.json says) and
        ``dtype`` to the saved config's. ``hook_name`` states the canonical site, for files
        that do not record it or record it wrongly (every format). ``activation_space``
        states the space the SAE was trained in (``"tl-processed"``, ``"hf"``, or a mapping of
        the four processing flags), for files whose ``model_from_pretrained_kwargs`` says
        otherwise (``{}`` means unprocessed, as SAELens's ``load_model`` reads it). ``path``
        may be a Hugging Face hub id (``"org/repo"``, with ``subfolder``).

        >>> import tempfile
        >>> sae = SAE.random("gated", 4, 8, "blocks.0.hook_resid_post")
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     sae.save(folder)
        ...     torch.equal(SAE.load(folder).r_mag, sae.r_mag)
        True
        """
        # saebridge.formats (above this module) registers its loader there when imported.
        from saebridge.sae.files import load as load_registered

        sae: SAE = load_registered(path, format=format, device=device, dtype=dtype,
                                   hook_name=hook_name, subfolder=subfolder,
                                   activation_space=activation_space)
        return sae

    @classmethod
    def from_pretrained(cls, release: str, sae_id: str, *,
                        device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None) -> SAE:
        """SAELens's ``SAE.from_pretrained(release, sae_id)``: the release looked up in
        SAELens's registry when installed (else ``release`` is a hub ``org/repo`` and
        ``sae_id`` its subfolder), fetched with huggingface_hub, loaded by :meth:`load`. An
        unknown release or sae_id lists the nearest valid ones.
        """
        from saebridge.sae.pretrained import from_pretrained

        sae: SAE = from_pretrained(release, sae_id, device=device, dtype=dtype)
        return sae

    def save(self, path: str | os.PathLike[str], *, format: str = "saelens") -> None:
        """Write this SAE to the folder ``path`` (created if needed) in ``format``."""
        from saebridge.sae.files import save as save_registered

        save_registered(self, path, format=format)

    # ---- nn.Module plumbing ---------------------------------------------------------

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SAE:
        # .to(), .cuda(), .half() … all go through here: keep cfg telling the truth. An empty
        # probe shows where fn sends tensors, so a move to meta is refused before any moves.
        torch_device(fn(self.W_enc.new_empty(0)).device)
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
