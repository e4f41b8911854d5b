"""Unit tests of saebridge.sae: every architecture against formulas written here in plain torch."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saebridge.errors import SAEConfigError, SAEFormatError, ShapeError
from saebridge.sae import SAE, SAEActivations, SAEConfig

ARCHS = ("standard", "topk", "batchtopk", "jumprelu", "gated")
MODES = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
RESID = "blocks.1.hook_resid_pre"
HOOK_Z = "blocks.1.attn.hook_z"
TOL = {"rtol": 1e-5, "atol": 1e-5}
"""float32 tolerance where the reference does the same arithmetic in another order."""


# ---- the reference: SAELens 6 semantics, written independently -------------------------

def reference(sae: SAE, x: torch.Tensor) -> SAEActivations:
    """sae_input, acts_pre, acts_post, recons of SAELens 6 for ``x`` ([..., d_in] or heads)."""
    cfg, p = sae.cfg, dict(sae.named_parameters())
    flat = x if x.shape[-1] == cfg.d_in else x.reshape(*x.shape[:-2], -1)
    s = flat
    if cfg.normalize_activations == "constant_norm_rescale":
        coeff = math.sqrt(cfg.d_in) / flat.norm(dim=-1, keepdim=True)
        s = flat * coeff
    elif cfg.normalize_activations == "layer_norm":
        mu = flat.mean(-1, keepdim=True)
        std = (flat - mu).std(-1, keepdim=True)  # unbiased, as torch.std defaults to
        s = (flat - mu) / (std + 1e-5)
    if cfg.apply_b_dec_to_input:
        s = s - p["b_dec"]
    dec_norm = p["W_dec"].norm(dim=-1)
    if cfg.architecture == "gated":
        gate = (s @ p["W_enc"] + p["b_gate"]) > 0
        pre = s @ (p["W_enc"] * torch.exp(p["r_mag"])) + p["b_mag"]
        post = torch.where(gate, torch.clamp(pre, min=0), torch.zeros_like(pre))
    else:
        pre = s @ p["W_enc"] + p["b_enc"]
        ranked = pre * dec_norm if cfg.rescale_acts_by_decoder_norm else pre
        if cfg.architecture == "standard":
            post = torch.clamp(ranked, min=0)
        elif cfg.architecture == "topk":
            keep = ranked.argsort(dim=-1, descending=True)[..., : cfg.k]
            mask = torch.zeros_like(ranked).scatter(-1, keep, 1.0)
            post = torch.clamp(ranked, min=0) * mask
        else:  # jumprelu, and batchtopk at inference
            thr = torch.clamp(p["threshold"], min=0)
            post = torch.where(ranked > thr, ranked, torch.zeros_like(ranked))
    acts = post / dec_norm if cfg.rescale_acts_by_decoder_norm else post
    y = acts @ p["W_dec"] + p["b_dec"]
    if cfg.normalize_activations == "constant_norm_rescale":
        y = y / coeff
    elif cfg.normalize_activations == "layer_norm":
        y = y * std + mu
    return SAEActivations(flat, pre, post, y.reshape(x.shape))


@st.composite
def saes(draw: st.DrawFn, archs: tuple[str, ...] = ARCHS, hook_z: bool | None = None
         ) -> tuple[SAE, torch.Tensor]:
    """A random SAE and a random input for it."""
    arch = draw(st.sampled_from(archs))
    n_heads, d_head = draw(st.integers(1, 3)), draw(st.integers(2, 4))  # layer_norm needs d_in >= 2
    use_z = draw(st.booleans()) if hook_z is None else hook_z
    d_in = n_heads * d_head if use_z else draw(st.integers(2, 12))
    d_sae = draw(st.integers(1, 24))
    k = draw(st.integers(1, d_sae)) if arch == "topk" else None
    extra = {}
    if arch in ("topk", "batchtopk"):
        extra["rescale_acts_by_decoder_norm"] = draw(st.booleans())
    sae = SAE.random(arch, d_in, d_sae, HOOK_Z if use_z else RESID, k=k,
                     seed=draw(st.integers(0, 2**16)),
                     normalize_activations=draw(st.sampled_from(MODES)),
                     apply_b_dec_to_input=draw(st.booleans()), **extra)
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    shape = lead + ((n_heads, d_head) if use_z and draw(st.booleans()) else (d_in,))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return sae, torch.randn(shape, generator=gen) * draw(st.sampled_from([0.1, 1.0, 10.0]))


# ---- the forward pass ------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(saes())
def test_forward_is_decode_of_encode(case: tuple[SAE, torch.Tensor]) -> None:
    sae, x = case
    out = sae(x)
    assert out.shape == x.shape
    assert torch.equal(out, sae.decode(sae.encode(x)).reshape(x.shape))


@settings(max_examples=80, deadline=None)
@given(saes())
def test_run_matches_reference(case: tuple[SAE, torch.Tensor]) -> None:
    sae, x = case
    got, want = sae.run(x), reference(sae, x)
    assert got.sae_input.shape[-1] == sae.cfg.d_in
    assert torch.equal(got.sae_input, want.sae_input)
    torch.testing.assert_close(got.acts_pre, want.acts_pre, **TOL)
    assert torch.equal(got.acts_post != 0, want.acts_post != 0)  # the same latents fire
    torch.testing.assert_close(got.acts_post, want.acts_post, **TOL)
    torch.testing.assert_close(got.recons, want.recons, rtol=1e-4, atol=1e-4)


def test_fields_are_named_like_saelens_hooks() -> None:
    assert SAEActivations._fields == ("sae_input", "acts_pre", "acts_post", "recons")


@settings(max_examples=40, deadline=None)
@given(d_sae=st.integers(1, 16), data=st.data())
def test_topk_keeps_exactly_k(d_sae: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, d_sae))
    order = data.draw(st.permutations(range(d_sae)))
    # Distinct values, the k largest positive: no ties or zeros at the cut.
    offset = data.draw(st.integers(0, d_sae - k))
    x = torch.tensor(order, dtype=torch.float32) - offset + 0.5
    sae = _identity_sae("topk", d_sae, k=k)
    acts = sae.encode(x)
    assert int((acts != 0).sum()) == k
    top = set(torch.tensor(order).argsort(descending=True)[:k].tolist())
    assert set(acts.nonzero().flatten().tolist()) == top
    assert torch.equal(acts[list(top)], x[list(top)])


@settings(max_examples=40, deadline=None)
@given(arch=st.sampled_from(["jumprelu", "batchtopk"]),
       thresholds=st.lists(st.floats(0.0625, 10.0, width=32), min_size=1, max_size=8))
def test_jumprelu_zero_at_or_below_threshold(arch: str, thresholds: list[float]) -> None:
    sae = _identity_sae(arch, len(thresholds))
    thr = torch.tensor(thresholds)
    with torch.no_grad():
        sae.threshold.copy_(thr)
    assert torch.all(sae.encode(thr) == 0)  # at the threshold: off
    assert torch.all(sae.encode(thr * 0.5) == 0)
    above = torch.nextafter(thr, torch.tensor(math.inf))
    assert torch.equal(sae.encode(above), above)  # just above: the pre-activation itself


def test_negative_threshold_acts_like_zero() -> None:
    sae = _identity_sae("jumprelu", 3)
    with torch.no_grad():
        sae.threshold.fill_(-1.0)
    x = torch.tensor([-0.5, 0.0, 0.25])
    assert torch.equal(sae.encode(x), torch.tensor([0.0, 0.0, 0.25]))


def test_gated_by_hand() -> None:
    cfg = SAEConfig(architecture="gated", d_in=1, d_sae=3, hook_name=RESID,
                    apply_b_dec_to_input=False)
    sae = SAE(cfg, {"W_enc": torch.tensor([[1.0, 1.0, -1.0]]), "W_dec": torch.ones(3, 1),
                    "b_dec": torch.zeros(1), "b_gate": torch.tensor([0.0, -5.0, 0.0]),
                    "b_mag": torch.tensor([1.0, 1.0, 0.0]),
                    "r_mag": torch.tensor([math.log(2.0), 0.0, 0.0])})
    out = sae.run(torch.tensor([2.0]))
    # latent 0: gate 2 > 0, magnitude 2*2 + 1; latent 1: gate 2 - 5 <= 0; latent 2: gate -2.
    assert torch.allclose(out.acts_pre, torch.tensor([5.0, 3.0, -2.0]))
    assert torch.allclose(out.acts_post, torch.tensor([5.0, 0.0, 0.0]))
    assert sae.b_enc is None and "b_enc" not in sae.state_dict()


def test_batchtopk_is_jumprelu_at_inference() -> None:
    bt = SAE.random("batchtopk", 6, 10, RESID, k=3, seed=4)
    jr = SAE(SAEConfig(architecture="jumprelu", d_in=6, d_sae=10, hook_name=RESID,
                       apply_b_dec_to_input=True), bt.state_dict())
    x = torch.randn(5, 6)
    assert torch.equal(bt.encode(x), jr.encode(x))
    # per token, not per batch: one row's latents do not depend on the others
    assert torch.equal(bt.encode(x[:1]), bt.encode(x)[:1])


# ---- normalisation and rescaling -------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(arch=st.sampled_from(ARCHS), seed=st.integers(0, 1000),
       scale=st.floats(0.01, 100.0))
def test_constant_norm_rescale_ignores_input_scale(arch: str, seed: int, scale: float) -> None:
    sae = _random(arch, seed, normalize_activations="constant_norm_rescale")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sae = sae.to(torch.float64)
    torch.testing.assert_close(sae.encode(scale * x), sae.encode(x))
    torch.testing.assert_close(sae(scale * x), scale * sae(x))


@settings(max_examples=30, deadline=None)
@given(arch=st.sampled_from(ARCHS), seed=st.integers(0, 1000), shift=st.floats(-5, 5))
def test_layer_norm_ignores_input_shift(arch: str, seed: int, shift: float) -> None:
    sae = _random(arch, seed, normalize_activations="layer_norm").to(torch.float64)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(sae.encode(x + shift), sae.encode(x))
    torch.testing.assert_close(sae(x + shift), sae(x) + shift)


@pytest.mark.parametrize("arch", ARCHS)
def test_expected_average_only_in_is_identity_until_folded(arch: str) -> None:
    plain = _random(arch, 1).to(torch.float64)
    scaled = SAE(_with(plain.cfg, normalize_activations="expected_average_only_in"),
                 {k: v.clone() for k, v in plain.state_dict().items()})
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(scaled(x), plain(x))  # SAELens 6 applies nothing at run time
    s = 2.5
    scaled.fold_activation_norm_scaling_factor(s)
    assert scaled.cfg.normalize_activations == "none"
    # folded weights on raw x do what the trained SAE did on x * s (output divided by s)
    torch.testing.assert_close(scaled.encode(x), plain.encode(x * s))
    torch.testing.assert_close(scaled(x), plain(x * s) / s)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_rescale_by_decoder_norm_equals_folded_norms(arch: str) -> None:
    sae = _random(arch, 2, rescale_acts_by_decoder_norm=True).to(torch.float64)
    n = sae.W_dec.norm(dim=-1)
    assert not torch.allclose(n, torch.ones_like(n))  # the test needs non-unit rows
    folded = {"W_enc": sae.W_enc * n, "b_enc": sae.b_enc * n, "W_dec": sae.W_dec / n[:, None],
              "b_dec": sae.b_dec, **({"threshold": sae.threshold} if arch == "batchtopk" else {})}
    plain = SAE(_with(sae.cfg, rescale_acts_by_decoder_norm=False), folded)
    x = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.encode(x), plain.encode(x))
    torch.testing.assert_close(sae(x), plain(x))
    # and it matters: without the rescale the latents differ, and so does the selection
    unscaled = SAE(_with(sae.cfg, rescale_acts_by_decoder_norm=False), sae.state_dict())
    assert not torch.allclose(unscaled.encode(x), sae.encode(x))
    assert not torch.equal(unscaled.encode(x) != 0, sae.encode(x) != 0)


def test_decode_needs_the_stats_of_an_encode() -> None:
    sae = _random("standard", 0, normalize_activations="layer_norm")
    with pytest.raises(SAEConfigError, match="encode"):
        sae.decode(torch.zeros(2, 16))
    acts = sae.encode(torch.randn(2, 8))
    assert sae.decode(acts).shape == (2, 8)
    with pytest.raises(ShapeError):
        sae.decode(torch.zeros(5, 16))


# ---- shapes ----------------------------------------------------------------------------

def test_hook_z_accepts_heads_or_flat() -> None:
    sae = SAE.random("topk", 6, 20, HOOK_Z, k=4, seed=3)
    z = torch.randn(2, 5, 3, 2)  # [batch, pos, n_heads, d_head]
    assert sae.cfg.is_hook_z
    assert torch.equal(sae.encode(z), sae.encode(z.flatten(-2)))
    out = sae.run(z)
    assert out.sae_input.shape == (2, 5, 6) and out.recons.shape == z.shape
    assert sae(z).shape == z.shape and sae(z.flatten(-2)).shape == (2, 5, 6)
    assert sae.decode(sae.encode(z)).shape == (2, 5, 6)
    torch.testing.assert_close(sae(z).flatten(-2), sae(z.flatten(-2)))
    with pytest.raises(ShapeError, match="n_heads"):
        sae.encode(torch.randn(2, 5, 4, 2))


def test_hook_z_modes() -> None:
    by_flag = SAE.random("standard", 6, 8, "blocks.0.attn.hook_z", reshape_activations="hook_z")
    one_head = SAE.random("standard", 2, 8, "blocks.0.attn.hook_z", hook_head_index=1)
    assert by_flag.cfg.is_hook_z and not one_head.cfg.is_hook_z
    with pytest.raises(ShapeError):
        one_head.encode(torch.randn(3, 3, 4))
    with pytest.raises(SAEConfigError, match="hook_z"):
        SAE.random("standard", 6, 8, RESID, reshape_activations="hook_z")


def test_wrong_width_is_a_shape_error() -> None:
    sae = SAE.random("standard", 8, 16, RESID)
    with pytest.raises(ShapeError, match=r"\[\.\.\., 8\]"):
        sae(torch.randn(2, 2, 4))
    with pytest.raises(ShapeError, match="d_sae"):
        sae.decode(torch.randn(2, 8))


def test_bad_device_string() -> None:
    with pytest.raises(SAEConfigError, match="'gpu'"):
        SAE.random("standard", 4, 8, RESID, device="gpu")


def test_state_dict_is_checked() -> None:
    cfg = SAE.random("jumprelu", 4, 8, RESID).cfg
    good = SAE.random("jumprelu", 4, 8, RESID).state_dict()
    with pytest.raises(ShapeError, match="W_dec"):
        SAE(cfg, {**good, "W_dec": good["W_dec"].T})
    with pytest.raises(SAEFormatError, match="threshold"):
        SAE(cfg, {k: v for k, v in good.items() if k != "threshold"})
    with pytest.raises(SAEFormatError, match="b_gate"):
        SAE(cfg, {**good, "b_gate": torch.zeros(8)})


# ---- construction, dtype, device -------------------------------------------------------

def test_from_config_is_seeded() -> None:
    cfg = SAE.random("standard", 4, 8, RESID).cfg
    a, b, c = (SAE.from_config(cfg, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_dec, c.W_dec)
    assert torch.equal(a.W_enc, a.W_dec.T)
    assert torch.allclose(a.W_dec.norm(dim=-1), torch.ones(8))


def test_to_updates_cfg_and_leaves_other_saes_alone() -> None:
    cfg = SAE.random("standard", 4, 8, RESID).cfg
    a, b = SAE(cfg), SAE(cfg)
    assert a.to(torch.float64) is a
    assert a.cfg.dtype == "float64" and a.W_enc.dtype == torch.float64
    assert b.cfg.dtype == "float32" and cfg.dtype == "float32"
    assert a(torch.randn(2, 4)).dtype == torch.float64  # inputs are cast to the SAE dtype
    a.to(dtype=torch.bfloat16, device="cpu")
    assert (a.cfg.dtype, a.cfg.device) == ("bfloat16", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda() -> None:
    sae = SAE.random("gated", 4, 8, RESID).cuda()
    assert sae.cfg.device == "cuda:0"
    x = torch.randn(3, 4, device="cuda")
    torch.testing.assert_close(sae(x).cpu(), sae.cpu()(x.cpu()), **TOL)


def test_activation_space() -> None:
    flags = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
    hf = SAE.random("standard", 4, 8, RESID, activation_space="hf").cfg
    tl = SAE.random("standard", 4, 8, RESID, activation_space="tl-processed").cfg
    assert all(hf.model_from_pretrained_kwargs[f] is False for f in flags)
    assert all(tl.model_from_pretrained_kwargs[f] is True for f in flags)
    assert hf.activation_space.name == "hf" and tl.activation_space.name == "tl-processed"
    default = SAE.random("standard", 4, 8, RESID).cfg
    assert default.model_from_pretrained_kwargs is None
    assert default.activation_space.name == "tl-processed"  # key absent: TL's defaults
    # A mapping is applied over no processing, as SAELens's load_model does.
    assert _with(default, model_from_pretrained_kwargs={}).activation_space.name == "hf"
    partial = _with(default, model_from_pretrained_kwargs={"fold_ln": True})
    assert not partial.activation_space.center_writing_weights
    assert partial.activation_space.fold_ln
    with pytest.raises(SAEConfigError, match="only one"):
        SAE.random("standard", 4, 8, RESID, activation_space="hf",
                   model_from_pretrained_kwargs={})


# ---- config validation -----------------------------------------------------------------

BASE = {"architecture": "standard", "d_in": 4, "d_sae": 8, "hook_name": RESID,
        "apply_b_dec_to_input": True}


@pytest.mark.parametrize(("change", "needle"), [
    ({"architecture": "topkk"}, "'topk'"),
    ({"architecture": 3}, "architecture"),
    ({"d_in": "4"}, "d_in"),
    ({"d_sae": 0}, "d_sae"),
    ({"d_in": True}, "d_in"),
    ({"hook_name": ""}, "hook_name"),
    ({"hook_head_index": -1}, "hook_head_index"),
    ({"dtype": "float8"}, "'float32'"),
    ({"apply_b_dec_to_input": 1}, "true or false"),
    ({"normalize_activations": "layernorm"}, "'layer_norm'"),
    ({"reshape_activations": "z"}, "hook_z"),
    ({"architecture": "topk"}, "needs an integer k"),
    ({"architecture": "topk", "k": 9}, "k <= d_sae"),
    ({"architecture": "topk", "k": 2.0}, "integer k"),
    ({"architecture": "batchtopk", "k": -1}, "positive"),
    ({"k": 3}, "has no k"),
    ({"rescale_acts_by_decoder_norm": True}, "only topk"),
    ({"model_from_pretrained_kwargs": []}, "mapping"),
    ({"device": 0}, "device"),
    ({"metadata": {"hook_name": RESID}}, "repeats 'hook_name'"),
    ({"model_from_pretrained_kwargs": {"fold_ln": "no"}}, "'no' (str); it must be true or"),
    ({"architecture": "batchtopk", "k": float("nan")}, "finite positive"),
])
def test_bad_config_says_what_and_how(change: dict, needle: str) -> None:
    data = {**BASE, **change}
    with pytest.raises(SAEConfigError) as info:
        SAEConfig.from_dict(data)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_from_dict_missing_and_unknown_keys() -> None:
    with pytest.raises(SAEConfigError, match="'apply_b_dec_to_input'"):
        SAEConfig.from_dict({k: v for k, v in BASE.items() if k != "apply_b_dec_to_input"})
    with pytest.raises(SAEConfigError, match="hook_nam"):
        SAEConfig.from_dict({**BASE, "hook_nme": RESID})
    with pytest.raises(SAEConfigError, match="mapping"):
        SAEConfig.from_dict([BASE])  # type: ignore[arg-type]


def test_to_dict_round_trip() -> None:
    cfg = SAEConfig.from_dict({**BASE, "architecture": "topk", "k": 2, "model_name": "gpt2",
                               "metadata": {"context_size": 128, "seqpos_slice": [None]}})
    again = SAEConfig.from_dict(cfg.to_dict())
    assert again == cfg
    again.metadata["context_size"] = 1
    assert cfg.metadata["context_size"] == 128  # to_dict copies


# ---- helpers ---------------------------------------------------------------------------

def _identity_sae(arch: str, d: int, k: int | None = None) -> SAE:
    """W_enc = I, zero biases: pre-activations are the input itself."""
    sae = SAE.random(arch, d, d, RESID, k=k, apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.b_enc.zero_()
    return sae


def _random(arch: str, seed: int, **overrides: object) -> SAE:
    k = 3 if arch == "topk" else None
    return SAE.random(arch, 8, 16, RESID, k=k, seed=seed, **overrides)


def _with(cfg: SAEConfig, **changes: object) -> SAEConfig:
    return SAEConfig.from_dict({**cfg.to_dict(), **changes})
