"""Token accounting: what a prompt costs before it is sent.

A model is billed, and limited, in tokens: every call pays for the whole conversation so far
plus the new input plus the output. A chat's cost is more than its words: the chat template
wraps each message in role markers and special tokens (and may add a default system prompt),
and the template's closing cue for the assistant's turn is paid too. `count_chat` shows where
the tokens go, message by message; `Prices` turns tokens into money.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import ValidationError
from lmforge.generation.chat import ChatHistory
from lmforge.tokenizer import Tokenizer


@dataclass(frozen=True)
class MessageCount:
    """One message's tokens: its text alone, and what its turn adds to the rendered prompt."""

    role: str
    content_tokens: int
    turn_tokens: int

    @property
    def overhead(self) -> int:
        """Template tokens around the text (role markers, separators; for the first turn, anything
        the template puts before it, such as a default system prompt)."""
        return self.turn_tokens - self.content_tokens


@dataclass(frozen=True)
class ChatCount:
    """A chat prompt's tokens: per message, the assistant cue at the end, and the total sent."""

    messages: list[MessageCount]
    generation_prompt_tokens: int
    total: int

    @property
    def content_tokens(self) -> int:
        return sum(m.content_tokens for m in self.messages)

    @property
    def template_tokens(self) -> int:
        """Everything the template adds: the total minus the messages' own text."""
        return self.total - self.content_tokens


def count_text(tokenizer: Tokenizer, text: str) -> int:
    """Tokens of `text` as a raw prompt (with the special tokens the tokenizer adds, e.g. BOS)."""
    return len(tokenizer.encode(text))


def count_chat(tokenizer: Tokenizer, history: ChatHistory) -> ChatCount:
    """The tokens of `history` rendered by the model's chat template with the assistant's cue.

    Each message is credited with the tokens its turn adds to the rendered prompt (the prompt up to
    and including it, minus the prompt before it), so the parts add up to the total exactly.
    """
    messages = history.to_messages()
    if not messages:
        raise ValidationError("the chat has no messages to count; add at least one message.")

    def rendered(count: int, cue: bool = False) -> int:
        if count == 0:
            return 0
        text = ChatHistory(None, messages[:count]).to_prompt(tokenizer, add_generation_prompt=cue)
        return len(tokenizer.encode(text, add_special_tokens=False))

    counts, before = [], 0
    for index, message in enumerate(messages, 1):
        through = rendered(index)
        content = message.get("content") or ""
        counts.append(MessageCount(message["role"], len(tokenizer.encode(content, add_special_tokens=False)),
                                   through - before))
        before = through
    total = rendered(len(messages), cue=True)
    return ChatCount(counts, total - before, total)


@dataclass(frozen=True)
class Prices:
    """Prices per million tokens, as providers quote them (any currency; output usually costs more)."""

    input_per_million: float
    output_per_million: float = 0.0

    def __post_init__(self) -> None:
        if self.input_per_million < 0 or self.output_per_million < 0:
            raise ValidationError(f"prices must be >= 0 per million tokens; got input {self.input_per_million}, "
                                  f"output {self.output_per_million}.")

    def cost(self, input_tokens: int, output_tokens: int = 0) -> float:
        return (input_tokens * self.input_per_million + output_tokens * self.output_per_million) / 1e6
