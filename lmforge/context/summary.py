"""The summarize strategy: older exchanges compressed into a running summary written by the model itself.

Dropping old turns (truncate, window) forgets what they said. Summarizing keeps the gist for far fewer
tokens: when the conversation no longer fits the budget, the exchanges before the last `keep_turns`
are given to the model with an instruction to summarize them (together with the summary so far), and
the prompt then carries the system prompt, the summary and the recent exchanges. Summaries are not
free: each one is a model call whose prompt and generated tokens are counted in `spent`.
"""

from __future__ import annotations

from lmforge.context.condensed import CondensedContext, transcript
from lmforge.context.model_calls import Complete, ask
from lmforge.errors import ValidationError
from lmforge.generation.chat import Message
from lmforge.generation.sampling_params import SamplingParams

INSTRUCTION = ("List every fact stated in the conversation below, one short line each. Keep every name, number, "
               "date and decision; leave out greetings and filler.")
SUMMARY_HEADER = "Summary of the earlier conversation:"


class SummarizedContext(CondensedContext):
    """Summarizes the exchanges before the last `keep_turns` once the conversation outgrows the budget
    (the summary so far included, so it stays one running summary of at most `summary_tokens`)."""

    what = "the summary"

    def __init__(self, model, tokenizer, reserve_output: int = 256, keep_turns: int = 2, summary_tokens: int = 96,
                 complete: Complete | None = None):
        if summary_tokens < 1:
            raise ValidationError(f"SummarizedContext needs summary_tokens >= 1, got {summary_tokens}.")
        super().__init__(model, tokenizer, reserve_output, keep_turns, complete)
        self.summary_tokens = summary_tokens
        self.summary = ""

    @property
    def memory(self) -> str:
        return self.summary

    @memory.setter
    def memory(self, value: str) -> None:
        self.summary = value

    def condensed_text(self) -> str:
        return f"{SUMMARY_HEADER} {self.summary}" if self.summary else ""

    def wants_to_condense(self, tokens: int, budget: int) -> bool:
        return tokens > budget  # while the conversation fits, nothing is lost: no summary

    def condense(self, messages: list[Message]) -> None:
        earlier = f"{SUMMARY_HEADER} {self.summary}\n\n" if self.summary else ""
        self.summary = ask(self.complete, self.tokenizer, f"{INSTRUCTION}\n\n{earlier}{transcript(messages)}",
                           SamplingParams(temperature=0.0, max_tokens=self.summary_tokens), self.spent)
