"""Context strategies in which the model condenses older exchanges (summarize, state).

Both keep the last `keep_turns` exchanges word for word and replace everything before them with
something the model writes — a summary, a JSON object of facts — carried in the system prompt. What
differs is what the model writes and when: `CondensedContext` holds the shared bookkeeping (how many
messages are condensed, the tokens the model calls cost, the budget checks) and asks its subclass
for the rest.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

from lmforge.context.model_calls import Complete, TokenUsage, local_completion
from lmforge.context.strategies import SelectedContext, exchanges, prompt_tokens
from lmforge.errors import InputError, ValidationError
from lmforge.generation.chat import ChatHistory, Message


def transcript(messages: list[Message]) -> str:
    """Messages as plain "role: text" lines, the form the model reads when it condenses them."""
    return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages)


class CondensedContext(ABC):
    """Selects what to send: the system prompt with the condensed older exchanges, then the recent ones.

    Keep one per conversation: it remembers what it condensed and how many messages that covers, so
    each exchange is condensed once. The model calls go to `model`, or to `complete` when given (e.g.
    through a serving engine); `spent` counts their tokens.
    """

    what = "condensed context"  # how messages name it ("the summary", "the facts")

    def __init__(self, model, tokenizer, reserve_output: int, keep_turns: int, complete: Complete | None):
        if keep_turns < 1 or reserve_output < 0:
            raise ValidationError(f"{type(self).__name__} needs keep_turns >= 1 and reserve_output >= 0; got "
                                  f"{keep_turns} and {reserve_output}.")
        self.tokenizer = tokenizer
        self.complete = complete or local_completion(model, tokenizer)
        self.reserve_output, self.keep_turns = reserve_output, keep_turns
        self.covered = 0  # messages of the history condensed so far
        self.spent = TokenUsage()

    @property
    @abstractmethod
    def memory(self) -> Any:
        """What the older exchanges were condensed to (settable, e.g. to resume a saved conversation)."""

    @abstractmethod
    def condensed_text(self) -> str:
        """The memory as it is added to the system prompt ("" while there is none)."""

    @abstractmethod
    def condense(self, messages: list[Message]) -> None:
        """Fold `messages` (the exchanges leaving the recent window) into the memory, with a model call."""

    def wants_to_condense(self, tokens: int, budget: int) -> bool:
        """Whether to condense the exchanges beyond `keep_turns` when the prompt would be `tokens` long."""
        return True

    def snapshot(self) -> tuple[int, Any]:
        """(messages covered, a copy of the memory): enough to resume with `restore`."""
        return self.covered, copy.deepcopy(self.memory)

    def restore(self, snapshot: tuple[int, Any]) -> None:
        self.covered, memory = snapshot
        self.memory = copy.deepcopy(memory)

    def _sent(self, history: ChatHistory) -> ChatHistory:
        system = f"{history.system or ''}\n\n{self.condensed_text()}".strip()
        return ChatHistory(system or None, history.messages[self.covered:])

    def select(self, history: ChatHistory, context_window: int) -> SelectedContext:
        """The prompt to send for `history` with a `context_window`-token model."""
        budget = context_window - self.reserve_output
        if budget < 1:
            raise ValidationError(f"reserving {self.reserve_output} tokens for the answer leaves no room in a "
                                  f"{context_window}-token window; reserve fewer.")
        if len(history.messages) < self.covered:
            raise InputError(f"the history is shorter than what {self.what} covers; start a new "
                             f"{type(self).__name__} for a new conversation.")
        sent = self._sent(history)
        tokens = prompt_tokens(self.tokenizer, sent)
        recent = exchanges(history.messages[self.covered:])
        if len(recent) > self.keep_turns and self.wants_to_condense(tokens, budget):
            older = [m for group in recent[:-self.keep_turns] for m in group]
            self.condense(older)
            self.covered += len(older)
            sent = self._sent(history)
            tokens = prompt_tokens(self.tokenizer, sent)
        if tokens > budget:
            raise InputError(f"even with {self.what}, the last {self.keep_turns} exchange(s) take {tokens} tokens, "
                             f"more than the budget of {budget}; keep fewer turns or shorten the messages.")
        return SelectedContext(sent, tokens, self.covered)
