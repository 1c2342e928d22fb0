"""Quantize tensors into GGUF storage types: F32, F16 and llama.cpp's Q8_0 and Q4_0 blocks.

The inverse of `gguf_dequant`. A block format cuts the flattened weights into runs of 32
and stores each run as one fp16 scale d plus 32 small integers q, the weight being d * q:
Q8_0 keeps q in [-127, 127] (d = absmax / 127); Q4_0 keeps 4-bit codes with an offset of 8,
w = d * (q - 8), and takes d = (the value of largest magnitude) / -8, so that value lands
exactly on the code 0. Rounding follows llama.cpp's reference code bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lmforge.checkpoint.gguf_dequant import QUANT_FORMATS
from lmforge.errors import UnsupportedError

BLOCK = 32  # weights per Q8_0 / Q4_0 block
SLICE_BLOCKS = 16384  # blocks encoded at once (2 MB of float32 weights)


def _blocks(weights: torch.Tensor, type_name: str) -> torch.Tensor:
    """Flatten to float32 rows of 32 weights, failing when the last dimension does not split evenly."""
    if weights.dim() == 0 or weights.shape[-1] % BLOCK:
        raise UnsupportedError(
            f"{type_name} packs rows in blocks of {BLOCK} weights, but this tensor's last dimension is "
            f"{tuple(weights.shape)[-1:]}; store it as F16 or F32 instead."
        )
    return weights.detach().to(torch.float32).reshape(-1, BLOCK)


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, with 0 where the scale is 0 (an all-zero block stores all-zero codes)."""
    return torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero), exact: floor(|x| + 0.5) would round 0.49999997 up in fp32.

    |x| = whole + fraction, and floor(2 * fraction) is 1 exactly when fraction >= 0.5.
    Steps run in place on two temporaries: on large tensors allocation costs as much as arithmetic.
    """
    magnitude = values.abs()
    whole = magnitude.floor()
    return magnitude.sub_(whole).mul_(2).floor_().add_(whole).copysign_(values)


def _fp16_bytes(scale: torch.Tensor) -> torch.Tensor:
    """(n, 1) float32 scales -> (n, 2) little-endian fp16 bytes."""
    return scale.to(torch.float16).view(torch.uint8)


def quantize_f32(weights: torch.Tensor) -> torch.Tensor:
    """F32: the IEEE float32 bytes, 4 per weight."""
    return weights.detach().to(torch.float32).contiguous().reshape(-1).view(torch.uint8)


def quantize_f16(weights: torch.Tensor) -> torch.Tensor:
    """F16: each weight rounded to the nearest fp16 (values beyond ±65504 become ±inf)."""
    return weights.detach().to(torch.float16).contiguous().reshape(-1).view(torch.uint8)


def _q8_0_blocks(blocks: torch.Tensor) -> torch.Tensor:
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    codes = _round_half_away(blocks * _inverse(scale)).to(torch.int8)
    return torch.cat([_fp16_bytes(scale), codes.view(torch.uint8)], dim=1)


def _q4_0_blocks(blocks: torch.Tensor) -> torch.Tensor:
    largest = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
    scale = largest / -8
    # llama.cpp: (int8_t)(w / d + 8.5f) truncates, i.e. rounds half up; values past 15 are clamped.
    codes = (blocks * _inverse(scale)).add_(8.5).trunc_().clamp_(0, 15).to(torch.uint8)
    packed = codes[:, : BLOCK // 2] | (codes[:, BLOCK // 2:] << 4)
    return torch.cat([_fp16_bytes(scale), packed], dim=1)


def _in_slices(encode: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor, type_name: str) -> torch.Tensor:
    """Encode the blocks a slice at a time: each step's temporaries (a few MB) then stay in the CPU's
    cache instead of streaming the whole tensor through memory a dozen times."""
    blocks = _blocks(weights, type_name)
    out = torch.empty(blocks.shape[0], QUANT_FORMATS[type_name].type_size, dtype=torch.uint8)
    for start in range(0, blocks.shape[0], SLICE_BLOCKS):
        out[start:start + SLICE_BLOCKS] = encode(blocks[start:start + SLICE_BLOCKS])
    return out.reshape(-1)


def quantize_q8_0(weights: torch.Tensor) -> torch.Tensor:
    """Q8_0, 34 bytes per block: fp16 d = absmax / 127, then 32 int8 q = round(w / d)."""
    return _in_slices(_q8_0_blocks, weights, "Q8_0")


def quantize_q4_0(weights: torch.Tensor) -> torch.Tensor:
    """Q4_0, 18 bytes per block: fp16 d, then 16 bytes of 4-bit codes q = clamp(round(w / d) + 8, 0, 15).

    d = max / -8, where max is the block's value of largest magnitude with its sign (the first
    one on a tie). Byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
    """
    return _in_slices(_q4_0_blocks, weights, "Q4_0")


QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": quantize_f32,
    "F16": quantize_f16,
    "Q8_0": quantize_q8_0,
    "Q4_0": quantize_q4_0,
}


def quantize(weights: torch.Tensor, type_name: str) -> torch.Tensor:
    """Encode `weights` (any shape, row-major) as GGUF `type_name`: a flat uint8 tensor of its stored bytes."""
    if type_name not in QUANTIZERS:
        raise UnsupportedError(f"lmforge cannot write GGUF tensors as {type_name}; it writes "
                               f"{', '.join(QUANTIZERS)}. Pick one of those.")
    return QUANTIZERS[type_name](weights)


def stored_bytes(shape: tuple[int, ...], type_name: str) -> int:
    """How many bytes a tensor of `shape` takes when stored as `type_name`."""
    fmt = QUANT_FORMATS[type_name]
    return math.prod(shape) // fmt.block_size * fmt.type_size
