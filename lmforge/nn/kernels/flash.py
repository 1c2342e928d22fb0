"""FlashAttention (Dao et al., 2022) in plain PyTorch: exact attention in linear memory.

Instead of materialising the Tq x Tk score matrix, queries and keys are cut into
tiles and the softmax is computed *online*: each query row keeps a running
maximum m, a running denominator l and an unnormalised output accumulator, and
rescales them whenever a new key tile raises the maximum. The result equals
softmax(Q K^T * scale + mask) V to float rounding, with only tile-sized scores alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.errors import InputError
from lmforge.nn.masks import CAUSAL


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float, dropout: float = 0.0, block_size: int = 128,
                    causal: bool = False) -> torch.Tensor:
    """Tiled attention with an online softmax; same contract as `eager_attention`.

    q [B, H, Tq, d]; k, v [B, H_kv, Tk, d] with H_kv dividing H; `mask` additive and
    broadcastable to [B, 1, Tq, Tk]. `causal=True` hides future keys without a mask
    tensor (queries are the last Tq positions, as with a KV cache) and skips key
    tiles that lie wholly in a query tile's future. Peak extra memory is
    O(B * H * block_size^2), independent of the sequence length. `mask` may be `CAUSAL`, which
    means causal=True.

    For one query row and key tile j with scores s_j (already scaled and masked):

        m_new = max(m, max(s_j))                  running maximum
        alpha = exp(m - m_new)                    shrinks what was summed under the old maximum
        p_j   = exp(s_j - m_new)                  this tile's unnormalised probabilities
        l     = alpha * l + sum(p_j)              running softmax denominator
        acc   = alpha * acc + p_j @ v_j           running unnormalised output

    and the output is acc / l once every tile has been seen. Subtracting the
    running maximum keeps every exp() <= 1, exactly as a stable softmax does.
    """
    if mask is CAUSAL:
        mask, causal = None, True
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise InputError(f"{heads} query heads cannot share {kv_heads} key/value heads; H must be a multiple of H_kv.")
    if block_size < 1:
        raise InputError(f"block_size must be a positive number of positions, got {block_size}.")
    if causal and q_len > k_len:
        raise InputError(f"causal attention puts the {q_len} queries at the end of the keys, so it needs "
                         f"at least as many keys; got {k_len}.")
    group = heads // kv_heads
    # GQA without copying K/V: the `group` query heads sharing a KV head become extra query rows.
    q = q.view(batch, kv_heads, group, q_len, head_dim)
    mask = None if mask is None else mask.unsqueeze(2)  # [B, 1, 1, Tq, Tk]: broadcast over the group
    hidden = torch.finfo(torch.float32).min
    offset = k_len - q_len  # absolute position of query 0 among the keys
    out = torch.empty(batch, kv_heads, group, q_len, head_dim, dtype=q.dtype, device=q.device)

    for q_start in range(0, q_len, block_size):
        q_end = min(q_start + block_size, q_len)
        rows = q_end - q_start
        q_tile = q[:, :, :, q_start:q_end].reshape(batch, kv_heads, group * rows, head_dim)
        row_max = torch.full((batch, kv_heads, group, rows, 1), float("-inf"), device=q.device)
        denominator = torch.zeros(batch, kv_heads, group, rows, 1, device=q.device)
        acc = torch.zeros(batch, kv_heads, group, rows, head_dim, device=q.device)
        # With causal masking the last query of this tile sees keys up to position offset + q_end - 1.
        k_stop = min(k_len, offset + q_end) if causal else k_len
        for k_start in range(0, k_stop, block_size):
            k_end = min(k_start + block_size, k_len)
            k_tile, v_tile = k[:, :, k_start:k_end], v[:, :, k_start:k_end]
            scores = torch.matmul(q_tile, k_tile.transpose(-1, -2)).float() * scale
            scores = scores.view(batch, kv_heads, group, rows, k_end - k_start)
            if mask is not None:
                scores = scores + _mask_tile(mask, q_start, q_end, k_start, k_end)
            if causal and k_end > offset + q_start + 1:  # the tile crosses the diagonal
                query_pos = torch.arange(offset + q_start, offset + q_end, device=q.device)[:, None]
                key_pos = torch.arange(k_start, k_end, device=q.device)[None, :]
                scores = scores.masked_fill(key_pos > query_pos, hidden)

            # Clamped so that a tile hidden by -inf (rather than finfo.min) gives exp(-inf) = 0, not NaN.
            new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True)).clamp(min=hidden)
            alpha = torch.exp(row_max - new_max)  # 0 on the first tile (row_max = -inf)
            probs = torch.exp(scores - new_max)
            denominator = alpha * denominator + probs.sum(dim=-1, keepdim=True)
            if dropout:  # dropout(softmax) = dropout(p) / l: drop from the numerator only
                probs = F.dropout(probs, p=dropout)
            weighted = torch.matmul(probs.to(v.dtype).view(batch, kv_heads, group * rows, k_end - k_start), v_tile)
            acc = alpha * acc + weighted.view(batch, kv_heads, group, rows, head_dim).float()
            row_max = new_max
        out[:, :, :, q_start:q_end] = (acc / denominator).to(q.dtype)
    return out.view(batch, heads, q_len, head_dim)


def _mask_tile(mask: torch.Tensor, q_start: int, q_end: int, k_start: int, k_end: int) -> torch.Tensor:
    """The [.., rows, cols] piece of a broadcastable mask (a size-1 query axis is shared by all rows)."""
    if mask.shape[-2] != 1:
        mask = mask[..., q_start:q_end, :]
    return mask[..., k_start:k_end]
