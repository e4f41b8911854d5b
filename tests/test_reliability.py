"""Bad input gets a clear saebridge error and leaves no state behind, on every backend."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import saebridge as sb
from saebridge import backends
from saebridge.errors import BackendNotInstalledError, ModelMismatchWarning, SAEBridgeError
from saebridge.testing import RaiseAt, hooks_left, torch_module
from saebridge.tolerance import logprob_atol
from tests.parity import TOL, logprob_gap

ROOT = Path(__file__).resolve().parents[1]


class _Boom(RuntimeError):
    pass


class _FailingSAE(sb.SAE):
    """An SAE whose encoder raises (a bug in user SAE code)."""

    def run(self, x):
        raise _Boom("SAE failed")

    def encode(self, x):
        raise _Boom("SAE failed")


@given(data=st.data())
def test_a_raise_anywhere_leaves_no_state(models, backend, data):
    model = models(*backend)
    tokens = model.to_tokens("Hello world, hello model")
    sites = [n for n in model.hook_names() if model.adapter.writable(n)
             and n.split(".")[-1] in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                                      "hook_attn_out", "hook_mlp_out")]
    site = data.draw(st.sampled_from(sites))
    attached = sb.SAE.random("standard", 64, 32, "blocks.0.hook_resid_pre", seed=1
                             ).to(backend.device)
    model.add_sae(attached)
    try:
        before = model(tokens)
        # Compared with the count now: a TransformerBridge wires permanent capture hooks
        # of its own on its first forward.
        hooks = hooks_left(model)
        module = torch_module(model)
        weights = {k: v.clone() for k, v in module.state_dict().items()}
        source = data.draw(st.sampled_from(["intervention", "sae", "steer+raise"]))
        if source == "intervention":
            ops = [RaiseAt(site, _Boom(site))]
        elif source == "steer+raise":
            later = data.draw(st.sampled_from(sites))
            ops = [sb.Steer(site, torch.ones(64, device=backend.device)),
                   RaiseAt(later, _Boom(later))]
        else:
            failing = _FailingSAE.random("standard", 64, 32, site, seed=2).to(backend.device)
            ops = [sb.Splice(failing)]
        with pytest.raises(_Boom):
            model.run_with_interventions(tokens, ops)
        assert hooks_left(model) == hooks
        assert [s.hook for s in model.attached] == [attached.cfg.hook_name]
        assert torch.equal(model(tokens), before)
        for k, v in module.state_dict().items():
            assert torch.equal(v, weights[k]), k
    finally:
        model.reset_saes()


def test_model_name_mismatch_warns_naming_both(models):
    model = models("hf")
    model.adapter.model_name = "openai-community/gpt2"
    try:
        sae = sb.SAE.random("standard", 64, 16, "blocks.0.hook_resid_pre",
                            model_name="pythia-70m")
        with pytest.warns(ModelMismatchWarning, match=r"'pythia-70m'.*'openai-community/gpt2'"):
            model.run_with_saes("Hello", saes=[sae])
        ok = sb.SAE.random("standard", 64, 16, "blocks.0.hook_resid_pre",
                           model_name="gpt2-small")
        with _no_warning():
            model.run_with_saes("Hello", saes=[ok])
    finally:
        model.adapter.model_name = None


class _no_warning:
    def __enter__(self):
        import warnings

        self.catch = warnings.catch_warnings()
        self.catch.__enter__()
        warnings.simplefilter("error", ModelMismatchWarning)

    def __exit__(self, *exc):
        self.catch.__exit__(*exc)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sae_in_another_dtype_is_converted(models, backend, dtype):
    """An SAE computes in its own dtype; its output is cast back to the model's, and agrees
    with the fp32 SAE's within the SAE dtype's named tolerance."""
    model = models(*backend)
    sae32 = sb.SAE.random("standard", 64, 64, "blocks.1.hook_resid_pre", seed=9
                          ).to(backend.device)
    other = sae32.to(dtype)
    tokens = model.to_tokens("Hello world")
    ref = model.run_with_saes(tokens, [sae32])
    out = model.run_with_saes(tokens, [other])
    assert out.dtype == ref.dtype
    tol = max(logprob_atol(dtype), TOL)  # the SAE's rounding bounds the difference
    assert logprob_gap(out, ref) <= tol


def test_missing_backend_package_names_the_extra(monkeypatch, models):
    tl = models("tl-processed").adapter.model
    real = backends.importlib.import_module

    def fake(name, *args):
        if name == "saebridge.adapters.transformer_lens":
            raise ModuleNotFoundError("No module named 'transformer_lens'")
        return real(name, *args)

    monkeypatch.setattr(backends.importlib, "import_module", fake)
    with pytest.raises(BackendNotInstalledError, match=r"pip install 'saebridge\[tl\]'"):
        sb.wrap(tl)
    with pytest.raises(ImportError):  # the builtin catches it too
        sb.wrap(tl)


def _in_two_threads(run, repeats: int) -> dict[int, list[torch.Tensor]]:
    """``run(i)`` called ``repeats`` times in each of two threads, i = 0 and 1, at once."""
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def work(i: int) -> None:
        for _ in range(repeats):
            results[i].append(run(i))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_threads_with_different_saes_both_get_their_results(models, backend):
    model = models(*backend)
    tokens = model.to_tokens("Hello world, hello model")
    saes = [sb.SAE.random("topk", 64, 64, f"blocks.{i}.hook_resid_post", k=4, seed=i
                          ).to(backend.device) for i in range(2)]
    expected = [model.run_with_saes(tokens, [s]) for s in saes]
    hooks = hooks_left(model)  # after a first forward: a bridge's own capture hooks stay
    results = _in_two_threads(lambda i: model.run_with_saes(tokens, [saes[i]]), repeats=5)
    for i in range(2):
        assert len(results[i]) == 5
        for r in results[i]:  # new threads may use another intra-op thread count: not bitwise
            torch.testing.assert_close(r, expected[i], atol=1e-5, rtol=0)
    assert hooks_left(model) == hooks


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_package_never_unpickles_untrusted_code():
    """Every torch.load passes weights_only=True; pickle.load(s) is never called."""
    files = sorted((ROOT / "saebridge").rglob("*.py")) + sorted((ROOT / "adapters").rglob("*.py"))
    assert len(files) > 10
    for path in files:
        for call in _calls(ast.parse(path.read_text())):
            name = _name(call.func)
            assert name not in ("pickle.load", "pickle.loads", "dill.load", "cloudpickle.load"), \
                f"{path}:{call.lineno} calls {name}"
            if name == "torch.load":
                kw = {k.arg: k.value for k in call.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) \
                    and kw["weights_only"].value is True, f"{path}:{call.lineno}: {name}"


def test_every_error_is_a_saebridge_error_and_a_builtin():
    from saebridge import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type)
               and issubclass(c, SAEBridgeError) and c is not SAEBridgeError]
    assert len(classes) >= 8
    for cls in classes:  # the natural builtin, so existing except clauses keep working
        assert issubclass(cls, KeyError | ValueError | ImportError | TypeError | IndexError
                          | OSError | RuntimeError | NotImplementedError), cls


def test_two_wrappers_of_one_model_share_its_lock(models, tokenizer):
    """sb.wrap twice on the same HF model, used from two threads: each thread's hooks must
    not run in the other's forward."""
    hf = models("hf").adapter.model
    wrappers = [sb.wrap(hf, tokenizer=tokenizer) for _ in range(2)]
    assert wrappers[0].lock is wrappers[1].lock
    saes = [sb.SAE.random("topk", 64, 64, "blocks.0.hook_resid_post", k=4, seed=s)
            for s in (11, 12)]
    tokens = wrappers[0].to_tokens("Hello world, hello model")
    expected = [w.run_with_saes(tokens, [s]) for w, s in zip(wrappers, saes, strict=True)]
    results = _in_two_threads(lambda i: wrappers[i].run_with_saes(tokens, [saes[i]]), repeats=8)
    for i in range(2):
        for r in results[i]:
            torch.testing.assert_close(r, expected[i], atol=1e-5, rtol=0)
    assert hooks_left(hf) == 0
