"""GPT-2 hook map: names, errors, and every site read/written where TransformerLens has it;
the registry: one complete record per architecture file."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import saebridge as sb
from saebridge.errors import RegistryError, UnknownHookError, UnsupportedArchitectureError
from saebridge.hookmap import hook_map, names, resolve
from saebridge.hookmap.architecture import Architecture
from saebridge.hookmap.registry import (
    BUILTIN,
    architecture,
    architecture_of,
    architectures,
    register_aliases,
    register_architecture,
)
from saebridge.hookmap.site import Site
from saebridge.hookmap.tl_config import tl_fields
from saebridge.testing import Record
from saebridge.tiny import tiny, tiny_config, tiny_tokenizer

TOK = tiny_tokenizer()

REQUIRED = ["hook_embed", "hook_pos_embed", "ln_final.hook_normalized"] + [
    f"blocks.1.{n}" for n in (
        "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_q", "attn.hook_k",
        "attn.hook_v", "attn.hook_z", "attn.hook_pattern", "hook_attn_out", "mlp.hook_pre",
        "mlp.hook_post", "hook_mlp_out")]


def test_gpt2_map_covers_the_required_hooks(models):
    hf_names = models("hf").hook_names()
    for name in REQUIRED:
        assert name in hf_names
    assert set(hf_names) <= set(models("tl-processed").adapter.model.hook_dict)


def test_unknown_hook_lists_nearest_names():
    hmap = hook_map("GPT2LMHeadModel")
    with pytest.raises(UnknownHookError) as err:
        resolve(hmap, "blocks.1.hook_resid_pree", 2)
    assert "blocks.1.hook_resid_pre" in str(err.value)
    with pytest.raises(KeyError):  # the builtin still catches it
        resolve(hmap, "blocks.7.hook_resid_pre", 2)
    with pytest.raises(UnknownHookError, match="0 to 1"):
        resolve(hmap, "blocks.7.hook_resid_pre", 2)


def test_names_are_in_execution_order():
    order = names(hook_map("GPT2LMHeadModel"), 2)
    assert order.index("blocks.0.hook_resid_post") < order.index("blocks.1.hook_resid_pre")
    assert order.index("blocks.0.attn.hook_z") < order.index("blocks.0.hook_attn_out")


# Not named ``backend``: conftest parametrises that fixture over the whole backend matrix.
@pytest.mark.parametrize("backend_name", ["hf", "tl-processed", "tl-unprocessed"])
def test_cache_matches_tl_processed_at_every_hook(models, backend_name):
    """Cache values are canonical (TL-processed) on every backend: each conversion
    raw → processed checked against a TL model built from the same weights."""
    tokens = models("hf").to_tokens("Hello world, hello model")
    _, ref = models("tl-processed").run_with_cache(tokens)
    _, cache = models(backend_name).run_with_cache(tokens)
    assert set(cache) == set(ref)
    for name in ref:
        torch.testing.assert_close(cache[name], ref[name], atol=2e-5, rtol=1e-4, msg=name)


def test_hf_native_activations_equal_unprocessed_tl(models):
    """The raw HF sites (incl. resid_mid without a module boundary, z from c_proj's input)
    are exactly TL's unprocessed hooks."""
    tokens = models("hf").to_tokens("Hello world, hello model")
    seen: dict[str, dict[str, torch.Tensor]] = {}
    for backend in ("hf", "tl-unprocessed"):
        model, seen[backend] = models(backend), {}
        grab = [Record(n, seen[backend]) for n in model.hook_names()]
        model.run_with_interventions(tokens, grab)
    for name, value in seen["tl-unprocessed"].items():
        torch.testing.assert_close(seen["hf"][name], value, atol=2e-5, rtol=1e-4, msg=name)


def test_processed_to_raw_conversion_rebuilds_the_raw_stream(models):
    """The hard direction: a centred stream back to raw needs the raw mean, rebuilt by the
    tracker from hook_z / mlp.hook_post. Compared with HF's native activations."""
    tokens = models("hf").to_tokens("Layer norm reads the stream")
    raw: dict[str, torch.Tensor] = {}
    models("hf").run_with_interventions(tokens, [Record(n, raw) for n in models("hf").hook_names()])
    tl = models("tl-processed")
    back: dict[str, torch.Tensor] = {}
    # An SAE op in raw space makes the engine build the tracker; reuse it via a real SAE.
    sae = sb.SAE.random("standard", 64, 32, "blocks.1.hook_resid_post", activation_space="hf")
    grabs = [Record(n, back, sb.ActivationSpace.parse("hf")) for n in tl.hook_names()
             if n.split(".")[-1] != "hook_pattern"]
    tl.run_with_interventions(tokens, [*grabs, sb.Splice(sae, use_error_term=True)])
    for name, value in back.items():
        torch.testing.assert_close(value, raw[name], atol=5e-5, rtol=1e-4, msg=name)


def test_processed_logits_are_raw_logits_minus_their_vocab_mean(models):
    tokens = models("hf").to_tokens("Hello world")
    raw, processed = models("hf")(tokens), models("tl-processed")(tokens)
    torch.testing.assert_close(processed, raw - raw.mean(-1, keepdim=True), atol=2e-5, rtol=1e-4)


def test_resid_mid_write_reaches_the_rest_of_the_block(models):
    """ln_2's input is not the residual GPT2Block adds to: a write must go elsewhere."""
    tokens = models("hf").to_tokens("Hello world")
    vec = torch.randn(64, generator=torch.Generator().manual_seed(1))
    steer = [sb.Steer("blocks.0.hook_resid_mid", vec, coef=3.0)]
    out = {b: models(b).run_with_interventions(tokens, steer).log_softmax(-1)
           for b in ("hf", "tl-unprocessed")}
    torch.testing.assert_close(out["hf"], out["tl-unprocessed"], atol=1e-4, rtol=0)
    assert (out["hf"] - models("hf")(tokens).log_softmax(-1)).abs().max() > 1e-2


def test_pattern_is_read_only_on_hf(models):
    tokens = models("hf").to_tokens("Hello")
    with pytest.raises(UnknownHookError, match="read but not written"):
        models("hf").run_with_interventions(
            tokens, [sb.Steer("blocks.0.attn.hook_pattern", torch.zeros(2))])


# ---- the registry: one complete record per architecture file ------------------------------

ARCHITECTURES = [pytest.param(a, id=a.name) for a in architectures()]


def test_the_registry_lists_every_builtin_file_once():
    assert [a.name for a in architectures()] == list(BUILTIN)
    hf_names = [n for a in architectures() for n in a.hook_map.architectures]
    assert len(hf_names) == len(set(hf_names))
    assert architecture("llama").hook_map is hook_map("Qwen2ForCausalLM")
    assert architecture_of("MistralForCausalLM").name == "llama"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_record_is_complete(arch: Architecture):
    """Hook map, TransformerLens table, alias tables and tiny spec all fit together: the
    tiny model builds, every site's module exists in it, and the table gives a
    HookedTransformerConfig with the model's sizes for every architecture it converts."""
    model, _ = tiny(arch.name, tokenizer=TOK)
    assert model.config.architectures == [arch.tiny.model_class]
    hmap = arch.hook_map
    assert hmap.tl_weights is not None and arch.tl_architectures
    modules = dict(model.named_modules())
    prefix = next(p for p in hmap.prefixes if any(m.startswith(p) for m in modules if m))
    sites = [s for t in (hmap.before_blocks, hmap.block, hmap.after_blocks)
             for s in t.values() if isinstance(s, Site)]
    for site in sites:
        assert prefix + site.module.replace("{layer}", "0") in modules, site.module
    for attr in hmap.config.values():
        assert hasattr(model.config, attr), attr
    config_cls = pytest.importorskip("transformer_lens.config").HookedTransformerConfig
    for hf_name in arch.tl_architectures:
        hf_config = tiny_config(arch.name, TOK, model_class=hf_name)
        cfg = config_cls(original_architecture=hf_name, **tl_fields(arch.tl_config, hf_config))
        assert (cfg.n_layers, cfg.n_heads, cfg.d_vocab) == (
            getattr(hf_config, hmap.config["n_layers"]),
            getattr(hf_config, hmap.config["n_heads"]), len(TOK))
        assert cfg.d_model == getattr(hf_config, hmap.config["d_model"])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_alias_names_a_hook_of_the_map(arch: Architecture):
    hmap = arch.hook_map
    known = {*hmap.before_blocks, *hmap.after_blocks,
             *(f"blocks.{{layer}}.{n}" for n in hmap.block)}
    for table in arch.aliases:
        assert set(table.architectures) <= set(hmap.architectures), table.architectures
        for pattern, sides in table.entries.items():
            for side in (sides.output, sides.input):
                assert side is None or side.name in known, (pattern, side)


def test_registries_refuse_duplicates_and_name_the_nearest_key():
    gpt2 = architecture("gpt2")
    with pytest.raises(RegistryError, match="already registered"):
        register_architecture(gpt2)
    with pytest.raises(RegistryError, match="already registered"):
        register_architecture(replace(gpt2, name="gpt2-again"))  # its hook map is taken
    with pytest.raises(RegistryError, match="already registered"):
        register_aliases(gpt2.aliases[0])
    assert [a.name for a in architectures()] == list(BUILTIN)  # nothing half-registered
    with pytest.raises(UnsupportedArchitectureError, match=r"'llama'.*CONTRIBUTING"):
        architecture("lama")
    with pytest.raises(KeyError, match="Gemma2ForCausalLM"):
        hook_map("Gemma2ForCausalM")


def test_a_record_naming_models_its_map_lacks_is_refused():
    gpt2 = architecture("gpt2")
    with pytest.raises(RegistryError, match="GPTNeoXForCausalLM"):
        replace(gpt2, tl_architectures=("GPTNeoXForCausalLM",))
