"""Output heads: turn the final hidden states into what a task needs.

- LM head: a plain vocabulary-sized `nn.Linear` (`lm_head` in each model) →
  next-token or masked-token logits, often sharing its weight with the token
  embedding ("tied").
- `pool`: one vector per sequence (first token, last real token, or mean of real
  tokens) for classification and sentence embeddings.
- `ClassificationHead`: dense → tanh → projection to labels (BERT pooler, BART).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UnsupportedError


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, strategy: str) -> torch.Tensor:
    """Reduce [B, T, D] to [B, D] with 'first', 'last' (last real token) or 'mean' (over real tokens)."""
    if strategy == "first":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if strategy == "last":
        # Index of the last real token; right padding assumed, as HF does for decoder classifiers.
        last = attention_mask.long().cumsum(-1).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if strategy == "mean":
        weights = attention_mask[..., None].to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    raise UnsupportedError(f"pooling {strategy!r} is not supported; use 'first', 'last' or 'mean'.")


def sentence_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor | None, normalize: bool = True) -> torch.Tensor:
    """Mean of the real tokens' vectors, optionally scaled to unit length (sentence-transformers)."""
    pooled = pool(hidden, attention_mask, "mean")
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


class ClassificationHead(nn.Module):
    """dense → tanh → dropout → out_proj: the classic sentence-classification head."""

    def __init__(self, dim: int, num_labels: int, dropout: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(dim, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))
