"""Retrieval-augmented prompts: passages found for the latest question go into the prompt as numbered sources.

Each turn the user's latest message is the query. The k best chunks go into that message, numbered
("[1] (notes/a.md) text ..."), followed by the question and an instruction to cite sources as [n];
earlier messages are sent as they were written (their passages answered earlier questions). The
conversation is then fitted into the generator's window by any context strategy, counting the
generator's tokens; when even that leaves no room, the lowest-scoring passages go first. The answer's
[n] markers say which sources it used.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.context.rag.index import ScoredChunk
from lmforge.context.rag.retrieval import Retriever
from lmforge.context.strategies import ContextPolicy, SelectedContext, select_context
from lmforge.errors import InputError, ValidationError
from lmforge.generation.chat import ChatHistory

INSTRUCTION = ("Answer the question using the numbered sources below. Cite the sources you use by their number in "
               "square brackets, like [1]. If the sources do not answer the question, say so.")
CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")  # [2] or [1, 3]


def with_sources(question: str, passages: list[ScoredChunk]) -> str:
    """The user message the model reads: the instruction, the numbered passages, then the question."""
    if not passages:
        return question
    sources = "\n\n".join(f"[{number}] ({p.chunk.source}) {p.chunk.text}" for number, p in enumerate(passages, 1))
    return f"{INSTRUCTION}\n\nSources:\n{sources}\n\nQuestion: {question}"


@dataclass(frozen=True)
class AugmentedContext(SelectedContext):
    """What is sent, and the passages in it: `passages[n - 1]` is source [n]."""

    passages: list[ScoredChunk]


class RetrievedContext:
    """Selects what to send: passages for the latest user message, then `select` (a context strategy bound to
    the generator's tokenizer and window) fits the conversation; passages are dropped, lowest score first,
    while it does not fit."""

    def __init__(self, retriever: Retriever, select: Callable[[ChatHistory], SelectedContext], top_k: int = 4):
        if top_k < 1:
            raise ValidationError(f"top_k (passages retrieved per message) must be >= 1, got {top_k}.")
        self.retriever, self.select_history, self.top_k = retriever, select, top_k

    def select(self, history: ChatHistory) -> AugmentedContext:
        """What to send for `history`, whose last message (the user's) is the query."""
        if not history.messages or history.messages[-1]["role"] != "user":
            raise InputError("retrieval needs a user message last in the conversation: it is the query.")
        question = history.messages[-1].get("content") or ""
        passages = self.retriever.retrieve(question, self.top_k)
        while True:
            latest = {"role": "user", "content": with_sources(question, passages)}
            try:
                selected = self.select_history(ChatHistory(history.system, [*history.messages[:-1], latest]))
            except ValidationError:
                raise
            except InputError:  # it does not fit: one passage fewer, unless there are none left
                if not passages:
                    raise
                passages = passages[:-1]
                continue
            return AugmentedContext(selected.history, selected.tokens, selected.dropped_messages, passages)


def cited_numbers(answer: str, sources: int) -> list[int]:
    """The source numbers (1..`sources`) an answer cites as [n] or [n, m], in order of first mention."""
    numbers = [int(n) for group in CITATION.findall(answer) for n in group.split(",")]
    return list(dict.fromkeys(n for n in numbers if 1 <= n <= sources))


@dataclass(frozen=True)
class CitedAnswer:
    """An answer, the passages its prompt carried (source [n] is `passages[n - 1]`) and the numbers it cites."""

    text: str
    passages: list[ScoredChunk]
    cited: list[int]

    @property
    def sources(self) -> list[ScoredChunk]:
        """The passages the answer cites; all that were sent when it cites none."""
        return [self.passages[n - 1] for n in self.cited] if self.cited else self.passages


def question_context(retriever: Retriever, tokenizer, context_window: int, question: str, top_k: int = 4,
                     reserve_output: int = 256, system: str | None = None) -> AugmentedContext:
    """The prompt for one question: its passages as numbered sources, within a `context_window`-token window
    minus `reserve_output` tokens for the answer."""
    policy = ContextPolicy("full", reserve_output=reserve_output)
    context = RetrievedContext(retriever, lambda h: select_context(h, tokenizer, context_window, policy), top_k)
    return context.select(ChatHistory(system, [{"role": "user", "content": question}]))


def answer_question(model, tokenizer, retriever: Retriever, question: str, top_k: int = 4,
                    max_tokens: int = 256, system: str | None = None) -> CitedAnswer:
    """A greedy answer to `question` from the passages retrieved for it, with the sources it cites."""
    from lmforge.generation import SamplingParams, generate

    selected = question_context(retriever, tokenizer, model.config.context_length, question, top_k, max_tokens,
                                system)
    prompt_ids = tokenizer.encode(selected.history.to_prompt(tokenizer), add_special_tokens=False)
    output = generate(model, tokenizer, [prompt_ids], SamplingParams(temperature=0.0, max_tokens=max_tokens))[0]
    text = output.outputs[0].text
    return CitedAnswer(text, selected.passages, cited_numbers(text, len(selected.passages)))
