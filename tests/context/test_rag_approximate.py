"""Approximate (HNSW) search: on clustered random unit vectors it finds nearly all of exact search's top 10,
with the same scores for what it finds; a real index answers its planted question the same way."""

import numpy as np
import pytest

from lmforge.context.rag import ChunkingSettings, Retriever, VectorIndex, build_index, load_documents
from lmforge.context.rag.approximate import HNSWSearch
from lmforge.errors import ValidationError
from tests.context.rag_corpus import QUESTION, write_corpus

pytest.importorskip("faiss")


def test_hnsw_recall_against_exact_search():
    generator = np.random.default_rng(0)
    centres = generator.normal(size=(50, 64))
    vectors = centres[generator.integers(0, 50, 20000)] + 0.5 * generator.normal(size=(20000, 64))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    search = HNSWSearch(vectors)
    found = 0
    for query in vectors[generator.integers(0, 20000, 50)] + 0.05:
        query = (query / np.linalg.norm(query)).astype(np.float32)
        exact = set(np.argsort(-(vectors @ query))[:10])
        ids, scores = search.search(query, 10)
        np.testing.assert_allclose(scores, vectors[ids] @ query, atol=1e-5)
        assert list(scores) == sorted(scores, reverse=True)
        found += len(exact & set(ids))
    assert found / 500 >= 0.95
    with pytest.raises(ValidationError, match="HNSW settings must be >= 1"):
        HNSWSearch(vectors, neighbours=0)


def test_an_index_loaded_for_approximate_search_answers_like_exact(minilm_encoder, tmp_path):
    (tmp_path / "corpus").mkdir()
    index = build_index(load_documents(write_corpus(tmp_path / "corpus")).documents, minilm_encoder,
                        ChunkingSettings(32, 4))
    index.save(tmp_path / "index")
    approximate = Retriever(VectorIndex.load(tmp_path / "index"), minilm_encoder)
    approximate.index.use_approximate_search()
    exact = Retriever(index, minilm_encoder)
    for k in (1, 3, len(index.chunks) + 5):  # more than there are: every chunk, once
        hits, expected = approximate.retrieve(QUESTION, k), exact.retrieve(QUESTION, k)
        assert [h.chunk for h in hits] == [e.chunk for e in expected]
        np.testing.assert_allclose([h.score for h in hits], [e.score for e in expected], atol=1e-5)
