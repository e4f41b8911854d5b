# %% [markdown]
# # Steering a vanilla Hugging Face GPT-2 with an SAE trained on TransformerLens
#
# Most public residual-stream SAEs (SAELens's GPT-2 releases among them) were trained on
# activations of a TransformerLens `HookedTransformer` loaded with its default weight
# processing. Processing changes what the hooks see: with `center_writing_weights` every
# write into the residual stream is mean-centred over `d_model`, so TransformerLens's
# residual stream is the Hugging Face one **minus its per-token mean**.
#
# This example shows, on a tiny random GPT-2 built offline:
#
# 1. the two residual streams differ by exactly that per-token mean;
# 2. why a residual-stream *steering vector* still acts the same on both (every reader of
#    the stream is a LayerNorm, which removes the mean first);
# 3. where it does *not*: an SAE's latents read off the raw stream, and `attn.hook_z`, where
#    processing folded the value bias `b_V` away;
# 4. that saebridge gives the same latents and the same steered log-probs on both.
#
# Run: `python examples/01_steer_hf_with_tl_sae.py` (or open it as a notebook).

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import saebridge as sb
from saebridge.adapters.transformer_lens import from_hf  # offline: no hub look-up
from saebridge.tiny import tiny_gpt2
from saebridge.tolerance import logprob_atol

HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # notebooks: cwd
TOL = logprob_atol(torch.float32)  # the one named fp32 tolerance for log-probs

hf_model, tokenizer = tiny_gpt2(seed=0)          # GPT2LMHeadModel, 2 layers, d_model 64
tl_model = from_hf(hf_model, tokenizer=tokenizer)  # processed, as HookedTransformer.from_pretrained
hf = sb.wrap(hf_model, tokenizer=tokenizer)
tl = sb.wrap(tl_model)
tokens = hf.to_tokens("The quick brown fox jumps over the lazy dog")
print(hf, tl, sep="\n")

# %% [markdown]
# ## 1. The residual streams differ by the per-token mean
#
# Read the stream entering block 1 with each library's own API: Hugging Face's
# `hidden_states[1]` and TransformerLens's `blocks.1.hook_resid_pre`.

# %%
HOOK = "blocks.1.hook_resid_pre"
with torch.no_grad():
    resid_hf = hf_model(tokens, output_hidden_states=True).hidden_states[1]
    _, tl_cache = tl_model.run_with_cache(tokens)
resid_tl = tl_cache[HOOK]
mean = resid_hf.mean(-1, keepdim=True)
print(f"max |HF - TL|            = {(resid_hf - resid_tl).abs().max():.3e}")
print(f"max |(HF - mean) - TL|   = {(resid_hf - mean - resid_tl).abs().max():.3e}")
print(f"TL's stream is centred: max |mean| = {resid_tl.mean(-1).abs().max():.1e}")
torch.testing.assert_close(resid_hf - mean, resid_tl, atol=1e-5, rtol=1e-5)
assert (resid_hf - resid_tl).abs().max() > 1e-3

# %% [markdown]
# ## 2. Why a steering vector still acts the same
#
# Steering adds `coef * v` to the stream. On HF the stream becomes `x + coef·v`; on TL it is
# `(x - mean(x)) + coef·v`. The two differ by `mean(x)` along the all-ones direction, and
# every reader of the residual stream (`ln_1`, `ln_2`, `ln_f`) subtracts the mean before
# anything else, so they see the same input. Adding the vector with each library's plain
# hooks (no saebridge) gives the same log-probs:

# %%
sae = sb.SAE.random("topk", d_in=64, d_sae=256, hook_name=HOOK, k=16, seed=0,
                    activation_space="tl-processed")  # a stand-in for an SAELens release
FEATURE, COEF = 3, 8.0
v = sae.W_dec[FEATURE].detach()

ln = hf_model.transformer.h[1].ln_1
x = resid_hf[0]
torch.testing.assert_close(ln(x + 5.0), ln(x), atol=1e-5, rtol=1e-5)  # LN ignores a shift


def hf_hook(module, inputs, output):  # block 0's output is the stream entering block 1
    return (output[0] + COEF * v, *output[1:]) if isinstance(output, tuple) \
        else output + COEF * v


handle = hf_model.transformer.h[0].register_forward_hook(hf_hook)
try:
    with torch.no_grad():
        plain_hf = hf_model(tokens).logits.log_softmax(-1)
finally:
    handle.remove()
with torch.no_grad():
    plain_tl = tl_model.run_with_hooks(
        tokens, fwd_hooks=[(HOOK, lambda act, hook: act + COEF * v)]).log_softmax(-1)
