"""Logits processors: the stage between the model's logits and the sampled token.

Each processor rewrites the next-token logits of one sequence (a [vocab] float32 tensor);
a filtered token gets -inf, i.e. probability 0. `LogitsPipeline.from_params` runs them in a
fixed order: the output's constraints first (a structured-output grammar, a reasoning budget),
then hard constraints and penalties on the raw logits (logit bias, bad words, min tokens,
no-repeat-ngram, repetition, presence/frequency), then temperature, then the truncation filters
(top-k, top-p, min-p, typical-p), which act on the tempered distribution.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lmforge.errors import ValidationError
from lmforge.generation.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

NEG_INF = float("-inf")

Observer = Callable[[str, Tensor, Tensor], None]
"""observer(processor_name, logits_before, logits_after), called once per processor."""


class SequenceState:
    """What the processors know about one sequence: its tokens so far and per-processor state.

    The pipeline is shared by every sequence with the same params; anything that differs per
    sequence (token counts, an n-gram table, a grammar automaton) lives here, under
    `processor_state[processor.name]`, kept current by each processor's `on_reset` / `on_accept`.
    """

    def __init__(self, prompt_token_ids: Iterable[int], processors: Sequence[LogitsProcessor] = ()):
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self._hooks = [p for p in processors if p.stateful]
        self.reset()

    def reset(self) -> None:
        """Forget all output tokens (the prompt stays)."""
        self.output_token_ids: list[int] = []
        self.output_counts: dict[int, int] = {}  # token id -> times generated
        self.seen: set[int] = set(self.prompt_token_ids)  # prompt + output ids
        self.processor_state: dict[str, Any] = {}
        self._counts_tensor: Tensor | None = None  # dense views, built on first use
        self._seen_mask: Tensor | None = None
        for processor in self._hooks:
            processor.on_reset(self)

    def accept(self, token_id: int) -> None:
        """Append a generated token and advance every stateful processor."""
        self.output_token_ids.append(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        self.seen.add(token_id)
        if self._counts_tensor is not None:
            self._counts_tensor[token_id] += 1
        if self._seen_mask is not None:
            self._seen_mask[token_id] = True
        for processor in self._hooks:
            processor.on_accept(self, token_id)

    def replay(self, output_token_ids: Iterable[int]) -> None:
        """Rebuild the state for these outputs (after preemption): reset, then accept each."""
        self.reset()
        for token_id in output_token_ids:
            self.accept(token_id)

    def last_token_ids(self, k: int) -> list[int]:
        """The last k ids of prompt + output (fewer if the sequence is shorter)."""
        if k <= 0:
            return []
        tail = self.output_token_ids[-k:]
        missing = k - len(tail)
        return (self.prompt_token_ids[-missing:] if missing else []) + tail

    def counts_tensor(self, vocab_size: int, device: torch.device) -> Tensor:
        """Output token counts as a dense float [vocab] tensor; built once, then updated by `accept`."""
        if self._counts_tensor is None or self._counts_tensor.device != device:
            counts = torch.zeros(vocab_size, device=device)
            if self.output_counts:
                ids = torch.tensor(list(self.output_counts), device=device)
                counts[ids] = torch.tensor(list(self.output_counts.values()), dtype=counts.dtype, device=device)
            self._counts_tensor = counts
        return self._counts_tensor

    def seen_mask(self, vocab_size: int, device: torch.device) -> Tensor:
        """Prompt + output ids as a bool [vocab] mask; built once, then updated by `accept`."""
        if self._seen_mask is None or self._seen_mask.device != device:
            mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if self.seen:
                mask[torch.tensor(list(self.seen), device=device)] = True
            self._seen_mask = mask
        return self._seen_mask


class LogitsProcessor(ABC):
    """One rewrite of the next-token logits. Holds only per-params configuration, never per-sequence state."""

    name: str = "processor"

    @abstractmethod
    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        """Return the processed logits; may modify `logits` in place."""

    def on_reset(self, state: SequenceState) -> None:
        """(Re)initialise this processor's entry in `state.processor_state` from the prompt."""

    def on_accept(self, state: SequenceState, token_id: int) -> None:
        """Advance this processor's per-sequence state by one generated token."""

    @property
    def stateful(self) -> bool:
        """Whether this processor keeps per-sequence state (overrides `on_reset` or `on_accept`)."""
        cls = type(self)
        return cls.on_reset is not LogitsProcessor.on_reset or cls.on_accept is not LogitsProcessor.on_accept

    def __repr__(self) -> str:
        config = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({config})"


