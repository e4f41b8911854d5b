"""Models dispatched by accelerate (``device_map=``) with layers offloaded to the CPU and to
disk, against the same model in memory: clean runs, splices in every activation space,
steering, caches, latents and generation give the same numbers on the HF, nnsight and
HookedTransformer backends; and the bad inputs give the library's errors.

On a CPU-only machine "offloaded to the CPU" needs one trick: accelerate offloads ``"cpu"``
entries of a device map only when the main device is not the CPU, and it tells devices
apart by ``== "cpu"``. ``main_device=torch.device("cpu")`` is not equal to that string, so
``"cpu"`` entries are offloaded (weights in a CPU weights map, parameters on ``meta``
between forwards, exactly as next to a GPU), while entries given as ``torch.device("cpu")``
stay in memory.
"""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch

import saebridge as sb
from saebridge.errors import DeviceError, SpaceConversionError, UnsupportedArchitectureError
from tests.parity import assert_changed, logprob_gap

pytest.importorskip("accelerate")

CPU = torch.device("cpu")
SPACES = ("hf", "tl-processed", "tl-unprocessed")
SITES = ("blocks.1.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.0.ln2.hook_normalized",
         "blocks.1.hook_mlp_out")
BACKENDS = ("hf", "nnsight-hf", "tl-processed")
EXACT = {"atol": 1e-6, "rtol": 1e-6}
"""The same weights run by the same code on the same device: equal up to float noise."""


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _blocks(hf) -> list[str]:
    adapter = sb.wrap(hf).adapter
    return [adapter.prefix + adapter.site(f"blocks.{i}.hook_resid_post").module
            for i in range(adapter.n_layers)]


def device_map(hf, embed_offloaded: bool = False) -> dict:
    """Block 0 offloaded to CPU, block 1 to disk, the rest in memory (or offloaded too)."""
    blocks = _blocks(hf)
    rest = CPU if not embed_offloaded else "cpu"
    dmap: dict = {key.rpartition(".")[0]: rest for key in hf.state_dict()
                  if not any(key.startswith(b + ".") for b in blocks)}
    return {**dmap, blocks[0]: "cpu", blocks[1]: "disk"}


def dispatched(path, folder, embed_offloaded: bool = False):
    from accelerate import dispatch_model

    hf = _load(path)
    return dispatch_model(hf, device_map(hf, embed_offloaded), main_device=CPU,
                          offload_dir=str(folder))


def build(hf, tok, backend: str):
    if backend == "hf":
        return sb.wrap(hf, tokenizer=tok)
    if backend == "tl-processed":
        from saebridge.adapters.transformer_lens import from_hf

        return sb.wrap(from_hf(hf, tokenizer=tok))
    import nnsight

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnsight.NNsightDeprecationWarning)
        return sb.wrap(nnsight.LanguageModel(hf, tokenizer=copy.deepcopy(tok)))


_PAIRS: dict = {}


@pytest.fixture(params=["gpt2", "llama"])
def family(request) -> str:
    return request.param


@pytest.fixture
def pair(family, backend_name, tmp_path_factory):
    """(in memory, dispatched with offloaded layers) of one family on one backend."""
    from transformers import AutoTokenizer

    from tests.conftest import family_dir

    key = (family, backend_name)
    if key not in _PAIRS:
        path = family_dir(tmp_path_factory, family)
        tok = AutoTokenizer.from_pretrained(path)
        folder = tmp_path_factory.mktemp(f"offload-{family}")
        _PAIRS[key] = (build(_load(path), tok, backend_name),
                       build(dispatched(path, folder), tok, backend_name))
    return _PAIRS[key]


@pytest.fixture(params=BACKENDS)
def backend_name(request) -> str:
    return request.param


def test_the_model_really_is_offloaded(family, tmp_path_factory):
    from tests.conftest import family_dir

    hf = dispatched(family_dir(tmp_path_factory, family), tmp_path_factory.mktemp("off"))
    blocks = _blocks(hf)
    params = dict(hf.named_parameters())
    assert all(p.is_meta for n, p in params.items() if n.startswith(blocks[0] + "."))
    assert all(p.is_meta for n, p in params.items() if n.startswith(blocks[1] + "."))
    assert not any(p.is_meta for n, p in params.items() if "embed" in n or ".wte." in n)


