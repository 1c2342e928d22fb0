"""The summarize strategy: older exchanges compressed into a running summary written by the model itself.

Dropping old turns (truncate, window) forgets what they said. Summarizing keeps the gist for far fewer
tokens: when the conversation no longer fits the budget, the exchanges before the last `keep_turns`
are given to the model with an instruction to summarize them (together with the summary so far), and
the prompt then carries the system prompt, the summary and the recent exchanges. Summaries are not
free: each one is a model call whose prompt and generated tokens are counted in `spent`.
"""

from __future__ import annotations

from lmforge.context.model_calls import Complete, TokenUsage, ask, local_completion
from lmforge.context.strategies import SelectedContext, exchanges, prompt_tokens
from lmforge.errors import InputError, ValidationError
from lmforge.generation.chat import ChatHistory, Message
from lmforge.generation.sampling_params import SamplingParams

INSTRUCTION = ("List every fact stated in the conversation below, one short line each. Keep every name, number, "
               "date and decision; leave out greetings and filler.")
SUMMARY_HEADER = "Summary of the earlier conversation:"


def transcript(messages: list[Message]) -> str:
    """Messages as plain "role: text" lines, the form the summarizer reads."""
    return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages)


class SummarizedContext:
    """Selects what to send, summarizing old exchanges when the conversation outgrows the budget.

    Keep one per conversation: it remembers the summary and how many messages it covers, so each
    exchange is summarized once. The summaries are written by `model`, or by `complete` when given
    (e.g. through a serving engine).
    """

    def __init__(self, model, tokenizer, reserve_output: int = 256, keep_turns: int = 2, summary_tokens: int = 96,
                 complete: Complete | None = None):
        if keep_turns < 1 or summary_tokens < 1 or reserve_output < 0:
            raise ValidationError(f"SummarizedContext needs keep_turns >= 1, summary_tokens >= 1 and "
                                  f"reserve_output >= 0; got {keep_turns}, {summary_tokens}, {reserve_output}.")
        self.tokenizer = tokenizer
        self.complete = complete or local_completion(model, tokenizer)
        self.reserve_output, self.keep_turns, self.summary_tokens = reserve_output, keep_turns, summary_tokens
        self.summary = ""
        self.covered = 0  # messages of the history the summary stands for
        self.spent = TokenUsage()

    def _with_summary(self, history: ChatHistory) -> ChatHistory:
        system = history.system or ""
        if self.summary:
            system = f"{system}\n\n{SUMMARY_HEADER} {self.summary}".strip()
        return ChatHistory(system or None, history.messages[self.covered:])

    def select(self, history: ChatHistory, context_window: int) -> SelectedContext:
        """The prompt to send for `history` with a `context_window`-token model."""
        budget = context_window - self.reserve_output
        if budget < 1:
            raise ValidationError(f"reserving {self.reserve_output} tokens for the answer leaves no room in a "
                                  f"{context_window}-token window; reserve fewer.")
        if len(history.messages) < self.covered:
            raise InputError("the history is shorter than what this summary covers; start a new SummarizedContext "
                             "for a new conversation.")
        sent = self._with_summary(history)
        tokens = prompt_tokens(self.tokenizer, sent)
        recent = exchanges(history.messages[self.covered:])
        if tokens > budget and len(recent) > self.keep_turns:
            older = [m for group in recent[:-self.keep_turns] for m in group]
            self._summarize(older)
            self.covered += len(older)
            sent = self._with_summary(history)
            tokens = prompt_tokens(self.tokenizer, sent)
        if tokens > budget:
            raise InputError(f"even with the summary, the last {self.keep_turns} exchange(s) take {tokens} tokens, "
                             f"more than the budget of {budget}; keep fewer turns or shorten the messages.")
        return SelectedContext(sent, tokens, self.covered)

    def _summarize(self, messages: list[Message]) -> None:
        earlier = f"{SUMMARY_HEADER} {self.summary}\n\n" if self.summary else ""
        self.summary = ask(self.complete, self.tokenizer, f"{INSTRUCTION}\n\n{earlier}{transcript(messages)}",
                           SamplingParams(temperature=0.0, max_tokens=self.summary_tokens), self.spent)
