# %% [markdown]
# # Per-head attention SAEs: block-diagonal `hook_z`
#
# An attention-output SAE on `blocks.L.attn.hook_z` reads all heads concatenated
# (`d_in = n_heads · d_head`). A *per-head* SAE is block-diagonal: head `h` only ever talks
# to its own `m = d_sae / n_heads` latents, so latents `[h·m, (h+1)·m)` belong to head `h`.
# saebridge detects such an SAE when it loads one (a SAELens folder whose `W_enc`/`W_dec` are
# exactly block-diagonal), stores only the blocks and runs the forward per head.
#
# This example builds one on a tiny random GPT-2, saves and reloads it as SAELens would,
# ablates one head's latents and shows that only that head's output (`hook_z`) changes, on
# Hugging Face and on TransformerLens, and plots per-head latent activity over a prompt.
#
# Run: `python examples/03_per_head_attention_saes.py` (or open it as a notebook).

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import saebridge as sb
from saebridge.adapters.transformer_lens import from_hf
from saebridge.interventions import Observe
from saebridge.sae.blockdiag import BlockDiagSAE, block_diagonal
from saebridge.tiny import tiny_gpt2
from saebridge.tolerance import logprob_atol

HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # notebooks: cwd
TOL = logprob_atol(torch.float32)

hf_model, tokenizer = tiny_gpt2(seed=0)  # 4 heads of d_head 16 per layer
models = {"HF": sb.wrap(hf_model, tokenizer=tokenizer),
          "TL processed": sb.wrap(from_hf(hf_model, tokenizer=tokenizer))}
N_HEADS, Z = hf_model.config.n_head, "blocks.1.attn.hook_z"

# %% [markdown]
# ## Build one, save it in SAELens's format, load it back
#
# A stand-in for a trained per-head SAE: a random TopK SAE initialised as SAELens does
# (encoder = decoder transposed, `b_dec` = the data's mean, here over the prompt's `hook_z`),
# then `block_diagonal` zeroes every weight outside the head blocks. Saved with
# `sae.save(folder)` it is an ordinary SAELens folder with dense `[d_in, d_sae]` matrices;
# `sb.SAE.load` finds the block structure.

# %%
tokens = models["HF"].to_tokens("Attention heads read the residual stream")
_, cache = models["HF"].run_with_cache(tokens, names=[Z])  # canonical = TL-processed space
init = sb.SAE.random("topk", d_in=64, d_sae=N_HEADS * 32, hook_name=Z, k=8, seed=0,
                     activation_space="tl-processed")
with torch.no_grad():
    init.W_enc.copy_(init.W_dec.T)
    init.b_enc.zero_()
    init.b_dec.copy_(cache[Z].flatten(-2).mean((0, 1)))
dense = block_diagonal(init, N_HEADS)
folder = Path(tempfile.mkdtemp()) / "per_head_sae"
dense.save(folder)
sae = sb.SAE.load(folder)
info = sb.inspect(folder)
print(f"{info.format}: {type(sae).__name__}, n_heads={sae.cfg.n_heads}, "
      f"{sae.cfg.latents_per_head} latents per head, W_enc {tuple(sae.W_enc.shape)}")
assert isinstance(sae, BlockDiagSAE) and info.format == "saelens-blockdiag"
assert list(sae.features_of(2)) == list(range(64, 96)) and sae.head_of(70) == 2

# %% [markdown]
# ## Per-head latent activity over a prompt
#
# The latents of `run_with_cache_with_saes` are `[batch, pos, d_sae]`; reshaped to
# `[pos, n_heads, m]`, their sum per head says how much each head's SAE fires at each token.

# %%
per_head = {}
for name, model in models.items():
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    acts = cache[f"{Z}.hook_sae_acts_post"][0]  # [pos, d_sae]
    per_head[name] = acts.reshape(acts.shape[0], N_HEADS, -1).sum(-1).T  # [head, pos]
torch.testing.assert_close(per_head["HF"], per_head["TL processed"], atol=1e-4, rtol=1e-4)

# %% [markdown]
# ## Ablate one head's latents: only that head's `hook_z` changes
#
# `sb.Ablate(sae, features)` zeroes the chosen latents and keeps the SAE's error term, so the
# activation changes by exactly the ablated latents' decoder contribution. For a
# block-diagonal SAE that contribution lies in one head. An `Observe` after the ablation
# reads the `hook_z` the model goes on with.

