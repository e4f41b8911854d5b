"""saebridge quickstart: one SAE, three backends, the same numbers.

Builds the built-in tiny GPT-2 (seeded, nothing downloaded), converts it offline into
TransformerLens with and without weight processing, and an SAE trained (here: randomly
initialised) in TransformerLens's processed space. It splices, steers and caches with the
same code on every backend and prints how far apart their log-probs are.

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import torch

import saebridge as sb
from saebridge.adapters.transformer_lens import from_hf
from saebridge.tiny import tiny_gpt2
from saebridge.tolerance import logprob_atol


def main() -> int:
    hf_model, tokenizer = tiny_gpt2(seed=0)
    models = {
        "hf": sb.wrap(hf_model, tokenizer=tokenizer),
        "tl-processed": sb.wrap(from_hf(hf_model, tokenizer=tokenizer)),
        "tl-unprocessed": sb.wrap(from_hf(
            hf_model, tokenizer=tokenizer, fold_ln=False, center_writing_weights=False,
            center_unembed=False, fold_value_biases=False)),
    }
    sae = sb.SAE.random("topk", d_in=64, d_sae=256, hook_name="blocks.1.hook_resid_pre", k=16,
                        seed=0, activation_space="tl-processed")
    tokens = models["hf"].to_tokens("Sparse autoencoders find features in the residual stream")
    runs = {
        "clean": lambda m: m(tokens),
        "splice": lambda m: m.run_with_saes(tokens, saes=[sae]),
        "splice+error": lambda m: m.run_with_saes(tokens, saes=[sae], use_error_term=True),
        "steer": lambda m: m.run_with_interventions(tokens, [sb.Steer.from_sae(sae, 3, 8.0)]),
        "ablate": lambda m: m.run_with_interventions(tokens, [sb.Ablate(sae, [0, 1, 2])]),
    }
    tol = logprob_atol(torch.float32)
    print(f"tiny GPT-2, {tokens.shape[1]} tokens; SAE {sae.cfg.architecture} "
          f"d_sae={sae.cfg.d_sae} at {sae.cfg.hook_name} ({sae.cfg.activation_space.name})")
    print(f"{'run':<14}{'backend':<16}{'max |Δ log-prob| vs hf':>24}  ok (tol {tol:g})")
    worst = 0.0
    for run_name, run in runs.items():
        ref = run(models["hf"]).log_softmax(-1)
        for name, model in models.items():
            if name == "hf":
                continue
            diff = (run(model).log_softmax(-1) - ref).abs().max().item()
            worst = max(worst, diff)
            print(f"{run_name:<14}{name:<16}{diff:>24.2e}  {'PASS' if diff <= tol else 'FAIL'}")
    _, cache = models["tl-processed"].run_with_cache_with_saes(tokens, saes=[sae])
    _, cache_hf = models["hf"].run_with_cache_with_saes(tokens, saes=[sae])
    key = f"{sae.cfg.hook_name}.hook_sae_acts_post"
    same = torch.equal(cache[key] > 0, cache_hf[key] > 0)
    print(f"latents {key}: same active set on hf and tl-processed: {same}; "
          f"max |Δ| {(cache[key] - cache_hf[key]).abs().max().item():.2e}")
    return 0 if worst <= tol and same else 1


if __name__ == "__main__":
    raise SystemExit(main())
