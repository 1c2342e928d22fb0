"""Approximate nearest-neighbour search: an HNSW graph over an index's vectors (faiss), for large corpora.

Exact search compares the query with every vector: simple, always right, and linear in the corpus. An
HNSW graph (hierarchical navigable small world) links each vector to a few near neighbours on several
levels; a search walks the graph from the top level down, visiting a few hundred vectors instead of all
of them, and may miss a true neighbour now and then (`ef_search` trades speed for recall). The graph
is built in memory from the index's vectors when it is loaded, so the index on disk stays safetensors
+ JSON. Needs the optional `faiss-cpu` package.
"""

from __future__ import annotations

import numpy as np

from lmforge.errors import UnsupportedError, ValidationError


def _faiss():
    try:
        import faiss
    except ImportError:
        raise UnsupportedError("approximate search needs the faiss-cpu package: pip install faiss-cpu "
                               "(or search exactly, without --approximate).") from None
    return faiss


class HNSWSearch:
    """An HNSW graph of unit vectors [n, dim]; `search` returns (row ids, cosine scores), best first."""

    def __init__(self, vectors: np.ndarray, neighbours: int = 32, ef_construction: int = 80, ef_search: int = 64):
        if min(neighbours, ef_construction, ef_search) < 1:
            raise ValidationError(f"HNSW settings must be >= 1, got neighbours={neighbours}, "
                                  f"ef_construction={ef_construction}, ef_search={ef_search}.")
        faiss = _faiss()
        self.graph = faiss.IndexHNSWFlat(vectors.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
        self.graph.hnsw.efConstruction = ef_construction
        self.graph.hnsw.efSearch = ef_search
        self.graph.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, query_vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.graph.hnsw.efSearch = max(self.graph.hnsw.efSearch, k)  # a search cannot return more than it visits
        scores, ids = self.graph.search(np.ascontiguousarray(query_vector[None], dtype=np.float32), k)
        found = ids[0] >= 0  # fewer than k vectors: faiss pads with -1
        return ids[0][found], scores[0][found]
