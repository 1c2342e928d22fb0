"""Training data: read documents, split them reproducibly, tokenize them.

A *document* is the unit that is never cut in two by a split: a file, a line,
a paragraph, a JSONL record or a CSV row. Readers turn files (or an HF
`datasets` object) into documents; `train_validation_split` shuffles them with a
seed that gives the same split on every machine; `tokenize_documents` turns
them into token ids with attention masks and token type ids for the collators.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from tokenizers import Tokenizer as BackendTokenizer

from lmforge.errors import InputError
from lmforge.tokenizer import Tokenizer

UNITS = ("file", "line", "paragraph")


@dataclass(frozen=True)
class Document:
    """One training example before tokenization.

    `source` says where it came from ("notes/a.txt", "data.jsonl:17") so that an
    error about it can name it. `text_pair` holds the second text of a
    BERT-style sentence pair; `label` the class of a classification example.
    """

    text: str
    source: str
    text_pair: str | None = None
    label: Any = None


# ----- readers --------------------------------------------------------------------------


def _read_file(path: Path, encoding: str) -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: byte {exc.start} is not valid {encoding} ({exc.reason}); re-encode the file "
                         f"as {encoding}, pass the right encoding=..., or exclude it with the glob pattern.") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc}); check that it exists and is "
                         "readable.") from exc


def _require_documents(documents: list[Document], where: str, hint: str) -> list[Document]:
    if not documents:
        raise InputError(f"{where}: no documents found; {hint}")
    return documents


def read_text(path: str | Path, pattern: str = "*.txt", unit: str = "file",
              encoding: str = "utf-8") -> list[Document]:
    """Read a text file, or every file under a folder (recursively) whose name matches `pattern`.

    `unit` decides what one document is: a whole file ("file", e.g. source
    code, where a function must not be split from its module), a line ("line",
    e.g. one sentence per line) or a paragraph separated by blank lines
    ("paragraph", e.g. prose). Files are read in sorted path order so that the
    documents, and therefore a seeded split, are the same on every machine.
    Whitespace-only documents are skipped.
    """
    if unit not in UNITS:
        raise InputError(f"unit must be one of {', '.join(UNITS)}; got {unit!r}.")
    path = Path(path)
    if path.is_dir():
        files = sorted(file for file in path.rglob(pattern) if file.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"{path}: no such file or folder; pass a text file or a folder of text files.")
    documents = []
    for file in files:
        text = _read_file(file, encoding)
        if unit == "file":
            pieces = [(text, str(file))]
        elif unit == "line":
            pieces = [(line, f"{file}:{number}") for number, line in enumerate(text.split("\n"), start=1)]
        else:
            pieces = [(part.strip("\n"), f"{file}#{number}")
                      for number, part in enumerate(re.split(r"\n\s*\n", text), start=1)]
        documents.extend(Document(piece, source) for piece, source in pieces if piece.strip())
    hint = (f"no file matches pattern {pattern!r} (searched recursively)." if not files else
            "the matching files are empty or whitespace only.")
    return _require_documents(documents, str(path), hint)


def _document(record: Mapping[str, Any], source: str, text_column: str, pair_column: str | None,
              label_column: str | None) -> Document:
    """Pick the selected columns of one record (a JSON object, a CSV row, a dataset row)."""
    for column in (text_column, pair_column, label_column):
        if column is not None and column not in record:
            raise InputError(f"{source}: no column {column!r}; the columns are: {', '.join(map(str, record))}. "
                             "Pass the right text_column / pair_column / label_column.")
    texts = [record[text_column], None if pair_column is None else record[pair_column]]
    for column, value in zip((text_column, pair_column), texts):
        if column is not None and not isinstance(value, str):
            raise InputError(f"{source}: column {column!r} holds {type(value).__name__} {value!r}, not text.")
    label = None if label_column is None else record[label_column]
    return Document(texts[0], source, texts[1], label)


def read_jsonl(path: str | Path, text_column: str = "text", pair_column: str | None = None,
               label_column: str | None = None, encoding: str = "utf-8") -> list[Document]:
    """Read JSON Lines: one JSON object per line, one document per object (blank lines are skipped).

    `text_column` names the field holding the text; `pair_column` an optional
    second text (sentence pairs); `label_column` an optional class label.
    """
    path = Path(path)
    documents = []
    # Split on "\n" only: JSON strings may hold other line separators such as U+2028 unescaped.
    for number, line in enumerate(_read_file(path, encoding).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be one JSON "
                             "object.") from exc
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}.")
        documents.append(_document(record, f"{path}:{number}", text_column, pair_column, label_column))
    return _require_documents(documents, str(path), "the file has no JSON records; write one object per line.")


def read_csv(path: str | Path, text_column: str = "text", pair_column: str | None = None,
             label_column: str | None = None, delimiter: str = ",", encoding: str = "utf-8") -> list[Document]:
    """Read a CSV file with a header row: one document per row, columns selected by header name."""
    path = Path(path)
    rows = csv.DictReader(io.StringIO(_read_file(path, encoding), newline=""), delimiter=delimiter)
    header = rows.fieldnames or []
    for column in (text_column, pair_column, label_column):
        if column is not None and column not in header:
            raise InputError(f"{path}: no column {column!r}; the columns are: {', '.join(header) or '(none)'}. "
                             "Pass the right text_column / pair_column / label_column.")
    # Line numbers count the header as line 1, as an editor shows them.
    documents = [_document(row, f"{path}:{rows.line_num}", text_column, pair_column, label_column)
                 for row in rows]
    return _require_documents(documents, str(path), "it has a header but no rows.")


def from_hf_dataset(dataset: Any, text_column: str = "text", pair_column: str | None = None,
                    label_column: str | None = None) -> list[Document]:
    """Documents from a Hugging Face `datasets.Dataset` (or anything with `column_names` that yields dict rows).

    `datasets` is not a dependency of lmforge: the object is only iterated.
    A `DatasetDict` (several splits) must be narrowed to one split first.
    """
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, Mapping):
        raise InputError(f"this dataset has several splits ({', '.join(columns)}); pick one, "
                         "e.g. dataset['train'].")
    if columns is None:
        raise InputError(f"{type(dataset).__name__} is not a datasets.Dataset (it has no column_names); pass "
                         "one, or a list of Document.")
    for column in (text_column, pair_column, label_column):
        if column is not None and column not in columns:
            raise InputError(f"dataset has no column {column!r}; the columns are: {', '.join(columns)}. "
                             "Pass the right text_column / pair_column / label_column.")
    documents = [_document(row, f"dataset[{index}]", text_column, pair_column, label_column)
                 for index, row in enumerate(dataset)]
    return _require_documents(documents, "dataset", "it has no rows.")


def load_documents(source: Any, **options: Any) -> list[Document]:
    """Pick the reader from the source: .jsonl → `read_jsonl`, .csv → `read_csv`, a dataset object →
    `from_hf_dataset`, any other file or folder → `read_text`. `options` go to that reader."""
    if hasattr(source, "column_names"):
        return from_hf_dataset(source, **options)
    suffix = Path(source).suffix.lower()
    if Path(source).is_file() and suffix in (".jsonl", ".csv"):
        return (read_jsonl if suffix == ".jsonl" else read_csv)(source, **options)
    return read_text(source, **options)


# ----- shuffling and splitting -----------------------------------------------------------


class Split(NamedTuple):
    train: list[Document]
    validation: list[Document]


def shuffled(items: Sequence[Any], seed: int) -> list[Any]:
    """A copy of `items` in a random order that depends only on `seed`.

    A Fisher–Yates shuffle (swap each position with a uniformly chosen earlier
    or equal one) driven by `random.Random(seed).random()`, whose sequence
    Python guarantees across versions and platforms; so the same seed yields
    the same order on every machine, and therefore the same split.
    """
    order = list(items)
    rng = random.Random(seed)
    for i in range(len(order) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def train_validation_split(documents: Sequence[Document], validation: float = 0.1, seed: int = 0,
                           shuffle: bool = True) -> Split:
    """Split whole documents into a training set and a held-out validation set.

    `validation` is a fraction (0 < f < 1, rounded to at least one document) or
    a count. Splitting documents, not token blocks, keeps every document on one
    side, so validation loss measures text the model never trained on.
    Shuffling first (seeded) avoids a validation set made of, say, only the
    last folder read.
    """
    documents = list(documents)
    if isinstance(validation, bool) or not isinstance(validation, (int, float)):
        raise InputError(f"validation must be a fraction or a count of documents, got {validation!r}.")
    if isinstance(validation, float):
        if not 0 < validation < 1:
            raise InputError(f"validation fraction must be between 0 and 1 (exclusive), got {validation}.")
        count = max(1, round(len(documents) * validation))
    else:
        count = validation
    if not 0 < count < len(documents):
        raise InputError(f"cannot hold out {count} of {len(documents)} documents for validation: both sides "
                         "need at least one; use a smaller validation size or more documents.")
    order = shuffled(documents, seed) if shuffle else documents
    return Split(order[count:], order[:count])


# ----- tokenization ---------------------------------------------------------------------


def tokenize_documents(documents: Iterable[Document], tokenizer: Tokenizer, max_length: int | None = None,
                       truncation: bool = False, add_special_tokens: bool = True,
                       label_to_id: Mapping[Any, int] | None = None) -> list[dict[str, Any]]:
    """Token ids for each document, as dicts of lists that the collators batch.

    Each example holds `input_ids`, `attention_mask` (all ones: padding comes
    later, per batch) and `token_type_ids` (0 for the first text, 1 for the
    second of a pair: how BERT tells the two sentences apart). A document with
    a label also gets `labels` (an integer; string labels go through
    `label_to_id`). A document longer than `max_length` is an error unless
    `truncation=True`: silently dropping the end of a text is a choice the
    caller should make. Truncation shortens the text, never the special tokens,
    and takes tokens from the longer text of a pair first.
    """
    if max_length is not None and max_length < 1:
        raise InputError(f"max_length must be >= 1, got {max_length}.")
    truncating = None  # a copy of the backend with truncation on, made at the first long document
    examples = []
    for document in documents:
        encoding = tokenizer.backend.encode(document.text, document.text_pair, add_special_tokens=add_special_tokens)
        if max_length is not None and len(encoding.ids) > max_length:
            if not truncation:
                raise InputError(f"{document.source}: {len(encoding.ids)} tokens, longer than max_length="
                                 f"{max_length}; pass truncation=True to cut it, or raise max_length.")
            if truncating is None:
                truncating = BackendTokenizer.from_str(tokenizer.backend.to_str())
                truncating.enable_truncation(max_length, strategy="longest_first")
            encoding = truncating.encode(document.text, document.text_pair, add_special_tokens=add_special_tokens)
            if len(encoding.ids) > max_length:  # the special tokens alone do not fit
                raise InputError(f"{document.source}: max_length={max_length} cannot hold even the special "
                                 "tokens; raise max_length.")
        example = {"input_ids": list(encoding.ids), "attention_mask": [1] * len(encoding.ids),
                   "token_type_ids": list(encoding.type_ids)}
        if document.label is not None:
            example["labels"] = _label_id(document, label_to_id)
        examples.append(example)
    return examples


def label_vocabulary(documents: Iterable[Document]) -> dict[Any, int]:
    """Class ids for the labels of `documents` (the `label_to_id` of `tokenize_documents`): the distinct
    labels in sorted order get 0, 1, …; numerically when all are integers (CSV's "10" after "9")."""
    labels = set()
    for document in documents:
        if document.label is None:
            raise InputError(f"{document.source}: no label; every document of a classification dataset needs one "
                             "(pass label_column=...).")
        if not isinstance(document.label, (str, int)):
            raise InputError(f"{document.source}: label {document.label!r} is a {type(document.label).__name__}; a "
                             "class label must be a string or an integer.")
        labels.add(document.label)
    numeric = all(isinstance(label, int) or (isinstance(label, str) and label.strip().lstrip("-").isdigit())
                  for label in labels)
    ordered = sorted(labels, key=(lambda label: (int(label), str(label))) if numeric else str)
    return {label: index for index, label in enumerate(ordered)}


def _label_id(document: Document, label_to_id: Mapping[Any, int] | None) -> int:
    label = document.label
    if label_to_id is not None:
        if label not in label_to_id:
            raise InputError(f"{document.source}: label {label!r} is not in label_to_id "
                             f"({', '.join(map(repr, label_to_id))}).")
        return label_to_id[label]
    if isinstance(label, int) and not isinstance(label, bool):
        return label
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label)
    raise InputError(f"{document.source}: label {label!r} is not an integer; pass label_to_id, e.g. "
                     "{'negative': 0, 'positive': 1}.")


def iter_texts(documents: Iterable[Document]) -> Iterator[str]:
    """The texts of documents (both texts of a pair), e.g. to train a tokenizer on them."""
    for document in documents:
        yield document.text
        if document.text_pair is not None:
            yield document.text_pair
