"""Training data: readers, seeded splits and tokenization with masks, type ids and truncation."""

import json
import os
from pathlib import Path

import pytest

from lmforge import AutoTokenizer
from lmforge.errors import InputError
from lmforge.train.data import (
    Document,
    from_hf_dataset,
    label_vocabulary,
    load_documents,
    read_csv,
    read_jsonl,
    read_text,
    shuffled,
    tokenize_documents,
    train_validation_split,
)

JSON_PACKAGE = Path(json.__file__).parent  # a few real source files that exist wherever Python does


@pytest.fixture(scope="module")
def minilm():
    """A real BERT WordPiece tokenizer: [CLS] a [SEP] b [SEP] with token type ids 0 then 1."""
    return AutoTokenizer.from_pretrained("all-minilm-l6-v2")


# ----- readers --------------------------------------------------------------------------


def test_read_text_folder_with_glob_reads_each_file_once():
    documents = read_text(JSON_PACKAGE, pattern="*.py")
    files = sorted(JSON_PACKAGE.rglob("*.py"))
    assert [doc.source for doc in documents] == [str(f) for f in files if f.read_text().strip()]
    assert len(documents) >= 4
    assert documents[0].text == Path(documents[0].source).read_text()
    assert not any(doc.source.endswith(".pyc") for doc in documents)


def test_read_text_recurses_and_filters_by_pattern(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "deeper" / "b.txt").write_text("second")
    (tmp_path / "sub" / "c.md").write_text("not matched")
    (tmp_path / "blank.txt").write_text("  \n\n")
    assert [doc.text for doc in read_text(tmp_path)] == ["first", "second"]
    assert [doc.text for doc in read_text(tmp_path, pattern="*.md")] == ["not matched"]


def test_read_text_by_line_and_by_paragraph(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("one\ntwo\n\n\nthree\n  \nfour\nfive\n")
    lines = read_text(file, unit="line")
    assert [doc.text for doc in lines] == ["one", "two", "three", "four", "five"]
    assert lines[2].source == f"{file}:5"
    paragraphs = read_text(file, unit="paragraph")
    assert [doc.text for doc in paragraphs] == ["one\ntwo", "three", "four\nfive"]
    with pytest.raises(InputError, match="unit must be one of"):
        read_text(file, unit="sentence")


def test_empty_or_missing_text_sources_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match=r"no documents found; no file matches pattern '\*.txt'"):
        read_text(tmp_path)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(InputError, match="empty or whitespace only"):
        read_text(tmp_path)
    with pytest.raises(InputError, match="no such file or folder"):
        read_text(tmp_path / "missing")


def test_undecodable_bytes_name_the_file(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(InputError, match=f"{bad}: byte 3 is not valid utf-8"):
        read_text(tmp_path)
    assert read_text(bad, encoding="latin-1")[0].text == "café latin-1"


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path / 'missing.jsonl'}: cannot be read"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match=f"{tmp_path}: cannot be read"):
        read_csv(tmp_path)  # a folder
    if os.geteuid() != 0:  # root reads files whatever their permissions
        file = tmp_path / "secret.txt"
        file.write_text("x")
        file.chmod(0)
        with pytest.raises(InputError, match="secret.txt: cannot be read"):
            read_text(file)


def test_read_jsonl_selects_columns(tmp_path):
    file = tmp_path / "data.jsonl"
    records = [{"question": "Why?", "passage": "Because.", "label": 1, "id": 7},
               {"question": "Who\u2028?", "passage": "Them.", "label": 0, "id": 8}]
    file.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1], ensure_ascii=False) + "\n")
    documents = read_jsonl(file, text_column="question", pair_column="passage", label_column="label")
    assert documents == [Document("Why?", f"{file}:1", "Because.", 1), Document("Who\u2028?", f"{file}:3", "Them.", 0)]
    with pytest.raises(InputError, match=r"data.jsonl:1: no column 'text'; the columns are: question, passage, "
                                         r"label, id"):
        read_jsonl(file)


