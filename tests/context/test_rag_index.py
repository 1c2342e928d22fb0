"""RAG index and retrieval: a planted passage is found for its question among distractors; save/load gives the
same results; another embedding model, a missing or corrupt index and an empty corpus are refused clearly."""

import json

import numpy as np
import pytest

from lmforge.context.rag import (
    ChunkingSettings,
    EmbeddingModelMismatch,
    IndexFileError,
    Retriever,
    VectorIndex,
    build_index,
    load_documents,
)
from lmforge.errors import InputError, ValidationError
from tests.context.rag_corpus import QUESTION, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def index(corpus, minilm_encoder):
    return build_index(load_documents(corpus).documents, minilm_encoder, ChunkingSettings(32, 4))


def test_the_planted_passage_is_retrieved_first(index, minilm_encoder):
    assert len({chunk.source for chunk in index.chunks}) == 7 and len(index.chunks) > 7
    hits = Retriever(index, minilm_encoder).retrieve(QUESTION, k=3)
    assert hits[0].chunk.source == "notes/village.txt" and "March" in hits[0].chunk.text
    assert hits[0].score > hits[1].score + 0.1 and hits[1].score >= hits[2].score
    everything = Retriever(index, minilm_encoder).retrieve(QUESTION, k=100)
    assert len(everything) == len(index.chunks)
    cosines = index.vectors @ minilm_encoder.encode([QUESTION])[0]  # unit vectors: the dot product is the cosine
    np.testing.assert_allclose([hit.score for hit in everything], np.sort(cosines)[::-1], atol=1e-6)
    with pytest.raises(ValidationError, match="k .* must be >= 1"):
        Retriever(index, minilm_encoder).retrieve(QUESTION, k=0)
    with pytest.raises(ValidationError, match="the query is empty"):
        Retriever(index, minilm_encoder).retrieve("  ", k=1)


def test_save_and_load_round_trip_gives_identical_results(index, minilm_encoder, tmp_path):
    index.save(tmp_path / "index")
    loaded = VectorIndex.load(tmp_path / "index")
    assert loaded.chunks == index.chunks and loaded.chunking == index.chunking
    assert loaded.embedding_model == "all-minilm-l6-v2" and np.array_equal(loaded.vectors, index.vectors)
    for question in (QUESTION, "How long should bread dough rise?", "storms on planets"):
        assert (Retriever(loaded, minilm_encoder).retrieve(question, 4)
                == Retriever(index, minilm_encoder).retrieve(question, 4))
    metadata = json.loads((tmp_path / "index" / "index.json").read_text())
    assert metadata["embedding_model"] == {"name": "all-minilm-l6-v2", "dim": 384}
    assert metadata["chunking"] == {"chunk_tokens": 32, "overlap_tokens": 4} and metadata["lmforge_version"]
    assert set(metadata["chunks"][0]) == {"source", "start", "end", "text", "tokens"}


def test_another_embedding_model_is_refused_with_both_names(index, minilm_encoder, monkeypatch):
    monkeypatch.setattr(minilm_encoder, "name", "/models/e5-small")
    with pytest.raises(EmbeddingModelMismatch, match=r"built with the embedding model 'all-minilm-l6-v2' \(384 "
                                                     r"dimensions\), but the query is embedded with '/models/e5-small'"
                                                     r".*--embedding-model /models/e5-small"):
        Retriever(index, minilm_encoder)


def test_missing_corrupt_and_empty_indexes_are_clear(index, tmp_path):
    with pytest.raises(IndexFileError, match="no such folder; build one with: lmforge rag index DOCUMENTS --out"):
        VectorIndex.load(tmp_path / "missing")
    (tmp_path / "notes").mkdir()
    with pytest.raises(IndexFileError, match=r"not an index \(it needs index.json and vectors.safetensors\)"):
        VectorIndex.load(tmp_path / "notes")
    index.save(tmp_path / "index")
    metadata = tmp_path / "index" / "index.json"
    good = metadata.read_text()
    metadata.write_text(good[:200])
    with pytest.raises(IndexFileError, match=r"the index is corrupt \(JSONDecodeError.*rebuild it with"):
        VectorIndex.load(tmp_path / "index")
    short = json.loads(good)
    short["chunks"] = short["chunks"][1:]
    metadata.write_text(json.dumps(short))
    with pytest.raises(IndexFileError, match=r"holds float32 \(\d+, 384\) but index.json describes float32"):
        VectorIndex.load(tmp_path / "index")
    metadata.write_text(good)
    (tmp_path / "index" / "vectors.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(IndexFileError, match=r"the index is corrupt \(SafetensorError"):
        VectorIndex.load(tmp_path / "index")


def test_documents_without_text_or_chunks_too_long_for_the_encoder_are_refused(corpus, minilm_encoder, tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(InputError, match=r"the 1 document\(s\) hold no text to index"):
        build_index(load_documents(tmp_path).documents, minilm_encoder)
    with pytest.raises(ValidationError, match="chunks of 600 tokens do not fit all-minilm-l6-v2, which reads at most "
                                              "510 tokens of text"):
        build_index(load_documents(corpus).documents, minilm_encoder, ChunkingSettings(600, 0))
