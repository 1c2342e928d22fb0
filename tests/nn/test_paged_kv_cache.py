"""A packed step through PagedKVCache (decodes, fresh prompt chunks, chunks after a cached prefix)
gives every sequence the logits it gets alone from a plain forward pass."""

import random

import pytest
import torch

from lmforge.errors import InputError, KVCacheError
from lmforge.nn.paged_kv_cache import PagedKVCache, Span
from tests.models.test_gpt2 import hf_gpt2
from tests.models.test_llama import hf_llama
from tests.parity import max_abs_diff, ours_from_hf

BLOCK = 4


class Pool:
    """Hands out shuffled physical blocks, so logical order never matches physical order."""

    def __init__(self, num_blocks: int, seed: int = 0):
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def table(self, num_tokens: int) -> list[int]:
        return [self.free.pop() for _ in range(-(-num_tokens // BLOCK))]


def packed_step(model, cache: PagedKVCache, spans: list[Span], tokens: list[list[int]]) -> torch.Tensor:
    """Run one packed step; logits [N, V] of every packed token."""
    positions = cache.prepare(spans)
    ids = torch.tensor([t for span, seq in zip(spans, tokens) for t in seq[span.start:span.start + span.length]])
    with torch.no_grad():
        return model(ids[None], position_ids=positions[None], kv_cache=cache).logits[0]


@pytest.mark.parametrize("builder,implementation", [(hf_llama, "sdpa"), (hf_llama, "eager"), (hf_llama, "flash"),
                                                    (hf_gpt2, "sdpa")], ids=["llama-sdpa", "llama-eager",
                                                                             "llama-flash", "gpt2-sdpa"])
def test_mixed_packed_steps_equal_plain_forward(builder, implementation):
    model = ours_from_hf(builder(num_key_value_heads=2) if builder is hf_llama else builder(), "causal-lm",
                         implementation)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(1, 90, (n,), generator=generator).tolist() for n in (11, 6, 17, 9)]
    with torch.no_grad():
        expected = [model(torch.tensor([seq])).logits[0] for seq in sequences]
    cache, pool = PagedKVCache.for_model(model, num_blocks=32, block_size=BLOCK), Pool(32)
    tables = [pool.table(len(seq)) for seq in sequences]
    # Step 1: seq 0 prefills 8 tokens, seq 1 all 6, seq 2 its first 5, seq 3 waits.
    plan = [(0, 0, 8), (1, 0, 6), (2, 0, 5)]
    logits = packed_step(model, cache, [Span(tables[i], s, n) for i, s, n in plan], [sequences[i] for i, _, _ in plan])
    assert max_abs_diff(logits[:8], expected[0][:8]) <= 1e-4
    assert max_abs_diff(logits[8:14], expected[1][:6]) <= 1e-4
    assert max_abs_diff(logits[14:19], expected[2][:5]) <= 1e-4
    # Step 2: decodes first (seq 1 token 6, seq 0 token 8), then chunks on a cached prefix and a fresh prompt.
    plan = [(1, 5, 1), (0, 8, 1), (2, 5, 12), (3, 0, 9)]
    logits = packed_step(model, cache, [Span(tables[i], s, n) for i, s, n in plan], [sequences[i] for i, _, _ in plan])
    assert max_abs_diff(logits[0], expected[1][5]) <= 1e-4  # a decode that recomputes position 5
    assert max_abs_diff(logits[1], expected[0][8]) <= 1e-4
    assert max_abs_diff(logits[2:14], expected[2][5:17]) <= 1e-4
    assert max_abs_diff(logits[14:23], expected[3][:9]) <= 1e-4


def test_many_decodes_attend_in_length_groups():
    """20 decodes with contexts from 2 to 39 tokens (sorted, as the model runner packs them) are split
    into several batched calls; each still reads exactly its own context."""
    model = ours_from_hf(hf_llama(num_key_value_heads=2), "causal-lm")
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, 90, (n,), generator=generator).tolist() for n in range(2, 41, 2)]
    with torch.no_grad():
        expected = [model(torch.tensor([seq])).logits[0, -1] for seq in sequences]
    cache, pool = PagedKVCache.for_model(model, num_blocks=256, block_size=BLOCK), Pool(256)
    tables = [pool.table(len(seq)) for seq in sequences]
    packed_step(model, cache, [Span(t, 0, len(s) - 1) for t, s in zip(tables, sequences)], sequences)  # prefill
    logits = packed_step(model, cache, [Span(t, len(s) - 1, 1) for t, s in zip(tables, sequences)], sequences)
    assert len(cache._plan.decode_groups) == 2
    for row, reference in enumerate(expected):
        assert max_abs_diff(logits[row], reference) <= 1e-4


def test_copy_blocks_duplicates_every_layer():
    model = ours_from_hf(hf_llama(), "causal-lm")
    cache = PagedKVCache.for_model(model, num_blocks=4, block_size=BLOCK)
    for pool in cache.keys + cache.values:
        pool[1].normal_()
    cache.copy_blocks([(1, 3)])
    assert all(torch.equal(pool[3], pool[1]) for pool in cache.keys + cache.values)


def test_misuse_is_reported():
    model = ours_from_hf(hf_llama(), "causal-lm")
    cache = PagedKVCache.for_model(model, num_blocks=4, block_size=BLOCK)
    with pytest.raises(KVCacheError, match="block table"):
        cache.prepare([Span([0], 2, 3)])  # 5 tokens do not fit one block of 4
    cache.prepare([Span([0], 0, 3)])
    with pytest.raises(KVCacheError, match="prepare"), torch.no_grad():
        model(torch.tensor([[1, 2]]), position_ids=torch.tensor([[0, 1]]), kv_cache=cache)
    with pytest.raises(InputError, match="position_ids"):
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
