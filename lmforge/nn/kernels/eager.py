"""The textbook attention kernel: softmax(Q K^T * scale + mask) V, step by step."""

from __future__ import annotations

import torch

from lmforge.nn.masks import CAUSAL


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float, dropout: float = 0.0) -> torch.Tensor:
    if k.shape[1] != q.shape[1]:  # GQA/MQA: each key/value head serves a group of query heads
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]: how well each query matches each key
    if mask is CAUSAL:
        mask = CAUSAL.as_tensor(q.shape[-2], scores.dtype, scores.device)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # each row sums to 1
    if dropout:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    return torch.matmul(weights, v)  # weighted average of the values