# ----- hard constraints and penalties (on the raw logits) -------------------------------


class LogitBias(LogitsProcessor):
    """logit[t] += bias[t] (OpenAI `logit_bias`): -100 practically bans a token, +100 practically forces it."""

    name = "logit_bias"

    def __init__(self, bias: dict[int, float]):
        if any(token < 0 for token in bias):
            raise ValidationError(f"logit_bias has negative token ids {sorted(t for t in bias if t < 0)}; "
                                  "use ids from the tokenizer's vocabulary.")
        self.bias = dict(bias)
        self._max_id = max(bias)
        self._ids = torch.tensor(list(bias), dtype=torch.long)
        self._values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        if self._max_id >= logits.shape[-1]:
            raise ValidationError(f"logit_bias names token id {self._max_id} but the vocabulary has "
                                  f"{logits.shape[-1]} tokens; use ids below {logits.shape[-1]}.")
        logits[self._ids.to(logits.device)] += self._values.to(logits.device)
        return logits


class BadWords(LogitsProcessor):
    """Never generate these token sequences.

    A single-token word is always banned. For a longer word w, its last token is banned when the
    output so far ends with w[:-1], so the model can start the word but never complete it.
    """

    name = "bad_words"

    def __init__(self, words: Sequence[Sequence[int]]):
        self.single = sorted({w[0] for w in words if len(w) == 1})
        self.multi = [(list(w[:-1]), w[-1]) for w in words if len(w) > 1]

    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        output = state.output_token_ids
        banned = list(self.single)
        banned += [last for prefix, last in self.multi
                   if len(output) >= len(prefix) and output[-len(prefix):] == prefix]
        if banned:
            logits[banned] = NEG_INF
        return logits


class MinTokens(LogitsProcessor):
    """Ban EOS and the stop token ids while fewer than `min_tokens` tokens have been generated."""

    name = "min_tokens"

    def __init__(self, min_tokens: int, stop_token_ids: Sequence[int]):
        self.min_tokens = min_tokens
        self.stop_token_ids = sorted(set(stop_token_ids))

    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        if len(state.output_token_ids) < self.min_tokens:
            logits[self.stop_token_ids] = NEG_INF
        return logits


class NoRepeatNGram(LogitsProcessor):
    """No n-gram may occur twice in prompt + output (HF `no_repeat_ngram_size`).

    Per sequence it keeps a table {n-1 tokens: tokens that have followed them}; the next token t
    is banned when (last n-1 tokens, t) is already in the table. The table grows by one n-gram
    per accepted token, so each step costs O(1) rather than a rescan of the sequence.
    """

    name = "no_repeat_ngram"

    def __init__(self, ngram_size: int):
        self.n = ngram_size

    def on_reset(self, state: SequenceState) -> None:
        tokens, n = state.prompt_token_ids, self.n
        table: dict[tuple[int, ...], set[int]] = {}
        for i in range(len(tokens) - n + 1):
            table.setdefault(tuple(tokens[i:i + n - 1]), set()).add(tokens[i + n - 1])
        state.processor_state[self.name] = table

    def on_accept(self, state: SequenceState, token_id: int) -> None:
        ngram = state.last_token_ids(self.n)  # ends with token_id
        if len(ngram) == self.n:
            state.processor_state[self.name].setdefault(tuple(ngram[:-1]), set()).add(token_id)

    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        banned = state.processor_state[self.name].get(tuple(state.last_token_ids(self.n - 1)))
        if banned:
            logits[list(banned)] = NEG_INF
        return logits


