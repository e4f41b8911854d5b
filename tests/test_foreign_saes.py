"""Other libraries' SAE objects used directly (saebridge.sae.foreign), SAELens's attribute
paths on saebridge SAEs, and ``SAE.from_pretrained`` against a hub cache built on the spot.

SAELens objects are real (``sae_lens`` is a dev dependency). dictionary_learning cannot be
installed beside nnsight 0.8 (its 0.1.0 wheel pins ``nnsight<0.4``) and sparsify is not a
dev dependency (it pulls schedulefree, simple-parsing and natsort), so their objects are
stand-ins below: classes defined in the libraries' modules (``__module__``), with the
attribute and parameter names of dictionary_learning 0.1.0 ``dictionary.py`` and
``trainers/top_k.py`` and of sparsify 1.3.3 ``sparse_coder.py``, read from their wheels.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn

import saebridge as sb
from saebridge.errors import ArgumentTypeError, SAEConfigError, SAEFormatError
from saebridge.sae.foreign import as_sae
from saebridge.sae.transcoder import Transcoder

sae_lens = pytest.importorskip("sae_lens")
from tests.oracle import saelens_sae  # noqa: E402

HOOK = "blocks.1.hook_resid_pre"
ARCHS = [("standard", {}), ("topk", {"k": 3}), ("jumprelu", {}), ("gated", {}),
         ("batchtopk", {"k": 3})]


def _tokens(model):
    return model.to_tokens(["The cat sat on the mat and"])


@pytest.mark.parametrize(("arch", "kw"), ARCHS, ids=[a for a, _ in ARCHS])
def test_saelens_sae_converted_once_sharing_storage(arch, kw):
    ours = sb.SAE.random(arch, 64, 128, HOOK, activation_space="hf", **kw)
    theirs = saelens_sae(ours)
    sae = as_sae(theirs)
    assert as_sae(theirs) is sae
    for name, p in sae.named_parameters():
        assert p.data_ptr() == getattr(theirs, name).data_ptr(), name
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), theirs(x), atol=1e-5, rtol=1e-5)
        theirs.W_dec[0].mul_(2.0)  # an edit of theirs is an edit of ours
    assert torch.equal(sae.W_dec[0], theirs.W_dec[0])
    assert sae.cfg.metadata.hook_name == theirs.cfg.metadata.hook_name == HOOK
    assert sae.cfg.activation_space.name == "hf"


def test_saelens_objects_go_everywhere_an_sae_goes(models):
    model = models("hf")
    ours = sb.SAE.random("topk", 64, 128, HOOK, k=4, activation_space="hf")
    theirs = saelens_sae(ours)
    toks = _tokens(model)
    want = model.run_with_saes(toks, saes=[ours])
    assert not torch.allclose(want, model(toks))
    torch.testing.assert_close(model.run_with_saes(toks, saes=[theirs]), want)
    torch.testing.assert_close(model.run_with_saes(toks, saes=theirs), want)
    with model.saes([theirs]):
        torch.testing.assert_close(model(toks), want)
    model.add_sae(theirs)
    try:
        torch.testing.assert_close(model(toks), want)
    finally:
        model.reset_saes()
    for make in (lambda s: sb.Splice(s), lambda s: sb.Ablate(s, [1, 2]),
                 lambda s: sb.Clamp(s, [3], value=2.0), lambda s: sb.Steer.from_sae(s, 5, 3.0)):
        torch.testing.assert_close(model.run_with_interventions(toks, [make(theirs)]),
                                   model.run_with_interventions(toks, [make(ours)]))
    _, cache = model.run_with_cache_with_saes(toks, saes=[theirs])
    assert cache[f"{HOOK}.hook_sae_acts_post"].shape[-1] == 128


def test_saelens_transcoder_keeps_its_skip_term():
    tc = Transcoder.random("standard", 64, 128, 64, "blocks.0.hook_resid_mid",
                           "blocks.0.hook_mlp_out", skip=True)
    theirs = saelens_sae(tc)
    assert type(theirs).__name__ == "SkipTranscoder"
    ours = as_sae(theirs)
    assert isinstance(ours, Transcoder) and ours.cfg.hook_name_out == "blocks.0.hook_mlp_out"
    assert ours.cfg.metadata.hook_name_out == "blocks.0.hook_mlp_out"
    assert ours.W_skip.data_ptr() == theirs.W_skip.data_ptr()
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_use_error_term_attribute_is_honoured(models):
    model = models("hf")
    toks = _tokens(model)
    sae = sb.SAE.random("standard", 64, 128, HOOK, activation_space="hf")
    clean = model(toks)
    sae.use_error_term = True
    torch.testing.assert_close(model.run_with_saes(toks, saes=[sae]), clean, atol=1e-4,
                               rtol=1e-4)
    assert not torch.allclose(model.run_with_saes(toks, saes=[sae], use_error_term=False),
                              clean, atol=1e-3)
    theirs = saelens_sae(sb.SAE.random("standard", 64, 128, HOOK, seed=3,
                                       activation_space="hf"))
    theirs.use_error_term = True
    model.add_sae(theirs)
    try:
        torch.testing.assert_close(model(toks), clean, atol=1e-4, rtol=1e-4)
    finally:
        model.reset_saes()


def test_unsupported_objects_name_what_is_supported():
    with pytest.raises(ArgumentTypeError, match=r"SAELens SAEs and transcoders.*sparsify"):
        as_sae(nn.Linear(4, 4))
    with pytest.raises(ArgumentTypeError, match="dictionary_learning AutoEncoder"):
        sb.Splice(object())  # type: ignore[arg-type]
    fake = type("TemporalSAE", (nn.Module,), {"__module__": "sae_lens.saes.temporal_sae"})()
    fake.cfg = types.SimpleNamespace(to_dict=lambda: {"architecture": "temporal"})
    with pytest.raises(SAEConfigError, match=r"architecture 'temporal'.*Supported"):
        as_sae(fake)


def test_metadata_reads_like_saelens():
    sae = sb.SAE.random("standard", 4, 8, "blocks.0.attn.hook_z", hook_head_index=1,
                        metadata={"context_size": 16})
    md = sae.cfg.metadata
    assert (md.hook_name, md.hook_head_index, md.context_size) == ("blocks.0.attn.hook_z", 1, 16)
    assert md.dataset_path is None and md["context_size"] == 16
    md.hook_name = "blocks.1.attn.hook_z"
    assert sae.cfg.hook_name == "blocks.1.attn.hook_z"
    assert type(sae.cfg.to_dict()["metadata"]) is dict  # saved as plain JSON


# ---- dictionary_learning and sparsify stand-ins ----------------------------------------------

def _dl_class(name: str, init):
    return type(name, (nn.Module,), {"__module__": "dictionary_learning.dictionary",
                                     "__init__": init})


def _autoencoder_init(self, activation_dim, dict_size):  # dictionary.AutoEncoder
    nn.Module.__init__(self)
    self.activation_dim, self.dict_size = activation_dim, dict_size
    self.bias = nn.Parameter(torch.randn(activation_dim) * 0.1)
    self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
    self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
    with torch.no_grad():
        self.decoder.weight.div_(self.decoder.weight.norm(dim=0, keepdim=True))


def _jumprelu_init(self, activation_dim, dict_size):  # dictionary.JumpReluAutoEncoder
    nn.Module.__init__(self)
    self.activation_dim, self.dict_size = activation_dim, dict_size
    self.W_enc = nn.Parameter(torch.randn(activation_dim, dict_size) * 0.2)
    self.b_enc = nn.Parameter(torch.randn(dict_size) * 0.1)
    self.W_dec = nn.Parameter(torch.randn(dict_size, activation_dim) * 0.2)
    self.b_dec = nn.Parameter(torch.randn(activation_dim) * 0.1)
    self.threshold = nn.Parameter(torch.rand(dict_size) * 0.1)
    self.apply_b_dec_to_input = False


def test_dictionary_learning_objects_need_a_site_once_then_go_anywhere(models):
    torch.manual_seed(0)
    ae = _dl_class("AutoEncoder", _autoencoder_init)(64, 128)
    with pytest.raises(SAEConfigError, match="hook_name="):
        sb.Splice(ae)
    sae = as_sae(ae, hook_name=HOOK)
    assert as_sae(ae) is sae and sb.Splice(ae).sae is sae
    assert sae.W_enc.data_ptr() == ae.encoder.weight.data_ptr()  # the transposed view
    assert sae.W_dec.data_ptr() == ae.decoder.weight.data_ptr()
    x = torch.randn(5, 64)
    # dictionary_learning AutoEncoder.encode: relu(encoder(x - bias)); decode: decoder(f) + bias
    with torch.no_grad():
        f = torch.relu(ae.encoder(x - ae.bias))
        torch.testing.assert_close(sae.encode(x), f)
        torch.testing.assert_close(sae(x), ae.decoder(f) + ae.bias)
    model = models("hf")
    toks = _tokens(model)
    assert not torch.allclose(model.run_with_saes(toks, saes=[ae]), model(toks))

    jr = _dl_class("JumpReluAutoEncoder", _jumprelu_init)(64, 128)
    sae = as_sae(jr, hook_name="resid_1")  # dictionary_learning's own site name
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    assert sae.threshold.data_ptr() == jr.threshold.data_ptr()
    with torch.no_grad():
        pre = x @ jr.W_enc + jr.b_enc
        want = torch.relu(pre) * (pre > jr.threshold)
        torch.testing.assert_close(sae.encode(x), want)


def _topk_init(self, activation_dim, dict_size, k):  # trainers/top_k.AutoEncoderTopK
    nn.Module.__init__(self)
    self.activation_dim, self.dict_size = activation_dim, dict_size
    self.register_buffer("k", torch.tensor(k, dtype=torch.int))
    self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))
    self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
    self.encoder = nn.Linear(activation_dim, dict_size)
    self.b_dec = nn.Parameter(torch.randn(activation_dim) * 0.1)


def test_dictionary_learning_topk_standin_reads_k_from_its_buffer():
    torch.manual_seed(2)
    ae = type("AutoEncoderTopK", (nn.Module,), {"__module__": "dictionary_learning.trainers.top_k",
                                                "__init__": _topk_init})(64, 128, 5)
    sae = as_sae(ae, hook_name=HOOK)
    assert (sae.cfg.architecture, sae.cfg.k) == ("topk", 5)
    assert sae.b_dec.data_ptr() == ae.b_dec.data_ptr()
    x = torch.randn(3, 64)
    with torch.no_grad():  # AutoEncoderTopK.encode / decode
        pre = torch.relu(ae.encoder(x - ae.b_dec))
        vals, idx = pre.topk(5)
        f = torch.zeros_like(pre).scatter(-1, idx, vals)
        torch.testing.assert_close(sae(x), ae.decoder(f) + ae.b_dec, atol=1e-5, rtol=1e-5)


def test_sparsify_coder_standin():
    class SparseCoder(nn.Module):  # sparsify 1.3.3 sparse_coder.SparseCoder
        __module__ = "sparsify.sparse_coder"

        def __init__(self, d_in, num_latents, k):
            super().__init__()
            self.cfg = types.SimpleNamespace(activation="topk", expansion_factor=32,
                                             normalize_decoder=True, num_latents=num_latents,
                                             k=k, multi_topk=False, skip_connection=False,
                                             transcode=False)
            self.d_in, self.num_latents = d_in, num_latents
            self.encoder = nn.Linear(d_in, num_latents)
            self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
            self.b_dec = nn.Parameter(torch.randn(d_in) * 0.1)
            self.W_skip = None

    torch.manual_seed(1)
    coder = SparseCoder(64, 128, 4)
    sae = as_sae(coder, hook_name=HOOK)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 4
    assert sae.W_enc.data_ptr() == coder.encoder.weight.data_ptr()
    assert sae.W_dec.data_ptr() == coder.W_dec.data_ptr()
    x = torch.randn(3, 64)
    with torch.no_grad():  # sparsify: relu(encoder(x - b_dec)), top k, then W_dec rows + b_dec
        pre = torch.relu(coder.encoder(x - coder.b_dec))
        vals, idx = pre.topk(4)
        want = torch.zeros_like(pre).scatter(-1, idx, vals) @ coder.W_dec + coder.b_dec
        torch.testing.assert_close(sae(x), want, atol=1e-5, rtol=1e-5)


# ---- SAE.from_pretrained: SAELens's registry, a hub cache written here -----------------------

def _hub_cache(root, repo_id: str, files: dict[str, bytes]) -> None:
    """The layout huggingface_hub reads offline: refs/main → a snapshot folder of files."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, data in files.items():
        path = repo / "snapshots" / commit / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_from_pretrained_resolves_a_saelens_release_offline(offline_hub, tmp_path):
    sae = sb.SAE.random("standard", 64, 128, "blocks.0.hook_resid_pre")
    sae.save(tmp_path / "saved")
    files = {f"blocks.0.hook_resid_pre/{p.name}": p.read_bytes()
             for p in (tmp_path / "saved").iterdir()}
    _hub_cache(offline_hub, "jbloom/GPT2-Small-SAEs-Reformatted", files)
    loaded = sb.SAE.from_pretrained("gpt2-small-res-jb", "blocks.0.hook_resid_pre")
    assert torch.equal(loaded.W_dec, sae.W_dec)
    assert loaded.cfg.metadata.hook_name == "blocks.0.hook_resid_pre"
    # The registry's config_overrides: the SAEs were trained with center_writing_weights only.
    assert loaded.cfg.model_from_pretrained_kwargs["center_writing_weights"] is True
    # No SAELens release of that name: an org/repo is the repository, sae_id its subfolder.
    again = sb.SAE.from_pretrained("jbloom/GPT2-Small-SAEs-Reformatted",
                                   "blocks.0.hook_resid_pre")
    assert torch.equal(again.W_enc, sae.W_enc)
    json.dumps(loaded.cfg.to_dict())


