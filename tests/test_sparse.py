"""Sparse decoding gives the dense results: kernels, every SAE architecture, and a splice."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from saebridge.kernel import sae as kernel_sae
from saebridge.kernel import sparse
from saebridge.sae import SAE
from saebridge.testing import sparse_random_sae
from saebridge.tolerance import LOGPROB_ATOL

ARCHS = ["standard", "topk", "jumprelu", "gated", "batchtopk"]
D_IN, D_SAE, L0 = 16, 2048, 12
"""Wide enough that L0 / d_sae is far below MAX_SPARSE_DENSITY, as in a trained SAE."""


def sparse_sae(arch: str, *, d_in: int = D_IN, d_sae: int = D_SAE, seed: int = 0,
               dtype: torch.dtype = torch.float64, hook: str = "blocks.0.hook_resid_pre",
               **cfg) -> SAE:
    """A random SAE of which about ``L0`` latents fire per token."""
    return sparse_random_sae(arch, d_in, d_sae, hook, l0=L0, seed=seed, dtype=dtype, **cfg)


def dense_reference(sae: SAE, acts: torch.Tensor) -> torch.Tensor:
    """The dense decode, written out: what the sparse path must reproduce."""
    if sae.cfg.rescale_acts_by_decoder_norm:
        acts = acts * (1 / sae.W_dec.norm(dim=-1))
    return acts @ sae.W_dec + sae.b_dec


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the sparse kernel, to show which path a decode took."""
    calls = []
    real = sparse.decode_sparse

    def counted(*args, **kwargs):
        calls.append(args[0].nnz)
        return real(*args, **kwargs)
    monkeypatch.setattr(sparse, "decode_sparse", counted)
    # The kernel's SAE forward imports it by name (shipped code refers to names, not modules).
    monkeypatch.setattr(kernel_sae, "decode_sparse", counted)
    return calls


