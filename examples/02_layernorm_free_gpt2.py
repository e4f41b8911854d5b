# %% [markdown]
# # A LayerNorm-free GPT-2 in TransformerLens, nnsight over TransformerLens, and raw HF
#
# LayerNorm-free GPT-2 (Heimersheim's `gpt2_noLN`, published as `apollo-research/gpt2_noLN`)
# is a GPT-2 fine-tuned until its LayerNorms could be removed. On the hub it is a plain
# `GPT2LMHeadModel` with a recipe that turns every LayerNorm into an affine map:
# `layer_norm_epsilon = 1e12` (the variance term vanishes next to it) and gains scaled by
# `1e6` (making up for dividing by `sqrt(1e12)`), so `LN(x) = (x - mean(x))·w + b`.
#
# Researchers study it in three ways, and want the same numbers from each:
#
# 1. raw Hugging Face;
# 2. TransformerLens, where the norms are removed outright (`normalization_type=None`);
# 3. nnsight over TransformerLens: the role nnsight's own `UnifiedTransformer` played until
#    nnsight 0.4 removed it (saebridge ships one: `saebridge.adapters.nnsight.UnifiedTransformer`).
#
# This example builds the recipe on a tiny random GPT-2, saves and reloads it as you would
# load the hub checkpoint, checks the equivalences a researcher would write (logits, hook
# values, an SAE spliced into all three) and plots the per-position agreement.
#
# Run: `python examples/02_layernorm_free_gpt2.py` (or open it as a notebook).

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import saebridge as sb
from saebridge.adapters.nnsight import UnifiedTransformer
from saebridge.adapters.transformer_lens import from_hf
from saebridge.tiny import tiny_gpt2
from saebridge.tolerance import logprob_atol

HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # notebooks: cwd
TOL = logprob_atol(torch.float32)

# %% [markdown]
# ## The gpt2_noLN recipe, saved and loaded back

# %%
model, tokenizer = tiny_gpt2(seed=0)
with torch.no_grad():
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.mul_(1e6)
model.config.layer_norm_epsilon = 1e12
checkpoint = Path(tempfile.mkdtemp()) / "gpt2-noLN"
model.save_pretrained(checkpoint)
hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()

# Each "LayerNorm" is now affine: scaling the stream scales its output (minus the bias).
ln = hf_model.transformer.h[0].ln_1
x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.testing.assert_close(ln(2 * x) - ln.bias, 2 * (ln(x) - ln.bias), atol=1e-5, rtol=1e-5)

# %% [markdown]
# ## Three ways in

# %%
tl_model = from_hf(hf_model, tokenizer=tokenizer)           # HookedTransformer, no hub look-up
ut = UnifiedTransformer(hf_model, tokenizer=tokenizer)      # nnsight over a HookedTransformer
models = {"hf": sb.wrap(hf_model, tokenizer=tokenizer), "tl": sb.wrap(tl_model),
          "nnsight-tl": sb.wrap(ut)}
print(f"TransformerLens normalization_type={tl_model.cfg.normalization_type}")
for name, wrapped in models.items():
    print(f"{name:<11} {wrapped}")
tokens = models["hf"].to_tokens("Layer norm reads the residual stream; here it does not.")

# %% [markdown]
# ## Check 1: the same logits
#
# TransformerLens's default `center_unembed` subtracts each position's mean over the
# vocabulary from the logits, which changes no probability: compare log-probs, and logits
# after subtracting that mean.

# %%
with torch.no_grad():
    ref_logits = hf_model(tokens).logits
clean = {name: wrapped(tokens) for name, wrapped in models.items()}
for name, logits in clean.items():
    gap = (logits.log_softmax(-1) - ref_logits.log_softmax(-1)).abs().max()
    print(f"clean {name:<11} max |Δ log-prob| vs HF = {gap:.1e}")
    assert gap <= TOL, name
    torch.testing.assert_close(logits - logits.mean(-1, keepdim=True),
                               ref_logits - ref_logits.mean(-1, keepdim=True),
                               atol=1e-4, rtol=1e-4)

