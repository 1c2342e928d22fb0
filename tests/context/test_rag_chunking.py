"""RAG documents and chunking: a folder becomes documents through the converters (unsupported types skipped, or
refused with the supported list); chunks never exceed the token budget, overlap as asked, cut at paragraph and
sentence ends when they can, and keep their source and character span."""

import json
import random

import pytest

from lmforge.context.rag import (
    ChunkingSettings,
    Document,
    chunk_document,
    load_documents,
)
from lmforge.errors import InputError, ValidationError

WORDS = "the cat sat on a mat and then it ran to see the dog who was in the red house by the old tree".split()


@pytest.fixture(scope="module")
def tokenizer(minilm_encoder):
    return minilm_encoder.tokenizer


def count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_chunks_fit_the_budget_and_keep_their_span(tokenizer):
    text = ("Paragraph one has a sentence. It has another one, longer than the first, with numbers 3.14 and "
            "identifiers like lmforge.context.rag and naïve café.\n\n") * 12
    text += "数据科学很有趣。" * 40 + " supercalifragilisticexpialidocious" * 30 + " x" + "abcdefghij" * 30
    chunks = chunk_document(Document("notes/a.txt", text), tokenizer, ChunkingSettings(48, 8))
    assert len(chunks) > 10
    for chunk in chunks:
        assert chunk.source == "notes/a.txt" and chunk.text == text[chunk.start:chunk.end]
        assert chunk.tokens == count(tokenizer, chunk.text) <= 48
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for before, after in zip(chunks, chunks[1:]):  # every character is in a chunk
        assert before.start < after.start <= before.end
    # A "word" of 69 tokens must be cut inside, and a piece of a word may take more tokens than in the word.
    letters = random.Random(0)
    noise = "".join(letters.choice("bcdfghjklmnpqrstvwxz") for _ in range(99))
    for chunk in chunk_document(Document("noise", f"{noise} {noise}"), tokenizer, ChunkingSettings(16, 4)):
        assert chunk.tokens == count(tokenizer, chunk.text) <= 16


def test_overlap_is_as_asked_and_cuts_prefer_sentence_ends(tokenizer):
    words = " ".join(WORDS[i % len(WORDS)] for i in range(400))  # one token per word, no sentences
    chunks = chunk_document(Document("a", words), tokenizer, ChunkingSettings(40, 10))
    assert [c.tokens for c in chunks[:-1]] == [40] * (len(chunks) - 1)  # nothing better than a full chunk
    for before, after in zip(chunks, chunks[1:]):
        assert count(tokenizer, words[after.start:before.end]) == 10
    none = chunk_document(Document("a", words), tokenizer, ChunkingSettings(40, 0))
    assert all(after.start > before.end for before, after in zip(none, none[1:]))
    sentences = " ".join(f"Sentence number {i} is short." for i in range(60))
    for chunk in chunk_document(Document("b", sentences), tokenizer, ChunkingSettings(40, 0)):
        assert chunk.text.startswith("Sentence") and chunk.text.endswith(".") and chunk.tokens >= 20


def test_a_paragraph_break_wins_over_a_later_sentence_end(tokenizer):
    first = " ".join(["One sentence here."] * 6)  # about 24 tokens
    second = " ".join(["Another sentence follows."] * 8)
    chunks = chunk_document(Document("c", f"{first}\n\n{second}"), tokenizer, ChunkingSettings(40, 0))
    assert chunks[0].text == first


def test_short_and_empty_documents(tokenizer):
    assert chunk_document(Document("d", "  \n\n "), tokenizer, ChunkingSettings()) == []
    [chunk] = chunk_document(Document("d", "  Just one line. "), tokenizer, ChunkingSettings())
    assert (chunk.start, chunk.end, chunk.text, chunk.tokens) == (2, 16, "Just one line.", 4)
    with pytest.raises(ValidationError, match="less than half of chunk_tokens"):
        ChunkingSettings(64, 32)
    with pytest.raises(ValidationError, match="chunk_tokens must be >= 8"):
        ChunkingSettings(4, 0)


def test_a_folder_is_read_through_the_converters(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("# Title\n\nSome **bold** [link](http://x.org).\n")
    (tmp_path / "sub" / "b.json").write_text(json.dumps({"key": [1, 2]}, indent=4))
    (tmp_path / "sub" / "c.csv").write_text('name, age\n"Smith, John", 42\n')
    (tmp_path / "d.html").write_text("<html><head><script>x()</script></head><body><p>Hello</p></body></html>")
    (tmp_path / "slides.pptx").write_bytes(b"PK\x03\x04")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "e.txt").write_text("secret")
    corpus = load_documents(tmp_path)
    assert [(d.source, d.text) for d in corpus.documents] == [
        ("a.md", "# Title\n\nSome bold link.\n"), ("d.html", "Hello\n"),
        ("sub/b.json", '{"key":[1,2]}\n'), ("sub/c.csv", "name | age\nSmith, John | 42\n")]
    assert corpus.skipped == ["slides.pptx"]


def test_unsupported_missing_and_empty_inputs_are_clear(tmp_path):
    (tmp_path / "slides.pptx").write_bytes(b"PK")
    with pytest.raises(InputError, match=r"no converter for '.pptx' files; supported: .csv, .htm, .html, .json"):
        load_documents(tmp_path / "slides.pptx")
    with pytest.raises(InputError, match=r"no documents to index \(1 file\(s\) of other types\); supported types: "
                                         r".csv, .htm"):
        load_documents(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no documents to index \(no files\)"):
        load_documents(tmp_path / "empty")
    with pytest.raises(InputError, match="no such file or folder"):
        load_documents(tmp_path / "missing")
