# %% [markdown]
# # Remote steering and splicing inside an nnsight trace
#
# With nnsight a model can run on a remote server (NDIF): the body of your trace is sent as a
# request and executed next to the model. The server has no saebridge, and lets a request
# import only `torch`, `numpy`, `einops`, `math`, `typing`, `collections` and builtins. So
# saebridge compiles each intervention beforehand into plain data (an SAE as a dict of its
# tensors plus the config primitives its forward reads) and ships its torch-only kernel by
# value with the request.
#
# Two ways to run remotely:
#
# - `sb.wrap(lm, remote=True)`: the common front (`run_with_saes`, `run_with_interventions`,
#   `run_with_cache_with_saes`, `generate`), each call one request;
# - `sb.prepare_splice(lm, sae)` / `sb.prepare_steer(lm, hook, vector)` compiled before your
#   own `with lm.trace(..., remote=True):`, whose body then names only data.
#
# (In a local trace, `sb.splice(lm, sae)` and `sb.steer(...)` are called in the body itself.)
#
# Here `remote="local"` stands in for `remote=True`: nnsight serialises the request exactly
# as it would for the server, deserialises it with local modules hidden, and runs it on
# this machine. We also measure what travels: the bytes of each request.
#
# Run: `python examples/07_remote_nnsight.py` (or open it as a notebook).

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from nnsight import TransformersModel
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

import saebridge as sb
from saebridge.tiny import tiny_gpt2

HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # notebooks: cwd
REMOTE = "local"  # True to send the requests to NDIF (a real hub model is needed there)

hf_model, tokenizer = tiny_gpt2(seed=0)
lm = TransformersModel(hf_model, task="text-generation", tokenizer=tokenizer)
local, remote = sb.wrap(lm), sb.wrap(lm, remote=REMOTE)
sae = sb.SAE.random("topk", d_in=64, d_sae=256, hook_name="blocks.1.hook_resid_pre", k=16,
                    seed=0, activation_space="tl-processed")
tokens = local.to_tokens("Hello world, hello model, hello SAE")
print(local, remote, sep="\n")

# %% [markdown]
# ## The common front, one request per call
#
# Every result equals the local run bit for bit: the same kernel functions compute it.

# %%
steer = sb.Steer.from_sae(sae, 3, coef=8.0, positions=slice(1, None))
runs = {
    "run_with_saes": lambda m: m.run_with_saes(tokens, saes=[sae]),
    "run_with_interventions": lambda m: m.run_with_interventions(
        tokens, [steer, sb.Ablate(sae, [5, 7])]),
    "latents": lambda m: m.run_with_cache_with_saes(tokens, saes=[sae], names=[])[1][
        f"{sae.cfg.hook_name}.hook_sae_acts_post"],
    "generate": lambda m: m.generate(tokens, 4, interventions=[steer]),
}
for name, run in runs.items():
    got, want = run(remote), run(local)
    assert torch.equal(got, want), name
    print(f"{name:<24} remote == local: True")
assert not torch.equal(runs["run_with_saes"](remote), remote(tokens))  # the splice did work

# %% [markdown]
# ## Inside your own trace
#
# Compile first, then call the prepared objects in the body; it then names only data, never
# saebridge or an SAE module (which the server could not import). `sb.prepare_splice` returns
# the latents, `sb.prepare_steer` adds one `d_model` vector.

# %%
splicer = sb.prepare_splice(lm, sae)
with lm.trace(tokens, remote=REMOTE):
    latents = splicer(lm).save()
    logits = lm.output.logits.save()
assert torch.equal(logits, local.run_with_saes(tokens, saes=[sae]))
print(f"own trace: latents {tuple(latents.shape)}, "
      f"{int((latents > 0).sum(-1).max())} active per token (k={sae.cfg.k})")

# %% [markdown]
# On this machine, `sb.splice` inside your trace hands back latents you can edit in place,
# dictionary_learning's idiom: the edit reaches the model (the same logits as SAELens's
# `hook_sae_acts_post` hook). Edit before the body reads anything later in the model, as with
# any nnsight edit. Remotely, prepared latents are a record of the run: edit there with
# `sb.Ablate`/`sb.Clamp` in `sb.prepare`.

# %%
feature = int(latents[0, -1].argmax())
with lm.trace(tokens):
    handle = sb.splice(lm, sae)
    handle[..., feature] = 0.0
    edited = lm.output.logits.save()


def zero_feature(acts, hook):
    acts[..., feature] = 0.0
    return acts


