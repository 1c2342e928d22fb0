"""Positional encodings: how a model knows where each token sits.

Attention by itself is order-blind. Three classic fixes:
- learned absolute positions (GPT-2, BERT, BART): a trainable vector per position;
- sinusoidal positions (the original Transformer): fixed sin/cos of the position
  at geometrically spaced frequencies;
- rotary embeddings (RoPE, Llama): rotate each (query, key) channel pair by an
  angle proportional to the position, so q·k depends only on relative distance.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lmforge.errors import InputError, UnsupportedError


def check_max_positions(position_ids: torch.Tensor, max_positions: int) -> None:
    """Raise a clear error instead of an index error when inputs are too long."""
    if position_ids.numel() and int(position_ids.max()) >= max_positions:
        raise InputError(
            f"input needs position {int(position_ids.max())} but the model supports at most "
            f"{max_positions} positions; shorten the input (truncate the prompt or history)."
        )


def default_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         past_length: int = 0) -> torch.Tensor:
    """Positions of the new tokens `input_ids` [B, T] (or their embeddings [B, T, D]), counting real
    tokens only.

    With left padding a prompt still starts at position 0. `attention_mask` covers the
    cached past and the new tokens ([B, past_length + T]). A mask that numbers packed
    examples (1, 1, 2, 2, 2, 0; see lmforge.nn.masks) starts each example at position 0.
    """
    batch, length = input_ids.shape[:2]
    if attention_mask is None:
        positions = torch.arange(past_length, past_length + length, device=input_ids.device)
        return positions.expand(batch, -1)
    count = (attention_mask > 0).long().cumsum(-1)  # real tokens so far
    if bool(attention_mask.max() > 1):  # packed: count from the first token of each example
        starts = torch.ones_like(attention_mask, dtype=torch.bool)
        starts[:, 1:] = attention_mask[:, 1:] != attention_mask[:, :-1]
        count = count - torch.where(starts, count - 1, 0).cummax(-1).values
    return (count - 1).clamp(min=0)[:, -length:]


class LearnedPositionalEmbedding(nn.Embedding):
    """A trainable vector per position. `offset` reproduces BART's 2 reserved rows."""

    def __init__(self, max_positions: int, dim: int, offset: int = 0):
        super().__init__(max_positions + offset, dim)
        self.max_positions = max_positions
        self.offset = offset

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        check_max_positions(position_ids, self.max_positions)
        return super().forward(position_ids + self.offset)


class SinusoidalPositionalEmbedding(nn.Module):
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)). Not trained."""

    def __init__(self, max_positions: int, dim: int, base: float = 10000.0):
        super().__init__()
        self.max_positions = max_positions
        position = torch.arange(max_positions, dtype=torch.float32)[:, None]
        inv_freq = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        table = torch.zeros(max_positions, dim)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        check_max_positions(position_ids, self.max_positions)
        return self.table[position_ids]


def rotary_inverse_frequencies(head_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Per channel-pair rotation speed theta_i = base^(-2i/d), optionally rescaled.

    Scaling stretches the usable context: `linear` divides every frequency by
    `factor` (position interpolation); `llama3` leaves high frequencies alone,
    divides low ones by `factor` and blends smoothly in between (Llama 3.1).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
        wavelength = 2 * math.pi / inv_freq
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        is_medium = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(is_medium, blended, scaled)
    raise UnsupportedError(f"rope scaling type {kind!r} is not supported; use one of: default, linear, llama3.")


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) for given positions; `apply_rotary` rotates q and k with them.

    Channels are paired as (i, i + d/2) — the "rotate half" layout of HF Llama. The sine is
    returned with its first half negated, so a rotation is x*cos + swap_halves(x)*sin.
    """

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0,
                 scaling: dict[str, Any] | None = None):
        super().__init__()
        self.max_positions = max_positions
        self.register_buffer("inv_freq", rotary_inverse_frequencies(head_dim, base, scaling), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        check_max_positions(position_ids, self.max_positions)
        angles = position_ids[..., None].float() * self.inv_freq  # [B, T, d/2]
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)  # [B, T, d]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, d] by the angles of `RotaryEmbedding`: each pair (x_i, x_{i+d/2}) turns by theta.

    (x1, x2) → (x1 cos - x2 sin, x2 cos + x1 sin), written as x*cos + (x2, x1)*(-sin, sin).
    """
    swapped = x.roll(x.shape[-1] // 2, dims=-1)  # (x2, x1)
    return x * cos[:, None] + swapped * signed_sin[:, None]
