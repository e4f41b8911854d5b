"""Session fixtures: one tiny GPT-2 saved to disk, and every backend built from it offline;
the backend matrix (:data:`BACKENDS` × :data:`DEVICES`, the ``backend`` fixture) that every
cross-backend test runs over. The checks those tests share live in tests/parity.py.

The model has random LayerNorm gains/biases and linear biases (the default init would
make TransformerLens processing invisible). TransformerLens models are converted from the
same HF weights with saebridge's offline converter; nothing touches a hub.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

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

# ---- the backend matrix: every test that compares backends draws its cases from here -------

BACKENDS = ("hf", "tl-processed", "tl-unprocessed", "bridge", "bridge-compat", "nnsight-hf",
            "nnsight-tl")
"""Every backend, each built from the same HF weights (:func:`build_model`,
:func:`build_family_model`): HF through torch hooks; HookedTransformer processed and
unprocessed; TransformerBridge raw and after ``enable_compatibility_mode()``; nnsight's
``LanguageModel`` over its own copy of the HF model and ``UnifiedTransformer`` over a
processed HookedTransformer."""
TL_BACKENDS = ("tl-processed", "tl-unprocessed", "nnsight-tl")
"""Built on a HookedTransformer, which TransformerLens 4.x removed."""
BRIDGES = ("bridge", "bridge-compat")
NNSIGHT_BACKENDS = ("nnsight-hf", "nnsight-tl")
SUBSETS: dict[str, tuple[str, ...]] = {
    "all": BACKENDS,
    # Tests of nnsight's own objects: envoys, user traces, the interleaver.
    "nnsight": NNSIGHT_BACKENDS,
    # Native activations equal HF's: no weight processing between HF and the hooks.
    "raw": ("hf", "tl-unprocessed", "bridge", "nnsight-hf"),
}
"""Named subsets of :data:`BACKENDS`, for a test that genuinely needs one: mark it
``@pytest.mark.backends("<name>")`` and say why next to the mark."""
DEVICES = ("cpu", "cuda")


class Backend(NamedTuple):
    """One cell of the matrix: ``models(*backend)`` or ``arch_models(family, *backend)``."""

    name: str
    device: str


def has_hooked_transformer() -> bool:
    """TransformerLens 4.x removed HookedTransformer; its backends are skipped there."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def unavailable(backend: str, device: str) -> str | None:
    """Why this machine cannot build ``backend`` on ``device``; None when it can."""
    if device == "cuda" and not torch.cuda.is_available():
        return "CUDA not available on this machine"
    if backend in TL_BACKENDS and not has_hooked_transformer():
        return "this TransformerLens has no HookedTransformer (4.x)"
    if backend in NNSIGHT_BACKENDS and importlib.util.find_spec("nnsight") is None:
        return "nnsight is not installed"
    return None


def matrix(backends: tuple[str, ...] = BACKENDS) -> list:
    """``backends`` × :data:`DEVICES` as pytest params (ids like ``hf-cpu``), each skipped
    with its reason where this machine cannot build it."""
    params = []
    for name in backends:
        for device in DEVICES:
            why = unavailable(name, device)
            params.append(pytest.param(Backend(name, device), id=f"{name}-{device}",
                                       marks=[pytest.mark.skip(reason=why)] if why else []))
    return params


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"backends(subset): run the backend fixture over a subset: {sorted(SUBSETS)}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The ``backend`` fixture runs over every backend × device, or over the subset that
    ``@pytest.mark.backends("<name>")`` names."""
    if "backend" not in metafunc.fixturenames:
        return
    mark = metafunc.definition.get_closest_marker("backends")
    subset = mark.args[0] if mark else "all"
    if subset not in SUBSETS:
        raise KeyError(f"unknown backend subset {subset!r}; the subsets are {sorted(SUBSETS)} "
                       "(add one to SUBSETS in tests/conftest.py)")
    metafunc.parametrize("backend", matrix(SUBSETS[subset]), indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    """A :class:`Backend` (name, device): each of :data:`BACKENDS` on each device in turn."""
    return request.param


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
        _MODELS[key] = build_backend(hf.to(device).eval(), tokenizer, backend)
    return _MODELS[key]


def build_backend(hf, tokenizer, backend: str):
    """``backend`` (one of :data:`BACKENDS`) built offline around or from the HF model
    ``hf`` (which it may keep: build one HF model per backend)."""
    if backend == "hf":
        return hf
    if backend in BRIDGES:
        from saebridge.adapters.tl_bridge import bridge_from_hf

        return bridge_from_hf(hf, tokenizer=tokenizer, compatibility_mode=backend != "bridge")
    if backend in NNSIGHT_BACKENDS:
        return build_nnsight(hf, tokenizer, backend)
    from saebridge.adapters.transformer_lens import from_hf

    flags = UNPROCESSED if backend == "tl-unprocessed" else {}
    return from_hf(hf, tokenizer=tokenizer, **flags)


def build_nnsight(hf, tokenizer, backend: str):
    """nnsight's ``LanguageModel`` over its own copy of the HF model, or ``UnifiedTransformer``
    over a processed HookedTransformer built from it offline."""
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


# ---- every architecture: one tiny checkpoint per family, every backend built from it ------

def registered_families() -> list[str]:
    """Every registered architecture's short name (``saebridge/hookmap/registry.py``): a new
    architecture file is picked up by every test that takes the ``family`` fixture."""
    from saebridge.hookmap.registry import architectures

    return [arch.name for arch in architectures()]


FAMILIES = registered_families()
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
        _FAMILY_MODELS[key] = (build_backend(hf.to(device).eval(), tok, backend), tok)
    return _FAMILY_MODELS[key]


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory):
    """``arch_models(family, backend, device="cpu")`` → a wrapped model of a tiny
    ``family`` (:data:`FAMILIES`) on ``backend`` (:data:`BACKENDS`)."""
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


@pytest.fixture
def model(models, backend):
    """The backend under test, run once: a TransformerBridge wires permanent capture hooks
    of its own on its first forward, so hook counts are compared with the count after it."""
    model = models(*backend)
    model("Hello")
    return model
