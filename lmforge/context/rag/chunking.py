"""Token-aware chunking: documents cut into overlapping passages that the embedding model reads whole.

An encoder reads a bounded number of tokens, and its one vector per text blurs as the text grows, so
each document is cut into chunks of at most `chunk_tokens` tokens of the *embedding model's* tokenizer
(the model that will read them, not the generator). A cut prefers a paragraph break, then a sentence
end or line break, then a space between words, and falls no earlier than half a chunk. Consecutive
chunks share `overlap_tokens` tokens (moved back to the start of a word), so a passage cut at one
chunk's end is read whole in the next.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.context.rag.documents import Document
from lmforge.errors import ValidationError
from lmforge.tokenizer import Tokenizer

# How good a place between two tokens is for a cut (higher is better).
INSIDE_WORD, BETWEEN_WORDS, SENTENCE_END, PARAGRAPH_BREAK = range(4)
LONGEST_WORD = 8  # tokens an overlap may move back to start at a word (text without spaces has no word starts)


@dataclass(frozen=True)
class ChunkingSettings:
    """The longest chunk and the overlap between neighbours, in tokens of the embedding model."""

    chunk_tokens: int = 128
    overlap_tokens: int = 24

    def __post_init__(self) -> None:
        if self.chunk_tokens < 8:
            raise ValidationError(f"chunk_tokens must be >= 8, got {self.chunk_tokens}.")
        if not 0 <= self.overlap_tokens < self.chunk_tokens // 2:
            raise ValidationError(f"overlap_tokens must be >= 0 and less than half of chunk_tokens "
                                  f"({self.chunk_tokens}), got {self.overlap_tokens}.")


@dataclass(frozen=True)
class Chunk:
    """A passage of a document: its text, where it is (`source`, characters [start, end)) and its tokens."""

    source: str
    start: int
    end: int
    text: str
    tokens: int


def cut_quality(text: str, left_end: int, right_start: int) -> int:
    """How good a cut is between a token ending at `left_end` and the next starting at `right_start`."""
    gap, before = text[left_end:right_start], text[left_end - 1]
    if gap.count("\n") >= 2:
        return PARAGRAPH_BREAK
    if "\n" in gap or (gap and before in ".!?") or before in "。！？":
        return SENTENCE_END
    return BETWEEN_WORDS if gap else INSIDE_WORD


def chunk_document(document: Document, tokenizer: Tokenizer, settings: ChunkingSettings) -> list[Chunk]:
    """`document` cut into chunks of at most `settings.chunk_tokens` tokens (see the module's docstring)."""
    text, limit, overlap = document.text, settings.chunk_tokens, settings.overlap_tokens
    offsets = tokenizer.backend.encode(text, add_special_tokens=False).offsets
    # quality[i]: cutting before token i (i >= 1)
    quality = [INSIDE_WORD] + [cut_quality(text, offsets[i - 1][1], offsets[i][0]) for i in range(1, len(offsets))]
    chunks: list[Chunk] = []
    start = 0
    while start < len(offsets):
        end = len(offsets)
        if end - start > limit:  # the best cut in [start + half a chunk, start + limit]; the latest of equals
            end = max(range(start + max(overlap + 1, limit // 2), start + limit + 1), key=lambda i: (quality[i], i))
        while True:  # count the text itself: the encoder reads the text, not this slice of ids
            span = offsets[start][0], offsets[end - 1][1]
            tokens = len(tokenizer.encode(text[span[0]:span[1]], add_special_tokens=False))
            if tokens <= limit:
                break
            end -= 1
        chunks.append(Chunk(document.source, span[0], span[1], text[span[0]:span[1]], tokens))
        if end == len(offsets):
            break
        start = _word_start(quality, max(end - overlap, start + 1), lowest=start + 1)
    return chunks


def _word_start(quality: list[int], index: int, lowest: int) -> int:
    """`index`, or the start of the word it is inside (at most `LONGEST_WORD` tokens back, not before `lowest`)."""
    for candidate in range(index, max(lowest, index - LONGEST_WORD) - 1, -1):
        if quality[candidate] != INSIDE_WORD:
            return candidate
    return index


def chunk_documents(documents: list[Document], tokenizer: Tokenizer, settings: ChunkingSettings) -> list[Chunk]:
    """The chunks of every document, in order."""
    return [chunk for document in documents for chunk in chunk_document(document, tokenizer, settings)]
