"""Retrieval: the chunks of an index closest in meaning to a question.

The question is embedded by the index's own embedding model (two models' vectors live in different
spaces and cannot be compared) and the index returns the k chunks whose vectors are nearest to it,
with their cosine similarity.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.context.rag.embeddings import SentenceEncoder
from lmforge.context.rag.index import ScoredChunk, VectorIndex
from lmforge.errors import ValidationError


class Retriever:
    """An index and the encoder that embeds its queries (by default, the model the index was built with)."""

    def __init__(self, index: VectorIndex, encoder: SentenceEncoder | None = None):
        self.encoder = SentenceEncoder.from_pretrained(index.embedding_model) if encoder is None else encoder
        index.check_encoder(self.encoder)
        self.index = index

    @classmethod
    def load(cls, folder: str | Path, embedding_model: str | Path | None = None,
             approximate: bool = False) -> Retriever:
        """The index in `folder`, with its own embedding model unless another is named (and then refused);
        `approximate` searches an HNSW graph of it instead of every vector (needs faiss-cpu)."""
        index = VectorIndex.load(folder)
        if approximate:
            index.use_approximate_search()
        encoder = None if embedding_model is None else SentenceEncoder.from_pretrained(embedding_model)
        return cls(index, encoder)

    def retrieve(self, query: str, k: int = 5) -> list[ScoredChunk]:
        """The `k` chunks most similar to `query`, best first."""
        if not query.strip():
            raise ValidationError("the query is empty; ask a question to retrieve passages for.")
        return self.index.search(self.encoder.encode([query])[0], k)
