"""Retrieval-augmented generation: answers grounded in your documents, with the sources they cite.

documents (files → text) → chunking (passages of at most N embedding tokens, overlapping) →
embeddings (one unit vector per passage) → index (vectors + metadata on disk, exact cosine search)
→ retrieval (the passages nearest a question) → augment (numbered sources in the prompt within the
generator's token budget; the answer's [n] markers name its sources).
"""

from lmforge.context.rag.augment import (
    AugmentedContext,
    CitedAnswer,
    RetrievedContext,
    answer_question,
    cited_numbers,
    question_context,
)
from lmforge.context.rag.chunking import (
    Chunk,
    ChunkingSettings,
    chunk_document,
    chunk_documents,
)
from lmforge.context.rag.documents import Corpus, Document, load_documents
from lmforge.context.rag.embeddings import DEFAULT_EMBEDDING_MODEL, SentenceEncoder
from lmforge.context.rag.index import (
    EmbeddingModelMismatch,
    IndexFileError,
    ScoredChunk,
    VectorIndex,
    build_index,
)
from lmforge.context.rag.retrieval import Retriever

__all__ = ["AugmentedContext", "Chunk", "ChunkingSettings", "CitedAnswer", "Corpus", "DEFAULT_EMBEDDING_MODEL",
           "Document", "EmbeddingModelMismatch", "IndexFileError", "RetrievedContext", "Retriever", "ScoredChunk",
           "SentenceEncoder", "VectorIndex", "answer_question", "build_index", "chunk_document", "chunk_documents",
           "cited_numbers", "load_documents", "question_context"]
