"""The textbook attention kernel: softmax(Q K^T * scale + mask) V, step by step."""

from __future__ import annotations

import torch

from lmforge.nn.masks import CAUSAL


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) as float32 [B, H, Tq, Tk]: how much each query reads each key (rows sum to 1)."""
    if k.shape[1] != q.shape[1]:  # GQA/MQA: each key/value head serves a group of query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]: how well each query matches each key
    if mask is CAUSAL:
        mask = CAUSAL.as_tensor(q.shape[-2], scores.dtype, scores.device)
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float, dropout: float = 0.0) -> torch.Tensor:
    if v.shape[1] != q.shape[1]:
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    weights = attention_weights(q, k, mask, scale).to(q.dtype)
    if dropout:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    return torch.matmul(weights, v)  # weighted average of the values