print(f"plain hooks, HF vs TL: max |Δ log-prob| = {(plain_hf - plain_tl).abs().max():.2e}")
assert (plain_hf - plain_tl).abs().max() <= TOL

# %% [markdown]
# ## 3. Where it does not: latents, and `hook_z`
#
# An SAE *reads* the stream: its encoder is not mean-invariant. Encoding HF's raw stream
# with an SAE trained on TL's centred one gives other latents. The same holds at
# `attn.hook_z`: TL's default `fold_value_biases` moves the value bias `b_V` into `b_O`, so
# TL's `hook_z` is HF's minus `b_V` (a per-head constant).

# %%
naive = sae.encode(resid_hf)        # what a hand-written HF hook would feed the SAE
correct = sae.encode(resid_tl)      # what the SAE saw in training
changed = ((naive > 0) != (correct > 0)).any(-1).float().mean().item()
print(f"raw-stream latents: max |Δ| = {(naive - correct).abs().max():.3f}, "
      f"{changed:.0%} of tokens change their active set")
assert (naive - correct).abs().max() > 0.1

Z = "blocks.1.attn.hook_z"
with sb.trace(hf, tokens, space="native") as t:  # HF's own hook_z (the c_proj input, per head)
    z_hf = t[Z]
z_tl = tl_cache[Z]
shift = (z_hf - z_tl).flatten(0, 1)  # [tokens, n_heads, d_head]
print(f"hook_z: HF - TL is a constant per head: max |Δ| {shift.abs().max():.3f}, "
      f"spread over tokens {shift.std(0).max():.1e}")
assert shift.abs().max() > 1e-2 and shift.std(0).max() < 1e-5

# %% [markdown]
# ## 4. saebridge: same latents, same steered log-probs
#
# The SAE records the space it was trained in (`sae.cfg.activation_space`). On each backend
# saebridge converts the native activation into that space before encoding, and writes
# back the reconstruction plus what the space removed. Steering needs no conversion.

# %%
latents = {}
for name, model in {"hf": hf, "tl": tl}.items():
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    latents[name] = cache[f"{HOOK}.hook_sae_acts_post"]
print(f"saebridge latents, HF vs TL: max |Δ| = {(latents['hf'] - latents['tl']).abs().max():.1e}")
torch.testing.assert_close(latents["hf"], latents["tl"], atol=1e-5, rtol=1e-5)

tl_raw = sb.wrap(from_hf(hf_model, tokenizer=tokenizer, fold_ln=False,
                         center_writing_weights=False, center_unembed=False,
                         fold_value_biases=False))
backends = {"HF": hf, "TL processed": tl, "TL unprocessed": tl_raw}
steer = sb.Steer.from_sae(sae, FEATURE, coef=COEF)
delta = {}
for name, model in backends.items():
    clean = model(tokens).log_softmax(-1)
    steered = model.run_with_interventions(tokens, [steer]).log_softmax(-1)
    delta[name] = (steered - clean)[0, -1]  # at the last position
    print(f"{name:<15} steered vs plain-hook HF: max |Δ log-prob| = "
          f"{(steered - plain_hf).abs().max():.1e}")
    torch.testing.assert_close(steered, plain_hf, atol=TOL, rtol=0)

# %% [markdown]
# ## Figure: steered-minus-clean log-prob of a few target tokens, per backend

# %%
ref = delta["HF"]
readable = [t for t in ref.argsort(descending=True).tolist()
            if "\ufffd" not in tokenizer.decode([t])]  # skip partial UTF-8 byte tokens
targets = readable[:3] + readable[-2:]  # most promoted, most suppressed
labels = [repr(tokenizer.decode([t])) for t in targets]
fig, ax = plt.subplots(figsize=(7, 3.5))
width = 0.8 / len(delta)
for i, (name, d) in enumerate(delta.items()):
    ax.bar([j + i * width for j in range(len(targets))], d[targets].tolist(), width, label=name)
ax.set_xticks([j + width for j in range(len(targets))], labels)
ax.axhline(0, color="black", linewidth=0.5)
ax.set_ylabel("Δ log-prob (steered − clean)")
ax.set_title(f"Steering along SAE feature {FEATURE} (×{COEF}) at {HOOK}, last position")
ax.legend(fontsize=8)
fig.tight_layout()
(HERE / "figures").mkdir(exist_ok=True)
fig.savefig(HERE / "figures" / "01_steer_hf_with_tl_sae.png", dpi=110)
for name, d in delta.items():
    torch.testing.assert_close(d[targets], ref[targets], atol=TOL, rtol=0, msg=name)
