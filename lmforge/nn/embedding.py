"""Token embedding: a lookup table from token id to a learned vector.

`scale` multiplies the vectors (BART/T5-style models scale by sqrt(d_model) so
embeddings and positional encodings start at comparable magnitudes).
"""

import torch
from torch import nn

from lmforge.errors import InputError


class TokenEmbedding(nn.Embedding):
    """nn.Embedding that checks ids are in range and can scale its output."""

    def __init__(self, vocab_size: int, dim: int, padding_idx: int | None = None, scale: float = 1.0):
        super().__init__(vocab_size, dim, padding_idx=padding_idx)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.num_embeddings):
            raise InputError(
                f"token id out of range: ids must lie in [0, {self.num_embeddings}) but got "
                f"min={int(input_ids.min())}, max={int(input_ids.max())}; use the model's own tokenizer."
            )
        out = super().forward(input_ids)
        return out * self.scale if self.scale != 1.0 else out


def embed_inputs(embed_tokens: nn.Module, input_ids: torch.Tensor | None,
                 inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    """The token vectors a backbone starts from: `embed_tokens(input_ids)`, or `inputs_embeds` [B, T, D]
    given instead (soft prompts, or vectors from another model)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("pass exactly one of input_ids (token ids) and inputs_embeds (vectors [batch, length, "
                         f"dim]); got {'both' if input_ids is not None else 'neither'}.")
    return embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
