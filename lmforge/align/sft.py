"""Supervised fine-tuning (SFT): teach a model to answer by training on example answers.

Each example is a conversation (or a prompt and its completion). The model sees the
whole text, rendered with its chat template exactly as it will be at inference, but
the loss counts only the answer tokens: labels are -100 over the prompt, so the model
learns to produce responses, not to imitate users. The answer includes the template's
end-of-turn token, so the model also learns to stop.

Rows come in three shapes (JSON array or JSONL):
- `{"instruction": ..., "input": ... (optional), "response": ...}` (Alpaca style),
- `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}` (chat; every
  assistant turn is trained),
- `{"prompt": ..., "completion": ...}` (plain text, no template; EOS ends the completion).

The text is tokenized piece by piece (prompt, then answer), which is how generation
sees it: the prompt is encoded, then the answer's tokens are appended one by one.

Packing lays several short examples end to end in rows of `max_length` tokens instead of
padding each batch to its longest example, so no compute goes to padding. The attention mask
then numbers the examples (1, 1, 1, 2, 2, ...): attention stays inside each example and
positions restart at 0 for each, so a packed example computes exactly what it computes alone,
and the first token of each example is not a target (nothing may be predicted across a
boundary).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import InputError, ValidationError
from lmforge.tokenizer import Tokenizer
from lmforge.train.collate import IGNORE_INDEX, PaddingCollator
from lmforge.train.trainer import Trainer, TrainerCallback, TrainingArguments

OVERLONG = ("error", "truncate", "skip")
PACKED_LENGTH = 1024  # tokens per packed row when SFTConfig.max_length is not set (or the context, if shorter)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON array file or a JSONL file (one object per line); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a .json or .jsonl file of SFT examples.")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise InputError(f"{path} is empty; it needs at least one example.")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc}).") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{number}: not a JSON object ({exc.msg}).") from None
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise InputError(f"{path}: row {number} is {type(row).__name__}, not an object with the example's fields.")
    return rows


def _text(row: dict, key: str, number: int) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise InputError(f"row {number}: {key!r} is {'missing' if value is None else type(value).__name__}; "
                         f"it must be a string.")
    return value


def conversation(row: dict[str, Any], number: int) -> list[dict[str, str]] | tuple[str, str]:
    """A row as chat messages, or as (prompt, completion) for plain-text rows."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise InputError(f"row {number}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
                raise InputError(f"row {number}: every message needs a 'role' and a string 'content'; got {message!r}.")
        if not any(message["role"] == "assistant" for message in messages):
            raise InputError(f"row {number}: no 'assistant' message, so there is nothing to learn from it.")
        return messages
    if "instruction" in row or "response" in row:
        instruction, response = _text(row, "instruction", number), _text(row, "response", number)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise InputError(f"row {number}: 'input' must be a string, got {type(extra).__name__}.")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    if "prompt" in row or "completion" in row:
        return _text(row, "prompt", number), _text(row, "completion", number)
    raise InputError(f"row {number}: has fields {sorted(row)}; an SFT row needs 'messages', 'instruction' + "
                     "'response', or 'prompt' + 'completion'.")


def _chat_pieces(messages: list[dict], tokenizer: Tokenizer) -> list[tuple[list[int], bool]]:
    """(token ids, trained?) pieces: everything before each assistant turn untrained, the turn trained."""
    pieces, done = [], ""
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:turn], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:turn + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and through.startswith(prompt)):
            raise ValidationError("the chat template does not render a conversation as a prefix of its longer "
                                  "versions, so answer tokens cannot be told from prompt tokens; use prompt/completion "
                                  "rows instead.")
        pieces.append((tokenizer.encode(prompt[len(done):], add_special_tokens=False), False))
        pieces.append((tokenizer.encode(through[len(prompt):], add_special_tokens=False), True))
        done = through
    return pieces


def _plain_pieces(prompt: str, completion: str, tokenizer: Tokenizer) -> list[tuple[list[int], bool]]:
    if tokenizer.eos_token_id is None:
        raise ValidationError("prompt/completion rows end with EOS, but this tokenizer has none; use chat rows.")
    return [(tokenizer.encode(prompt), False),
            (tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id], True)]