def test_read_jsonl_errors(tmp_path):
    file = tmp_path / "broken.jsonl"
    file.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(InputError, match="broken.jsonl:2: not valid JSON"):
        read_jsonl(file)
    file.write_text('{"text": 3}\n')
    with pytest.raises(InputError, match="column 'text' holds int 3, not text"):
        read_jsonl(file)
    file.write_text("\n\n")
    with pytest.raises(InputError, match="no documents found"):
        read_jsonl(file)


def test_read_csv_selects_columns_and_names_existing_ones(tmp_path):
    file = tmp_path / "reviews.csv"
    file.write_text('review,stars\n"Great, really\ngreat",5\nBad,1\n')
    documents = read_csv(file, text_column="review", label_column="stars")
    assert [(doc.text, doc.label) for doc in documents] == [("Great, really\ngreat", "5"), ("Bad", "1")]
    assert documents[1].source == f"{file}:4"
    with pytest.raises(InputError, match=r"no column 'text'; the columns are: review, stars"):
        read_csv(file)
    file.write_text("review,stars\n")
    with pytest.raises(InputError, match="no documents found; it has a header but no rows"):
        read_csv(file, text_column="review")


class FakeDataset:
    """What lmforge uses of a datasets.Dataset: column_names and iteration over dict rows."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0]) if rows else ["text"]

    def __iter__(self):
        return iter(self.rows)


def test_hf_dataset_objects_are_duck_typed():
    documents = from_hf_dataset(FakeDataset([{"sentence": "a", "label": 2}, {"sentence": "b", "label": 0}]),
                                text_column="sentence", label_column="label")
    assert documents == [Document("a", "dataset[0]", None, 2), Document("b", "dataset[1]", None, 0)]
    with pytest.raises(InputError, match="no column 'text'; the columns are: sentence"):
        from_hf_dataset(FakeDataset([{"sentence": "a"}]))
    with pytest.raises(InputError, match="no documents found"):
        from_hf_dataset(FakeDataset([]))
    splits = FakeDataset([{"text": "a"}])
    splits.column_names = {"train": ["text"], "test": ["text"]}
    with pytest.raises(InputError, match=r"several splits \(train, test\); pick one"):
        from_hf_dataset(splits)


def test_load_documents_picks_the_reader(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "json"}\n')
    (tmp_path / "b.csv").write_text("body\ncsv\n")
    (tmp_path / "c.txt").write_text("text")
    assert load_documents(tmp_path / "a.jsonl", text_column="body")[0].text == "json"
    assert load_documents(tmp_path / "b.csv", text_column="body")[0].text == "csv"
    assert [doc.text for doc in load_documents(tmp_path)] == ["text"]
    assert load_documents(FakeDataset([{"text": "row"}]))[0].text == "row"


# ----- shuffling and splitting -----------------------------------------------------------


def test_shuffle_is_pinned_so_every_machine_agrees():
    # Fisher–Yates over random.Random(seed).random(), whose output Python guarantees across versions.
    assert shuffled(range(10), seed=0) == [9, 4, 0, 5, 2, 7, 1, 3, 6, 8]
    assert shuffled(range(10), seed=1) == [8, 0, 3, 4, 5, 2, 9, 6, 7, 1]
    assert sorted(shuffled(range(1000), seed=3)) == list(range(1000))


def test_split_is_deterministic_disjoint_and_complete():
    documents = [Document(f"doc {i}", f"doc{i}") for i in range(103)]
    train, validation = train_validation_split(documents, validation=0.1, seed=42)
    assert (len(train), len(validation)) == (93, 10)
    assert not {d.source for d in train} & {d.source for d in validation}
    assert sorted(d.source for d in train + validation) == sorted(d.source for d in documents)
    assert train_validation_split(documents, validation=0.1, seed=42) == (train, validation)
    assert train_validation_split(documents, validation=0.1, seed=43).validation != validation
    by_count = train_validation_split(documents, validation=25, seed=42)
    assert len(by_count.validation) == 25 and by_count.validation[:10] == validation  # a prefix of one order
    unshuffled = train_validation_split(documents, validation=3, shuffle=False)
    assert unshuffled.validation == documents[:3] and unshuffled.train == documents[3:]
    assert len(train_validation_split(documents[:5], validation=0.01).validation) == 1


@pytest.mark.parametrize("validation", [0, 5, 1.0, 0.0, -2, True, "10%"])
def test_split_rejects_sizes_that_leave_a_side_empty(validation):
    with pytest.raises(InputError):
        train_validation_split([Document(str(i), str(i)) for i in range(5)], validation=validation)


# ----- tokenization ---------------------------------------------------------------------


def test_tokenize_single_and_pair_with_masks_and_type_ids(minilm):
    single, pair = tokenize_documents([Document("hello world", "a"), Document("a question", "b", "the answer")],
                                      minilm)
    cls, sep = minilm.token_to_id("[CLS]"), minilm.token_to_id("[SEP]")
    assert single["input_ids"] == minilm.encode("hello world")
    assert single["attention_mask"] == [1] * len(single["input_ids"])
    assert single["token_type_ids"] == [0] * len(single["input_ids"])
    question, answer = minilm.encode("a question", False), minilm.encode("the answer", False)
    assert pair["input_ids"] == [cls, *question, sep, *answer, sep]
    assert pair["token_type_ids"] == [0] * (len(question) + 2) + [1] * (len(answer) + 1)
    assert "labels" not in single


def test_too_long_is_an_error_naming_the_document_unless_truncation(minilm):
    long = Document("word " * 40, "corpus.jsonl:12", "short pair")
    with pytest.raises(InputError, match=r"corpus.jsonl:12: 45 tokens, longer than max_length=16; "
                                         r"pass truncation=True"):
        tokenize_documents([long], minilm, max_length=16)
    (example,) = tokenize_documents([long], minilm, max_length=16, truncation=True)
    sep = minilm.token_to_id("[SEP]")
    pair = minilm.encode("short pair", False)
    assert len(example["input_ids"]) == 16 and len(example["token_type_ids"]) == 16
    # The special tokens survive and the longer text is the one shortened.
    assert example["input_ids"][0] == minilm.token_to_id("[CLS]") and example["input_ids"][-1] == sep
    assert example["input_ids"][-len(pair) - 1:-1] == pair
    (fits,) = tokenize_documents([Document("short", "x")], minilm, max_length=16, truncation=True)
    assert fits["input_ids"] == minilm.encode("short")
    (long_pair,) = tokenize_documents([Document("a question", "q", "passage " * 40)], minilm, max_length=16,
                                      truncation=True)
    assert long_pair["input_ids"][:4] == minilm.encode("a question")  # the short text is kept whole
    assert long_pair["token_type_ids"] == [0] * 4 + [1] * 12
    with pytest.raises(InputError, match="q: max_length=2 cannot hold even the special tokens"):
        tokenize_documents([Document("a question", "q", "an answer")], minilm, max_length=2, truncation=True)


def test_labels_become_integers(minilm):
    documents = [Document("good", "a", label="positive"), Document("bad", "b", label="negative")]
    examples = tokenize_documents(documents, minilm, label_to_id={"negative": 0, "positive": 1})
    assert [e["labels"] for e in examples] == [1, 0]
    assert tokenize_documents([Document("csv row", "c", label="3")], minilm)[0]["labels"] == 3
    with pytest.raises(InputError, match="label 'positive' is not an integer; pass label_to_id"):
        tokenize_documents(documents, minilm)


def test_label_vocabulary_numbers_the_classes_in_sorted_order():
    rows = [Document("t", f"data.csv:{i}", label=label) for i, label in enumerate(["10", "9", "2", "9"])]
    assert label_vocabulary(rows) == {"2": 0, "9": 1, "10": 2}  # numerically: CSV labels are text
    assert label_vocabulary([Document("t", "a", label="pos"), Document("t", "b", label="neg")]) == {"neg": 0, "pos": 1}
    with pytest.raises(InputError, match="data.jsonl:2: no label; every document of a classification dataset"):
        label_vocabulary([Document("t", "data.jsonl:1", label=1), Document("t", "data.jsonl:2")])
    with pytest.raises(InputError, match=r"data.jsonl:1: label \[1, 2\] is a list; a class label must be"):
        label_vocabulary([Document("t", "data.jsonl:1", label=[1, 2])])
