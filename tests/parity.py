"""What every cross-backend test checks, written once: log-probs equal to HF's within the
dtype's named tolerance (:mod:`saebridge.tolerance`), a splice that really changed the output,
the same latents, and random SAEs whose latents sit clear of their on/off boundaries.

Imported as ``tests.parity`` (pytest's importlib mode puts no test folder on ``sys.path``);
the backend matrix itself (the ``backend`` fixture and its subsets) lives in conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from hypothesis import strategies as st

import saebridge as sb
from saebridge.tolerance import logprob_atol

TOL = logprob_atol(torch.float32)
"""Max |Δ log-prob| between backends for the tiny fp32 models; other dtypes get theirs from
:func:`saebridge.tolerance.logprob_atol`, as :func:`assert_same_logprobs` does."""
CHANGED = 100 * TOL
"""A splice must move some log-prob by more than this to count as having done something."""
ACTS_TOL = {"atol": 1e-4, "rtol": 1e-4}
"""Latents and cached activations (fp32) compared across backends."""
MARGIN = 1e-4
"""Float noise (~1e-6) must not flip a latent: random SAEs with a pre-activation nearer than
this to its on/off boundary are skipped."""
SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
         "hook_mlp_out", "mlp.hook_post", "attn.hook_z")


def logprob_gap(logits: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |Δ log-prob| between two logits tensors."""
    return (logits.log_softmax(-1) - ref.log_softmax(-1)).abs().max().item()


def assert_same_logprobs(logits: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """``logits`` give ``ref``'s log-probs within the named tolerance of ``ref``'s dtype."""
    tol, gap = logprob_atol(ref.dtype), logprob_gap(logits, ref)
    assert gap <= tol, f"{what} vs reference: max |Δ log-prob| {gap:.2e} > {tol:g}"


def assert_changed(logits: torch.Tensor, clean: torch.Tensor, what: str = "") -> None:
    """The splice (or edit) that gave ``logits`` did something: some log-prob moved by
    more than 100 times the tolerance, so agreement within it is not vacuous."""
    bound, gap = 100 * logprob_atol(clean.dtype), logprob_gap(logits, clean)
    assert gap > bound, f"{what}: the edit changed log-probs by only {gap:.2e} ≤ {bound:g}"


def assert_same_latents(acts: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """The same latents fire, with the same values within :data:`ACTS_TOL`."""
    assert torch.equal(acts != 0, ref != 0), f"{what}: other latents fire"
    torch.testing.assert_close(acts, ref, **ACTS_TOL, msg=what)


def assert_splice_agrees(model: sb.Model, hf: sb.Model, saes: list, tokens: torch.Tensor, *,
                         what: str = "", latents: bool = False) -> torch.Tensor:
    """``saes`` spliced into ``model`` give HF's log-probs and change them (and, with
    ``latents``, the same latents as on HF); returns the spliced logits."""
    logits = model.run_with_saes(tokens, saes=saes)
    want = hf.run_with_saes(tokens, saes=saes)
    assert_same_logprobs(logits, want, what)
    assert_changed(want, hf(tokens), what)
    if latents:
        _, got = model.run_with_cache_with_saes(tokens, saes=saes, names=[])
        _, ref = hf.run_with_cache_with_saes(tokens, saes=saes, names=[])
        for sae in saes:
            key = f"{sae.cfg.hook_name}.hook_sae_acts_post"
            assert_same_latents(got[key], ref[key], f"{what} {key}")
    return logits


# ---- random SAEs and tokens ---------------------------------------------------------------

tokens_st = st.builds(
    lambda seed, batch, pos: torch.randint(1, 384, (batch, pos),
                                           generator=torch.Generator().manual_seed(seed)),
    st.integers(0, 2**16), st.integers(1, 2), st.integers(2, 10))
"""Random token ids of the tiny models' vocabulary, 1-2 sequences of 2-10 tokens."""


@st.composite
def random_saes(draw: st.DrawFn, sites: list[str], width: Callable[[str], int],
                archs: list[str], d_sae: int, k: int) -> sb.SAE:
    """A random SAE of one of ``archs`` at one of ``sites`` in layer 0 or 1, ``width(site)``
    wide, trained (by its label) on HF or on processed TransformerLens activations."""
    site = draw(st.sampled_from(sites))
    layer = draw(st.integers(0, 1))
    arch = draw(st.sampled_from(archs))
    return sb.SAE.random(arch, width(site), d_sae, f"blocks.{layer}.{site}",
                         k=k if "topk" in arch else None, seed=draw(st.integers(0, 2**16)),
                         activation_space=draw(st.sampled_from(["hf", "tl-processed"])))


def boundary_gap(sae: sb.SAE, acts_pre: torch.Tensor, sae_input: torch.Tensor) -> float:
    """Distance of the nearest pre-activation to its architecture's on/off boundary (for
    gated SAEs, also the gate pre-activation's, which SAELens does not expose)."""
    arch = sae.cfg.architecture
    if arch == "topk":
        top = acts_pre.topk(sae.cfg.k + 1, dim=-1).values
        gap = min((top[..., -2] - top[..., -1]).min().item(), top[..., :-1].abs().min().item())
    elif arch in ("jumprelu", "batchtopk"):
        gap = (acts_pre - sae.threshold).abs().min().item()
    else:
        gap = acts_pre.abs().min().item()
    if arch == "gated":
        x = sae_input - sae.b_dec if sae.cfg.apply_b_dec_to_input else sae_input
        gap = min(gap, (x @ sae.W_enc + sae.b_gate).abs().min().item())
    return gap


def clear_of_boundaries(model: sb.Model, sae: sb.SAE, tokens: torch.Tensor) -> bool:
    """No latent of ``sae`` on ``tokens`` is within :data:`MARGIN` of flipping."""
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], names=[])
    hook = sae.cfg.hook_name
    return boundary_gap(sae, cache[f"{hook}.hook_sae_acts_pre"],
                        cache[f"{hook}.hook_sae_input"]) > MARGIN
