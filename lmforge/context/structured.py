"""Structured output: constrained decoding to a JSON schema, a regex, a choice list or a grammar.

A grammar engine (llguidance) follows the text generated so far and, before each token, computes
which vocabulary entries can continue it without leaving the language; `GrammarConstraint` sets
every other logit to -inf, so the sampler can only pick tokens that keep the output valid. The
matcher is per-sequence state of the logits pipeline: it advances with each accepted token and is
rebuilt by replaying the tokens after a preemption. Grammars compile lazily (about a millisecond
for a JSON schema); the vocabulary is read once per tokenizer (about half a second).
"""

from __future__ import annotations

import copy
import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmforge.errors import InputError, ValidationError
from lmforge.generation.processors import NEG_INF, LogitsProcessor, SequenceState

if TYPE_CHECKING:
    import llguidance

    from lmforge.tokenizer import Tokenizer

JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
"""How generated JSON is laid out: `json.dumps`'s default spacing and no other whitespace. A small
model given free whitespace can spend its whole budget on newlines; one fixed layout cannot."""


def _llguidance():
    try:
        import llguidance
    except ImportError:  # a declared dependency; only a broken install gets here
        raise InputError("structured output needs the llguidance package; install it with "
                         "`pip install llguidance`.") from None
    return llguidance


@dataclass(frozen=True)
class StructuredOutputParams:
    """What the output must match — set exactly one field (vLLM's `structured_outputs` names).

    json: a JSON schema (dict or JSON text); json_object: any JSON object; regex: a regular
    expression (Rust `regex` syntax, matched against the whole output); choice: one of these
    strings exactly; grammar: a Lark grammar in llguidance's dialect (may embed `%json {schema}`).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValidationError(f"structured output takes exactly one of json, regex, choice, grammar or "
                                  f"json_object; got {given or 'none'}.")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValidationError(f"structured output choice must be a non-empty list of strings, "
                                      f"got {self.choice!r}.")
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", json.loads(self.json))
            except json.JSONDecodeError as exc:
                raise ValidationError(f"structured output json is not valid JSON ({exc}); pass a JSON schema "
                                      "as a dict or as JSON text.") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValidationError(f"structured output json must be a JSON schema object, got {self.json!r}.")
        object.__setattr__(self, "_grammar", self._compile())  # once: validated here, used by every sequence
        error = _llguidance().LLMatcher.validate_grammar(self._grammar)
        if error:
            raise ValidationError(f"the structured output {self.kind} is invalid: {error.strip()}")

    @classmethod
    def coerce(cls, value: StructuredOutputParams | dict) -> StructuredOutputParams:
        """Accept the params or their dict form ({"json": {...}}, {"regex": "..."}, ...)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict) or set(value) - {"json", "regex", "choice", "grammar", "json_object"}:
            raise ValidationError(f"structured_outputs must be a StructuredOutputParams or a dict with one of the "
                                  f"keys json, regex, choice, grammar, json_object; got {value!r}.")
        return cls(**value)

    @property
    def kind(self) -> str:
        if self.json_object:
            return "json_object"
        return next(name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None)

    def llguidance_grammar(self) -> str:
        """The constraint as an llguidance grammar (a JSON document naming one or more grammars)."""
        return self._grammar

    def _compile(self) -> str:
        matcher = _llguidance().LLMatcher
        if self.json is not None or self.json_object:
            schema = {"type": "object"} if self.json_object else self.json
            return matcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        if self.regex is not None:
            return matcher.grammar_from_regex(self.regex)
        if self.choice is not None:  # JSON string literals are valid Lark literals
            return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        return matcher.grammar_from_lark(self.grammar)


class GrammarVocabulary:
    """A tokenizer's vocabulary as the grammar engine sees it (each token's bytes), built once per tokenizer.

    `eos_token_ids` are the tokens that end the output: the grammar allows them only where the
    output is complete.
    """

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Sequence[int]):
        backend = copy.copy(tokenizer.backend)
        backend.no_padding()
        backend.no_truncation()
        eos = list(eos_token_ids) or [tokenizer.eos_token_id]
        if eos == [None]:
            raise InputError("structured output needs an end-of-sequence token to finish the output, and this "
                             "tokenizer has none; pass stop_token_ids in SamplingParams.")
        self.vocab_size = tokenizer.vocab_size
        self.tokenizer: llguidance.LLTokenizer = _llguidance().LLTokenizer(
            backend.to_str(), n_vocab=self.vocab_size, eos_token=eos)

    @classmethod
    def of(cls, tokenizer: Tokenizer, eos_token_ids: Sequence[int]) -> GrammarVocabulary:
        """The cached vocabulary of `tokenizer` with these end tokens."""
        per_tokenizer = cls._cache.setdefault(tokenizer, {})
        key = tuple(sorted(set(eos_token_ids)))
        if key not in per_tokenizer:
            per_tokenizer[key] = cls(tokenizer, key)
        return per_tokenizer[key]


_BIT = torch.arange(8, dtype=torch.uint8)


class GrammarConstraint(LogitsProcessor):
    """Filter every token that cannot continue the output within the grammar (runs before all other processors)."""

    name = "structured_output"

    def __init__(self, params: StructuredOutputParams, vocabulary: GrammarVocabulary):
        self.params = params
        self._grammar = params.llguidance_grammar()
        self._vocabulary = vocabulary

    def on_reset(self, state: SequenceState) -> None:
        matcher = _llguidance().LLMatcher(self._vocabulary.tokenizer, self._grammar, log_level=0)
        if matcher.is_error():
            raise ValidationError(f"the structured output {self.params.kind} cannot be used: {matcher.get_error()}")
        state.processor_state[self.name] = matcher

    def on_accept(self, state: SequenceState, token_id: int) -> None:
        matcher = state.processor_state[self.name]
        if not matcher.consume_token(token_id):
            raise InputError(f"token {token_id} does not continue the structured output ({matcher.get_error()}); "
                             "a processor after the grammar must not re-allow filtered tokens.")

    def allowed(self, state: SequenceState) -> Tensor:
        """Which of the vocabulary's tokens may come next, as a bool [vocab_size] mask."""
        packed = torch.frombuffer(bytearray(state.processor_state[self.name].compute_bitmask()), dtype=torch.uint8)
        bits = (packed.unsqueeze(1) >> _BIT) & 1  # little-endian: token 8k + j is bit j of byte k
        return bits.view(-1)[:self._vocabulary.vocab_size].bool()

    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        allowed = self.allowed(state).to(logits.device)
        size = min(len(allowed), logits.shape[-1])
        logits[:size].masked_fill_(~allowed[:size], NEG_INF)
        logits[size:] = NEG_INF  # rows of the embedding beyond the tokenizer's vocabulary
        return logits


def grammar_constraint(params: StructuredOutputParams | dict, tokenizer: Tokenizer | None,
                       eos_token_ids: Sequence[int]) -> GrammarConstraint:
    """The logits processor that enforces `params` for sequences of `tokenizer`'s tokens."""
    if tokenizer is None:
        raise ValidationError("structured output needs the tokenizer to know each token's text; pass tokenizer= "
                              "to LogitsPipeline.from_params.")
    return GrammarConstraint(StructuredOutputParams.coerce(params), GrammarVocabulary.of(tokenizer, eos_token_ids))
