"""Task accuracy by exact match: what a model answers to held-out questions, and how often it is right.

This is the prompting baseline every fine-tuning result should be read against: the same questions,
answered greedily by the untouched model, either alone (zero-shot) or after a few solved examples
shown as earlier chat turns (few-shot). The solved examples are a `ChatHistory`, so they can be saved
as JSON, edited, reloaded in `lmforge chat` (/load), or come from a conversation saved there (/save).

Rows are SFT rows (`lmforge.align.sft`): {"instruction", "response", optional "input"} or chat
{"messages": [..., last message from the assistant]}. The question is everything before the last
assistant message; the expected answer is that message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.errors import InputError
from lmforge.generation.chat import ChatHistory, Message

BATCH = 16  # questions generated together


@dataclass
class ExactMatchResult:
    """Every answer, expected answer and verdict in row order, and the share of exact answers."""

    answers: list[str]
    expected: list[str]
    correct: list[bool]

    @property
    def exact_match(self) -> float:
        return sum(self.correct) / len(self.correct)


def question_and_answer(row: dict[str, Any], number: int) -> tuple[list[Message], str]:
    """A chat row split into the messages that ask (before the last assistant turn) and that turn's text."""
    from lmforge.align.sft import conversation

    messages = conversation(row, number)
    if isinstance(messages, tuple):
        raise InputError(f"row {number}: prompt/completion rows are plain text, not chat turns; exact-match "
                         "evaluation needs instruction/response or messages rows.")
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return [dict(m) for m in messages[:last]], messages[last]["content"]


def few_shot_history(rows: Sequence[dict[str, Any]], system: str | None = None) -> ChatHistory:
    """Solved examples as earlier turns: each row's question (user) and answer (assistant), in order."""
    history = ChatHistory(system=system)
    for number, row in enumerate(rows, 1):
        question, answer = question_and_answer(row, number)
        history.messages.extend([*question, {"role": "assistant", "content": answer}])
    return history


def evaluate_exact_match(model, tokenizer, rows: Sequence[dict[str, Any]], history: ChatHistory | None = None,
                         max_new_tokens: int = 32, normalize: Callable[[str], str] = str.strip,
                         progress: bool = False) -> ExactMatchResult:
    """Greedy answers to each row's question, asked after `history` (few-shot turns; None: zero-shot),
    scored by exact match with the row's answer after `normalize` (default: surrounding spaces removed)."""
    from tqdm.auto import tqdm

    from lmforge.generation import SamplingParams, generate

    if not rows:
        raise InputError("no rows to evaluate; give at least one instruction/response or messages row.")
    history = history or ChatHistory()
    prompts, expected = [], []
    for number, row in enumerate(rows, 1):
        question, answer = question_and_answer(row, number)
        asked = ChatHistory(history.system, [*history.messages, *question])
        prompts.append(asked.to_prompt(tokenizer))
        expected.append(answer)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    answers: list[str] = []
    with tqdm(total=len(prompts), desc="Answering", unit="question", disable=not progress) as bar:
        for start in range(0, len(prompts), BATCH):
            batch = prompts[start:start + BATCH]
            answers.extend(output.outputs[0].text for output in generate(model, tokenizer, batch, params))
            bar.update(len(batch))
    return ExactMatchResult(answers, expected, [normalize(a) == normalize(e) for a, e in zip(answers, expected)])
