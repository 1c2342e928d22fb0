"""The transformer block: attention and feed-forward, each wrapped in residual + norm.

Pre-norm (GPT-2, Llama): x + sublayer(norm(x)) — the residual stream is never
normalised, which keeps deep stacks stable. Post-norm (original Transformer,
BERT, BART): norm(x + sublayer(x)). Decoders of encoder–decoder models insert
cross-attention over the encoder output between the two.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.nn.attention import Attention
from lmforge.nn.kv_cache import KVCache


class TransformerBlock(nn.Module):
    def __init__(
        self,
        self_attn: Attention,
        mlp: nn.Module,
        attn_norm: nn.Module,
        mlp_norm: nn.Module,
        pre_norm: bool = True,
        cross_attn: Attention | None = None,
        cross_attn_norm: nn.Module | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.self_attn, self.attn_norm = self_attn, attn_norm
        self.cross_attn, self.cross_attn_norm = cross_attn, cross_attn_norm
        self.mlp, self.mlp_norm = mlp, mlp_norm
        self.pre_norm = pre_norm
        self.dropout = nn.Dropout(dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module, sublayer) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        encoder_states: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = self._residual(x, self.attn_norm, lambda h: self.self_attn(h, attention_mask, rotary, kv_cache=kv_cache))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_attn_norm, lambda h: self.cross_attn(
                h, encoder_mask, key_value_states=encoder_states, kv_cache=kv_cache))
        return self._residual(x, self.mlp_norm, self.mlp)


def number_layers(layers: nn.ModuleList) -> None:
    """Tell each block's attention modules their layer index (their slot in a KV cache)."""
    for index, layer in enumerate(layers):
        layer.self_attn.layer_idx = index
        if layer.cross_attn is not None:
            layer.cross_attn.layer_idx = index
