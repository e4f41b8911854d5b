"""Remote execution: the front's runs as nnsight requests, checked three ways.

1. ``remote="local"``: nnsight serialises the request and deserialises it with local
   modules hidden, then runs it; results must equal local runs. (It keeps site-packages
   importable, so an installed saebridge would pass it falsely.)
2. A stricter server: the requests, serialised exactly as nnsight's remote backend does,
   are deserialised and run in a subprocess where importing saebridge fails; every module
   the payload imports while loading must be on NDIF's allowed list.
3. Payload sizes: steering ships one vector, splicing ships the SAE's parameters once.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import saebridge as sb
from saebridge.errors import SAEConfigError, SpaceConversionError

nnsight = pytest.importorskip("nnsight")
zstd = pytest.importorskip("zstandard")

from nnsight.schema.request import RequestModel  # noqa: E402
from nnsight.tracing.backend import Backend  # noqa: E402

from saebridge.kernel import sae as kernel_sae  # noqa: E402

ALLOWED = {"torch", "numpy", "einops", "math", "typing", "collections", "_collections",
           "builtins"}
"""What NDIF lets a request import."""
FRAMEWORK = {"nnsight", "cloudpickle"}
"""The request's envelope (tracer, envoys, the by-value function loader): nnsight's own."""


class Capture(Backend):
    """nnsight's remote serialisation, then a local run of the request (as ``remote="local"``
    does), keeping every request's bytes."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []

    def __call__(self, tracer) -> None:
        self.blobs.append(RequestModel.serialize(tracer, compress=False))
        tracer.execute(tracer.info.code)


def compressed(blob: bytes) -> int:
    return len(zstd.ZstdCompressor(level=6).compress(blob))  # as nnsight's remote backend


@pytest.fixture
def lm(models):
    return models("nnsight-hf").adapter.envoy


@pytest.fixture
def tokens(models):
    return models("hf").to_tokens("Hello world, hello SAE")


def saes():
    return (sb.SAE.random("jumprelu", 64, 48, "blocks.1.hook_resid_mid", seed=1,
                          activation_space="tl-processed"),
            sb.SAE.random("topk", 64, 48, "blocks.0.attn.hook_z", k=5, seed=2,
                          activation_space="tl-processed"),
            sb.SAE.random("gated", 256, 48, "blocks.0.mlp.hook_post", seed=3,
                          activation_space="hf"))


def runs(model: sb.Model, tokens: torch.Tensor) -> list:
    """Splice, steer, latent edits, caches and generation: each one request."""
    resid, z, post = saes()
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    return [model.run_with_saes(tokens, [resid, z, post]),
            model.run_with_interventions(tokens, [sb.Steer.from_sae(resid, 3, 5.0, [1, 2])]),
            model.run_with_interventions(tokens, [sb.Ablate(z, [1, 2]),
                                                  sb.Clamp(post, 4, 3.0, positions=slice(1, 4))]),
            model.run_with_cache(tokens, names)[1],
            model.run_with_cache_with_saes(tokens, [resid], names=names)[1],
            model.generate(tokens, 3, interventions=[sb.Steer.from_sae(z, 1, 4.0)])]


def assert_same(got, want) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    else:
        assert torch.equal(got, want)


def test_remote_local_runs_equal_local_runs(models, lm, tokens):
    remote = sb.wrap(lm, remote="local")
    assert type(remote).__name__ == "RemoteModel"
    for got, want in zip(runs(remote, tokens), runs(models("nnsight-hf"), tokens), strict=True):
        assert_same(got, want)
    import cloudpickle

    registered = cloudpickle.list_registry_pickle_by_value()
    assert {"saebridge.adapters.nnsight_remote", "saebridge.kernel.activations"} <= registered


