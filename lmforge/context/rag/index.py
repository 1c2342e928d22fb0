"""A vector index on disk: one unit vector per chunk, searched exactly by cosine similarity.

`build_index` cuts documents into chunks with the embedding model's tokenizer and embeds every chunk;
`search` scores all the vectors against the query's in one matrix-vector product (unit vectors, so the
dot product is the cosine) and keeps the k best. Exact search reads every vector, which takes
milliseconds up to about a hundred thousand chunks on a CPU; beyond that `use_approximate_search`
switches to an HNSW graph (lmforge.context.rag.approximate), which trades a little recall for speed.

An index is a folder: `vectors.safetensors` (the [chunks, dim] float32 matrix) and `index.json` (the
embedding model and its dimension, the chunking settings, every chunk's source, span, token count and
text, and the lmforge version). Both hold data only: nothing is unpickled on load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from lmforge.context.rag.chunking import Chunk, ChunkingSettings, chunk_documents
from lmforge.context.rag.documents import Document
from lmforge.context.rag.embeddings import SentenceEncoder
from lmforge.errors import InputError, LMForgeError, ValidationError

if TYPE_CHECKING:
    from lmforge.context.rag.approximate import HNSWSearch

FORMAT = "lmforge.rag-index/1"
VECTORS_FILE = "vectors.safetensors"
METADATA_FILE = "index.json"
REBUILD = "rebuild it with: lmforge rag index DOCUMENTS --out INDEX"


class IndexFileError(LMForgeError):
    """An index folder is missing, incomplete or corrupt."""


class EmbeddingModelMismatch(InputError):
    """Queries embedded with another model than the index's chunks: their vectors are not comparable."""


@dataclass(frozen=True)
class ScoredChunk:
    """A chunk found by a search, with its cosine similarity to the query (1 = same direction)."""

    chunk: Chunk
    score: float


@dataclass
class VectorIndex:
    """Chunks, their unit vectors (row i embeds chunks[i]) and how both were made."""

    vectors: np.ndarray
    chunks: list[Chunk]
    embedding_model: str
    chunking: ChunkingSettings
    approximate: HNSWSearch | None = field(default=None, repr=False)  # set by use_approximate_search

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def check_encoder(self, encoder: SentenceEncoder) -> None:
        """Refuse an encoder other than the one the index was built with."""
        if encoder.name != self.embedding_model or encoder.dim != self.dim:
            raise EmbeddingModelMismatch(
                f"this index was built with the embedding model {self.embedding_model!r} ({self.dim} dimensions), "
                f"but the query is embedded with {encoder.name!r} ({encoder.dim} dimensions): vectors of different "
                f"models cannot be compared. Embed queries with {self.embedding_model!r} (the CLI does unless "
                f"--embedding-model says otherwise), or rebuild the index with: lmforge rag index DOCUMENTS "
                f"--out INDEX --embedding-model {encoder.name}")

    def search(self, query_vector: np.ndarray, k: int) -> list[ScoredChunk]:
        """The `k` chunks most similar to `query_vector` (a unit vector [dim]), best first."""
        if k < 1:
            raise ValidationError(f"k (the number of chunks to retrieve) must be >= 1, got {k}.")
        if query_vector.shape != (self.dim,):
            raise InputError(f"the query vector has shape {tuple(query_vector.shape)}; this index needs ({self.dim},).")
        if self.approximate is not None:
            ids, scores = self.approximate.search(query_vector, k)
            return [ScoredChunk(self.chunks[i], float(score)) for i, score in zip(ids, scores)]
        scores = self.vectors @ query_vector.astype(np.float32)
        best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        best = best[np.lexsort((best, -scores[best]))]  # by score, ties by position
        return [ScoredChunk(self.chunks[i], float(scores[i])) for i in best]

    def use_approximate_search(self, **settings) -> None:
        """Search an HNSW graph of the vectors from now on (`HNSWSearch` settings), built here, in memory."""
        from lmforge.context.rag.approximate import HNSWSearch

        self.approximate = HNSWSearch(self.vectors, **settings)

    def save(self, folder: str | Path) -> None:
        """Write `vectors.safetensors` and `index.json` into `folder` (created if needed)."""
        from lmforge import __version__

        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            save_file({"vectors": np.ascontiguousarray(self.vectors, dtype=np.float32)}, str(folder / VECTORS_FILE))
            metadata = {"format": FORMAT, "lmforge_version": __version__,
                        "embedding_model": {"name": self.embedding_model, "dim": self.dim},
                        "chunking": asdict(self.chunking), "chunks": [asdict(chunk) for chunk in self.chunks]}
            (folder / METADATA_FILE).write_text(json.dumps(metadata, ensure_ascii=False, indent=1) + "\n",
                                                encoding="utf-8")
        except OSError as exc:
            raise IndexFileError(f"{folder}: cannot write the index ({exc.strerror}); choose a writable folder.") \
                from exc

    @classmethod
    def load(cls, folder: str | Path) -> VectorIndex:
        """Read an index written by `save`, checking that its two files agree."""
        folder = Path(folder)
        if not (folder / METADATA_FILE).is_file() or not (folder / VECTORS_FILE).is_file():
            what = "no such folder" if not folder.exists() else f"not an index (it needs {METADATA_FILE} and " \
                                                                 f"{VECTORS_FILE})"
            raise IndexFileError(f"{folder}: {what}; build one with: lmforge rag index DOCUMENTS --out {folder}")
        try:
            metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
            if metadata.get("format") != FORMAT:
                raise IndexFileError(f"{folder / METADATA_FILE}: format {metadata.get('format')!r} is not "
                                     f"{FORMAT!r}; {REBUILD}")
            vectors = load_file(str(folder / VECTORS_FILE))["vectors"]
            chunks = [Chunk(**chunk) for chunk in metadata["chunks"]]
            index = cls(vectors, chunks, metadata["embedding_model"]["name"], ChunkingSettings(**metadata["chunking"]))
            expected = (len(chunks), metadata["embedding_model"]["dim"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError, KeyError, TypeError,
                AttributeError, ValidationError) as exc:
            raise IndexFileError(f"{folder}: the index is corrupt ({type(exc).__name__}: {exc}); {REBUILD}") from exc
        if vectors.shape != expected or vectors.dtype != np.float32:
            raise IndexFileError(f"{folder}: {VECTORS_FILE} holds {vectors.dtype} {tuple(vectors.shape)} but "
                                 f"{METADATA_FILE} describes float32 {expected}; {REBUILD}")
        return index


def build_index(documents: list[Document], encoder: SentenceEncoder, settings: ChunkingSettings = ChunkingSettings(),
                batch_size: int = 32, progress: bool = False) -> VectorIndex:
    """Chunk `documents` with `encoder`'s tokenizer and embed every chunk (`progress`: a bar on stderr)."""
    if settings.chunk_tokens > encoder.max_text_tokens:
        raise ValidationError(f"chunks of {settings.chunk_tokens} tokens do not fit {encoder.name}, which reads at "
                              f"most {encoder.max_text_tokens} tokens of text; use fewer chunk tokens.")
    chunks = chunk_documents(documents, encoder.tokenizer, settings)
    if not chunks:
        raise InputError(f"the {len(documents)} document(s) hold no text to index; add documents with text.")
    vectors = encoder.encode([chunk.text for chunk in chunks], batch_size=batch_size, progress=progress)
    return VectorIndex(vectors, chunks, encoder.name, settings)
