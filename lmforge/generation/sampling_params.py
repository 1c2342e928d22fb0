"""SamplingParams: every knob of token-by-token generation, in one validated dataclass.

Field names follow vLLM (and so the OpenAI API) so users switch without
relearning. The same object drives `generate`, the engine, the server and the
explain report; it is checked once, at construction, and each bad value gets an
error naming the field and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmforge.errors import ValidationError

if TYPE_CHECKING:
    from lmforge.context.structured import StructuredOutputParams


@dataclass
class SamplingParams:
    n: int = 1  # independent completions per prompt
    temperature: float = 1.0  # 0 = greedy (argmax); < 1 sharpens, > 1 flattens the distribution
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability sums to top_p
    top_k: int = 0  # keep the k most likely tokens; 0 (or -1) = off
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    typical_p: float = 1.0  # locally typical sampling; 1 = off
    repetition_penalty: float = 1.0  # CTRL-style: divide positive / multiply negative logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI: subtract once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence of a generated token
    no_repeat_ngram_size: int = 0  # forbid repeating any n-gram of this size; 0 = off
    logit_bias: dict[int, float] | None = None  # token id → value added to its logit
    bad_words: list[str] | None = None  # words (possibly several tokens) that are never generated
    max_tokens: int | None = 16  # new tokens at most; None = until the context window is full
    min_tokens: int = 0  # EOS and stop token ids are suppressed until this many tokens exist
    stop: list[str] | None = None  # stop strings; the output is cut before them
    stop_token_ids: list[int] | None = None  # extra token ids that end the output
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    include_stop_str_in_output: bool = False
    seed: int | None = None  # makes sampling reproducible
    logprobs: int | None = None  # return the sampled token's logprob and this many top alternatives
    skip_special_tokens: bool = True  # in the detokenized text
    num_beams: int = 1  # beam search when > 1 (deterministic; sampling fields are ignored)
    length_penalty: float = 1.0  # beam score = sum logprob / length**length_penalty
    reasoning_budget: int | None = None  # thinking models: tokens allowed before </think> is forced
    # the output must match a JSON schema / regex / choice / grammar (lmforge.context.structured)
    structured_outputs: StructuredOutputParams | dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        if self.structured_outputs is not None:
            from lmforge.context.structured import (
                StructuredOutputParams,  # the grammar engine loads on use
            )

            self.structured_outputs = StructuredOutputParams.coerce(self.structured_outputs)

    def _validate(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValidationError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}.")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)

        for name in ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "length_penalty"):
            if not is_number(getattr(self, name)):
                fail(name, "must be a number")
        if not is_int(self.n) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if self.temperature < 0:
            fail("temperature", "must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "must be an integer >= 0 (0 or -1 disables it)")
        if not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if not 0 < self.typical_p <= 1:
            fail("typical_p", "must be in (0, 1]")
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "must be > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                fail(name, "must be in [-2, 2]")
        if not is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            fail("no_repeat_ngram_size", "must be an integer >= 0")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            fail("max_tokens", "must be an integer >= 1 (or None for as many as the context allows)")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            fail("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must not exceed max_tokens={self.max_tokens}")
        if self.stop is not None and not (isinstance(self.stop, list)
                                          and all(isinstance(s, str) and s for s in self.stop)):
            fail("stop", "must be a non-empty string or a list of non-empty strings")
        if self.stop_token_ids is not None and not (isinstance(self.stop_token_ids, list)
                                                    and all(is_int(t) and t >= 0 for t in self.stop_token_ids)):
            fail("stop_token_ids", "must be a list of token ids (integers >= 0)")
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}
            except (AttributeError, TypeError, ValueError):
                fail("logit_bias", "must map token ids to numbers")
            if any(token < 0 for token in self.logit_bias):
                fail("logit_bias", "must map token ids (integers >= 0) to numbers")
        if self.bad_words is not None and not (isinstance(self.bad_words, list)
                                               and all(isinstance(w, str) and w.strip() for w in self.bad_words)):
            fail("bad_words", "must be a non-empty string or a list of non-empty strings")
        if self.seed is not None and not is_int(self.seed):
            fail("seed", "must be an integer")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            fail("logprobs", "must be an integer in [0, 20]")
        if not is_int(self.num_beams) or self.num_beams < 1:
            fail("num_beams", "must be an integer >= 1")
        if self.reasoning_budget is not None and (not is_int(self.reasoning_budget) or self.reasoning_budget < 0):
            fail("reasoning_budget", "must be an integer >= 0 (thinking tokens), or None for no limit")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0 (top_k = 1 picks the argmax too)."""
        return self.temperature == 0 or self.top_k == 1
