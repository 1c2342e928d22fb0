"""int4 weights stored as 16-row tiles, multiplied with AVX-512 VNNI.

The row-at-a-time kernels of `kernels` read each weight row as three streams (codes, scales,
offsets) and spend most of their instructions on per-row bookkeeping: every 32-weight block ends
in a vector to scale, every row in a horizontal sum. Where the CPU has AVX-512 VNNI
(`nn.kernels.avx512`), an int4 `QuantizedLinear` instead keeps its weight in this module's tile
layout, as llama.cpp repacks its weights at load: the arithmetic handles 16 rows per instruction
(one `vpdpbusd` multiplies 16 rows by four broadcast activation bytes), a tile's 16 sums land in
the lanes ready to scale and store, and each tile is one contiguous stream. This is the layout the
module holds — not a second copy — and it converts back to the format's own tensors
(`Int4Tiles.to_weight`) for saving, dequantizing and any other device.

Layout: rows in tiles of 16; each tile holds its scale groups (`group_size` columns) in turn, and
each group is a record of

- group_size / 32 blocks of 256 bytes: four runs of 64 bytes, run j holding, for each of the 16 rows
  in turn, that row's bytes 4j..4j+3 of the block's 16 packed bytes (columns 4j..4j+3 in the low
  nibbles, 16+4j..19+4j in the high ones, the order of `formats.pack_nibbles`);
- the 16 rows' scales, then their 16 offsets: float16 where every scale and offset is a float16 value
  (GGUF's Q4_1/Q4_0 blocks: 20 bytes per 32 weights, as in the file), else float32.

A product multiplies int8-rounded activations (`kernels._round_activations`), as the row kernels do,
and equals theirs up to the order of float additions. Several activation rows (a prompt) share each
block's unpacked codes four rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmforge.nn.kernels import avx512
from lmforge.nn.kernels.jit import jit
from lmforge.quant.formats import Int4Weight, QuantizedWeight

TILE_ROWS = avx512.TILE_ROWS
BLOCK_BYTES = 256  # one 16-row x 32-column block of codes


def supports(rows: int) -> bool:
    """Whether a weight with `rows` output rows can be tiled here: VNNI present and whole tiles."""
    return avx512.vnni_available() and rows % TILE_ROWS == 0


def _exact_in_half(values: torch.Tensor) -> bool:
    return bool(torch.equal(values.half().float(), values))


@dataclass
class Int4Tiles:
    """An int4 weight in tile layout: `tiles` uint8 [rows / 16, groups * record bytes]."""

    tiles: torch.Tensor
    shape: tuple[int, int]
    group_size: int
    half: bool  # scales and offsets stored as float16 (else float32)

    @staticmethod
    def suits(weight: QuantizedWeight) -> bool:
        """Whether `weight` is best held as tiles here: int4 on the CPU, whole tiles, and a CPU with VNNI."""
        return (isinstance(weight, Int4Weight) and weight.packed.device.type == "cpu"
                and supports(weight.shape[0]))

    @classmethod
    def from_weight(cls, weight: Int4Weight) -> Int4Tiles:
        rows, cols = weight.shape
        count, groups, blocks = rows // TILE_ROWS, cols // weight.group_size, weight.group_size // 32
        half = _exact_in_half(weight.scale) and _exact_in_half(weight.offset)
        words = weight.packed.contiguous().view(torch.int32)  # row n's packed bytes, four per word: [rows, cols / 8]
        codes = words.view(count, TILE_ROWS, groups, blocks, 4).permute(0, 2, 3, 4, 1)  # [tile, group, block, run, row]
        parts = [codes.reshape(count, groups, blocks * 4 * TILE_ROWS).view(torch.uint8)]
        for values in (weight.scale, weight.offset):
            values = values.half() if half else values.float()
            parts.append(values.reshape(count, TILE_ROWS, groups).transpose(1, 2).contiguous().view(torch.uint8))
        return cls(torch.cat(parts, dim=-1).view(count, -1), (rows, cols), weight.group_size, half)

    def to_weight(self) -> Int4Weight:
        """The format's own tensors (row layout), a new copy."""
        rows, cols = self.shape
        count, groups, blocks = rows // TILE_ROWS, cols // self.group_size, self.group_size // 32
        records = self.tiles.view(count, groups, -1)
        codes_end, width = blocks * BLOCK_BYTES, 2 if self.half else 4
        codes = records[..., :codes_end].contiguous().view(torch.int32).view(count, groups, blocks, 4, TILE_ROWS)
        packed = codes.permute(0, 4, 1, 2, 3).reshape(rows, cols // 8).contiguous().view(torch.uint8)
        scale_and_offset = []
        for start in (codes_end, codes_end + TILE_ROWS * width):
            values = records[..., start:start + TILE_ROWS * width].contiguous()
            values = values.view(torch.float16 if self.half else torch.float32).float()
            scale_and_offset.append(values.transpose(1, 2).reshape(rows, groups).contiguous())
        return Int4Weight(packed, *scale_and_offset, self.group_size)


@jit(inline=True)
def _group_scales(tiles, at, half):
    """A group record's 16 scales and 16 offsets, starting at byte `at`, as float32 lanes."""
    if half:
        return avx512.load_halves16(tiles, at), avx512.load_halves16(tiles, at + 32)
    return avx512.load_floats16(tiles, at), avx512.load_floats16(tiles, at + 64)


@jit(inline=True)
def _group_sum(x_sums, m, group, blocks):
    """Activation row m's sum of rounded values over one scale group (what the group's offsets multiply)."""
    total = np.float32(0)
    for block in range(group * blocks, (group + 1) * blocks):
        total += x_sums[m, block]
    return total


@jit(inline=True)
def _tile_block(acc, unpacked, scales, x, x_at, x_scale):
    """acc + the 16 rows' scale * x_scale * dot(codes, x[x_at : x_at+32]) for one tile block."""
    return avx512.scale_add(acc, avx512.tile_dot(unpacked, x, x_at), scales, x_scale)


@jit
def int4_product(codes, x_scales, x_sums, tiles, group_size, half, out, start, stop):
    """out[:, start:stop] = the int8-rounded activations (codes, x_scales, x_sums of `kernels._round_activations`)
    times the tiled weight's rows start..stop (multiples of 16) transposed. One to three activation rows go one at
    a time; from four on, each block's codes are unpacked once for four rows (a last partial four repeats its
    final row)."""
    rows, groups = codes.shape[0], codes.shape[1] // group_size
    blocks = group_size // 32
    record = tiles.shape[1] // groups
    for tile in range(start // TILE_ROWS, stop // TILE_ROWS):
        for m in range(rows if rows < 4 else 0):
            acc, x = avx512.zero_floats16(), codes[m]
            for group in range(groups):
                at = tile * tiles.shape[1] + group * record
                scales, offsets = _group_scales(tiles, at + blocks * BLOCK_BYTES, half)
                for b in range(blocks):
                    block = group * blocks + b
                    acc = _tile_block(acc, avx512.unpack_int4_tile(tiles, at + b * BLOCK_BYTES), scales, x, block * 32,
                                      x_scales[m, block])
                acc = avx512.multiply_add(acc, offsets, _group_sum(x_sums, m, group, blocks))
            avx512.store_floats16(out[m], tile * TILE_ROWS, acc)
        for first in range(0, rows if rows >= 4 else 0, 4):
            m0, m1, m2, m3 = first, min(first + 1, rows - 1), min(first + 2, rows - 1), min(first + 3, rows - 1)
            a0, a1, a2, a3 = avx512.zero_floats16(), avx512.zero_floats16(), avx512.zero_floats16(), avx512.zero_floats16()
            x0, x1, x2, x3 = codes[m0], codes[m1], codes[m2], codes[m3]
            for group in range(groups):
                at = tile * tiles.shape[1] + group * record
                scales, offsets = _group_scales(tiles, at + blocks * BLOCK_BYTES, half)
                for b in range(blocks):
                    block = group * blocks + b
                    unpacked, x_at = avx512.unpack_int4_tile(tiles, at + b * BLOCK_BYTES), block * 32
                    a0 = _tile_block(a0, unpacked, scales, x0, x_at, x_scales[m0, block])
                    a1 = _tile_block(a1, unpacked, scales, x1, x_at, x_scales[m1, block])
                    a2 = _tile_block(a2, unpacked, scales, x2, x_at, x_scales[m2, block])
                    a3 = _tile_block(a3, unpacked, scales, x3, x_at, x_scales[m3, block])
                a0 = avx512.multiply_add(a0, offsets, _group_sum(x_sums, m0, group, blocks))
                a1 = avx512.multiply_add(a1, offsets, _group_sum(x_sums, m1, group, blocks))
                a2 = avx512.multiply_add(a2, offsets, _group_sum(x_sums, m2, group, blocks))
                a3 = avx512.multiply_add(a3, offsets, _group_sum(x_sums, m3, group, blocks))
            avx512.store_floats16(out[m0], tile * TILE_ROWS, a0)
            avx512.store_floats16(out[m1], tile * TILE_ROWS, a1)
            avx512.store_floats16(out[m2], tile * TILE_ROWS, a2)
            avx512.store_floats16(out[m3], tile * TILE_ROWS, a3)
