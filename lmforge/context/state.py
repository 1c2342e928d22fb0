"""The state strategy: key facts pinned in a small JSON object that the model keeps up to date.

A summary is prose the model rewrites each time, and facts can slip out of it. A state is a flat JSON
object ({"dog": "Rex", "city": "Rome"}): as each exchange leaves the last `keep_turns`, the model reads
it and writes the facts it states, constrained by structured output to a flat object of short strings,
and the new facts are added to the state. Nothing the model writes replaces a fact: a known value or
a question (a value ending in "?", which a small model copies from the conversation) is skipped, and a new value under a key already in use gets the next free name (city, city_2, ...), the
later one being the newer. The state is kept within `state_tokens` by forgetting the oldest facts the
model wrote (facts pinned by hand stay). The prompt then carries the system prompt, the state and only
the recent exchanges, every turn. Each update is a model call whose tokens are counted in `spent`.
"""

from __future__ import annotations

import json
import re

from lmforge.context.condensed import CondensedContext, transcript
from lmforge.context.model_calls import Complete, ask
from lmforge.errors import ValidationError
from lmforge.generation.chat import Message
from lmforge.generation.sampling_params import SamplingParams

FACTS_GRAMMAR = r'''start: "{" pair (", " pair){0,5} "}"
pair: KEY ": " VALUE
KEY: /"[a-z_]{1,24}"/
VALUE: /"[^"\\\x00-\x1f]{1,48}"/
'''
"""A JSON object of 1-6 facts: short snake_case keys, one-line string values without escapes. (A JSON schema
cannot bound the keys' length, and a small model left free writes ever longer keys.)"""
FACT_PAIR = re.compile(r'"([a-z_]{1,24})": "([^"\\\x00-\x1f]{1,48})"')
INSTRUCTION = "Write the facts in these messages as a JSON object, one short key per fact."
STATE_HEADER = "Known facts (JSON):"


class StatefulContext(CondensedContext):
    """Reads every exchange that leaves the last `keep_turns` into the facts, at once (not only when over
    budget: the point is a small prompt every turn). `state` may start with facts pinned by hand (and be
    edited between turns)."""

    what = "the facts"

    def __init__(self, model, tokenizer, reserve_output: int = 256, keep_turns: int = 1, update_tokens: int = 96,
                 state_tokens: int = 192, state: dict[str, str] | None = None, complete: Complete | None = None):
        if update_tokens < 8 or state_tokens < 8:
            raise ValidationError(f"StatefulContext needs update_tokens >= 8 and state_tokens >= 8, got "
                                  f"{update_tokens} and {state_tokens}.")
        super().__init__(model, tokenizer, reserve_output, keep_turns, complete)
        self.update_tokens, self.state_tokens = update_tokens, state_tokens
        self.state: dict[str, str] = dict(state or {})
        self.pinned = set(self.state)  # facts given by hand: never forgotten

    @property
    def memory(self) -> dict[str, str]:
        return self.state

    @memory.setter
    def memory(self, value: dict[str, str]) -> None:
        self.state = value

    def condensed_text(self) -> str:
        return f"{STATE_HEADER} {json.dumps(self.state, ensure_ascii=False)}" if self.state else ""

    def condense(self, messages: list[Message]) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=self.update_tokens,
                                structured_outputs={"grammar": FACTS_GRAMMAR})
        text = ask(self.complete, self.tokenizer, f"{INSTRUCTION}\n\n{transcript(messages)}", params, self.spent)
        # The grammar fixes the layout, so the whole pairs can be read even from an answer cut at update_tokens.
        for key, value in FACT_PAIR.findall(text):
            if value.strip() and not value.rstrip().endswith("?") and value not in self.state.values():
                self.state[free_key(self.state, key)] = value
        written = [key for key in self.state if key not in self.pinned]  # oldest first
        while written and len(self.tokenizer.encode(self.condensed_text(), add_special_tokens=False)) > \
                self.state_tokens:
            del self.state[written.pop(0)]


def free_key(state: dict[str, str], key: str) -> str:
    """`key`, or key_2, key_3, ... — the first name not yet in `state`."""
    name, number = key, 2
    while name in state:
        name, number = f"{key}_{number}", number + 1
    return name
