"""PyTorch's fused attention (flash / memory-efficient / math backends chosen by torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.nn.masks import CAUSAL


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float, dropout: float = 0.0) -> torch.Tensor:
    # enable_gqa lets several query heads read one key/value head without copying it; is_causal skips
    # the future without reading a mask.
    causal = mask is CAUSAL
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, dropout_p=dropout,
                                          scale=scale, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
