# %% [markdown]
# # Cross-framework validation of your own model and SAE
#
# Before trusting an SAE result that was computed on one framework and will be reproduced on
# another, check that the frameworks agree on *your* checkpoint and *your* SAE. saebridge
# does it in one call, `sb.validate`, and one command, `saebridge validate`: the same clean,
# splice (error term off and on), steer and ablate runs on every backend, compared with the
# first by max |Δ log-prob|, KL and latent agreement, PASS/FAIL against the named fp32
# tolerance.
#
# Here "your model" is a tiny GPT-2 saved with `save_pretrained`, and "your SAE" a TopK SAE
# saved in SAELens's format, trained (here: initialised) on TransformerLens's processed
# residual stream.
#
# Run: `python examples/06_validate_your_model.py` (or open it as a notebook).

# %%
import copy
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from nnsight import TransformersModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import saebridge as sb
from saebridge.adapters.tl_bridge import bridge_from_hf
from saebridge.adapters.transformer_lens import from_hf
from saebridge.cli import main as saebridge_cli  # the `saebridge` command
from saebridge.tiny import save_tiny_gpt2
from saebridge.tolerance import logprob_atol

HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # notebooks: cwd
TOL = logprob_atol(torch.float32)
work = Path(tempfile.mkdtemp())

# Your checkpoint and your SAE, on disk.
model_dir = save_tiny_gpt2(work / "my-gpt2", seed=3)
sae_dir = work / "my-sae"
sb.SAE.random("topk", d_in=64, d_sae=256, hook_name="blocks.0.hook_resid_post", k=16,
              seed=3, activation_space="tl-processed").save(sae_dir)

# %% [markdown]
# ## `sb.validate`: load them as you would, wrap each backend, compare

# %%
hf_model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
sae = sb.SAE.load(sae_dir)
models = {
    "hf": sb.wrap(hf_model, tokenizer=tokenizer),
    "tl-processed": sb.wrap(from_hf(hf_model, tokenizer=tokenizer)),
    "bridge-compat": sb.wrap(bridge_from_hf(hf_model, tokenizer=tokenizer,
                                            compatibility_mode=True)),
    "nnsight-hf": sb.wrap(TransformersModel(hf_model, task="text-generation",
                                            tokenizer=tokenizer)),
}
prompt = "Sparse autoencoders find features in the residual stream of a transformer."
tokens = models["hf"].to_tokens(prompt)
report = sb.validate(models, tokens, saes=[sae])
print(report.table())
assert report.ok

# %% [markdown]
# ### Reading the report
#
# One row per (run, SAE, backend pair). `max_dlogprob` is the largest |Δ log-softmax| over
# positions and vocabulary; `kl` the mean KL(reference ‖ backend); `same_active` and
# `max_dlatent` compare the SAE's latents; `passed` checks both against `tolerance`.
# `report.to_json()` is what `--json` writes.

# %%
worst = max(report.rows, key=lambda row: row.max_dlogprob)
print(f"worst row: {worst.run} {worst.sae} {worst.reference} vs {worst.backend}: "
      f"{worst.max_dlogprob:.1e} (tolerance {worst.tolerance:g})")
assert {row.run for row in report.rows} == {"clean", "splice", "splice+error", "steer",
                                            "ablate"}
assert all(row.same_active for row in report.rows if row.run != "clean")

# %% [markdown]
# ### What the check catches
#
# `convert_spaces=False` treats the SAE as if it had been trained in each model's own
# space: what splicing it into raw HF with a hand-written hook does. The splice rows against
# TransformerLens then fail: HF's residual stream carries the per-token mean that the SAE
# never saw. The steer rows fail on the latents only (each row also compares the SAE's
# latents): the steered log-probs still agree, as example 1 explains.

# %%
unconverted = sb.validate(models, tokens, saes=[sae], runs=["splice", "steer"],
                          convert_spaces=False)
failed = [(row.run, row.backend) for row in unconverted.rows if not row.passed]
print(f"without space conversion, failing: {failed}")
assert not unconverted.ok and ("splice", "tl-processed") in failed
steer_rows = {row.backend: row for row in unconverted.rows if row.run == "steer"}
assert all(row.max_dlogprob <= TOL for row in steer_rows.values())
assert not steer_rows["tl-processed"].same_active

# %% [markdown]
# ## The same from the command line
#
# ```
# saebridge validate --model my-gpt2 --sae my-sae --backends hf,tl-processed,nnsight-hf \
#     --json report.json
# ```
#
# It exits 0 when every row passes, 1 on any FAIL (run it in CI next to your analysis). Here
# it is called in-process through the same entry point the console script uses.

# %%
exit_code = saebridge_cli(["validate", "--model", str(model_dir), "--sae", str(sae_dir),
                           "--backends", "hf,tl-processed,nnsight-hf", "--prompt", prompt,
                           "--json", str(work / "report.json"), "--quiet"])
from_cli = json.loads((work / "report.json").read_text())
print(f"exit code {exit_code}; {len(from_cli['rows'])} rows, ok={from_cli['ok']}")
assert exit_code == 0 and from_cli["ok"]
assert {row["backend"] for row in from_cli["rows"]} == {"tl-processed", "nnsight-hf"}

# %% [markdown]
# ## Figure: per-position |Δ log-prob| of the splice, across backend pairs
#
# `validate` reports the worst position; to see where along the prompt backends differ, take
# the max over the vocabulary only. The dashed line is the naive splice (no space
# conversion) against TransformerLens.

# %%
def logprobs(model, sae_):
    return model.run_with_saes(tokens, saes=[sae_]).log_softmax(-1)[0]  # [pos, vocab]


ref = logprobs(models["hf"], sae)
per_position = {f"hf vs {name}": (logprobs(model, sae) - ref).abs().amax(-1)
                for name, model in models.items() if name != "hf"}
naive = copy.deepcopy(sae)
naive.cfg.model_from_pretrained_kwargs = models["hf"].space.to_dict()  # "trained on raw HF"
naive_gap = (logprobs(models["hf"], naive) - logprobs(models["tl-processed"], sae)).abs()
for name, gap in per_position.items():
    assert gap.max() <= TOL, name
assert naive_gap.amax(-1).max() > 100 * TOL

fig, ax = plt.subplots(figsize=(10, 3.4))
for (name, gap), marker in zip(per_position.items(), "osx", strict=True):
    exact = " (exactly 0, drawn at 1e-10)" if gap.max() == 0 else ""
    ax.plot(gap.clamp_min(1e-10), marker=marker, markersize=4, label=name + exact)
ax.plot(naive_gap.amax(-1), linestyle="--", color="black",
        label="naive splice on hf vs tl-processed")
ax.axhline(TOL, color="red", linewidth=1, label=f"tolerance {TOL:g}")
ax.set_yscale("log")
ax.set_xlabel("position")
ax.set_ylabel("max over vocab |Δ log-prob|")
ax.set_title(f"Splicing {sae.cfg.hook_name}: backends agree at every position")
ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
fig.tight_layout()
(HERE / "figures").mkdir(exist_ok=True)
fig.savefig(HERE / "figures" / "06_validate_your_model.png", dpi=110)
