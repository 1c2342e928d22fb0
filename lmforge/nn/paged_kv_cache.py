"""Paged KV cache: every sequence's keys/values in fixed-size blocks of one shared pool per layer.

The serving engine runs many sequences in one forward pass, packed into a single row of
tokens: some decode one token, some prefill a chunk of their prompt, some continue a prompt
whose beginning came from the prefix cache. `prepare(spans)` turns each sequence's block
table and position into this step's plan: the slot each new token's key/value is written
to, and the slots and mask each query reads. Every layer then follows the same plan.

Decodes (one new token) are batched: their contexts are gathered side by side and one
kernel call attends them all. Prompt chunks attend one by one: a fresh prompt over its
own keys/values (nothing to gather), a chunk after a cached prefix over its gathered context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import InputError, KVCacheError
from lmforge.nn.kernels.paged import (
    context_mask,
    context_slots,
    gather_from_cache,
    slots,
)
from lmforge.nn.masks import CausalMask, causal_self_attention_mask


@dataclass(frozen=True)
class Span:
    """One sequence's part of a step: tokens [start, start + length) of it, cached in `block_table`."""

    block_table: list[int]
    start: int  # tokens already in the cache (the first new token's position)
    length: int  # new tokens this step


@dataclass
class _Chunk:
    """A multi-token span: its rows of the packed batch, and the context it reads (None: only itself)."""

    first: int
    length: int
    context: torch.Tensor | None  # slot ids [1, start + length]
    mask: torch.Tensor | CausalMask


@dataclass
class _DecodeGroup:
    """Consecutive single-token spans attended in one call: rows [first, first + count) of the batch."""

    first: int
    count: int
    context: torch.Tensor  # slot ids [count, longest context in the group]
    mask: torch.Tensor  # hides each row's slots past its own context


@dataclass
class _StepPlan:
    slot_mapping: torch.Tensor  # [N] where each new token's key/value goes
    positions: torch.Tensor  # [N]
    decode_groups: list[_DecodeGroup]
    chunks: list[_Chunk]
    decode_context: tuple[torch.Tensor, torch.Tensor] | None  # every span a decode: slots [N, L], lengths [N]