# %% [markdown]
# ## Check 2: the same hook values
#
# nnsight over TransformerLens addresses TransformerLens's hook points as envoys, and must
# read exactly what TransformerLens's own `run_with_cache` does. saebridge's caches hold the
# canonical space on every backend, so they agree across all three.

# %%
HOOK = "blocks.1.hook_resid_pre"
_, tl_cache = tl_model.run_with_cache(tokens)
with ut.trace(tokens):
    resid_ut = ut.blocks[1].hook_resid_pre.output.save()
assert torch.equal(resid_ut, tl_cache[HOOK])
caches = {name: wrapped.run_with_cache(tokens, names=[HOOK])[1][HOOK]
          for name, wrapped in models.items()}
for name, value in caches.items():
    torch.testing.assert_close(value, caches["hf"], atol=1e-5, rtol=1e-5, msg=name)

# %% [markdown]
# ## Check 3: an SAE spliced into all three gives the same log-probs
#
# Through the common front on each backend, and inside your own nnsight trace of the
# `UnifiedTransformer` (`sb.splice`).

# %%
sae = sb.SAE.random("topk", d_in=64, d_sae=256, hook_name=HOOK, k=16, seed=0,
                    activation_space="tl-processed")
spliced = {name: wrapped.run_with_saes(tokens, saes=[sae]) for name, wrapped in models.items()}
for name, logits in spliced.items():
    gap = (logits.log_softmax(-1) - spliced["hf"].log_softmax(-1)).abs().max()
    print(f"splice {name:<10} max |Δ log-prob| vs HF = {gap:.1e}")
    assert gap <= TOL, name
assert (spliced["hf"].log_softmax(-1) - clean["hf"].log_softmax(-1)).abs().max() > 1e-2

with ut.trace(tokens):
    latents = sb.splice(ut, sae).save()
    own_logits = ut.output.save()
assert (own_logits.log_softmax(-1) - spliced["hf"].log_softmax(-1)).abs().max() <= TOL
_, sae_cache = models["hf"].run_with_cache_with_saes(tokens, saes=[sae], names=[])
torch.testing.assert_close(latents, sae_cache[f"{HOOK}.hook_sae_acts_post"],
                           atol=1e-5, rtol=1e-5)

# %% [markdown]
# ## Figure: per-position agreement, and the splice's effect on every backend

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
for run, logits_by_name in (("clean", clean), ("SAE spliced", spliced)):
    for name in ("tl", "nnsight-tl"):
        gap = (logits_by_name[name].log_softmax(-1)
               - logits_by_name["hf"].log_softmax(-1)).abs().amax(-1)[0]
        left.plot(gap, marker="o" if run == "clean" else "x", markersize=4,
                  linestyle="-" if run == "clean" else "--", label=f"{run}: hf vs {name}")
left.axhline(TOL, color="red", linewidth=1, label=f"tolerance {TOL:g}")
left.set_yscale("log")
left.set_xlabel("position")
left.set_ylabel("max over vocab |Δ log-prob|")
left.set_title("Backends agree at every position", fontsize=10)
left.legend(fontsize=7)
effect = {name: (spliced[name].log_softmax(-1) - clean[name].log_softmax(-1)).flatten()
          for name in models}
for name, marker in (("tl", "o"), ("nnsight-tl", "x")):
    right.scatter(effect["hf"], effect[name], s=6, marker=marker, alpha=0.5, label=name)
lim = [effect["hf"].min().item(), effect["hf"].max().item()]
right.plot(lim, lim, color="black", linewidth=0.8, label="y = x")
right.set_xlabel("splice effect on HF (Δ log-prob, every position and token)")
right.set_ylabel("same on the other backend")
right.set_title("What the SAE changes is the same everywhere", fontsize=10)
right.legend(fontsize=7)
fig.suptitle("LayerNorm-free GPT-2: HF, TransformerLens and nnsight over TransformerLens")
fig.tight_layout()
(HERE / "figures").mkdir(exist_ok=True)
fig.savefig(HERE / "figures" / "02_layernorm_free_gpt2.png", dpi=110)
