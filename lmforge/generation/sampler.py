"""Sampler: turn processed logits into the next token id, and report logprobs.

Greedy decoding takes the argmax. Sampling is inverse-CDF: draw u ~ U(0, 1] with the request's
own `torch.Generator` and take the first token whose cumulative probability reaches u, so a seeded
request produces the same tokens whatever else runs beside it. Logprobs come from the *raw* model
logits (vLLM v1's default), not the processed ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from lmforge.errors import InputError
from lmforge.generation.sampling_params import SamplingParams
from lmforge.nn.kernels.threads import torch_on_one_thread

if TYPE_CHECKING:
    from lmforge.generation.processors import LogitsPipeline, Observer, SequenceState


class Sampler:
    """Picks tokens for one request: argmax when `params.greedy`, else a seeded draw from softmax(logits)."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.greedy = params.greedy
        # Without a seed, draw one from torch's global RNG: torch.manual_seed still makes runs repeatable.
        self.seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
        self.generator = torch.Generator(device=device).manual_seed(self.seed)

    def sample(self, processed_logits: Tensor) -> int:
        """The next token id from one sequence's [vocab] processed logits."""
        return sample_batch(processed_logits.unsqueeze(0), [self])[0]


def sample_batch(processed_logits: Tensor, samplers: Sequence[Sampler]) -> list[int]:
    """Row i of [batch, vocab] logits is sampled by samplers[i], each with its own generator.

    Greedy rows share one argmax and all rows are read back in one transfer; every row gets the
    token `samplers[i].sample(row)` would give. Inverse-CDF needs one random number per token where
    torch.multinomial draws one per vocabulary entry (about 20x slower on a CPU for 50k tokens).
    """
    if processed_logits.dim() != 2 or processed_logits.shape[0] != len(samplers):
        raise InputError(f"sample_batch needs [batch, vocab] logits with one sampler per row; got logits of "
                         f"shape {tuple(processed_logits.shape)} and {len(samplers)} samplers.")
    best, tokens = processed_logits.max(dim=-1)
    if torch.isneginf(best).any():
        row = int(torch.isneginf(best).nonzero()[0])
        raise InputError(f"every token of row {row} was filtered out (all logits are -inf); relax the "
                         "constraints (bad_words, logit_bias, min_tokens, a grammar) so some token stays allowed.")
    cdf = None
    for row, sampler in enumerate(samplers):
        if sampler.greedy:
            continue
        if sampler.generator.device.type != processed_logits.device.type:
            raise InputError(f"logits are on {processed_logits.device} but the sampler's generator is on "
                             f"{sampler.generator.device}; create the Sampler with device={processed_logits.device}.")
        if cdf is None:  # float64 so that even the least likely tokens keep their share of [0, 1]
            cdf = processed_logits.double().softmax(dim=-1).cumsum(dim=-1)
        # u in (0, total]: the first token with cdf >= u always exists and never has probability 0.
        u = (1 - torch.rand(1, dtype=torch.float64, device=cdf.device, generator=sampler.generator)) * cdf[row, -1]
        tokens[row] = torch.searchsorted(cdf[row], u)[0]
    return tokens.tolist()


@dataclass
class TokenLogprob:
    """A token's log-probability and the `top` most likely alternatives as (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def logprobs(raw_logits: Tensor, token_id: int, top_n: int = 0) -> TokenLogprob:
    """log_softmax of the raw [vocab] model logits: the chosen token's logprob and the top_n alternatives."""
    vocab_size = raw_logits.shape[-1]
    if not 0 <= token_id < vocab_size:
        raise InputError(f"token id {token_id} is outside the vocabulary [0, {vocab_size}).")
    log_probs = raw_logits.float().log_softmax(dim=-1)
    top: list[tuple[int, float]] = []
    if top_n > 0:
        values, ids = log_probs.topk(min(top_n, vocab_size))
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id, float(log_probs[token_id]), top)


class SamplingRow(Protocol):
    """What one generating sequence brings to a sampling step (generate's rows, the engine's sequences)."""

    params: SamplingParams
    pipeline: LogitsPipeline
    sampling_state: SequenceState
    sampler: Sampler
    logprobs: list[TokenLogprob] | None  # appended to when the request asked for logprobs


ONE_THREAD_ROWS = 4
"""Up to this many rows are sampled on one thread: too little work to gain from torch's thread pool, whose
threads would then keep spinning on the cores the next decode step needs (see nn.kernels.threads)."""


def sample_next_tokens(logits: Tensor, rows: Sequence[SamplingRow], observer: Observer | None = None,
                       logit_rows: Sequence[int] | None = None) -> list[int]:
    """The next token of every row from its raw [vocab] logits `logits[i]` (or `logits[logit_rows[i]]`: rows may
    share a row of logits, e.g. parallel samples of one prompt).

    Row i's logits pipeline processes its logits, its own sampler draws, its processor state
    accepts the token, and the token's logprobs are recorded when requested.
    """
    if not rows:  # e.g. an engine step that only prefilled prompt chunks
        return []
    threads = torch_on_one_thread() if len(rows) <= ONE_THREAD_ROWS else nullcontext()
    with threads:  # the gather too: copying a vocabulary-sized row is large enough for torch to go parallel
        logits = logits if logit_rows is None else logits[list(logit_rows)]
        processed = torch.stack([row.pipeline(logits[i], row.sampling_state, observer)
                                 for i, row in enumerate(rows)])
        tokens = sample_batch(processed, [row.sampler for row in rows])
    for i, (row, token) in enumerate(zip(rows, tokens)):
        row.sampling_state.accept(token)
        if row.logprobs is not None:
            row.logprobs.append(logprobs(logits[i], token, row.params.logprobs))
    return tokens