class PagedKVCache:
    """Per-layer key and value pools [num_blocks, block_size, H_kv, d], read through block tables.

    Pools start zeroed, so a slot that no sequence wrote holds a finite value and a masked read
    of it contributes exactly 0.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)
        self._plan: _StepPlan | None = None
        # Reused gather buffers: a fresh multi-megabyte tensor per layer costs page faults every step.
        self._key_buffer = torch.empty(0, num_kv_heads, head_dim, dtype=dtype, device=device)
        self._value_buffer = torch.empty(0, num_kv_heads, head_dim, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int) -> PagedKVCache:
        """A pool shaped for `model`'s decoder self-attention layers."""
        attention = model.decoder_attention_layers()
        first = attention[0]
        return cls(len(attention), num_blocks, block_size, first.num_kv_heads, first.head_dim,
                   dtype=model.dtype, device=model.device)

    @staticmethod
    def bytes_per_block(model, block_size: int) -> int:
        """Memory one block takes across all layers (keys and values)."""
        attention = model.decoder_attention_layers()
        first = attention[0]
        element = torch.empty((), dtype=model.dtype).element_size()
        return 2 * len(attention) * block_size * first.num_kv_heads * first.head_dim * element

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)

    # ----- one step ----------------------------------------------------------------------

    def prepare(self, spans: list[Span]) -> torch.Tensor:
        """Plan a packed step over `spans` (in packed order); returns the tokens' positions [N].

        Put single-token spans first, sorted by position: those leading ones are attended in a
        few batched calls, each over contexts of similar length (every row of a call reads as
        many slots as its longest context, so mixing 30- and 600-token contexts wastes reads).
        """
        bs, slot_mapping, positions, chunks = self.block_size, [], [], []
        for span in spans:
            end = span.start + span.length
            if span.length < 1 or end > len(span.block_table) * bs:
                raise KVCacheError(f"a span of {span.length} tokens from position {span.start} needs "
                                   f"{-(-end // bs)} blocks but its block table has {len(span.block_table)}; "
                                   "give every scheduled token a slot before running the step.")
            for p in range(span.start, end):
                slot_mapping.append(span.block_table[p // bs] * bs + p % bs)
            positions.extend(range(span.start, end))
        num_decodes = next((i for i, span in enumerate(spans) if span.length != 1), len(spans))
        decode_groups = []
        for first, count in _decode_groups(spans[:num_decodes]):
            group = spans[first:first + count]
            lens = torch.tensor([s.start + 1 for s in group], device=self.device)
            context = context_slots(self._tables(group), bs, int(lens.max()))
            mask = context_mask(lens, 1, context.shape[1], self.keys[0].dtype)
            decode_groups.append(_DecodeGroup(first, count, context, mask))
        first = num_decodes
        for span in spans[num_decodes:]:
            end = span.start + span.length
            if span.start == 0:  # a fresh prompt (chunk): it only sees itself
                mask = causal_self_attention_mask(None, span.length, span.length, self.keys[0].dtype, self.device)
                chunks.append(_Chunk(first, span.length, None, mask))
            else:
                context = context_slots(self._tables([span]), bs, end)
                mask = context_mask(torch.tensor([end], device=self.device), span.length, end, self.keys[0].dtype)
                chunks.append(_Chunk(first, span.length, context, mask))
            first += span.length
        device = self.device
        decode_context = None
        if spans and num_decodes == len(spans):
            lengths = torch.tensor([span.start + 1 for span in spans], device=device)
            decode_context = context_slots(self._tables(spans), bs, int(lengths.max())), lengths
        self._plan = _StepPlan(torch.tensor(slot_mapping, device=device), torch.tensor(positions, device=device),
                               decode_groups, chunks, decode_context)
        return self._plan.positions

    def decode_context(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """When every span of the prepared step is a decode (one new token): each row's context as token slots
        [N, longest context] (entries past a row's length are arbitrary) and its length [N], new token included;
        else None. What a fused decode kernel reads instead of the grouped plan."""
        return None if self._plan is None else self._plan.decode_context

    def _tables(self, spans: list[Span]) -> torch.Tensor:
        width = max(len(s.block_table) for s in spans)
        return torch.tensor([s.block_table + [-1] * (width - len(s.block_table)) for s in spans],
                            device=self.device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate block src into block dst in every layer, for each (src, dst)."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for pool in self.keys + self.values:
            pool.index_copy_(0, dst, pool.index_select(0, src))

    # ----- the attention protocol (see lmforge.nn.attention) -----------------------------

    @property
    def length(self) -> int:
        raise InputError("a paged batch packs many sequences at different positions; pass position_ids "
                         "(returned by PagedKVCache.prepare) to the model.")

    def attention_mask(self, padding_mask, query_length, dtype, device) -> None:
        """None: the plan holds each sequence's own masks (a packed row has no single mask)."""
        if padding_mask is not None:
            raise InputError("a paged batch has no padding; call the model without attention_mask.")
        return None

    def advance(self, new_positions: int) -> None:
        """Nothing to do: positions come from the block tables of the next `prepare`."""

    def attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None, kernel, scale: float) -> torch.Tensor:
        """Write the step's keys/values [1, H_kv, N, d] to their slots, then attend q [1, H, N, d] per plan."""
        plan = self._plan
        if plan is None or q.shape[0] != 1 or q.shape[2] != plan.slot_mapping.shape[0]:
            raise KVCacheError(f"PagedKVCache.prepare planned {0 if plan is None else len(plan.slot_mapping)} "
                               f"tokens but the model got {q.shape[0]} x {q.shape[2]}; call prepare(spans) "
                               "before every step and pass the packed tokens as one row.")
        key_pool, value_pool = self.keys[layer], self.values[layer]
        slots(key_pool).index_copy_(0, plan.slot_mapping, keys[0].transpose(0, 1))
        slots(value_pool).index_copy_(0, plan.slot_mapping, values[0].transpose(0, 1))
        outputs = []
        for group in plan.decode_groups:
            rows = slice(group.first, group.first + group.count)
            decode_q = q[0, :, rows].transpose(0, 1).unsqueeze(2)  # [S, H, 1, d]
            needed = group.context.numel()
            if self._key_buffer.shape[0] < needed:
                self._key_buffer = self._key_buffer.new_empty((needed, *self._key_buffer.shape[1:]))
                self._value_buffer = self._value_buffer.new_empty((needed, *self._value_buffer.shape[1:]))
            k = gather_from_cache(key_pool, group.context, self._key_buffer)
            v = gather_from_cache(value_pool, group.context, self._value_buffer)
            out = kernel(decode_q, k, v, group.mask, scale)  # [S, H, 1, d]
            outputs.append(out.squeeze(2).transpose(0, 1).unsqueeze(0))
        for chunk in plan.chunks:
            rows = slice(chunk.first, chunk.first + chunk.length)
            if chunk.context is None:
                k, v = keys[:, :, rows], values[:, :, rows]
            else:
                k, v = gather_from_cache(key_pool, chunk.context), gather_from_cache(value_pool, chunk.context)
            outputs.append(kernel(q[:, :, rows], k, v, chunk.mask, scale))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _decode_groups(decodes: list[Span], max_groups: int = 4, min_group: int = 8) -> list[tuple[int, int]]:
    """Split consecutive decode spans (sorted by position) into up to `max_groups` runs of about equal
    size, none smaller than `min_group`: (first, count) of each."""
    groups = max(1, min(max_groups, len(decodes) // min_group))
    bounds = [round(i * len(decodes) / groups) for i in range(groups + 1)]
    return [(a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a]
