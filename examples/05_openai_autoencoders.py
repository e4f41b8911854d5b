# %% [markdown]
# # OpenAI / Transformer Debugger autoencoders under every backend
#
# OpenAI's GPT-2 autoencoders (`openai/sparse_autoencoder`, used by Transformer Debugger) are
# published as `.pt` state dicts at `{location}{version}/autoencoders/{layer}.pt`, where the
# location names the site:
#
# | location | TransformerLens hook |
# | --- | --- |
# | `mlp_post_act` | `blocks.L.mlp.hook_post` (the MLP neurons, `d_mlp` wide) |
# | `resid_delta_mlp` | `blocks.L.hook_mlp_out` (what the MLP writes) |
# | `resid_delta_attn` | `blocks.L.hook_attn_out` (what attention writes) |
#
# They were trained on *unprocessed* GPT-2 activations, and the TopK ones LayerNorm their
# input (`normalize=True`, implied by the activation, not stored). `sb.SAE.load` reads all
# of that from the file and its path. This example writes three such files offline, exactly
# as their `Autoencoder.state_dict()` holds them, loads them, checks the math against their
# forward written out, and splices them under seven backends, comparing reconstructions
# and log-probs.
#
# Run: `python examples/05_openai_autoencoders.py` (or open it as a notebook).

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from nnsight import TransformersModel

import saebridge as sb
from saebridge.adapters.nnsight import UnifiedTransformer
from saebridge.adapters.tl_bridge import bridge_from_hf
from saebridge.adapters.transformer_lens import from_hf
from saebridge.tiny import tiny_gpt2
from saebridge.tolerance import logprob_atol

HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # notebooks: cwd
TOL = logprob_atol(torch.float32)

# %% [markdown]
# ## Three autoencoder files, written as OpenAI's code writes them
#
# `Autoencoder.state_dict()`: `pre_bias`, `latent_bias`, `encoder.weight [n_latents, d_in]`,
# `decoder.weight [d_in, n_latents]`, statistics buffers, and the activation by name with its
# state (a TopK module also leaks `activation.k` into the top level).

