"""Transformer building blocks, one concept per module."""

from lmforge.nn.attention import Attention
from lmforge.nn.block import TransformerBlock
from lmforge.nn.embedding import TokenEmbedding
from lmforge.nn.feedforward import MLP, GatedMLP
from lmforge.nn.masks import build_attention_mask
from lmforge.nn.norm import LayerNorm, RMSNorm
from lmforge.nn.positions import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
)

__all__ = [
    "Attention", "TransformerBlock", "TokenEmbedding", "MLP", "GatedMLP", "build_attention_mask",
    "LayerNorm", "RMSNorm", "LearnedPositionalEmbedding", "RotaryEmbedding", "SinusoidalPositionalEmbedding",
]
