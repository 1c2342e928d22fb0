"""Sentence embeddings for `POST /v1/embeddings`, served by an encoder model (BERT-style).

Each input (text, or token ids) goes through the encoder, is mean-pooled over its real tokens and
scaled to unit length, so a dot product of two embeddings is their cosine similarity — the same
`SentenceEncoder` that embeds RAG indexes. The encoder runs in a worker thread: an embedding batch
never blocks the server's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import threading

import numpy as np

from lmforge.context.rag.embeddings import SentenceEncoder
from lmforge.errors import InputError


class Embedder:
    def __init__(self, encoder: SentenceEncoder, name: str):
        self.encoder, self.name = encoder, name
        self.max_length = encoder.max_tokens
        self._lock = threading.Lock()  # one batch at a time through the model

    @classmethod
    def from_pretrained(cls, ref: str) -> Embedder:
        return cls(SentenceEncoder.from_pretrained(ref), ref)

    def _embed(self, inputs: list[str] | list[list[int]]) -> tuple[np.ndarray, int]:
        if all(isinstance(item, str) for item in inputs):
            rows = self.encoder.token_ids(inputs)
        else:
            rows = [list(item) for item in inputs]
            vocab = self.encoder.tokenizer.vocab_size
            if any(not 0 <= token < vocab for row in rows for token in row):
                raise InputError(f"token ids must be in [0, {vocab}) for the embedding model {self.name}.")
        with self._lock:
            return self.encoder.encode_ids(rows), sum(map(len, rows))

    async def embed(self, inputs: list[str] | list[list[int]]) -> tuple[np.ndarray, int]:
        """Unit-length embeddings [len(inputs), dim] and the number of tokens read."""
        return await asyncio.to_thread(self._embed, inputs)


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as JSON floats, or as base64 of little-endian float32 bytes (OpenAI's compact form)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