SERVER = r'''
import builtins, importlib.abc, sys, warnings

class NoSaebridge(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "saebridge" or name.startswith("saebridge."):
            raise ImportError(f"No module named {name!r} on this server")

sys.meta_path.insert(0, NoSaebridge())
warnings.simplefilter("ignore")

import torch, nnsight
from nnsight.intervention.serialization import CustomCloudUnpickler
from nnsight.schema.request import RequestModel
from nnsight.tracing.tracer import dec, inc
from transformers import AutoModelForCausalLM, AutoTokenizer

tiny_dir, requests, out = sys.argv[1:4]
hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
lm = nnsight.LanguageModel(hf, tokenizer=AutoTokenizer.from_pretrained(tiny_dir))
loaded = set()
real_import = builtins.__import__

def logged_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0:
        loaded.add(name)
    return real_import(name, globals, locals, fromlist, level)

class Unpickler(CustomCloudUnpickler):  # records what the payload imports while loading
    def find_class(self, module, name):
        loaded.add(module)
        return super().find_class(module, name)

    def load(self):
        builtins.__import__ = logged_import
        try:
            return super().load()
        finally:
            builtins.__import__ = real_import

results = []
for blob in torch.load(requests, weights_only=True):
    loaded.clear()
    try:
        tracer = RequestModel.deserialize(blob.numpy().tobytes(),
                                          lm._remoteable_persistent_objects(),
                                          unpickler=Unpickler)
    except ImportError as error:
        results.append({"error": repr(error), "loaded": sorted(loaded)})
        continue
    inc()  # a trace is running, as on the server
    try:
        tracer.execute(tracer.info.code)
    finally:
        dec()
    saved = tracer.info.frame.f_locals
    results.append({"loaded": sorted(loaded), **{
        k: saved[k] for k in ("logits", "store", "result", "latents") if k in saved}})
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "saebridge")
torch.save({"results": results, "leaked": leaked}, out)
'''


