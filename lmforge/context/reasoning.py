"""Reasoning budget: how many tokens a thinking model may spend between <think> and </think>.

Models with a thinking mode (Qwen3, SmolLM3, ...) write their reasoning inside think tags before the
answer, and their chat template has a switch (`enable_thinking`) that turns it off. Reasoning is paid
for like any output, so a simple question should not buy a long one: `reasoning="off"` flips the
template switch, and `reasoning=N` (tokens) keeps thinking on but lets `ReasoningBudget` close the
thought — it forces the closing tag once N thinking tokens have been generated, and the model answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from lmforge.errors import UnsupportedError, ValidationError
from lmforge.generation.processors import NEG_INF, LogitsProcessor, SequenceState

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

TEMPLATE_SWITCH = "enable_thinking"


@dataclass(frozen=True)
class ThinkingMode:
    """A tokenizer's thinking mode: the token ids that open and close a thought."""

    start_id: int
    end_id: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ThinkingMode:
        """The thinking mode of `tokenizer`, or UnsupportedError if its model has none."""
        start, end = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
        template = tokenizer.chat_template or ""
        if start is None or end is None or TEMPLATE_SWITCH not in template:
            raise UnsupportedError("this model has no thinking mode (its chat template has no `enable_thinking` "
                                   "switch or its vocabulary no <think> and </think> tokens), so there is no "
                                   "reasoning to switch off or budget; leave the reasoning option out.")
        return cls(start, end)


def reasoning_template_vars(tokenizer: Tokenizer, reasoning: str | int | None) -> dict[str, bool]:
    """The chat-template variables for `reasoning` ("off", a token budget, or None: the model's default)."""
    if reasoning is None:
        return {}
    check_reasoning(reasoning)
    ThinkingMode.of(tokenizer)
    return {TEMPLATE_SWITCH: reasoning != "off"}


def check_reasoning(reasoning: str | int) -> None:
    if reasoning != "off" and not (isinstance(reasoning, int) and not isinstance(reasoning, bool) and reasoning >= 0):
        raise ValidationError(f"reasoning must be 'off' or a budget of thinking tokens (an integer >= 0), "
                              f"got {reasoning!r}.")


class ReasoningBudget(LogitsProcessor):
    """Force </think> once a thought has used `budget` tokens (0: close it as soon as it opens)."""

    name = "reasoning_budget"

    def __init__(self, budget: int, mode: ThinkingMode):
        self.budget, self.mode = budget, mode

    def on_reset(self, state: SequenceState) -> None:
        prompt = state.prompt_token_ids
        opened = max((i for i, t in enumerate(prompt) if t == self.mode.start_id), default=-1)
        closed = max((i for i, t in enumerate(prompt) if t == self.mode.end_id), default=-1)
        # (thinking now?, thinking tokens spent): a template may open the thought in the prompt itself
        state.processor_state[self.name] = [opened > closed, 0]

    def on_accept(self, state: SequenceState, token_id: int) -> None:
        thought = state.processor_state[self.name]
        if token_id == self.mode.start_id:
            thought[0] = True
        elif token_id == self.mode.end_id:
            thought[0] = False
        elif thought[0]:
            thought[1] += 1

    def __call__(self, logits: Tensor, state: SequenceState) -> Tensor:
        thinking, spent = state.processor_state[self.name]
        if thinking and spent >= self.budget:
            end = logits[self.mode.end_id].clone()
            logits.fill_(NEG_INF)
            logits[self.mode.end_id] = end if end.isfinite() else 0.0
        return logits
