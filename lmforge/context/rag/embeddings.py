"""Sentence embeddings for a corpus: many texts through an encoder in batches, one unit vector each.

The encoder (a BERT-style model such as all-MiniLM-L6-v2) reads a text, and the mean of its real
tokens' output vectors, scaled to unit length, stands for the whole text (`BertModel.embed`), so the
dot product of two embeddings is their cosine similarity. A batch is padded to its longest text and
padding is computed for nothing, so texts are embedded in order of length (similar lengths share a
batch) and the vectors are put back in the caller's order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lmforge.errors import InputError, ValidationError

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


def model_name(ref: str | Path) -> str:
    """The name an index records for an embedding model: an embedded short name, or the folder's absolute path."""
    from lmforge.sources import EMBEDDED_MODELS

    if str(ref).lower() in EMBEDDED_MODELS:
        return str(ref).lower()
    return str(Path(ref).expanduser().resolve())


class SentenceEncoder:
    """An encoder model and its tokenizer, turning texts into unit-length vectors [n, dim] (float32)."""

    def __init__(self, model, tokenizer, name: str | Path):
        if not hasattr(model, "embed"):
            raise InputError(f"{name!r} is a {model.config.model_type} model without sentence embeddings; use an "
                             f"encoder such as {DEFAULT_EMBEDDING_MODEL} as the embedding model.")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, model_name(name)
        self.max_tokens = model.config.context_length  # special tokens ([CLS], [SEP]) included
        self.dim = model.config.hidden_size

    @property
    def max_text_tokens(self) -> int:
        """The longest text it reads whole, in tokens: its window minus the special tokens it adds."""
        return self.max_tokens - len(self.tokenizer.encode(""))

    @classmethod
    def from_pretrained(cls, ref: str | Path = DEFAULT_EMBEDDING_MODEL) -> SentenceEncoder:
        from lmforge.registry import AutoModel, AutoTokenizer

        return cls(AutoModel.from_pretrained(ref), AutoTokenizer.from_pretrained(ref), ref)

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Unit vectors of `texts`, one row each, in the order given; `progress` shows a bar on stderr."""
        return self.encode_ids(self.token_ids(texts), batch_size, progress)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids as the encoder reads them (special tokens included)."""
        return [encoding.ids for encoding in self.tokenizer.backend.encode_batch(list(texts))]

    def encode_ids(self, rows: list[list[int]], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Unit vectors of already tokenized texts (`token_ids`), one row each, in the order given."""
        if batch_size < 1:
            raise ValidationError(f"batch_size must be >= 1, got {batch_size}.")
        too_long = [i for i, ids in enumerate(rows) if len(ids) > self.max_tokens]
        if too_long:
            raise InputError(f"texts {too_long[:5]} are longer than the {self.max_tokens} tokens {self.name} reads "
                             "(special tokens included); shorten them, or chunk them with fewer tokens.")
        vectors = np.zeros((len(rows), self.dim), dtype=np.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)  # longest first
        with torch.inference_mode(), tqdm(total=len(rows), desc="Embedding", unit="text", disable=not progress) as bar:
            for first in range(0, len(order), batch_size):
                batch = order[first:first + batch_size]
                ids, mask = self._pad([rows[i] for i in batch])
                vectors[batch] = self.model.embed(ids, mask).float().numpy()
                bar.update(len(batch))
        return vectors

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids [B, T] and their attention mask (1 = token, 0 = padding)."""
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for row, tokens in enumerate(rows):
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, :len(tokens)] = 1
        return ids, mask
