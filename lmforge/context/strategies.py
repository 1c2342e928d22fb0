"""Context strategies: which part of a conversation is sent, so that the prompt fits a token budget.

The budget is the context window minus the tokens reserved for the answer. A conversation that
grows past it must lose something; each strategy decides what:

- `full`: send everything, and fail clearly once it no longer fits;
- `truncate`: drop the oldest exchanges (a user message and the replies to it) until it fits;
- `window`: send only the last `max_turns` exchanges and/or a prompt of at most `max_tokens` tokens
  (then, like truncate, whatever still does not fit the budget). `max_tokens` also caps truncate.

Every strategy keeps the system prompt and the latest user message; the full history stays with the
caller (to save, or to choose again with another strategy). Counts are of the rendered chat, as
the model receives it (template and assistant cue included).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import InputError, ValidationError
from lmforge.generation.chat import ChatHistory, Message
from lmforge.tokenizer import Tokenizer

STRATEGIES = ("full", "truncate", "window")


@dataclass(frozen=True)
class ContextPolicy:
    """How to fit a conversation into the model's window: a strategy, its limits, and the answer's reserve."""

    strategy: str = "full"
    max_turns: int | None = None
    max_tokens: int | None = None
    reserve_output: int = 256

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValidationError(f"context strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}.")
        for name in ("max_turns", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValidationError(f"ContextPolicy.{name} must be >= 1 (or None: no limit), got {value}.")
        if self.reserve_output < 0:
            raise ValidationError(f"ContextPolicy.reserve_output must be >= 0, got {self.reserve_output}.")
        if self.strategy == "window" and self.max_turns is None and self.max_tokens is None:
            raise ValidationError("the window strategy needs max_turns (last N exchanges) or max_tokens.")
        if self.max_turns is not None and self.strategy != "window":
            raise ValidationError(f"max_turns applies to the window strategy, not {self.strategy!r}.")
        if self.max_tokens is not None and self.strategy == "full":
            raise ValidationError("max_tokens caps what truncate or window send; full sends everything.")

    def budget(self, context_window: int) -> int:
        """Prompt tokens allowed with a `context_window`-token model."""
        budget = context_window - self.reserve_output
        if budget < 1:
            raise ValidationError(f"reserving {self.reserve_output} tokens for the answer leaves no room for the "
                                  f"prompt in a {context_window}-token context window; reserve fewer.")
        return budget


@dataclass(frozen=True)
class SelectedContext:
    """What is sent: the trimmed history, its token count, and how many messages were left out."""

    history: ChatHistory
    tokens: int
    dropped_messages: int


def prompt_tokens(tokenizer: Tokenizer, history: ChatHistory) -> int:
    """Tokens of `history` rendered as a prompt (template and assistant cue included)."""
    return len(tokenizer.encode(history.to_prompt(tokenizer), add_special_tokens=False))


def exchanges(messages: list[Message]) -> list[list[Message]]:
    """The messages grouped into exchanges: each user message with everything after it up to the next."""
    groups: list[list[Message]] = []
    for message in messages:
        if message["role"] == "user" or not groups:
            groups.append([])
        groups[-1].append(message)
    return groups


def select_context(history: ChatHistory, tokenizer: Tokenizer, context_window: int,
                   policy: ContextPolicy) -> SelectedContext:
    """The part of `history` to send under `policy` with a `context_window`-token model."""
    budget = policy.budget(context_window)
    groups = exchanges(history.messages)
    if policy.strategy == "window" and policy.max_turns is not None:
        groups = groups[-policy.max_turns:]
    limit = budget if policy.max_tokens is None else min(budget, policy.max_tokens)
    sent = ChatHistory(history.system, [m for group in groups for m in group])
    tokens = prompt_tokens(tokenizer, sent)
    while tokens > limit and len(groups) > 1 and policy.strategy != "full":
        groups = groups[1:]
        sent = ChatHistory(history.system, [m for group in groups for m in group])
        tokens = prompt_tokens(tokenizer, sent)
    if tokens > budget:
        if policy.strategy == "full":
            raise InputError(f"the conversation is {tokens} tokens but the budget is {budget} (a {context_window}-"
                             f"token window minus {policy.reserve_output} for the answer); choose the truncate or "
                             "window strategy, or start over.")
        raise InputError(f"the system prompt and the latest message alone take {tokens} tokens, more than the "
                         f"budget of {budget}; shorten them or reserve fewer tokens for the answer.")
    return SelectedContext(sent, tokens, len(history.messages) - len(sent.messages))