def test_from_pretrained_unknown_names_list_the_nearest(offline_hub):
    with pytest.raises(SAEFormatError, match="Nearest valid: 'gpt2-small-res-jb'"):
        sb.SAE.from_pretrained("gpt2-small-res-jbb", "blocks.0.hook_resid_pre")
    with pytest.raises(SAEFormatError, match=r"Nearest valid: 'blocks\.8\.hook_resid_pre'"):
        sb.SAE.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pri")


# ---- block-diagonal SAEs read like SAELens's dense ones -----------------------------------

def test_blockdiag_sae_gives_flat_w_enc_w_dec(models):
    from saebridge.sae.blockdiag import BlockDiagSAE, block_diagonal

    dense = block_diagonal(sb.SAE.random("topk", 64, 128, "blocks.0.attn.hook_z", k=5,
                                         activation_space="hf"), 4)
    sae = BlockDiagSAE.from_dense(dense, 4)
    assert tuple(sae.W_dec.shape) == (128, 64) and tuple(sae.W_enc.shape) == (64, 128)
    assert torch.equal(sae.W_dec, dense.W_dec) and torch.equal(sae.W_enc, dense.W_enc)
    assert torch.equal(sae.W_dec[77], sae.decoder_direction(77))
    assert "W_dec" not in dict(sae.named_parameters())  # the blocks are the parameters
    with torch.no_grad():
        sae.W_dec_blocks[1, 2].mul_(3.0)  # an edit of the blocks shows in the flat view
    assert torch.equal(sae.W_dec[32 + 2], 3.0 * dense.W_dec[32 + 2])
    model = models("hf")
    toks = _tokens(model)
    with torch.no_grad():
        sae.W_dec_blocks[1, 2].div_(3.0)
    torch.testing.assert_close(model.run_with_saes(toks, saes=[sae]),
                               model.run_with_saes(toks, saes=[dense]), atol=1e-5, rtol=1e-5)
    _, cache = model.run_with_cache_with_saes(toks, saes=[sae])
    assert cache["blocks.0.attn.hook_z.hook_sae_recons"].shape[-1] == 64  # flat, as SAELens
    assert cache["blocks.0.attn.hook_z.hook_sae_output"].shape[-2:] == (4, 16)
    assert sae.double().W_dec.dtype == torch.float64