def test_clean_steer_and_generate(pair):
    mem, off = pair
    tokens = mem.to_tokens("The quick brown fox jumps over the lazy dog")
    clean = mem(tokens)
    torch.testing.assert_close(off(tokens), clean, **EXACT)
    sae = sb.SAE.random("standard", _width(mem, "blocks.0.hook_resid_post"), 128,
                        "blocks.0.hook_resid_post", seed=3)
    steer = [sb.Steer.from_sae(sae, 5, coef=8.0)]
    steered = mem.run_with_interventions(tokens, steer)
    assert_changed(steered, clean, "steering")
    torch.testing.assert_close(off.run_with_interventions(tokens, steer), steered, **EXACT)
    assert torch.equal(off.generate(tokens, 4, saes=[sae]), mem.generate(tokens, 4, saes=[sae]))


@pytest.mark.parametrize("space", SPACES)
def test_splice_latents_in_every_space(pair, space):
    mem, off = pair
    tokens = mem.to_tokens("Sparse autoencoders find features in the residual stream")
    clean = mem(tokens)
    for i, hook in enumerate(SITES):
        width = _width(mem, hook)
        sae = sb.SAE.random("topk", width, 96, hook, k=6, seed=10 + i, activation_space=space)
        try:
            ref, ref_cache = mem.run_with_cache_with_saes(tokens, [sae], names=[])
        except SpaceConversionError:  # an unfolded SAE writing at a folded LayerNorm output
            assert hook.endswith("hook_normalized") and mem.adapter.space.fold_ln
            with pytest.raises(SpaceConversionError):
                off.run_with_cache_with_saes(tokens, [sae], names=[])
            continue
        got, cache = off.run_with_cache_with_saes(tokens, [sae], names=[])
        # The splice did something (far above the float noise the comparison allows).
        assert logprob_gap(ref, clean) > 1e-3, f"{space} SAE at {hook} changed nothing"
        torch.testing.assert_close(got, ref, **EXACT, msg=f"{space} SAE at {hook}")
        key = f"{hook}.hook_sae_acts_post"
        assert torch.equal(cache[key] != 0, ref_cache[key] != 0), hook
        torch.testing.assert_close(cache[key], ref_cache[key], **EXACT)


def _width(model, hook: str) -> int:
    act = model.run_with_cache("Hi", names=[hook])[1][hook]
    return act.shape[-1] * (act.shape[-2] if act.dim() == 4 else 1)


def test_cache_of_every_hook(pair):
    mem, off = pair
    tokens = mem.to_tokens("Hello world, hello model")
    _, ref = mem.run_with_cache(tokens)
    _, got = off.run_with_cache(tokens)
    assert set(got) == set(ref) and len(ref) > 20
    for name, value in ref.items():
        assert got[name].device == value.device == CPU, name
        torch.testing.assert_close(got[name], value, **EXACT, msg=name)


def test_hooks_asked_for_by_name(pair, backend_name):
    """The hooks TransformerLens runs only under a cfg flag, computed from the offloaded
    layers' weights (``hook_result`` reads each block's ``W_O``)."""
    if backend_name == "tl-processed":
        pytest.skip("a HookedTransformer has them only with its own flags set")
    mem, off = pair
    tokens = mem.to_tokens("Hello world, hello model")
    names = [f"blocks.{i}.{rel}" for i in range(2) for rel in (
        "attn.hook_result", "hook_q_input", "hook_mlp_in", "attn.hook_attn_scores")]
    _, ref = mem.run_with_cache(tokens, names=names)
    _, got = off.run_with_cache(tokens, names=names)
    for name in names:
        torch.testing.assert_close(got[name], ref[name], **EXACT, msg=name)


def test_constants_are_read_per_layer_through_the_weights_map(tmp_path, tiny_dir):
    """The conversion constants of an offloaded layer are computed only when a run needs
    them, from that layer's weights alone, and equal those of the model in memory."""
    from saebridge.hookmap.rawstats import PerLayer

    mem = sb.wrap(_load(tiny_dir)).adapter.raw_stats()
    off_adapter = sb.wrap(dispatched(tiny_dir, tmp_path)).adapter
    off = off_adapter.raw_stats()
    assert off._layers == {} and off._embed is None  # nothing read when wrapped
    torch.testing.assert_close(off.b_V_LKd[1], mem.b_V_LKd[1], rtol=0, atol=0)
    assert set(off._layers) == {1}
    for name in ("ln1_b_W_V_LKd", "W_O_mean_LHd", "b_O_mean_L", "W_out_mean_LM", "b_out_mean_L"):
        column: PerLayer = getattr(off, name)
        torch.testing.assert_close(column.stack(), getattr(mem, name).stack(), **EXACT)
    torch.testing.assert_close(off.embed_mean_V, mem.embed_mean_V, rtol=0, atol=0)
    assert off.ln_affine(0, "ln2")[0].equal(mem.ln_affine(0, "ln2")[0])
    assert all(not t.is_meta for t in off.layer(0)[:6])


