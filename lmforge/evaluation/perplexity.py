"""Perplexity: exp of the mean negative log-likelihood the model gives each next token of a text.

A text longer than the context window is read in windows of `context` tokens that start every
`stride` tokens. Each token is scored once, in the first window that predicts it, with as much
preceding text as that window holds (HF's sliding-window protocol). stride = context is fastest
but leaves the first token of every window unscored (nothing precedes it there); a smaller
stride scores every token, each with more context: a lower, fairer perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lmforge.errors import InputError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # summed negative log-likelihood (nats)
    tokens: int  # tokens scored (every token but the first)


@torch.inference_mode()
def perplexity(model, token_ids: Sequence[int], context: int = 512, stride: int | None = None,
               progress: bool = False) -> PerplexityResult:
    """Sliding-window perplexity of `token_ids` under a causal LM."""
    stride = stride or context
    if len(token_ids) < 2:
        raise InputError("perplexity needs a text of at least 2 tokens.")
    if not 1 <= stride <= context or context > model.config.context_length:
        raise InputError(f"need 1 <= stride <= context <= the model's context window "
                         f"({model.config.context_length}); got stride={stride}, context={context}.")
    ids = torch.tensor(list(token_ids), device=model.device)
    nll, scored, predicted_until = 0.0, 0, 1  # token 0 has nothing to be predicted from
    starts = range(0, len(ids) - 1, stride)
    for begin in tqdm(starts, desc="Perplexity", unit="window", disable=not progress):
        end = min(begin + context, len(ids))
        new = end - max(predicted_until, begin + 1)  # tokens this window scores first
        if new > 0:
            logits = model(ids[None, begin:end], logits_to_keep=new + 1).logits[0, :-1].float()
            targets = ids[end - new:end]
            nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            scored += new
            predicted_until = end
        if end == len(ids):
            break
    return PerplexityResult(math.exp(nll / scored), nll, scored)
