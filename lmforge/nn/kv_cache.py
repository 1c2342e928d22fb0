"""KV cache: remember every past token's keys and values so each step runs only the new token.

Without a cache, generating token t recomputes attention inputs for all t-1
previous tokens. With one, each layer appends the new token's key/value to a
buffer and attends over the buffer. The buffers are allocated once, at their
final size, so decoding never re-allocates or copies the past.
Encoder–decoder models also keep the cross-attention keys/values of the encoder
output, computed once per request.
"""

from __future__ import annotations

import torch

from lmforge.errors import InputError
from lmforge.nn.masks import causal_self_attention_mask


class KVCache:
    """Preallocated keys/values [batch, kv_heads, max_length, head_dim] per layer; `length` positions are filled."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        # Uninitialised on purpose: a position is always written before any query reads it.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.max_length = max_length
        self.length = 0  # positions already stored (the same for every layer between forward passes)

    @classmethod
    def for_model(cls, model, batch_size: int, max_length: int) -> "KVCache":
        """A cache shaped for `model`'s decoder self-attention layers, with room for `max_length` tokens
        after the model's virtual tokens (if it has any)."""
        attention = model.decoder_attention_layers()
        first = attention[0]
        return cls(len(attention), batch_size, first.num_kv_heads, first.head_dim,
                   max_length + getattr(model, "num_virtual_tokens", 0), dtype=model.dtype, device=model.device)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys/values for `layer`; return all positions so far (views, no copy)."""
        start, new = self.length, keys.shape[2]
        self.check_room(new)
        self.keys[layer][:, :, start:start + new] = keys
        self.values[layer][:, :, start:start + new] = values
        return self.keys[layer][:, :, :start + new], self.values[layer][:, :, :start + new]

    def check_room(self, new_positions: int) -> None:
        """Raise a clear error if `new_positions` more positions do not fit."""
        if self.length + new_positions > self.max_length:
            raise InputError(f"KV cache holds {self.max_length} positions but {self.length + new_positions} are "
                             "needed; allocate a larger cache (max_length) or generate fewer tokens.")

    def attention_mask(self, padding_mask: torch.Tensor | None, query_length: int, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor | None:
        """The causal + padding mask of `query_length` new positions over the cached ones and themselves.

        `padding_mask` [B, length + query_length] covers the cached positions too.
        """
        return causal_self_attention_mask(padding_mask, query_length, self.length + query_length, dtype, device)

    def attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None, kernel, scale: float) -> torch.Tensor:
        """Store the new keys/values, then attend the queries over every cached position."""
        keys, values = self.update(layer, keys, values)
        return kernel(q, keys, values, mask, scale)

    def advance(self, new_positions: int) -> None:
        """Called by the model after every layer has stored `new_positions` positions."""
        self.length += new_positions

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) batch rows: drop finished sequences, or follow beams to their parents."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.cross = [None if kv is None else (kv[0].index_select(0, rows), kv[1].index_select(0, rows))
                      for kv in self.cross]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)


class GrowingKVCache(KVCache):
    """Keys/values kept by concatenation instead of preallocated buffers: unbounded and differentiable.

    Gradients flow through what it holds, so training can use it to attend over learned
    positions that precede the input (prefix and prompt tuning put their virtual tokens here).
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.cross = [None] * num_layers
        self.max_length = None
        self.length = 0

    @classmethod
    def for_model(cls, model, batch_size: int = 0, max_length: int = 0) -> "GrowingKVCache":
        return cls(len(model.decoder_attention_layers()))

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            keys = torch.cat([self.keys[layer], keys], dim=2)
            values = torch.cat([self.values[layer], values], dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values

    def select(self, rows: torch.Tensor) -> None:
        self.keys = [None if k is None else k.index_select(0, rows) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, rows) for v in self.values]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys if k is not None)
