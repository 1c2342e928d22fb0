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

from lmforge.context.model_calls import Complete, TokenUsage, ask, local_completion
from lmforge.context.strategies import SelectedContext, exchanges, prompt_tokens
from lmforge.context.summary import transcript
from lmforge.errors import InputError, ValidationError
from lmforge.generation.chat import ChatHistory, Message
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


class StatefulContext:
    """Selects what to send: the system prompt, the pinned facts and the last `keep_turns` exchanges.

    Keep one per conversation: it remembers the state and how many messages it has read. `state` may
    start with facts pinned by hand (and be edited between turns).
    """

    def __init__(self, model, tokenizer, reserve_output: int = 256, keep_turns: int = 1, update_tokens: int = 128,
                 state: dict[str, str] | None = None, complete: Complete | None = None):
        if keep_turns < 1 or update_tokens < 8 or reserve_output < 0:
            raise ValidationError(f"StatefulContext needs keep_turns >= 1, update_tokens >= 8 and reserve_output "
                                  f">= 0; got {keep_turns}, {update_tokens}, {reserve_output}.")
        self.tokenizer = tokenizer
        self.complete = complete or local_completion(model, tokenizer)
        self.reserve_output, self.keep_turns, self.update_tokens = reserve_output, keep_turns, update_tokens
        self.state: dict[str, str] = dict(state or {})
        self.covered = 0  # messages of the history already read into the state
        self.spent = TokenUsage()

    def _with_state(self, history: ChatHistory) -> ChatHistory:
        system = history.system or ""
        if self.state:
            system = f"{system}\n\n{STATE_HEADER} {json.dumps(self.state, ensure_ascii=False)}".strip()
        return ChatHistory(system or None, history.messages[self.covered:])

    def select(self, history: ChatHistory, context_window: int) -> SelectedContext:
        """The prompt to send for `history` with a `context_window`-token model."""
        budget = context_window - self.reserve_output
        if budget < 1:
            raise ValidationError(f"reserving {self.reserve_output} tokens for the answer leaves no room in a "
                                  f"{context_window}-token window; reserve fewer.")
        if len(history.messages) < self.covered:
            raise InputError("the history is shorter than what this state has read; start a new StatefulContext "
                             "for a new conversation.")
        recent = exchanges(history.messages[self.covered:])
        if len(recent) > self.keep_turns:
            older = [m for group in recent[:-self.keep_turns] for m in group]
            self._update(older)
            self.covered += len(older)
        sent = self._with_state(history)
        tokens = prompt_tokens(self.tokenizer, sent)
        if tokens > budget:
            raise InputError(f"the facts and the last {self.keep_turns} exchange(s) take {tokens} tokens, more than "
                             f"the budget of {budget}; keep fewer turns, shorten the messages or remove facts.")
        return SelectedContext(sent, tokens, self.covered)

    def _update(self, messages: list[Message]) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=self.update_tokens,
                                structured_outputs={"grammar": FACTS_GRAMMAR})
        text = ask(self.complete, self.tokenizer, f"{INSTRUCTION}\n\n{transcript(messages)}", params, self.spent)
        # The grammar fixes the layout, so the whole pairs can be read even from an answer cut at update_tokens.
        self.state.update((key, value) for key, value in FACT_PAIR.findall(text) if value.strip())
