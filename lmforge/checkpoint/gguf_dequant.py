"""Dequantize GGUF tensors: llama.cpp's block formats decoded to float32 with torch.

Quantized weights are stored in blocks: a few scales (and minimums) in fp16
plus small integer codes, e.g. Q4_1 packs 32 weights as one fp16 scale d, one
fp16 minimum m and 32 4-bit codes q, each weight being d * q + m. K-quants nest
blocks in 256-weight super-blocks whose sub-block scales are themselves quantized.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmforge.errors import CheckpointError, UnsupportedError

QK_K = 256  # weights per K-quant super-block


class UnsupportedTensorTypeError(CheckpointError, UnsupportedError):
    """A GGUF tensor is stored in a block format lmforge cannot decode."""

# Dequantization: one function per block format.
# Each takes `blocks`, a uint8 tensor of shape (n_blocks, bytes_per_block), and
# returns float32 weights of shape (n_blocks, weights_per_block). All multi-byte
# fields are little-endian. Within a 32-weight group ggml packs two 4-bit values
# per byte as "all low nibbles first, then all high nibbles".
# --------------------------------------------------------------------------- #


def _f16(field: torch.Tensor) -> torch.Tensor:
    """Two bytes per row -> one fp16 value per row, widened to float32, shape (n, 1)."""
    return field.contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2k) 4-bit values: the k low nibbles, then the k high nibbles."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., k, 8) single bits, least significant first."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(-1) >> shifts) & 1


def _crumbs(packed: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 4, k) 2-bit values: bits 0-1 of every byte, then 2-3, 4-5, 6-7."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(4, 1)
    return (packed.unsqueeze(-2) >> shifts) & 3


def dequantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    """F32: plain IEEE float32, 4 bytes per weight."""
    return blocks.contiguous().view(torch.float32)


def dequantize_f16(blocks: torch.Tensor) -> torch.Tensor:
    """F16: IEEE half precision, 2 bytes per weight."""
    return _f16(blocks)


def dequantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    """BF16: bfloat16 (the top half of a float32), 2 bytes per weight."""
    return blocks.contiguous().view(torch.bfloat16).float()


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0, 34 bytes per 32 weights: fp16 scale d, then 32 int8 q. w = d * q."""
    d = _f16(blocks[:, :2])
    q = blocks[:, 2:].contiguous().view(torch.int8)
    return d * q


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0, 18 bytes per 32 weights: fp16 scale d, 16 bytes of 4-bit q. w = d * (q - 8)."""
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:]).float()
    return d * (q - 8)


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1, 20 bytes per 32 weights: fp16 scale d, fp16 minimum m, 16 bytes of 4-bit q. w = d * q + m."""
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:]).float()
    return d * q + m


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_0, 22 bytes per 32 weights: fp16 scale d, 4 bytes holding bit 4 of each q
    (bit j for weight j), 16 bytes of low 4-bit q. w = d * (q - 16)."""
    d = _f16(blocks[:, :2])
    high = _bits(blocks[:, 2:6]).reshape(-1, 32)
    q = (_nibbles(blocks[:, 6:]) | (high << 4)).float()
    return d * (q - 16)


def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_1, 24 bytes per 32 weights: fp16 scale d, fp16 minimum m, 4 bytes of high
    bits, 16 bytes of low 4-bit q (as Q5_0). w = d * q + m."""
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    high = _bits(blocks[:, 4:8]).reshape(-1, 32)
    q = (_nibbles(blocks[:, 8:]) | (high << 4)).float()
    return d * q + m


def _k_scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte field of Q4_K/Q5_K into 8 six-bit scales and 8 six-bit mins.

    Bytes 0-3 hold scales 0-3, bytes 4-7 mins 0-3 (low 6 bits each); their top 2 bits
    are the high bits of scales/mins 4-7, whose low 4 bits sit in bytes 8-11
    (scale in the low nibble, min in the high nibble).
    """
    low_sc, low_mn, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([low_sc & 63, (rest & 0x0F) | ((low_sc >> 6) << 4)], dim=-1)
    mins = torch.cat([low_mn & 63, (rest >> 4) | ((low_mn >> 6) << 4)], dim=-1)
    return scales.float(), mins.float()


def dequantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q2_K, 84 bytes per 256 weights in 16 groups of 16: 16 bytes of 4-bit group
    scale (low nibble) and min (high nibble), 64 bytes of 2-bit q, fp16 d, fp16 dmin.
    The q bytes form two halves of 32; each half yields 4 runs of 32 weights, from
    bits 0-1, 2-3, 4-5, 6-7. w = d * scale * q - dmin * min."""
    n = blocks.shape[0]
    packed_scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    scale = (d * (packed_scales & 0x0F).float()).unsqueeze(-1)
    offset = (dmin * (packed_scales >> 4).float()).unsqueeze(-1)
    q = _crumbs(qs.reshape(n, 2, 32)).reshape(n, 16, 16).float()
    return (scale * q - offset).reshape(n, QK_K)


def dequantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q3_K, 110 bytes per 256 weights in 16 groups of 16: 32 bytes of high bits
    (bit k of byte l belongs to weight 32k + l), 64 bytes of low 2-bit q (laid out as
    Q2_K), 12 bytes of 6-bit signed group scales, fp16 d. q = low - (4 if the high
    bit is 0 else 0); w = d * (scale - 32) * q."""
    n = blocks.shape[0]
    hmask, qs, packed_scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    # Scale i: low 4 bits from byte i % 8 (low nibble for i < 8, high for i >= 8),
    # high 2 bits from byte 8 + i % 4 at bit position 2 * (i // 4).
    low = torch.cat([packed_scales[:, :8] & 0x0F, packed_scales[:, :8] >> 4], dim=-1)
    high = _crumbs(packed_scales[:, 8:12]).reshape(n, 16)
    scale = d * ((low | (high << 4)).float() - 32)
    high_bit = _bits(hmask).transpose(1, 2).reshape(n, QK_K)
    low_q = _crumbs(qs.reshape(n, 2, 32)).reshape(n, QK_K)
    q = low_q.float() - 4 * (1 - high_bit.float())
    return (scale.unsqueeze(-1) * q.reshape(n, 16, 16)).reshape(n, QK_K)


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K, 144 bytes per 256 weights in 8 groups of 32: fp16 d, fp16 dmin, 12 bytes
    of 6-bit group scales and mins, 128 bytes of 4-bit q in 4 chunks of 32 bytes (low
    nibbles = group 2c, high nibbles = group 2c + 1). w = d * scale * q - dmin * min."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return ((d * scales).unsqueeze(-1) * q - (dmin * mins).unsqueeze(-1)).reshape(n, QK_K)


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K, 176 bytes per 256 weights: as Q4_K plus 32 bytes of fifth bits, inserted
    after the scales (bit g of byte l is the high bit of weight l in group g)."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    high = _bits(blocks[:, 16:48]).transpose(1, 2)
    low = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    q = (low | (high << 4)).float()
    return ((d * scales).unsqueeze(-1) * q - (dmin * mins).unsqueeze(-1)).reshape(n, QK_K)


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K, 210 bytes per 256 weights in 16 groups of 16: 128 bytes of low 4 bits,
    64 bytes of high 2 bits, 16 int8 group scales, fp16 d. Each half of 128 weights
    uses 64 low bytes (low nibbles -> weights 0-63, high -> 64-127) and 32 high bytes
    (bits 0-1, 2-3, 4-5, 6-7 -> weights 0-31, 32-63, 64-95, 96-127).
    w = d * scale * (q - 32)."""
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks[:, 208:210])
    low = _nibbles(ql.reshape(n, 2, 64))
    high = _crumbs(qh.reshape(n, 2, 32)).reshape(n, 2, 128)
    q = (low | (high << 4)).float() - 32
    return ((d * scales).unsqueeze(-1) * q.reshape(n, 16, 16)).reshape(n, QK_K)


def dequantize_q8_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_K, 292 bytes per 256 weights: fp32 scale d, 256 int8 q, then 16 int16 group
    sums (used only by dot-product kernels). w = d * q."""
    d = blocks[:, :4].contiguous().view(torch.float32)
    q = blocks[:, 4:260].contiguous().view(torch.int8)
    return d * q


@dataclass(frozen=True)
class QuantFormat:
    """How a GGUF tensor type is stored: weights and bytes per block, and its decoder."""

    block_size: int
    type_size: int
    dequantize: Callable[[torch.Tensor], torch.Tensor]


QUANT_FORMATS: dict[str, QuantFormat] = {
    "F32": QuantFormat(1, 4, dequantize_f32),
    "F16": QuantFormat(1, 2, dequantize_f16),
    "BF16": QuantFormat(1, 2, dequantize_bf16),
    "Q8_0": QuantFormat(32, 34, dequantize_q8_0),
    "Q4_0": QuantFormat(32, 18, dequantize_q4_0),
    "Q4_1": QuantFormat(32, 20, dequantize_q4_1),
    "Q5_0": QuantFormat(32, 22, dequantize_q5_0),
    "Q5_1": QuantFormat(32, 24, dequantize_q5_1),
    "Q2_K": QuantFormat(QK_K, 84, dequantize_q2_k),
    "Q3_K": QuantFormat(QK_K, 110, dequantize_q3_k),
    "Q4_K": QuantFormat(QK_K, 144, dequantize_q4_k),
    "Q5_K": QuantFormat(QK_K, 176, dequantize_q5_k),
    "Q6_K": QuantFormat(QK_K, 210, dequantize_q6_k),
    "Q8_K": QuantFormat(QK_K, 292, dequantize_q8_k),
}


def dequantize(raw: torch.Tensor, type_name: str, shape: Sequence[int]) -> torch.Tensor:
    """Decode the raw bytes of one GGUF tensor of `type_name` into float32 of torch `shape`."""
    fmt = QUANT_FORMATS.get(type_name)
    if fmt is None:
        raise UnsupportedTensorTypeError(
            f"GGUF tensor type {type_name} is not supported; lmforge decodes {', '.join(QUANT_FORMATS)}. "
            "Use a GGUF quantized with one of those types."
        )
    n_weights = math.prod(shape)
    if n_weights % fmt.block_size:
        raise CheckpointError(
            f"a {type_name} tensor of shape {tuple(shape)} does not fill whole blocks of "
            f"{fmt.block_size} weights; the file is corrupt, re-convert it."
        )
    expected = n_weights // fmt.block_size * fmt.type_size
    raw = raw.reshape(-1)
    if raw.numel() != expected:
        raise CheckpointError(
            f"a {type_name} tensor of shape {tuple(shape)} needs {expected} bytes but has {raw.numel()}; "
            "the file is truncated or corrupt, download or convert it again."
        )
    return fmt.dequantize(raw.view(-1, fmt.type_size)).reshape(tuple(shape))
