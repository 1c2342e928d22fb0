"""PagedAttention (Kwon et al., 2023): attention over a KV cache stored in fixed-size blocks.

Like virtual memory pages, the keys/values of every sequence live in blocks of
`block_size` token slots taken from one shared pool, in any physical order; a
per-sequence block table maps logical block i to its physical block. Sequences
grow a block at a time, so no memory is reserved for lengths they never reach.

A pool is [num_blocks, block_size, H_kv, d]: block-major, so it is also a flat
array of slots [num_blocks * block_size, H_kv, d] where slot = block * block_size
+ offset. Reading a sequence's context is one `index_select` of its slots, and
the result views as [H_kv, T, d] per sequence without another copy.
"""

from __future__ import annotations

import torch

from lmforge.errors import InputError
from lmforge.nn.kernels.sdpa import sdpa_attention


def slots(cache: torch.Tensor) -> torch.Tensor:
    """The pool as a flat array of token slots [num_blocks * block_size, H_kv, d] (a view)."""
    return cache.flatten(0, 1)


def context_slots(block_tables: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Slot ids [num_seqs, length] of logical positions 0..length-1 of each sequence.

    Unused table entries (e.g. -1) read as block 0: those positions lie past the sequence's
    context and must be hidden by the caller's mask.
    """
    offsets = torch.arange(block_size, device=block_tables.device)
    every_slot = block_tables.clamp(min=0)[:, :, None] * block_size + offsets  # [S, max_blocks, block_size]
    return every_slot.flatten(1)[:, :length]


def write_to_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new tokens' keys/values [N, H_kv, d] in their slots of the pools, in place.

    A negative slot (a padding token) is skipped.
    """
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        keys, values, slot_mapping = keys[keep], values[keep], slot_mapping[keep]
    slots(key_cache).index_copy_(0, slot_mapping, keys.to(key_cache.dtype))
    slots(value_cache).index_copy_(0, slot_mapping, values.to(value_cache.dtype))


def gather_from_cache(cache: torch.Tensor, context: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The keys (or values) of slots `context` [num_seqs, T]: [num_seqs, H_kv, T, d].

    One copy (into `out`, a reusable flat buffer of at least num_seqs * T slots, when given);
    the head transpose is a view.
    """
    num_seqs, length = context.shape
    flat = slots(cache)
    if out is not None:
        out = out[:num_seqs * length]
    gathered = torch.index_select(flat, 0, context.flatten(), out=out)
    return gathered.view(num_seqs, length, *flat.shape[1:]).transpose(1, 2)


def context_mask(context_lens: torch.Tensor, q_len: int, length: int, dtype: torch.dtype,
                 causal: bool = True) -> torch.Tensor:
    """Additive mask [num_seqs, 1, q_len, length] for queries that are the last q_len tokens of each context.

    Slots at or past a sequence's context length belong to nobody; with `causal`, query i of a
    sequence sees keys up to context_len - q_len + i.
    """
    device = context_lens.device
    key_pos = torch.arange(length, device=device)
    lens = context_lens[:, None, None]  # [S, 1, 1]
    visible = key_pos < lens  # [S, 1, length]
    if causal:
        query_pos = lens - q_len + torch.arange(q_len, device=device)[:, None]  # [S, q_len, 1]
        visible = visible & (key_pos <= query_pos)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                    causal: bool = True, kernel=sdpa_attention) -> torch.Tensor:
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
    block_size = key_cache.shape[1]
    capacity = block_tables.shape[1] * block_size
    if bool((context_lens > capacity).any()) or bool((context_lens < q_len).any()):
        raise InputError(f"every context length must lie in [{q_len}, {capacity}] (queries are part of the "
                         f"context; block tables hold {capacity} slots); got {context_lens.tolist()}.")
    length = int(context_lens.max())
    context = context_slots(block_tables, block_size, length)
    mask = context_mask(context_lens.to(q.device), q_len, length, q.dtype, causal)
    # Zero the slots past each context: a masked weight of 0 times a stale NaN would still be NaN.
    stale = mask[:, 0, -1, :, None] != 0  # [S, length, 1]: past the context (the last query sees it all)
    keys = gather_from_cache(key_cache, context).masked_fill(stale[:, None], 0)
    values = gather_from_cache(value_cache, context).masked_fill(stale[:, None], 0)
    return kernel(q, keys.to(q.dtype), values.to(q.dtype), mask, scale)
