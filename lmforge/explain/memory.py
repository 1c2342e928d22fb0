"""Memory, as the sequence grows: the KV cache step by step, and what the attention scores would take.

Generation keeps every past position's keys and values (the KV cache) so each new token runs alone: per
token it holds 2 (keys, values) x layers x key/value heads x head size numbers, so it grows by the same
amount at every step — grouped-query attention shrinks it by sharing key/value heads. Attention itself
scores every query against every key: the textbook (explicit) kernel materialises that [heads, T, T]
matrix per layer, the tiled (flash) kernel only a [heads, T, tile] slice of it at a time.
"""

from __future__ import annotations

import torch

from lmforge.explain.architecture import attention_type

FLASH_TILE = 128  # the flash kernel's default key tile (lmforge.nn.kernels.flash)


def kv_bytes_per_token(model) -> int:
    """Bytes the KV cache holds for one position of one sequence."""
    attention = model.decoder_attention_layers()
    first = attention[0]
    return 2 * len(attention) * first.num_kv_heads * first.head_dim * torch.finfo(model.dtype).bits // 8


def memory_section(model, prompt_tokens: int, generated_tokens: int) -> dict:
    """KV cache size after the prompt and after each generated token; attention-score memory at the prompt."""
    attention = model.decoder_attention_layers()
    first = attention[0]
    per_token = kv_bytes_per_token(model)
    kind = attention_type(first)
    if kind == "GQA":
        kind += f" ({first.num_heads // first.num_kv_heads} query heads per key/value head)"
    score_bytes = 4  # scores and softmax in float32
    return {
        "attention_type": kind, "layers": len(attention), "heads": first.num_heads, "kv_heads": first.num_kv_heads,
        "head_dim": first.head_dim, "kv_bytes_per_token": per_token,
        "kv_bytes_if_mha": per_token * first.num_heads // first.num_kv_heads,
        "kv_cache_bytes": [per_token * (prompt_tokens + step) for step in range(generated_tokens + 1)],
        "prompt_tokens": prompt_tokens,
        "explicit_scores_bytes": first.num_heads * prompt_tokens * prompt_tokens * score_bytes,
        "flash_scores_bytes": first.num_heads * prompt_tokens * min(FLASH_TILE, prompt_tokens) * score_bytes,
    }


def engine_blocks(prompt_ids: list[int], output_ids: list[int], block_size: int = 16) -> dict:
    """The engine's paged KV cache for this sequence, replayed on the real `BlockManager`: its block table after
    the prompt and after every generated token, and what a second request with the same prompt shares."""
    from lmforge.engine.block_manager import BlockManager
    from lmforge.engine.sequence import Sequence

    total = len(prompt_ids) + len(output_ids)
    manager = BlockManager(num_blocks=2 * (total // block_size + 2), block_size=block_size)
    first = Sequence(prompt_ids, request_id="explained")
    manager.allocate(first)
    first.num_computed_tokens = len(prompt_ids)  # the prefill wrote the prompt's keys and values
    manager.cache_computed(first)
    tables = [list(first.block_table)]
    for token in output_ids:
        first.append_token(token)
        manager.may_append(first)
        tables.append(list(first.block_table))
    second = Sequence(prompt_ids, request_id="same prompt")
    manager.allocate(second)
    shared = [block for block in second.block_table if block in first.block_table]
    return {"block_size": block_size, "tables": tables, "prompt_tokens": len(prompt_ids),
            "second_request_table": list(second.block_table), "shared_blocks": shared,
            "second_request_cached_tokens": second.num_cached_tokens}
