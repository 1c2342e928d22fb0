"""Sentence embeddings for `POST /v1/embeddings`, served by an encoder model (BERT-style).

Each input is tokenized, run through the encoder, mean-pooled over its real tokens and scaled
to unit length, so a dot product of two embeddings is their cosine similarity. The encoder runs
in a worker thread: an embedding batch never blocks the server's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import threading

import torch

from lmforge.errors import InputError


class Embedder:
    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_length = model.config.context_length
        self._lock = threading.Lock()  # one batch at a time through the model

    @classmethod
    def from_pretrained(cls, ref: str) -> Embedder:
        from lmforge.registry import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(ref)
        if not hasattr(model, "embed"):
            raise InputError(f"{ref!r} is a {model.config.model_type} model without sentence embeddings; "
                             "pass an encoder such as all-minilm-l6-v2 as the embedding model.")
        return cls(model, AutoTokenizer.from_pretrained(ref), ref)

    def _batch(self, inputs: list[str] | list[list[int]]) -> dict[str, torch.Tensor]:
        if all(isinstance(item, str) for item in inputs):
            return self.tokenizer(inputs, max_length=self.max_length)
        rows = [list(item) for item in inputs]
        too_long = [i for i, row in enumerate(rows) if len(row) > self.max_length]
        if too_long:
            raise InputError(f"inputs {too_long} are longer than the embedding model's {self.max_length} tokens.")
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), 1
        return {"input_ids": ids, "attention_mask": mask}

    def _embed(self, inputs: list[str] | list[list[int]]) -> tuple[torch.Tensor, int]:
        try:
            batch = self._batch(inputs)
        except InputError as exc:
            raise InputError(f"{exc} (the embedding model reads at most {self.max_length} tokens per input)") from None
        with self._lock, torch.inference_mode():
            vectors = self.model.embed(batch["input_ids"], batch["attention_mask"])
        return vectors.float(), int(batch["attention_mask"].sum())

    async def embed(self, inputs: list[str] | list[list[int]]) -> tuple[torch.Tensor, int]:
        """Unit-length embeddings [len(inputs), dim] and the number of tokens read."""
        return await asyncio.to_thread(self._embed, inputs)


def encode_vector(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    """A vector as JSON floats, or as base64 of little-endian float32 bytes (OpenAI's compact form)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()