class RepetitionPenalty(LogitsProcessor):
    """CTRL / HF repetition penalty over prompt + output tokens: for each seen token t,
    logit[t] / p if logit[t] > 0 else logit[t] * p, so p > 1 makes every seen token less likely."""

    name = "repetition_penalty"

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        seen = state.seen_mask(logits.shape[-1], logits.device)
        penalized = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return torch.where(seen, penalized, logits)


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI / vLLM penalties over *output* tokens, with c[t] = times t was generated:
    logit[t] -= presence * (c[t] > 0) + frequency * c[t]."""

    name = "presence_frequency_penalty"

    def __init__(self, presence: float, frequency: float):
        self.presence = presence
        self.frequency = frequency

    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        if not state.output_counts:
            return logits
        counts = state.counts_tensor(logits.shape[-1], logits.device)
        return logits - self.presence * (counts > 0) - self.frequency * counts


# ----- temperature and truncation (sampling only) ----------------------------------------


class Temperature(LogitsProcessor):
    """logits / T: softmax(logits / T) is sharper for T < 1 and flatter for T > 1."""

    name = "temperature"

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        return logits.div_(self.temperature)


class TopK(LogitsProcessor):
    """Keep the k highest logits (and any tied with the k-th), filter the rest."""

    name = "top_k"

    def __init__(self, k: int):
        self.k = k

    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        kth = torch.topk(logits, min(self.k, logits.shape[-1])).values[-1]
        return logits.masked_fill_(logits < kth, NEG_INF)


class TopP(LogitsProcessor):
    """Nucleus sampling (HF semantics): keep the smallest set of most likely tokens whose probability
    sums to >= top_p. Sorted ascending, a token goes when the cumulative mass up to and including it
    is <= 1 - top_p; the most likely token always stays."""

    name = "top_p"

    def __init__(self, top_p: float):
        self.top_p = top_p

    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        sorted_logits, order = torch.sort(logits)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - self.top_p
        remove[-1] = False
        return logits.masked_fill_(remove.scatter(0, order, remove), NEG_INF)


class MinP(LogitsProcessor):
    """Keep tokens with p >= min_p * p_max: the cut-off scales with the model's confidence."""

    name = "min_p"

    def __init__(self, min_p: float):
        self.min_p = min_p

    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        probs = logits.softmax(-1)
        return logits.masked_fill_(probs < self.min_p * probs.max(), NEG_INF)


class TypicalP(LogitsProcessor):
    """Locally typical sampling (Meister et al. 2022; HF TypicalLogitsWarper).

    A token's surprise is -log p; the distribution's entropy H is the expected surprise. Tokens are
    ranked by |-log p - H| (most "typical" first) and the shortest prefix of that ranking whose
    probability reaches typical_p is kept.
    """

    name = "typical_p"

    def __init__(self, mass: float):
        self.mass = mass

    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        log_probs = logits.log_softmax(-1)
        entropy = -(log_probs * log_probs.exp()).nansum()  # nansum: 0 * -inf for filtered tokens
        distance, order = torch.sort((-log_probs - entropy).abs())
        cumulative = logits[order].softmax(-1).cumsum(-1)
        last = min(int((cumulative < self.mass).sum()), logits.shape[-1] - 1)
        remove = distance > distance[last]
        remove[0] = False
        return logits.masked_fill_(remove.scatter(0, order, remove), NEG_INF)


# ----- the pipeline ------------------------------------------------------------------------


def bad_words_token_ids(words: Sequence[str], tokenizer: Tokenizer) -> list[list[int]]:
    """Token id sequences for each word, at the start of a text ("word") and after a space (" word")."""
    sequences: dict[tuple[int, ...], None] = {}  # ordered and de-duplicated
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids:
                sequences[ids] = None
    return [list(ids) for ids in sequences]


