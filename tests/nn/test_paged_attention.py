"""PagedAttention over scattered blocks equals attention over the same keys stored contiguously."""

import pytest
import torch

from lmforge.errors import InputError
from lmforge.nn import build_attention_mask
from lmforge.nn.kernels.eager import eager_attention
from lmforge.nn.kernels.paged import context_slots, gather_from_cache, paged_attention, write_to_cache
from tests.parity import max_abs_diff

BLOCK, KV_HEADS, HEADS, DIM, NUM_BLOCKS = 4, 2, 6, 8, 24
CPU = torch.device("cpu")


def fill_pool(lengths: list[int], seed: int = 0):
    """Write random K/V for sequences of `lengths` into randomly permuted blocks of a shared pool.

    Returns the pools, block tables (-1 padded), and each sequence's contiguous keys/values [H_kv, T, d].
    """
    generator = torch.Generator().manual_seed(seed)
    key_cache = torch.full((NUM_BLOCKS, BLOCK, KV_HEADS, DIM), float("nan"))  # stale slots must never be read
    value_cache = key_cache.clone()
    free = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    max_blocks = max(-(-n // BLOCK) for n in lengths) + 1  # one spare column of padding
    tables = torch.full((len(lengths), max_blocks), -1, dtype=torch.long)
    contiguous = []
    for row, length in enumerate(lengths):
        blocks = [free.pop() for _ in range(-(-length // BLOCK))]
        tables[row, :len(blocks)] = torch.tensor(blocks)
        keys = torch.randn(length, KV_HEADS, DIM, generator=generator)
        values = torch.randn(length, KV_HEADS, DIM, generator=generator)
        slots = torch.tensor([blocks[t // BLOCK] * BLOCK + t % BLOCK for t in range(length)])
        write_to_cache(key_cache, value_cache, keys, values, slots)
        contiguous.append((keys.transpose(0, 1), values.transpose(0, 1)))
    return key_cache, value_cache, tables, contiguous


def test_write_to_cache_round_trip_and_skips_padding_slots():
    key_cache, value_cache = torch.zeros(3, BLOCK, KV_HEADS, DIM), torch.zeros(3, BLOCK, KV_HEADS, DIM)
    keys, values = torch.randn(3, KV_HEADS, DIM), torch.randn(3, KV_HEADS, DIM)
    slots = torch.tensor([2 * BLOCK + 1, -1, 0 * BLOCK + 3])  # block 2 offset 1, a padding token, block 0 offset 3
    write_to_cache(key_cache, value_cache, keys, values, slots)
    assert torch.equal(key_cache[2, 1], keys[0]) and torch.equal(value_cache[2, 1], values[0])
    assert torch.equal(key_cache[0, 3], keys[2]) and torch.equal(value_cache[0, 3], values[2])
    assert int((key_cache != 0).any(dim=-1).sum()) == 2 * KV_HEADS  # nothing else was written


def test_gather_lays_blocks_end_to_end_in_logical_order():
    key_cache, _, tables, contiguous = fill_pool([9, 4])
    gathered = gather_from_cache(key_cache, context_slots(tables, BLOCK, 9))
    assert gathered.shape == (2, KV_HEADS, 9, DIM)
    assert torch.equal(gathered[0, :, :9], contiguous[0][0])
    assert torch.equal(gathered[1, :, :4], contiguous[1][0])


def contiguous_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    q_len, k_len = q.shape[1], keys.shape[1]
    mask = build_attention_mask(None, q_len, k_len, causal=True, dtype=torch.float32, device=CPU)
    return eager_attention(q[None], keys[None], values[None], mask, DIM ** -0.5)[0]


@pytest.mark.parametrize("q_len", [1, 3], ids=["decode", "prefill-on-cached-prefix"])
def test_matches_contiguous_eager_attention(q_len):
    lengths = [9, 4, 16, 3]
    key_cache, value_cache, tables, contiguous = fill_pool(lengths)
    q = torch.randn(len(lengths), HEADS, q_len, DIM)
    out = paged_attention(q, key_cache, value_cache, tables, torch.tensor(lengths), DIM ** -0.5)
    assert out.shape == q.shape
    for row, (keys, values) in enumerate(contiguous):
        assert max_abs_diff(out[row], contiguous_attention(q[row], keys, values)) <= 1e-5


def test_stale_slots_do_not_leak_into_the_result():
    lengths = [5, 2]
    key_cache, value_cache, tables, contiguous = fill_pool(lengths)
    key_cache, value_cache = key_cache.nan_to_num(1e4), value_cache.nan_to_num(1e4)  # huge finite leftovers
    q = torch.randn(2, HEADS, 1, DIM)
    out = paged_attention(q, key_cache, value_cache, tables, torch.tensor(lengths), DIM ** -0.5)
    for row, (keys, values) in enumerate(contiguous):
        assert max_abs_diff(out[row], contiguous_attention(q[row], keys, values)) <= 1e-5


def test_rejects_contexts_that_do_not_fit_the_block_table():
    key_cache, value_cache, tables, _ = fill_pool([5])
    q = torch.randn(1, HEADS, 1, DIM)
    with pytest.raises(InputError, match="context length"):
        paged_attention(q, key_cache, value_cache, tables, torch.tensor([tables.shape[1] * BLOCK + 1]), 1.0)
    with pytest.raises(InputError, match="one of each per sequence"):
        paged_attention(q, key_cache, value_cache, tables, torch.tensor([5, 5]), 1.0)