with local.saes([sae]):
    hooked = local.run_with_hooks(tokens, fwd_hooks=[
        (f"{sae.cfg.hook_name}.hook_sae_acts_post", zero_feature)])
assert torch.allclose(edited, hooked, atol=1e-5)
print(f"feature {feature} zeroed in the trace: max |Δ logit| vs the plain splice "
      f"{(edited - local.run_with_saes(tokens, saes=[sae])).abs().max():.3f}")

# %% [markdown]
# Interventions that must see each other's edits are compiled together with `sb.prepare`:
# a splice downstream of a steer then sees the mean the steer wrote into the residual stream,
# as it would in TransformerLens and in a front run. (Prepared separately, each sees only its
# own edit, and a centred-space SAE downstream re-centres the steered stream.)

# %%
vector = sae.W_dec[3].detach()
edits = [sb.Steer("blocks.0.hook_resid_post", vector, 4.0), sb.Splice(sae)]
both = sb.prepare(lm, edits)
with lm.trace(tokens, remote=REMOTE):
    records = both(lm).save()
    logits = lm.output.logits.save()
assert torch.equal(logits, local.run_with_interventions(tokens, edits))
assert f"{sae.cfg.hook_name}.hook_sae_acts_post" in records

steerer = sb.prepare_steer(lm, "blocks.0.hook_resid_post", vector, coef=4.0)
with lm.trace(tokens, remote=REMOTE):
    steerer(lm)
    splicer(lm)
    separate = lm.output.logits.save()
print(f"steer + splice prepared separately vs together: max |Δ logit| "
      f"{(separate - logits).abs().max():.3f}")

# %% [markdown]
# ## What travels in a request
#
# An nnsight `Backend` that serialises each request as the remote backend does
# (`RequestModel.serialize`), keeps its bytes, then runs it locally. A steering request
# carries one vector whatever the SAE's size; a splice carries the SAE's parameters, once.

# %%
class Capture(Backend):
    def __init__(self):
        self.sizes = []

    def __call__(self, tracer):
        self.sizes.append(len(RequestModel.serialize(tracer, compress=False)))
        tracer.execute(tracer.info.code)


def request_bytes(ops):
    capture = Capture()
    sb.wrap(lm, remote=capture).run_with_interventions(tokens, ops)
    return capture.sizes[0]


small = sb.SAE.random("topk", 64, 256, "blocks.1.hook_resid_pre", k=16, seed=1)
large = sb.SAE.random("topk", 64, 4096, "blocks.1.hook_resid_pre", k=16, seed=1)
sizes = {
    "clean forward": request_bytes([]),
    "steer (d_sae 256)": request_bytes([sb.Steer.from_sae(small, 3, 8.0)]),
    "steer (d_sae 4096)": request_bytes([sb.Steer.from_sae(large, 3, 8.0)]),
    "splice (d_sae 256)": request_bytes([sb.Splice(small)]),
    "splice (d_sae 4096)": request_bytes([sb.Splice(large)]),
    "splice + ablate (4096)": request_bytes([sb.Splice(large), sb.Ablate(large, [1, 2])]),
}
for name, size in sizes.items():
    print(f"{name:<24}{size:>12,} bytes")
param_bytes = {s: sum(p.numel() * p.element_size() for p in s.parameters()) for s in
               (small, large)}
assert abs(sizes["steer (d_sae 4096)"] - sizes["steer (d_sae 256)"]) < 64  # one vector
growth = sizes["splice (d_sae 4096)"] - sizes["splice (d_sae 256)"]
assert abs(growth - (param_bytes[large] - param_bytes[small])) < 0.01 * param_bytes[large]
assert sizes["splice + ablate (4096)"] - sizes["splice (d_sae 4096)"] < 0.01 * param_bytes[large]

# %% [markdown]
# ## Figure: request size by intervention

# %%
fig, ax = plt.subplots(figsize=(8, 3.4))
bars = ax.barh(list(sizes), [s / 1024 for s in sizes.values()], color="tab:blue")
ax.bar_label(bars, [f"{s / 1024:,.0f} KB" for s in sizes.values()], fontsize=8, padding=2)
ax.set_xscale("log")
ax.set_xlim(right=4 * max(sizes.values()) / 1024)  # room for the labels
ax.set_xlabel("request size (KB, uncompressed)")
ax.set_title("What travels to the server: a steer is one vector, a splice is the SAE")
ax.invert_yaxis()
fig.tight_layout()
(HERE / "figures").mkdir(exist_ok=True)
fig.savefig(HERE / "figures" / "07_remote_nnsight.png", dpi=110)
