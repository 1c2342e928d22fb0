"""The transformer block: attention and feed-forward, each wrapped in residual + norm.

Pre-norm (GPT-2, Llama): x + sublayer(norm(x)) — the residual stream is never
normalised, which keeps deep stacks stable. Post-norm (original Transformer,
BERT, BART): norm(x + sublayer(x)). Decoders of encoder–decoder models insert
cross-attention over the encoder output between the two.

Gradient checkpointing (`gradient_checkpointing = True`, set for a whole model with
`PreTrainedModel.set_gradient_checkpointing`) trades compute for memory in training: a
block keeps only its input for the backward pass and recomputes its activations then,
so activation memory grows with the number of blocks, not with everything inside them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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
        self.gradient_checkpointing = False

    def _input(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """What a sublayer reads: the normalised stream (pre-norm) or the stream itself (post-norm)."""
        return norm(x) if self.pre_norm else x

    def _merge(self, x: torch.Tensor, out: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """Add a sublayer's output back to the residual stream (then normalise, for post-norm)."""
        if self.training and self.dropout.p:
            out = self.dropout(out)
        return x + out if self.pre_norm else norm(x + out)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        encoder_states: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None:
            # Recompute in backward; the RNG state is replayed, so dropout masks are the same both times.
            return checkpoint(self._forward, x, attention_mask, rotary, encoder_states, encoder_mask, None,
                              use_reentrant=False)
        return self._forward(x, attention_mask, rotary, encoder_states, encoder_mask, kv_cache)

    def _forward(self, x, attention_mask, rotary, encoder_states, encoder_mask, kv_cache) -> torch.Tensor:
        out = self.self_attn(self._input(x, self.attn_norm), attention_mask, rotary, kv_cache=kv_cache)
        x = self._merge(x, out, self.attn_norm)
        if self.cross_attn is not None:
            out = self.cross_attn(self._input(x, self.cross_attn_norm), encoder_mask,
                                  key_value_states=encoder_states, kv_cache=kv_cache)
            x = self._merge(x, out, self.cross_attn_norm)
        return self._merge(x, self.mlp(self._input(x, self.mlp_norm)), self.mlp_norm)

def number_layers(layers: nn.ModuleList) -> None:
    """Tell each block's attention modules their layer index (their slot in a KV cache)."""
    for index, layer in enumerate(layers):
        layer.self_attn.layer_idx = index
        if layer.cross_attn is not None:
            layer.cross_attn.layer_idx = index