class LogitsPipeline:
    """An ordered list of processors, shared by every sequence that uses the same params."""

    def __init__(self, processors: Sequence[LogitsProcessor]):
        names = [p.name for p in processors]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValidationError(f"LogitsPipeline: processor names {duplicates} appear more than once; "
                                  "give each processor a unique `name` (it keys its per-sequence state).")
        self.processors = list(processors)

    @classmethod
    def from_params(cls, params: SamplingParams, eos_token_ids: Sequence[int], tokenizer: Tokenizer | None = None,
                    constraints: Sequence[LogitsProcessor] = ()) -> LogitsPipeline:
        """Build the processors `params` asks for, in the order of the module docstring.

        `constraints` (e.g. a grammar mask for constrained decoding) run first, on the raw logits;
        `params.structured_outputs` adds its grammar there and `params.reasoning_budget` the forced end
        of an over-long thought. Processors that would change nothing are
        left out; with greedy (or beam) decoding the temperature and truncation filters are too, as
        they cannot change the argmax.
        """
        processors = list(constraints)
        if params.structured_outputs is not None:
            from lmforge.context.structured import (
                grammar_constraint,  # the grammar engine loads on use
            )

            processors.insert(0, grammar_constraint(params.structured_outputs, tokenizer,
                                                    eos_token_ids or params.stop_token_ids or []))
        if params.reasoning_budget is not None:
            from lmforge.context.reasoning import ReasoningBudget, ThinkingMode

            if tokenizer is None:
                raise ValidationError("SamplingParams.reasoning_budget needs the tokenizer to find the think tags; "
                                      "pass tokenizer= to LogitsPipeline.from_params.")
            processors.append(ReasoningBudget(params.reasoning_budget, ThinkingMode.of(tokenizer)))
        if params.logit_bias:
            processors.append(LogitBias(params.logit_bias))
        if params.bad_words:
            if tokenizer is None:
                raise ValidationError("SamplingParams.bad_words needs a tokenizer to turn words into token ids; "
                                      "pass tokenizer= to LogitsPipeline.from_params.")
            processors.append(BadWords(bad_words_token_ids(params.bad_words, tokenizer)))
        stop_ids = set(params.stop_token_ids or []) | (set() if params.ignore_eos else set(eos_token_ids))
        if params.min_tokens > 0 and stop_ids:
            processors.append(MinTokens(params.min_tokens, sorted(stop_ids)))
        if params.no_repeat_ngram_size > 0:
            processors.append(NoRepeatNGram(params.no_repeat_ngram_size))
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenalty(params.repetition_penalty))
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            processors.append(PresenceFrequencyPenalty(params.presence_penalty, params.frequency_penalty))
        if not params.greedy and params.num_beams == 1:
            if params.temperature != 1.0:
                processors.append(Temperature(params.temperature))
            if params.top_k > 0:
                processors.append(TopK(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopP(params.top_p))
            if params.min_p > 0.0:
                processors.append(MinP(params.min_p))
            if params.typical_p < 1.0:
                processors.append(TypicalP(params.typical_p))
        return cls(processors)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.processors]

    def new_state(self, prompt_token_ids: Iterable[int]) -> SequenceState:
        """A fresh per-sequence state wired to this pipeline's stateful processors."""
        return SequenceState(prompt_token_ids, self.processors)

    def __call__(self, logits: Tensor, state: SequenceState, observer: Observer | None = None) -> Tensor:
        """Process one sequence's [vocab] logits; the input tensor is never modified.

        With an observer, each processor's input and output are passed to it as clones.
        """
        if not self.processors:
            return logits
        logits = logits.to(torch.float32, copy=True)
        for processor in self.processors:
            if observer is None:
                logits = processor(logits, state)
            else:
                before = logits.clone()
                logits = processor(logits, state)
                observer(processor.name, before, logits.clone())
        return logits

    def __repr__(self) -> str:
        return f"LogitsPipeline({self.processors!r})"