def test_from_pretrained_device_map_with_disk_offload(tmp_path, tiny_dir, tokenizer):
    """The way users load it: transformers' ``device_map=`` and ``offload_folder=``."""
    from transformers import AutoModelForCausalLM

    blocks = _blocks(_load(tiny_dir))
    dmap = {**{k.rpartition(".")[0]: "cpu" for k in _load(tiny_dir).state_dict()
               if not k.startswith(blocks[1] + ".")}, blocks[1]: "disk"}
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager",
                                              device_map=dmap, offload_folder=str(tmp_path))
    assert next(p for n, p in hf.named_parameters() if n.startswith(blocks[1])).is_meta
    mem, off = sb.wrap(_load(tiny_dir), tokenizer=tokenizer), sb.wrap(hf, tokenizer=tokenizer)
    sae = sb.SAE.random("jumprelu", 64, 128, "blocks.1.attn.hook_z", seed=2,
                        activation_space="tl-processed")
    tokens = mem.to_tokens("Layer norm, attention heads, MLP neurons")
    torch.testing.assert_close(off.run_with_saes(tokens, [sae]), mem.run_with_saes(tokens, [sae]),
                               **EXACT)
    assert off.adapter.device_of("blocks.1.attn.hook_z") == CPU


# ---- bad input ----------------------------------------------------------------------------


def test_a_weight_no_weights_map_holds_is_refused(tiny_dir):
    from accelerate import dispatch_model

    hf = _load(tiny_dir)
    dmap = device_map(hf)
    dmap[_blocks(hf)[1]] = "cpu"
    kept = {k: v for k, v in hf.state_dict().items() if ".mlp.c_fc." not in k}  # one left out
    hf = dispatch_model(hf, dmap, main_device=CPU, state_dict=kept)
    with pytest.raises(DeviceError, match=r"'transformer\.h\.0\.mlp\.c_fc\.bias'.*device_map"):
        sb.wrap(hf)


def test_an_offload_folder_deleted_after_loading_is_reported(tmp_path, tiny_dir):
    from saebridge.adapters.weights import WeightReader

    hf = dispatched(tiny_dir, tmp_path / "off")
    reader = WeightReader(hf)
    assert reader["transformer.h.1.ln_1.weight"].shape == (64,)  # read from disk
    shutil.rmtree(tmp_path / "off")
    with pytest.raises(DeviceError, match="offload folder was moved or deleted"):
        reader["transformer.h.1.ln_1.weight"]


def test_nnsight_needs_the_embedding_on_a_device(tmp_path, tiny_dir, tokenizer):
    hf = dispatched(tiny_dir, tmp_path, embed_offloaded=True)
    tokens = torch.tensor([[0, 5, 9, 7]])
    assert torch.equal(sb.wrap(hf)(tokens), sb.wrap(_load(tiny_dir))(tokens))  # HF runs it
    with pytest.raises(DeviceError, match=r"first parameter, 'transformer\.wte\.weight'"):
        build(hf, tokenizer, "nnsight-hf")


def test_a_bridge_over_offloaded_layers_is_refused(tmp_path, tiny_dir):
    from saebridge.adapters.tl_bridge import bridge_from_hf

    with pytest.raises(DeviceError, match="offloaded 24 of its weights"):
        bridge_from_hf(dispatched(tiny_dir, tmp_path))


def test_an_sae_on_the_meta_device_is_refused():
    from saebridge.kernel.ops import splice
    from saebridge.kernel.spaces import IDENTITY

    data = sb.SAE.random("topk", 64, 96, "blocks.0.hook_resid_post", k=4).data()
    data = data._replace(params={k: v.to("meta") for k, v in data.params.items()})
    with pytest.raises(DeviceError, match=r"meta device.*device_of"):
        splice(data, torch.zeros(1, 3, 64), IDENTITY, False, "none", "blocks.0.hook_resid_post")


def test_an_architecture_without_a_hook_map_lists_the_supported_ones():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, vocab_size=64,
                                     word_embed_proj_dim=16))
    with pytest.raises(UnsupportedArchitectureError) as err:
        sb.wrap(model)
    message = str(err.value)
    assert "'OPTForCausalLM'" in message and "hookmap=" in message
    assert all(a in message for a in ("GPT2LMHeadModel", "GPTNeoXForCausalLM",
                                      "LlamaForCausalLM", "Gemma2ForCausalLM"))
