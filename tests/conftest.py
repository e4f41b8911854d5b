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
        else:
            from saebridge.adapters.transformer_lens import from_hf

            flags = UNPROCESSED if backend == "tl-unprocessed" else {}
            _MODELS[key] = from_hf(hf, tokenizer=tokenizer, **flags)
    return _MODELS[key]


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
