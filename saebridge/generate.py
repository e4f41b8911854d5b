"""Greedy decoding by full forwards, for backends whose own ``generate`` cannot carry every hook.

TransformerLens's ``HookedTransformer.generate`` embeds tokens outside ``hook_embed`` (it
calls ``embed`` itself and feeds the forward a residual), so an intervention at
``hook_embed`` would silently not apply; the TransformerLens adapters decode with this loop
instead. Every step is a whole forward over the sequence so far (no KV cache), which is
also what the Hugging Face path does (``generate(use_cache=False)``): positions and
activation spaces then mean in each step exactly what they mean in a single run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def greedy(forward: Callable[[Tensor], Tensor], tokens_BP: Tensor, max_new_tokens: int
           ) -> Tensor:
    """``tokens_BP`` followed by ``max_new_tokens`` greedy tokens (no stop at EOS).

    >>> step = lambda t: torch.nn.functional.one_hot(t + 1, 8).float()  # "next id" model
    >>> greedy(step, torch.tensor([[3]]), 2)
    tensor([[3, 4, 5]])
    """
    for _ in range(max_new_tokens):
        next_B1 = forward(tokens_BP)[:, -1].argmax(-1, keepdim=True)
        tokens_BP = torch.cat([tokens_BP, next_B1.to(tokens_BP.device)], dim=1)
    return tokens_BP


def greedy_call(module: Callable[[Tensor], Tensor], n_new: int
                ) -> tuple[Callable[..., Tensor], dict[str, int]]:
    """What a traced generation of ``module`` calls (:func:`greedy` over its forwards), and
    the keyword arguments it is called with besides the tokens."""
    def call(tokens: Tensor, max_new_tokens: int) -> Tensor:
        return greedy(module, tokens, max_new_tokens)
    return call, {"max_new_tokens": n_new}