def _random_sparse(rows: int, d_sae: int, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(rows, d_sae, generator=gen, dtype=torch.float64)
    return acts * (torch.rand(rows, d_sae, generator=gen) < density)


@given(rows=st.integers(1, 9), d_sae=st.integers(64, 400), density=st.floats(0.0, 0.03),
       seed=st.integers(0, 2**16))
def test_kernel_matches_dense_matmul(rows: int, d_sae: int, density: float, seed: int) -> None:
    acts = _random_sparse(rows, d_sae, density, seed)
    W_dec = torch.randn(d_sae, 5, generator=torch.Generator().manual_seed(seed + 1),
                        dtype=torch.float64)
    lat = sparse.from_dense(acts, max_density=1.0)
    assert lat is not None and lat.nnz == int((acts != 0).sum())
    assert torch.equal(lat.to_dense(), acts)
    torch.testing.assert_close(sparse.decode_sparse(lat, W_dec), acts @ W_dec,
                               rtol=1e-12, atol=1e-12)
    scale = torch.rand(d_sae, dtype=torch.float64)
    torch.testing.assert_close(sparse.decode_sparse(lat, W_dec, scale), (acts * scale) @ W_dec,
                               rtol=1e-12, atol=1e-12)


def test_too_dense_is_refused() -> None:
    acts = _random_sparse(4, 100, 0.5, 0)
    assert sparse.from_dense(acts) is None
    assert sparse.from_dense(acts, max_density=1.0) is not None
    assert sparse.try_decode(acts, torch.randn(100, 3, dtype=torch.float64)) is None


@pytest.mark.parametrize("with_zeros", [False, True])
def test_topk_latents_are_the_entries_from_dense_finds(with_zeros: bool) -> None:
    ranked = torch.randn(3, 7, 500, generator=torch.Generator().manual_seed(1))
    ranked[1, 2, :3] = 5.0
    if with_zeros:
        ranked[0, 0] = -1.0  # every top-k value ReLUs to zero: an empty row
    acts, lat = sparse.topk_latents(ranked, 6)
    found = sparse.from_dense(acts, max_density=1.0)
    assert found is not None
    for a, b in zip(lat, found, strict=True):
        assert a == b if isinstance(a, int) else torch.equal(a, b)
    assert lat.nnz == int((acts != 0).sum()) == 3 * 7 * 6 - 6 * with_zeros


def test_sparse_coo_round_trip() -> None:
    acts = _random_sparse(2 * 3, 50, 0.05, 2).reshape(2, 3, 50)
    lat = sparse.from_dense(acts, max_density=1.0)
    assert lat is not None
    coo = lat.to_sparse_coo(acts.shape[:-1])
    assert coo.is_sparse and coo.is_coalesced() and coo.shape == acts.shape
    assert torch.equal(coo.to_dense(), acts)
    ref = acts.to_sparse()
    assert torch.equal(coo.indices(), ref.indices()) and torch.equal(coo.values(), ref.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_decodes_sparsely_and_equally(arch: str, spy) -> None:
    sae = sparse_sae(arch)
    x = torch.randn(3, 40, D_IN, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        out = sae.run(x)
        assert 0 < (out.acts_post != 0).sum(-1).float().mean() <= 2 * L0
        assert spy, "the sparse kernel was not used"
        torch.testing.assert_close(out.recons, dense_reference(sae, out.acts_post),
                                   rtol=1e-12, atol=1e-12)
        # forward == decode(encode(x)) bit for bit, whichever path found the latents.
        assert torch.equal(sae(x), sae.decode(sae.encode(x)))
        assert len(spy) == 3


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_float32_within_tolerance(arch: str) -> None:
    sae = sparse_sae(arch, dtype=torch.float32, d_in=64, d_sae=8192)
    x = torch.randn(8, 64)
    with torch.no_grad():
        out = sae.run(x)
        torch.testing.assert_close(out.recons, dense_reference(sae, out.acts_post),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [{"rescale_acts_by_decoder_norm": True},
                                 {"normalize_activations": "layer_norm"},
                                 {"normalize_activations": "constant_norm_rescale"}])
def test_preprocessing_options(cfg: dict, spy) -> None:
    sae = sparse_sae("topk", **cfg)
    x = torch.randn(20, D_IN, dtype=torch.float64) * 3 + 1
    with torch.no_grad():
        got = sae(x)
        acts = sae.encode(x)
        assert torch.equal(got, sae.decode(acts))
    want = sae(x)  # with grad: the dense path
    assert len(spy) == 2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_autograd_keeps_the_dense_gradient(spy) -> None:
    sae = sparse_sae("standard")
    acts = torch.zeros(4, D_SAE, dtype=torch.float64)
    acts[:, :3] = 1.0
    acts.requires_grad_(True)
    sae.decode(acts).sum().backward()
    assert not spy  # inactive latents still get W_dec @ grad, which only dense gives
    assert acts.grad is not None
    torch.testing.assert_close(acts.grad[0], sae.W_dec.detach().sum(-1))


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_splice_matches_a_dense_hand_written_splice(models, backend, arch: str, spy) -> None:
    model = models(*backend)
    space = model.space.name
    hook = "blocks.1.hook_resid_pre"
    sae = sparse_sae(arch, d_in=64, d_sae=4096, dtype=torch.float32, hook=hook,
                     activation_space=space).to(backend.device)
    tokens = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.run_with_saes(tokens, saes=[sae]).log_softmax(-1)
    assert spy

    def dense_splice(x: torch.Tensor) -> torch.Tensor:
        if space == "tl-processed":  # the SAE's space is centred, TL-processed is already
            x = x - x.mean(-1, keepdim=True)
        acts = sae.encode(x)
        return dense_reference(sae, acts)

    with torch.no_grad():
        want = model.run_with_interventions(tokens, [_Fn(hook, dense_splice)])
    torch.testing.assert_close(got, want.log_softmax(-1), rtol=0, atol=LOGPROB_ATOL[torch.float32])
    assert not torch.allclose(got, model(tokens).log_softmax(-1), atol=1e-3)


class _Fn:
    """A hand-written splice: a plain function at a hook."""

    writes = True

    def __init__(self, hook: str, fn) -> None:
        self.hook, self.fn = hook, fn

    def apply(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.fn(x)


def test_sparse_latent_cache(models, backend) -> None:
    model = models(*backend)
    hook = "blocks.1.hook_resid_pre"
    sae = SAE.random("topk", 64, 24576, hook, k=32, seed=4,
                     activation_space=model.space.name).to(backend.device)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    logits_d, dense = model.run_with_cache_with_saes(tokens, saes=[sae], names=[hook])
    logits_s, sparse_cache = model.run_with_cache_with_saes(tokens, saes=[sae], names=[hook],
                                                            sparse=True)
    assert torch.equal(logits_s, logits_d)
    key = f"{hook}.hook_sae_acts_post"
    lat = sparse_cache[key]
    assert lat.is_sparse and lat.is_coalesced() and lat.shape == (2, 16, 24576)
    assert torch.equal(lat.to_dense(), dense[key])
    assert lat.indices().shape[1] <= 32 * 2 * 16
    sparse_bytes = lat.indices().nbytes + lat.values().nbytes
    assert sparse_bytes <= dense[key].nbytes / 20
    for other in ("hook_sae_input", "hook_sae_recons", "hook_sae_output"):
        assert torch.equal(sparse_cache[f"{hook}.{other}"], dense[f"{hook}.{other}"])
    assert torch.equal(sparse_cache[hook], dense[hook])
    with pytest.raises(KeyError, match="sparse=False"):
        sparse_cache[f"{hook}.hook_sae_acts_pre"]
