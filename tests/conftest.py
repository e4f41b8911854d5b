"""Session fixtures: one tiny GPT-2 saved to disk, and every backend built from it offline.

The model has random LayerNorm gains/biases and linear biases (the default init would
make TransformerLens processing invisible). TransformerLens models are converted from the
same HF weights with saebridge's offline converter; nothing touches a hub.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# The tiny models are far faster single-threaded, and timings stay stable when other
# processes share the machine's two cores.
torch.set_num_threads(1)

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile(
    "dev", max_examples=60, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available on this machine"))]
BACKENDS = ["hf", "tl-processed", "tl-unprocessed"]
UNPROCESSED = dict(fold_ln=False, center_writing_weights=False, center_unembed=False,
                   fold_value_biases=False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    from saebridge.tiny import save_tiny_gpt2

    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


_MODELS: dict[tuple[str, str], object] = {}


def build_model(tiny_dir, tokenizer, backend: str, device: str):
    """A raw backend model on ``device``, built once per session."""
    key = (backend, device)
    if key not in _MODELS:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
        hf = hf.to(device).eval()
        if backend == "hf":
            _MODELS[key] = hf
        elif backend in NNSIGHT_BACKENDS:
            _MODELS[key] = build_nnsight(hf, tokenizer, backend)
        else:
            from saebridge.adapters.transformer_lens import from_hf

            flags = UNPROCESSED if backend == "tl-unprocessed" else {}
            _MODELS[key] = from_hf(hf, tokenizer=tokenizer, **flags)
    return _MODELS[key]


NNSIGHT_BACKENDS = ["nnsight-hf", "nnsight-tl"]
"""nnsight ``LanguageModel`` over its own copy of the HF model; the nnsight model over a
processed HookedTransformer (``UnifiedTransformer``, built from the HF model offline)."""


def build_nnsight(hf, tokenizer, backend: str):
    import copy
    import warnings

    import nnsight

    from saebridge.adapters.nnsight import UnifiedTransformer

    if backend == "nnsight-tl":
        return UnifiedTransformer(hf, tokenizer=tokenizer)
    with warnings.catch_warnings():  # LanguageModel is deprecated in nnsight 0.8, still common
        warnings.simplefilter("ignore", nnsight.NNsightDeprecationWarning)
        # A copy: nnsight sets the tokenizer's pad token and padding side.
        return nnsight.LanguageModel(hf, tokenizer=copy.deepcopy(tokenizer))


@pytest.fixture(scope="session")
def models(tiny_dir, tokenizer):
    """``models(backend, device)`` → a wrapped model."""
    import saebridge as sb

    def get(backend: str, device: str = "cpu") -> sb.Model:
        return sb.wrap(build_model(tiny_dir, tokenizer, backend, device), tokenizer=tokenizer)
    return get


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


# ---- every architecture: one tiny checkpoint per family, every backend built from it ------

FAMILIES = ["gpt2", "neox", "llama", "gemma2"]
BRIDGES = ["bridge", "bridge-compat"]
"""TransformerBridge in raw mode and after enable_compatibility_mode() (via bridge_from_hf)."""


def has_hooked_transformer() -> bool:
    """TransformerLens 4.x removed HookedTransformer; its backends are skipped there."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


FAMILY_BACKENDS = ["hf", *(["tl-processed", "tl-unprocessed"] if has_hooked_transformer()
                           else []), *BRIDGES]
_FAMILY_DIRS: dict[str, object] = {}
_FAMILY_MODELS: dict[tuple[str, str, str], object] = {}


def family_dir(tmp_path_factory: pytest.TempPathFactory, family: str):
    if family not in _FAMILY_DIRS:
        from saebridge.tiny import save_tiny

        _FAMILY_DIRS[family] = save_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"))
    return _FAMILY_DIRS[family]


def build_family_model(path, family: str, backend: str, device: str):
    """A raw backend model of ``family`` on ``device``, built once per session from the
    saved checkpoint (``save_pretrained`` + ``from_pretrained``, as a user loads one)."""
    key = (family, backend, device)
    if key not in _FAMILY_MODELS:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
        hf = hf.to(device).eval()
        if backend == "hf":
            model = hf
        elif backend in BRIDGES:
            from saebridge.adapters.tl_bridge import bridge_from_hf

            model = bridge_from_hf(hf, tokenizer=tok, compatibility_mode=backend != "bridge")
        else:
            from saebridge.adapters.transformer_lens import from_hf

            flags = UNPROCESSED if backend == "tl-unprocessed" else {}
            model = from_hf(hf, tokenizer=tok, **flags)
        _FAMILY_MODELS[key] = (model, tok)
    return _FAMILY_MODELS[key]


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory):
    """``arch_models(family, backend, device="cpu")`` → a wrapped model of a tiny
    ``family`` (:data:`FAMILIES`) on ``backend`` (:data:`FAMILY_BACKENDS`)."""
    import saebridge as sb

    def get(family: str, backend: str, device: str = "cpu") -> sb.Model:
        path = family_dir(tmp_path_factory, family)
        model, tok = build_family_model(path, family, backend, device)
        return sb.wrap(model, tokenizer=tok)
    return get


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Each tiny architecture in turn."""
    return request.param


@pytest.fixture(params=FAMILY_BACKENDS)
def family_backend(request) -> str:
    """Each backend that this TransformerLens supports, in turn."""
    return request.param


@pytest.fixture(scope="session")
def family_backends() -> list[str]:
    return list(FAMILY_BACKENDS)