def serve(blobs: list[bytes], tiny_dir, tmp_path) -> dict:
    """Run requests in a fresh process where saebridge cannot be imported; what each saved
    (or the ImportError it failed with). Checks that no saebridge module got imported and
    that each request that loaded imported only allowed modules while loading."""
    requests, out = tmp_path / "requests.pt", tmp_path / "out.pt"
    torch.save([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], requests)
    (tmp_path / "server.py").write_text(SERVER)
    done = subprocess.run([sys.executable, str(tmp_path / "server.py"), str(tiny_dir),
                           str(requests), str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          # The same thread count as here, so reductions (and bits) match.
                          env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert done.returncode == 0, done.stderr[-4000:]
    served = torch.load(out, weights_only=True)
    assert served["leaked"] == []
    for result in served["results"]:
        if "error" not in result:
            roots = {name.split(".")[0] for name in result["loaded"]}
            assert roots <= ALLOWED | FRAMEWORK, roots - ALLOWED - FRAMEWORK
    return served


def test_requests_run_where_saebridge_is_not_installed(models, lm, tokens, tiny_dir, tmp_path):
    capture = Capture()
    want = runs(sb.wrap(lm, remote=capture), tokens)
    assert len(capture.blobs) == len(want)
    assert all(b"def visit" in blob for blob in capture.blobs)  # the kernel travels by value
    served = serve(capture.blobs, tiny_dir, tmp_path)
    for got, expected in zip(served["results"], want, strict=True):
        if isinstance(expected, dict):  # a cache: the run's records
            assert_same(got["store"], dict(expected))
        else:
            assert_same(got["logits" if "logits" in got else "result"].detach(), expected)


def test_a_users_own_remote_trace_with_prepared_interventions(models, lm, tokens, tiny_dir,
                                                              tmp_path):
    """sb.prepare_splice/prepare_steer/prepare: compiled beforehand, so the body names only
    data. Compiled together (sb.prepare), a splice sees the mean an upstream steer wrote."""
    resid = saes()[0]
    vector = torch.randn(64, generator=torch.Generator().manual_seed(8))
    splicer = sb.prepare_splice(lm, resid)
    steer = sb.Steer("blocks.0.hook_resid_post", vector, 3.0, positions=[2])
    both = sb.prepare(lm, [steer, sb.Splice(resid)])
    want = models("nnsight-hf").run_with_cache_with_saes(
        tokens, [resid], names=[], use_error_term=False)[1][
        "blocks.1.hook_resid_mid.hook_sae_acts_post"]
    capture = Capture()
    with lm.trace(tokens, backend=capture):
        latents = both(lm)["blocks.1.hook_resid_mid.hook_sae_acts_post"].save()
        logits = lm.output.logits.save()
    ref = models("nnsight-hf").run_with_interventions(
        tokens, [sb.Steer("blocks.0.hook_resid_post", vector, 3.0, positions=[2]),
                 sb.Splice(resid)])
    assert torch.equal(logits, ref)
    assert not torch.equal(latents, want)  # the steer upstream changed them
    with lm.trace(tokens, remote="local"):
        again = splicer(lm).save()
    assert torch.equal(again, want)
    # What remote="local" lets through but a server refuses: a body naming saebridge.
    with lm.trace(tokens, backend=capture):
        naive = sb.splice(lm, resid).save()
    assert torch.equal(naive, want)
    served = serve(capture.blobs, tiny_dir, tmp_path)
    assert torch.equal(served["results"][0]["latents"].detach(), latents)
    assert torch.equal(served["results"][0]["logits"].detach(), logits)
    assert "saebridge" in served["results"][1]["error"]


def test_steering_ships_one_vector_and_splicing_ships_the_sae_once(models, lm, tokens):
    small = sb.SAE.random("standard", 64, 48, "blocks.1.hook_resid_pre", seed=4)
    large = sb.SAE.random("standard", 64, 8192, "blocks.1.hook_resid_pre", seed=4)
    sizes = {}
    for label, ops in {"steer small": [sb.Steer.from_sae(small, 3, 4.0)],
                       "steer large": [sb.Steer.from_sae(large, 3, 4.0)],
                       "splice": [sb.Splice(large)],
                       "splice + ablate": [sb.Splice(large), sb.Ablate(large, [1])]}.items():
        capture = Capture()
        sb.wrap(lm, remote=capture).run_with_interventions(tokens, ops)
        sizes[label] = len(capture.blobs[0])
    param_bytes = sum(p.numel() * p.element_size() for p in large.parameters())
    assert abs(sizes["steer large"] - sizes["steer small"]) < 64  # not W_dec: one vector
    # The SAE's parameters once, plus the kernel's SAE code (by value, ~70 KB).
    assert param_bytes < sizes["splice"] - sizes["steer large"] < param_bytes + 150_000
    # Ablate at another site than the splice would be a second site; the same SAE ships once.
    assert sizes["splice + ablate"] - sizes["splice"] < 0.01 * param_bytes


def test_what_cannot_run_remotely_is_refused_before_sending(models, lm, tokens, tiny_dir):
    from transformers import AutoModelForCausalLM

    capture = Capture()
    ut = sb.wrap(models("nnsight-tl").adapter.envoy, remote=capture)  # processed: centred
    raw = sb.SAE.random("standard", 64, 16, "blocks.1.hook_resid_pre", activation_space="hf")
    with pytest.raises(SpaceConversionError, match="raw residual mean"):
        ut.run_with_saes(tokens, [raw])

    class Custom:
        hook, writes = "blocks.0.hook_resid_pre", True

        def apply(self, x, ctx):
            return x

    remote = sb.wrap(lm, remote=capture)
    with pytest.raises(TypeError, match="Remote runs take Splice"):
        remote.run_with_interventions(tokens, [Custom()])  # type: ignore[list-item]

    class MySAE(sb.SAE):  # its own math: the kernel cannot compute it on a server
        def encode(self, x):
            return super().encode(x).relu()

    mine = MySAE(sb.SAE.random("standard", 64, 16, "blocks.1.hook_resid_pre").cfg)
    with pytest.raises(SAEConfigError, match="MySAE"):
        remote.run_with_saes(tokens, [mine])
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    plain = sb.wrap(nnsight.NNsight(hf), remote=True)
    with pytest.raises(TypeError, match="remote identity"):
        plain.run_with_saes(tokens, [raw])
    assert capture.blobs == []


ARCHS = ["standard", "topk", "batchtopk", "jumprelu", "gated"]
NORMS = ["none", "constant_norm_rescale", "layer_norm"]


@given(arch=st.sampled_from(ARCHS), norm=st.sampled_from(NORMS), rescale=st.booleans(),
       seed=st.integers(0, 2**16), head=st.booleans())
def test_the_kernel_computes_what_the_sae_computes(arch, norm, rescale, seed, head):
    """The trace kernel's SAE forward over (params, cfg) equals SAE.run."""
    topk = arch in ("topk", "batchtopk")
    hook = "blocks.0.attn.hook_z" if head else "blocks.0.hook_resid_pre"
    sae = sb.SAE.random(arch, 64, 96, hook, k=6 if topk else None, seed=seed,
                        normalize_activations=norm, rescale_acts_by_decoder_norm=rescale and topk)
    x = torch.randn(2, 3, 4, 16) if head else torch.randn(2, 3, 64)
    want = sae.run(x)
    got = kernel_sae.run(sae.data(), x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def transcoders_and_blocks():
    """Every SAE kind beyond the plain one: transcoders (one reading a LayerNorm's output
    with its affine, one with a skip term) and block-diagonal per-head SAEs (all heads, and
    splicing one head only)."""
    from saebridge.sae.blockdiag import BlockDiagSAE, block_diagonal
    from saebridge.sae.transcoder import Transcoder

    ln_tc = Transcoder.random("topk", 64, 96, 64, "blocks.0.ln2.hook_normalized",
                              "blocks.0.hook_mlp_out", k=6, seed=5, input_affine="ln2")
    skip_tc = Transcoder.random("jumprelu", 256, 96, 256, "blocks.1.mlp.hook_pre",
                                "blocks.1.mlp.hook_post", seed=6, skip=True)
    dense = sb.SAE.random("topk", 64, 32, "blocks.1.attn.hook_z", k=4, seed=7)
    blocks = BlockDiagSAE.from_dense(block_diagonal(dense, 4), 4)
    return ln_tc, skip_tc, blocks, blocks.splice_heads([1])


def test_transcoders_and_block_diagonal_saes_run_where_saebridge_is_not_installed(
        models, lm, tokens, tiny_dir, tmp_path):
    kinds = transcoders_and_blocks()
    capture = Capture()
    remote = sb.wrap(lm, remote=capture)
    got = [remote.run_with_saes(tokens, [sae]) for sae in kinds]
    got.append(remote.run_with_cache_with_saes(tokens, list(kinds[:3]), names=[])[1])
    local = models("nnsight-hf")
    want = [local.run_with_saes(tokens, [sae]) for sae in kinds]
    want.append(local.run_with_cache_with_saes(tokens, list(kinds[:3]), names=[])[1])
    hf = models("hf")
    for g, w, sae in zip(got[:4], want, kinds, strict=False):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g, hf.run_with_saes(tokens, [sae]), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(g, hf(tokens), atol=1e-3)  # each splice changed the output
    assert set(got[4]) == set(want[4]) and "blocks.0.ln2.hook_normalized.hook_sae_acts_post" \
        in got[4]
    for key in want[4]:
        torch.testing.assert_close(got[4][key], want[4][key], atol=1e-5, rtol=1e-5)
    served = serve(capture.blobs, tiny_dir, tmp_path)
    for result, expected in zip(served["results"], got[:4], strict=False):
        torch.testing.assert_close(result["logits"].detach(), expected, atol=1e-5, rtol=1e-5)


def test_transcoders_and_block_diagonal_saes_inside_a_users_own_trace(models, lm, tokens):
    local = models("nnsight-hf")
    for sae in transcoders_and_blocks():
        spliced = sb.prepare_splice(lm, sae)
        with lm.trace(tokens, remote="local"):
            latents = spliced(lm).save()
            logits = lm.output.logits.save()
        want_logits, cache = local.run_with_cache_with_saes(tokens, [sae], names=[])
        torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(latents, cache[f"{sae.cfg.hook_name}.hook_sae_acts_post"],
                                   atol=1e-5, rtol=1e-5)