# %%
def z_after(model, ops):
    seen = {}
    model.run_with_interventions(tokens, [*ops, Observe(Z, lambda hook, z: seen.update(z=z))])
    return seen["z"]  # [batch, pos, n_heads, d_head], the model's own space


effect = {}  # [ablated head, observed head] -> max |Δ z|
for name, model in models.items():
    clean_z = z_after(model, [])
    rows = []
    for head in range(N_HEADS):
        ablated_z = z_after(model, [sb.Ablate(sae, list(sae.features_of(head)))])
        rows.append((ablated_z - clean_z).abs().amax(dim=(0, 1, 3)))
    effect[name] = torch.stack(rows)
    print(f"{name}: max |Δ hook_z| per observed head (rows: ablated head)\n{effect[name]}")
    off_diagonal = effect[name][~torch.eye(N_HEADS, dtype=torch.bool)]
    assert off_diagonal.max() < 1e-6 and effect[name].diagonal().min() > 1e-4

# The change is exactly minus the ablated latents' decoder rows, in that head only.
_, cache = models["TL processed"].run_with_cache_with_saes(tokens, saes=[sae])
acts_head2 = cache[f"{Z}.hook_sae_acts_post"][0, :, sae.features_of(2)]  # [pos, m]
d_head = sae.cfg.d_in // N_HEADS  # W_dec is SAELens's flat [d_sae, d_in]; head 2's block:
expected = acts_head2 @ sae.W_dec[sae.features_of(2), 2 * d_head:3 * d_head]  # [pos, d_head]
got = z_after(models["TL processed"], [sb.Ablate(sae, list(sae.features_of(2)))]) \
    - z_after(models["TL processed"], [])
torch.testing.assert_close(got[0, :, 2], -expected, atol=1e-5, rtol=1e-5)

# The same ablation gives the same log-probs on both backends.
ablate = sb.Ablate(sae, list(sae.features_of(2)))
logprobs = {n: m.run_with_interventions(tokens, [ablate]).log_softmax(-1)
            for n, m in models.items()}
assert (logprobs["HF"] - logprobs["TL processed"]).abs().max() <= TOL

# %% [markdown]
# Splicing some heads only (`sae.splice_heads([2])`) replaces those heads' `z` with their
# reconstruction and passes the others through (on HF, whose `z` still holds the value bias
# the SAE's TL-processed space lacks, up to float rounding of that round trip):

# %%
spliced_z = z_after(models["HF"], [sb.Splice(sae.splice_heads([2]))])
clean_z = z_after(models["HF"], [])
changed = (spliced_z - clean_z).abs().amax(dim=(0, 1, 3))
print(f"splice_heads([2]): max |Δ hook_z| per head {changed}")
assert changed[[0, 1, 3]].max() < 1e-6 and changed[2] > 1e-4

# %% [markdown]
# ## Figure: per-head latent activity, and which heads an ablation touches

# %%
labels = [tokenizer.decode([t]) for t in tokens[0].tolist()]
labels[0] = "<bos>"
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2),
                                  gridspec_kw={"width_ratios": [3, 1.2]})
image = left.imshow(per_head["HF"].detach().numpy(), aspect="auto", cmap="viridis")
left.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
left.set_yticks(range(N_HEADS), [f"head {h}" for h in range(N_HEADS)])
left.set_title(f"Sum of each head's latents at {Z} (TopK, k={sae.cfg.k})")
fig.colorbar(image, ax=left)
matrix = effect["HF"].clamp_min(1e-9).log10().numpy()
right.imshow(matrix, cmap="magma", vmin=-9)
right.set_xticks(range(N_HEADS))
right.set_yticks(range(N_HEADS))
right.set_xlabel("head whose z is read")
right.set_ylabel("head ablated")
right.set_title("log10 max |Δz|", fontsize=9)
for i in range(N_HEADS):
    for j in range(N_HEADS):
        right.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center", fontsize=7,
                   color="white" if matrix[i, j] < -3 else "black")
fig.tight_layout()
(HERE / "figures").mkdir(exist_ok=True)
fig.savefig(HERE / "figures" / "03_per_head_attention_saes.png", dpi=110)
