"""The state strategy: key facts pinned in a small JSON object that the model keeps up to date.

A summary is prose the model rewrites each time, and facts can slip out of it. A state is a flat JSON
object ({"dog": "Rex", "city": "Rome"}): as each exchange leaves the last `keep_turns`, the model reads
it and writes the facts it states, constrained by structured output to a flat object of short strings,
and the result is merged into the state — a pinned fact stays until the model writes its key again.
The prompt then carries the system prompt, the state and only the recent exchanges, every turn. Each
update is a model call whose tokens are counted in `spent`.
"""

from __future__ import annotations

import json
import re

from lmforge.context.condensed import CondensedContext, transcript
from lmforge.context.model_calls import Complete, ask
from lmforge.errors import ValidationError
from lmforge.generation.chat import Message
from lmforge.generation.sampling_params import SamplingParams

FACTS_GRAMMAR = r'''start: "{" pair (", " pair){0,11} "}"
pair: KEY ": " VALUE
KEY: /"[a-z_]{1,24}"/
VALUE: /"[^"\\\x00-\x1f]{1,60}"/
'''
"""A JSON object of 1-12 facts: short snake_case keys, one-line string values without escapes. (A JSON schema
cannot bound the keys' length, and a small model left free writes ever longer keys.)"""
FACT_PAIR = re.compile(r'"([a-z_]{1,24})": "([^"\\\x00-\x1f]{1,60})"')
INSTRUCTION = ("Write every fact from this conversation as a JSON object, one key per fact (for example a name, "
               "a pet, a date, a place).")
STATE_HEADER = "Known facts (JSON):"


class StatefulContext(CondensedContext):
    """Reads every exchange that leaves the last `keep_turns` into the facts, at once (not only when over
    budget: the point is a small prompt every turn). `state` may start with facts pinned by hand (and be
    edited between turns)."""

    what = "the facts"

    def __init__(self, model, tokenizer, reserve_output: int = 256, keep_turns: int = 1, update_tokens: int = 128,
                 state: dict[str, str] | None = None, complete: Complete | None = None):
        if update_tokens < 8:
            raise ValidationError(f"StatefulContext needs update_tokens >= 8, got {update_tokens}.")
        super().__init__(model, tokenizer, reserve_output, keep_turns, complete)
        self.update_tokens = update_tokens
        self.state: dict[str, str] = dict(state or {})

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
        self.state.update((key, value) for key, value in FACT_PAIR.findall(text) if value.strip())
