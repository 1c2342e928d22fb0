"""Multi-head attention: every token gathers information from the tokens it may see.

Each token's vector is projected into a query, a key and a value per head. A
query's dot products with all keys (scaled by 1/sqrt(head_dim), masked, softmaxed)
weight an average of the values; the heads' results are concatenated and mixed
by `o_proj`. Grouped-query attention (GQA) lets several query heads share one
key/value head (MHA: as many KV heads as query heads; MQA: a single KV head),
shrinking the KV cache. Cross-attention takes keys and values from the encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.nn.fusion import FusedProjections
from lmforge.nn.kernels import get_attention_kernel
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.positions import apply_rotary


class Attention(FusedProjections, nn.Module):
    """Self- or cross-attention with MHA/GQA/MQA, optional rotary positions and a pluggable kernel."""

    fused_groups = {"qkv": ("q_proj", "k_proj", "v_proj")}

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = False,
        dropout: float = 0.0,
        implementation: str = "sdpa",
    ):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ConfigError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}.")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.scale = self.head_dim ** -0.5
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias)
        self.layer_idx = 0  # position in the stack: which KV-cache slot is ours (set by the model)
        self.set_implementation(implementation)

    def set_implementation(self, name: str) -> None:
        """Switch the attention kernel ('eager', 'sdpa' or 'flash'); the weights are unchanged."""
        self.kernel = get_attention_kernel(name)
        self.implementation = name

    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, heads, self.head_dim).transpose(1, 2)  # [B, heads, T, d]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_value_states: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, T, D] → [B, T, D]. `key_value_states` switches to cross-attention.

        With a `kv_cache` (contiguous `KVCache` or paged `PagedKVCache`), self-attention hands this
        step's keys/values to the cache, which stores them and attends over everything it holds;
        cross-attention computes the encoder's keys/values once and reuses them.
        """
        dropout = self.dropout if self.training else 0.0
        if key_value_states is not None:
            q = self._split_heads(self.q_proj(hidden_states), self.num_heads)
            k, v = self._cross_keys_values(key_value_states, kv_cache)
            out = self.kernel(q, k, v, attention_mask, self.scale, dropout)
        elif kv_cache is not None:  # the cache stores this step's keys/values and attends over all it holds
            q, k, v = self._self_queries_keys_values(hidden_states, rotary)
            out = kv_cache.attend(self.layer_idx, q, k, v, attention_mask, self.kernel, self.scale)
        else:
            q, k, v = self._self_queries_keys_values(hidden_states, rotary)
            out = self.kernel(q, k, v, attention_mask, self.scale, dropout)
        batch, _, length, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))

    def _self_queries_keys_values(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None):
        """q [B, H, T, d], k and v [B, H_kv, T, d] for self-attention, q and k rotated.

        Fused (inference), q, k and v come side by side from one matmul and q and k are rotated
        together: the fewest operations per decoded token. Unfused (training), each has its own
        matmul, so no copy joins them forward or splits their gradients backward.
        """
        qkv = self.fused_output("qkv", x)
        if qkv is None:
            q = self._split_heads(self.q_proj(x), self.num_heads)
            k = self._split_heads(self.k_proj(x), self.num_kv_heads)
            v = self._split_heads(self.v_proj(x), self.num_kv_heads)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            return q, k, v
        batch, length, _ = qkv.shape
        heads = self.num_heads + self.num_kv_heads  # query heads, then key heads
        qkv = qkv.view(batch, length, heads + self.num_kv_heads, self.head_dim).transpose(1, 2)
        qk, v = qkv[:, :heads], qkv[:, heads:]
        if rotary is not None:
            qk = apply_rotary(qk, *rotary)
        return qk[:, :self.num_heads], qk[:, self.num_heads:], v

    def _cross_keys_values(self, encoder_states: torch.Tensor, kv_cache: KVCache | None):
        cached = kv_cache.cross[self.layer_idx] if kv_cache is not None else None
        if cached is None:
            cached = (self._split_heads(self.k_proj(encoder_states), self.num_kv_heads),
                      self._split_heads(self.v_proj(encoder_states), self.num_kv_heads))
            if kv_cache is not None:
                kv_cache.cross[self.layer_idx] = cached
        return cached