# %%
def openai_state_dict(d_in, n_latents, k=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    decoder = torch.randn(d_in, n_latents, generator=gen)
    sd = {"pre_bias": 0.2 * torch.randn(d_in, generator=gen),
          "latent_bias": 0.1 * torch.randn(n_latents, generator=gen),
          "stats_last_nonzero": torch.zeros(n_latents, dtype=torch.long),
          "latents_activation_frequency": torch.rand(n_latents, generator=gen),
          "latents_mean_square": torch.rand(n_latents, generator=gen),
          "encoder.weight": torch.randn(n_latents, d_in, generator=gen) * d_in ** -0.5,
          "decoder.weight": decoder / decoder.norm(dim=0, keepdim=True)}
    if k is None:
        sd.update(activation="ReLU", activation_state_dict={})
    else:
        sd.update({"activation.k": k, "activation.postact_fn": "ReLU", "activation": "TopK",
                   "activation_state_dict": {"k": k, "postact_fn": "ReLU"}})
    return sd


root = Path(tempfile.mkdtemp())
files = {"mlp_post_act": (256, None), "resid_delta_mlp_v5_32k": (64, 8),
         "resid_delta_attn_v5_32k": (64, 8)}
state_dicts, saes = {}, {}
for seed, (location, (d_in, k)) in enumerate(files.items()):
    path = root / location / "autoencoders" / "1.pt"
    path.parent.mkdir(parents=True)
    state_dicts[location] = openai_state_dict(d_in, 96, k, seed)
    torch.save(state_dicts[location], path)
    saes[location] = sb.SAE.load(path)
    cfg = saes[location].cfg
    print(f"{location:<26} -> {cfg.hook_name:<24} {cfg.architecture:<8} k={cfg.k} "
          f"space={cfg.activation_space.name} normalize={cfg.normalize_activations}")
assert saes["mlp_post_act"].cfg.hook_name == "blocks.1.mlp.hook_post"
assert saes["resid_delta_mlp_v5_32k"].cfg.hook_name == "blocks.1.hook_mlp_out"
assert saes["resid_delta_attn_v5_32k"].cfg.hook_name == "blocks.1.hook_attn_out"

# %% [markdown]
# ## The math is theirs
#
# `latents = act((x - pre_bias) @ encoder.weight.T + latent_bias)`, `recons = latents @
# decoder.weight.T + pre_bias`; TopK files LayerNorm `x` first and undo it on the output.

# %%
def their_forward(sd, x):
    mu = std = None
    if sd["activation"] == "TopK":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    pre = (x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    if sd["activation"] == "TopK":
        top = pre.topk(sd["activation_state_dict"]["k"], dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:
        latents = pre.relu()
    recons = latents @ sd["decoder.weight"].T + sd["pre_bias"]
    return latents, recons * std + mu if mu is not None else recons


for location, sae in saes.items():
    x = torch.randn(3, 5, sae.cfg.d_in, generator=torch.Generator().manual_seed(1))
    latents, recons = their_forward(state_dicts[location], x)
    torch.testing.assert_close(sae.encode(x), latents)
    torch.testing.assert_close(sae(x), recons)

# %% [markdown]
# ## Spliced under every backend
#
# One tiny GPT-2, seven ways: raw HF, HookedTransformer processed (centred residual writes)
# and unprocessed, TransformerBridge raw and in compatibility mode, nnsight over HF and over
# TransformerLens. The SAEs read raw activations; on the processed backends saebridge rebuilds
# the raw `hook_mlp_out`/`hook_attn_out` from the centred ones before encoding.

# %%
hf_model, tokenizer = tiny_gpt2(seed=0)
UNPROCESSED = dict(fold_ln=False, center_writing_weights=False, center_unembed=False,
                   fold_value_biases=False)
models = {
    "hf": sb.wrap(hf_model, tokenizer=tokenizer),
    "tl-processed": sb.wrap(from_hf(hf_model, tokenizer=tokenizer)),
    "tl-unprocessed": sb.wrap(from_hf(hf_model, tokenizer=tokenizer, **UNPROCESSED)),
    "bridge": sb.wrap(bridge_from_hf(hf_model, tokenizer=tokenizer)),
    "bridge-compat": sb.wrap(bridge_from_hf(hf_model, tokenizer=tokenizer,
                                            compatibility_mode=True)),
    "nnsight-hf": sb.wrap(TransformersModel(hf_model, task="text-generation",
                                            tokenizer=tokenizer)),
    "nnsight-tl": sb.wrap(UnifiedTransformer(hf_model, tokenizer=tokenizer)),
}
tokens = models["hf"].to_tokens("Transformer Debugger reads the MLP neurons of GPT-2")
recon_gap, logprob_gap = {}, {}
for location, sae in saes.items():
    key = f"{sae.cfg.hook_name}.hook_sae_recons"
    ref_logits, ref_cache = models["hf"].run_with_cache_with_saes(tokens, saes=[sae], names=[])
    assert (ref_logits.log_softmax(-1) - models["hf"](tokens).log_softmax(-1)).abs().max() > 1e-2
    for name, model in models.items():
        logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], names=[])
        recon_gap[location, name] = (cache[key] - ref_cache[key]).abs().max().item()
        logprob_gap[location, name] = (logits.log_softmax(-1)
                                       - ref_logits.log_softmax(-1)).abs().max().item()
        assert logprob_gap[location, name] <= TOL, (location, name)
        assert recon_gap[location, name] <= 1e-4, (location, name)
print(f"worst |Δ recons| vs hf: {max(recon_gap.values()):.1e}; "
      f"worst |Δ log-prob| vs hf: {max(logprob_gap.values()):.1e} (tolerance {TOL:g})")

# %% [markdown]
# ## Figure: how far each backend's reconstruction is from raw HF's

# %%
names = [n for n in models if n != "hf"]
fig, ax = plt.subplots(figsize=(9, 3.4))
width = 0.8 / len(saes)
for i, location in enumerate(saes):
    xs = [j + i * width for j in range(len(names))]
    values = [recon_gap[location, n] for n in names]
    ax.bar(xs, [max(v, 1e-10) for v in values], width, label=location)
    for x, value in zip(xs, values, strict=True):
        if value == 0:  # bit-identical to hf (nnsight over the same HF modules)
            ax.text(x, 2e-10, "0", ha="center", fontsize=7)
ax.axhline(1e-4, color="red", linestyle="--", linewidth=1, label="assertion bound 1e-4")
ax.set_yscale("log")
ax.set_ylim(1e-10, 1e-2)
ax.set_xticks([j + width for j in range(len(names))], names, fontsize=8)
ax.set_ylabel("max |recons − recons on hf|")
ax.set_title("OpenAI autoencoders: reconstructions agree on every backend")
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
(HERE / "figures").mkdir(exist_ok=True)
fig.savefig(HERE / "figures" / "05_openai_autoencoders.png", dpi=110)