def tokenize_row(row: dict[str, Any], number: int, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row: labels are the ids over the answers and -100 elsewhere."""
    shaped = conversation(row, number)
    pieces = _plain_pieces(*shaped, tokenizer) if isinstance(shaped, tuple) else _chat_pieces(shaped, tokenizer)
    ids = [token for piece, _ in pieces for token in piece]
    labels = [token if trained else IGNORE_INDEX for piece, trained in pieces for token in piece]
    return ids, labels


def fit_length(ids: list[int], labels: list[int], max_length: int | None, overlong: str,
               number: int) -> tuple[list[int], list[int]] | None:
    """The example within `max_length`: unchanged, cut ("truncate"), None when dropped ("skip", or a cut
    that leaves no answer token), or an error ("error")."""
    if max_length is None or len(ids) <= max_length:
        return ids, labels
    if overlong == "error":
        raise InputError(f"row {number}: {len(ids)} tokens, longer than max_length={max_length}; raise "
                         "max_length, or set overlong='truncate' or 'skip'.")
    if overlong == "skip" or all(label == IGNORE_INDEX for label in labels[:max_length]):
        return None
    return ids[:max_length], labels[:max_length]


@dataclass
class SFTReport:
    """What tokenization did to the rows: kept, cut at max_length, dropped for length."""

    kept: int = 0
    truncated: int = 0
    skipped: int = 0


def tokenize_rows(rows: Sequence[dict[str, Any]], tokenizer: Tokenizer, max_length: int | None = None,
                  overlong: str = "error") -> tuple[list[dict[str, list[int]]], SFTReport]:
    """`input_ids` + `labels` (-100 outside the answers) for every row.

    A row longer than `max_length` is an error (`overlong="error"`), cut at max_length
    ("truncate"; a row whose answers fall entirely beyond the cut is skipped) or dropped ("skip").
    """
    if overlong not in OVERLONG:
        raise ValidationError(f"overlong must be one of {', '.join(OVERLONG)}; got {overlong!r}.")
    examples, report = [], SFTReport()
    for number, row in enumerate(rows, 1):
        ids, labels = tokenize_row(row, number, tokenizer)
        fitted = fit_length(ids, labels, max_length, overlong, number)
        if fitted is None:
            report.skipped += 1
            continue
        report.truncated += len(fitted[0]) < len(ids)
        examples.append({"input_ids": fitted[0], "labels": fitted[1]})
        report.kept += 1
    if not examples:
        raise InputError(f"all {len(rows)} rows were skipped as longer than max_length={max_length}; raise it.")
    return examples, report


def pack_examples(examples: Sequence[dict[str, list[int]]], length: int) -> list[dict[str, list[int]]]:
    """Lay examples end to end, in order, in rows of at most `length` tokens; `attention_mask` numbers
    each row's examples 1, 2, ... and the first label of every example is -100."""
    rows: list[dict[str, list[int]]] = []
    for example in examples:
        ids, labels = example["input_ids"], [IGNORE_INDEX, *example["labels"][1:]]
        if len(ids) > length:
            raise InputError(f"an example of {len(ids)} tokens does not fit a packed row of {length}; raise "
                             "max_length or set overlong='truncate' or 'skip'.")
        if not rows or len(rows[-1]["input_ids"]) + len(ids) > length:
            rows.append({"input_ids": [], "labels": [], "attention_mask": []})
        row = rows[-1]
        number = (row["attention_mask"][-1] + 1) if row["attention_mask"] else 1
        row["input_ids"] += ids
        row["labels"] += labels
        row["attention_mask"] += [number] * len(ids)
    return rows


@dataclass
class SFTConfig(TrainingArguments):
    """TrainingArguments plus how examples become sequences: `max_length` (None: the model's
    context; with packing, 1024 or the context if shorter), `overlong` ("error", "truncate" or "skip"), and `packing`
    (training examples laid end to end in rows of max_length tokens, attention kept inside each)."""

    max_length: int | None = None
    overlong: str = "error"
    packing: bool = False
    learning_rate: float = 2e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.overlong not in OVERLONG:
            raise ValidationError(f"SFTConfig.overlong must be one of {', '.join(OVERLONG)}; got {self.overlong!r}.")


class SFTTrainer(Trainer):
    """The Trainer on SFT rows: tokenizes them with the chat template and answer-only labels;
    `report` says how many rows were kept, truncated or skipped."""

    def __init__(self, model: torch.nn.Module, args: SFTConfig, train_dataset: Sequence[dict[str, Any]],
                 tokenizer: Tokenizer, eval_dataset: Sequence[dict[str, Any]] | None = None,
                 callbacks: Sequence[TrainerCallback] = ()):
        context = model.config.context_length
        max_length = args.max_length or (min(PACKED_LENGTH, context) if args.packing else context)
        train, self.report = tokenize_rows(train_dataset, tokenizer, max_length, args.overlong)
        if args.packing:
            train = pack_examples(train, max_length)
        evaluation = tokenize_rows(eval_dataset, tokenizer, max_length, args.overlong)[0] if eval_dataset else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        super().__init__(model, args, train, PaddingCollator(pad_token_id=pad or 0), eval_dataset=evaluation,
                         task="causal-lm", callbacks=callbacks)
