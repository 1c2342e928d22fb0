"""PagedAttention (Kwon et al., 2023): attention over a KV cache stored in fixed-size blocks.

Like virtual memory pages, the keys/values of every sequence live in blocks of
`block_size` token slots taken from one shared pool, in any physical order; a
per-sequence block table maps logical block i to its physical block. Sequences
grow a block at a time, so no memory is reserved for lengths they never reach.
"""

from __future__ import annotations

import torch

from lmforge.errors import InputError
from lmforge.nn.kernels.sdpa import sdpa_attention


def write_to_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter new tokens' keys/values [N, H_kv, d] into their slots of the pools, in place.

    The caches are [num_blocks, H_kv, block_size, d]; slot = block_id * block_size + offset.
    A negative slot (a padding token) is skipped.
    """
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        keys, values, slot_mapping = keys[keep], values[keep], slot_mapping[keep]
    block_size = key_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    key_cache[blocks, :, offsets] = keys.to(key_cache.dtype)
    value_cache[blocks, :, offsets] = values.to(value_cache.dtype)


def gather_from_cache(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Each sequence's blocks, laid end to end: [num_seqs, H_kv, max_blocks * block_size, d].

    Unused table entries may hold any value (e.g. -1); they are read as block 0 and must be
    hidden by the caller, which `paged_attention` does with the context lengths. The result
    is a fresh tensor (index_select copies), never a view of the pool.
    """
    num_seqs, max_blocks = block_tables.shape
    _, kv_heads, block_size, head_dim = cache.shape
    physical = block_tables.clamp(min=0).flatten()
    blocks = cache.index_select(0, physical).view(num_seqs, max_blocks, kv_heads, block_size, head_dim)
    return blocks.transpose(1, 2).reshape(num_seqs, kv_heads, max_blocks * block_size, head_dim)


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                    causal: bool = True) -> torch.Tensor:
    """Attention of q [num_seqs, H, Tq, d] over each sequence's cached keys/values → [num_seqs, H, Tq, d].

    `block_tables` [num_seqs, max_blocks] lists each sequence's physical blocks in logical order;
    `context_lens` [num_seqs] counts its cached tokens, including the Tq new ones already written
    with `write_to_cache`. The queries are the last Tq positions of the context: with `causal`
    (prefill on a cached prefix, Tq > 1) query i sees keys up to context_len - Tq + i.
    """
    num_seqs, _, q_len, _ = q.shape
    if block_tables.shape[0] != num_seqs or context_lens.shape[0] != num_seqs:
        raise InputError(f"q holds {num_seqs} sequences but block_tables has {block_tables.shape[0]} rows "
                         f"and context_lens {context_lens.shape[0]}; pass one of each per sequence.")
    capacity = block_tables.shape[1] * key_cache.shape[2]
    if bool((context_lens > capacity).any()) or bool((context_lens < q_len).any()):
        raise InputError(f"every context length must lie in [{q_len}, {capacity}] (queries are part of the "
                         f"context; block tables hold {capacity} slots); got {context_lens.tolist()}.")
    key_pos = torch.arange(capacity, device=q.device)  # logical position of every gathered slot
    lens = context_lens.to(q.device)[:, None, None]  # [S, 1, 1]
    visible = key_pos < lens  # slots past the context are unwritten or belong to nobody
    # Zero those slots: a masked weight of 0 times a stale NaN (e.g. from torch.empty) would still be NaN.
    stale = ~visible[..., None]  # [S, 1, capacity, 1]
    keys = gather_from_cache(key_cache, block_tables).masked_fill_(stale, 0)
    values = gather_from_cache(value_cache, block_tables).masked_fill_(stale, 0)
    if causal:
        query_pos = lens - q_len + torch.arange(q_len, device=q.device)[:, None]  # [S, Tq, 1]
        visible = visible & (key_pos <= query_pos)
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
    mask = mask.masked_fill(~visible, torch.finfo(q.dtype).min)[:, None]  # [S, 1, Tq, capacity]
    return sdpa_attention(q, keys.to(q.dtype), values.to(q.dtype), mask, scale)
