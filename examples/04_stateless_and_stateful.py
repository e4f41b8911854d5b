# %% [markdown]
# # Stateless and stateful SAE use, and what an error leaves behind
#
# SAELens's `HookedSAETransformer` offers two styles, and saebridge keeps both on every
# backend:
#
# - **stateless**: `model.run_with_saes(tokens, saes=[sae])` splices for one call only;
# - **stateful**: `model.add_sae(sae)` … `model.reset_saes()`, or `with model.saes([sae]):`.
#
# The wrapped model is never modified: attached SAEs live in the wrapper and are applied on
# each forward, every hook is removed in a `finally`, and there are no on/off flags. So
# `outputA = model(tokens)`, a run with SAEs, then `outputC = model(tokens)` gives
# `outputA == outputC` exactly, and an exception raised in the middle of a forward (in your
# intervention, in an SAE, in your own code inside `with model.saes(...)`) leaves nothing
# attached and no hook behind.
#
# Run: `python examples/04_stateless_and_stateful.py` (or open it as a notebook).

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from nnsight import TransformersModel

import saebridge as sb
from saebridge.adapters.transformer_lens import from_hf
from saebridge.tiny import tiny_gpt2

HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # notebooks: cwd

hf_model, tokenizer = tiny_gpt2(seed=0)
tl_model = from_hf(hf_model, tokenizer=tokenizer)
backends = {"HF": sb.wrap(hf_model, tokenizer=tokenizer),
            "TL processed": sb.wrap(tl_model),
            "nnsight": sb.wrap(TransformersModel(hf_model, task="text-generation",
                                                 tokenizer=tokenizer))}
sae = sb.SAE.random("topk", d_in=64, d_sae=256, hook_name="blocks.0.hook_resid_post", k=8,
                    seed=0, activation_space="tl-processed")
tokens = backends["HF"].to_tokens("Sparse autoencoders find features")


class Explode:
    """Your own intervention (anything with `hook`, `writes` and `apply`), failing at block 1:
    the SAE at block 0 has already been spliced in when it raises."""

    hook, writes = "blocks.1.hook_resid_post", False

    def apply(self, x, ctx):
        raise RuntimeError("something went wrong in my intervention")


def gap(a, b):
    return (a - b).abs().max().item()

# %% [markdown]
# ## The same sequence of calls on every backend
#
# Each step records how far the logits are from `outputA`, the clean run.

# %%
steps = {}
for name, model in backends.items():
    outputA = model(tokens)
    outputB = model.run_with_saes(tokens, saes=[sae])  # stateless: this call only
    outputC = model(tokens)
    assert torch.equal(outputA, outputC), name         # nothing stayed attached
    assert gap(outputA, outputB) > 1e-2, name           # and the splice did something
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    assert f"{sae.cfg.hook_name}.hook_sae_acts_post" in cache  # SAELens's cache keys
    record = {"model(tokens)": outputA, "run_with_saes": outputB, "model(tokens) again": outputC}

    model.add_sae(sae)                                   # stateful
    assert [s.sae for s in model.attached] == [sae]
    record["after add_sae"] = model(tokens)
    torch.testing.assert_close(record["after add_sae"], outputB, atol=0, rtol=0)
    model.reset_saes()
    assert model.attached == []
    record["after reset_saes"] = model(tokens)

    with model.saes([sae]):                              # a with-block attaches, then detaches
        record["inside with saes()"] = model(tokens)
    record["after the with block"] = model(tokens)

    # An exception in the middle of a forward, with an SAE attached:
    try:
        with model.saes([sae]):
            model.run_with_interventions(tokens, [Explode()])
    except RuntimeError as error:
        print(f"{name}: caught {error!r}")
    assert model.attached == []
    record["after an error mid-forward"] = model(tokens)

    # ... and in your own code inside the block:
    try:
        with model.saes([sae]):
            model(tokens)
            raise KeyboardInterrupt  # even an interrupt
    except KeyboardInterrupt:
        pass
    assert model.attached == []
    record["after an interrupt"] = model(tokens)

    for step in ("after reset_saes", "after the with block", "after an error mid-forward",
                 "after an interrupt"):
        assert torch.equal(record[step], outputA), (name, step)
    assert torch.equal(record["inside with saes()"], outputB), name
    steps[name] = {step: gap(logits, outputA) for step, logits in record.items()}

# %% [markdown]
# The wrapped objects themselves hold no hook either: calling them directly gives the clean
# logits.

# %%
with torch.no_grad():
    torch.testing.assert_close(hf_model(tokens).logits, backends["HF"](tokens), atol=0, rtol=0)
    torch.testing.assert_close(tl_model(tokens), backends["TL processed"](tokens),
                               atol=0, rtol=0)
print({name: f"{s['run_with_saes']:.3f}" for name, s in steps.items()})

# %% [markdown]
# ## Figure: distance from the clean logits after each call

# %%
labels = list(next(iter(steps.values())))
fig, ax = plt.subplots(figsize=(9, 3.6))
width = 0.8 / len(steps)
for i, (name, record) in enumerate(steps.items()):
    xs = [j + i * width for j in range(len(labels))]
    ax.bar(xs, list(record.values()), width, label=name)
    for x, value in zip(xs, record.values(), strict=True):
        if value == 0:  # exactly equal to outputA
            ax.text(x, 0.01, "0", ha="center", fontsize=7)
ax.set_xticks([j + width for j in range(len(labels))], labels, rotation=25, ha="right",
              fontsize=8)
ax.set_ylabel("max |logits − outputA|")
ax.set_title("Only the calls that splice the SAE change the logits; nothing lingers")
ax.legend(fontsize=8)
fig.tight_layout()
(HERE / "figures").mkdir(exist_ok=True)
fig.savefig(HERE / "figures" / "04_stateless_and_stateful.png", dpi=110)
