"""The blocked encoder finds the dense path's active latents, block size whatever it is."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from saebridge.kernel import blocked, sparse
from saebridge.kernel import sae as kernel_sae
from saebridge.sae import SAE
from saebridge.sae.blockdiag import BlockDiagSAE, block_diagonal
from saebridge.sae.transcoder import Transcoder
from saebridge.testing import sparse_random_sae

ARCHS = ["standard", "topk", "jumprelu", "gated", "batchtopk"]


def sparse_sae(arch: str, *, d_sae: int = 2048, seed: int = 0,
               dtype: torch.dtype = torch.float64, **cfg) -> SAE:
    return sparse_random_sae(arch, 16, d_sae, "blocks.0.hook_resid_pre", l0=12, seed=seed,
                             dtype=dtype, **cfg)


def active(sae: SAE, x: torch.Tensor, block: int) -> sparse.SparseLatents | None:
    """The blocked encoder as ``SAE.forward_sparse`` calls it, with a forced block size."""
    cfg = sae.cfg
    _, sae_in, _ = kernel_sae.prepare(sae.data(), x)
    norms = kernel_sae.decoder_norms(sae.data()) if cfg.rescale_acts_by_decoder_norm else None
    return blocked.encode_sae(sae_in.reshape(-1, cfg.d_in), dict(sae.named_parameters()),
                              cfg.architecture, cfg.k, norms, block=block)


def assert_same_latents(got: sparse.SparseLatents, acts_post: torch.Tensor) -> None:
    want = sparse.from_dense(acts_post, max_density=1.0)
    assert want is not None
    assert torch.equal(got.crow_R1, want.crow_R1)
    assert torch.equal(got.col_Z, want.col_Z)
    torch.testing.assert_close(got.values_Z, want.values_Z, rtol=1e-12, atol=1e-12)


@given(arch=st.sampled_from(ARCHS), block=st.integers(1, 300), rows=st.integers(1, 40),
       seed=st.integers(0, 2**16), rescale=st.booleans())
def test_every_block_size_finds_the_dense_latents(arch: str, block: int, rows: int, seed: int,
                                                  rescale: bool) -> None:
    rescale = rescale and arch in ("topk", "batchtopk")  # the architectures that can
    sae = sparse_sae(arch, d_sae=600, seed=seed % 7, rescale_acts_by_decoder_norm=rescale)
    x = torch.randn(rows, 16, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    with torch.no_grad():
        got = active(sae, x, block)
        out = sae.run(x)
    assert got is not None
    assert_same_latents(got, out.acts_post)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_in_blocks_equals_run(arch: str, monkeypatch) -> None:
    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 4096)  # 64 rows -> blocks of 256 latents
    sae = sparse_sae(arch, dtype=torch.float32)
    x = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1))
    assert blocked.block_size(64, sae.cfg.d_sae, x.device) == 256
    with torch.no_grad():
        got = sae(x)
        want = sae.run(x).recons
    assert got.shape == want.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_topk_merges_candidates_and_rises_its_floor() -> None:
    # Ascending pre-activations along the latents: every block beats the floor of the
    # previous ones, so candidates pile up and are merged many times.
    k, rows, width = 5, 3, 400
    top = blocked._TopK(rows, k)
    ranked = torch.arange(rows * width, dtype=torch.float64).reshape(rows, width) / 7
    ranked[1] = -ranked[1]  # a row whose first block already holds its top k
    for start in range(0, width, 3):  # first block narrower than k: no floor at first
        top.add(ranked[:, start:start + 3].clone(), start)
    lat = top.latents(width)
    assert lat.crow_R1.tolist() == [0, 5, 5, 10]  # row 1: every value ReLUs to zero
    assert lat.col_Z.tolist() == [395, 396, 397, 398, 399] * 2


def test_ties_at_the_floor_keep_k_latents() -> None:
    top = blocked._TopK(1, 2)
    top.add(torch.tensor([[1.0, 1.0, 0.5]]), 0)
    top.add(torch.tensor([[1.0, 2.0]]), 3)
    lat = top.latents(5)
    assert lat.nnz == 2 and 4 in lat.col_Z.tolist()
    assert sorted(lat.values_Z.tolist()) == [1.0, 2.0]


def test_too_dense_falls_back_to_the_dense_path() -> None:
    sae = SAE.random("standard", 16, 600, "blocks.0.hook_resid_pre")  # half the latents fire
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert active(sae, x, 64) is None
        torch.testing.assert_close(sae(x), sae.run(x).recons, rtol=0, atol=0)
    topk = SAE.random("topk", 16, 64, "blocks.0.hook_resid_pre", k=8)  # k / d_sae = 1/8
    with torch.no_grad():
        assert active(topk, x, 16) is None
        assert torch.equal(topk(x), topk.run(x).recons)


def test_autograd_and_block_layouts_take_the_dense_path(monkeypatch) -> None:
    calls = []
    real = blocked.encode_sae
    monkeypatch.setattr("saebridge.kernel.sae.encode_sae",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    sae = sparse_sae("topk", dtype=torch.float32)
    x = torch.randn(5, 16)
    out = sae(x)
    assert out.requires_grad and not calls  # gradients need the dense latents
    out.sum().backward()
    assert sae.W_enc.grad is not None
    with torch.no_grad():
        sae(x)
    assert calls == [1]
    dense = SAE.random("standard", 8, 16, "blocks.0.attn.hook_z")
    heads = BlockDiagSAE.from_dense(block_diagonal(dense, 2), 2)
    with torch.no_grad():
        z = torch.randn(3, 2, 4)
        torch.testing.assert_close(heads(z), heads.run(z).recons, rtol=0, atol=0)
    assert calls == [1]


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_transcoder_forward_adds_the_skip_term(arch: str) -> None:
    tc = Transcoder.random(arch, 16, 512, 12, "blocks.0.ln2.hook_normalized",
                           "blocks.0.hook_mlp_out", k=4 if arch == "topk" else None, skip=True)
    with torch.no_grad():
        tc.b_enc.sub_(2.5)  # standard: a few active latents, so the blocked path is taken
        x = torch.randn(2, 7, 16)
        got = tc(x)
        acts = tc.run(x)
    assert got.shape == (2, 7, 12)
    torch.testing.assert_close(got, acts.recons, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, tc.decode(acts.acts_post) + x @ tc.W_skip.T,
                               rtol=1e-5, atol=1e-5)


def test_empty_inputs_take_the_dense_path() -> None:
    sae = sparse_sae("topk", dtype=torch.float32)
    with torch.no_grad():
        for x in (torch.randn(0, 16), torch.randn(2, 0, 16)):
            assert sae(x).shape == x.shape
            assert active(sae, x, 64) is None


def test_splices_build_dense_latents_only_for_a_cache(models, backend, monkeypatch):
    model = models(*backend)
    space = model.space.name
    hook = "blocks.1.hook_resid_pre"
    saes = [sparse_random_sae(arch, 64, 4096, hook, l0=16, dtype=torch.float32,
                              activation_space=space).to(backend.device)
            for arch in ("topk", "jumprelu")]
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    runs: list[str] = []
    real = SAE.run
    monkeypatch.setattr(SAE, "run", lambda self, x: runs.append(self.cfg.architecture)
                        or real(self, x))
    for sae in saes:
        spliced = model.run_with_saes(tokens, saes=[sae])
        assert not runs  # SAE.forward: the blocked encoder, no dense latents
        sparse_logits, sparse_cache = model.run_with_cache_with_saes(
            tokens, saes=[sae], names=[hook], sparse=True)
        assert not runs  # a sparse cache keeps the blocked encoder's latents as they are
        cached_logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], names=[hook])
        assert runs == [sae.cfg.architecture]
        runs.clear()
        key = f"{hook}.hook_sae_acts_post"
        lat = sparse_cache[key]
        assert lat.is_sparse and lat.is_coalesced() and lat.shape == cache[key].shape
        torch.testing.assert_close(lat.to_dense(), cache[key], rtol=1e-5, atol=1e-5)
        assert torch.equal(lat.to_dense() != 0, cache[key] != 0)
        torch.testing.assert_close(sparse_cache[f"{hook}.hook_sae_input"],
                                   cache[f"{hook}.hook_sae_input"], rtol=0, atol=0)
        torch.testing.assert_close(spliced, cached_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(spliced, sparse_logits, rtol=0, atol=0)
        assert not torch.allclose(spliced, model(tokens), atol=1e-3)
