"""int8 and int4 weights stored as 16-row tiles, multiplied with AVX-512 VNNI.

The row-at-a-time kernels of `kernels` read each weight row as separate streams (codes, scales,
offsets) and spend most of their instructions on per-row bookkeeping: every 32-weight block ends
in a vector to scale, every row in a horizontal sum. Where the CPU has AVX-512 VNNI
(`nn.kernels.avx512`), an int8 or int4 `QuantizedLinear` instead keeps its weight in this module's
tile layout, as llama.cpp repacks its weights at load: the arithmetic handles 16 rows per
instruction (one `vpdpbusd` multiplies 16 rows by four broadcast activation bytes), a tile's 16 sums
land in the lanes ready to scale and store, and each tile is one contiguous stream. This is the
layout the module holds — not a second copy — and it converts back to the format's own tensors
(`TiledWeight.to_weight`) for saving, dequantizing and any other device.

Layout: rows in tiles of 16; each tile holds its scale groups (`group_size` columns) in turn, and
each group is a record of

- group_size / 32 blocks of codes, each `bits` runs of 64 bytes: run j holds, for each of the 16
  rows in turn, that row's bytes 4j..4j+3 of the block (int8: columns 4j..4j+3, stored plus 128 since
  `vpdpbusd` multiplies unsigned by signed bytes; int4: the block's 16 packed bytes, columns 4j..4j+3
  in the low nibbles and 16+4j..19+4j in the high ones, the order of `formats.pack_nibbles`);
- the 16 rows' scales, then (int4) their 16 offsets: float16 where every value is a float16 value
  (GGUF's Q8_0/Q4_1/Q4_0 blocks, which then take the bytes they take in the file), else float32.

A product multiplies int8-rounded activations (`kernels._round_activations`), as the row kernels do,
and equals theirs up to the order of float additions: for int8 the stored +128 comes back out as
-128 * scale * (the activations' block sum), an offset like int4's. Several activation rows (a
prompt) share each block's codes four rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmforge.nn.kernels import avx512
from lmforge.nn.kernels.jit import jit
from lmforge.quant.formats import Int4Weight, Int8Weight, QuantizedWeight

TILE_ROWS = avx512.TILE_ROWS
BITS = {Int8Weight: 8, Int4Weight: 4}
UNSIGNED = 128  # added to int8 codes in tiles


def supports(rows: int) -> bool:
    """Whether a weight with `rows` output rows can be tiled here: VNNI present and whole tiles."""
    return avx512.vnni_available() and rows % TILE_ROWS == 0


def _exact_in_half(values: torch.Tensor) -> bool:
    return bool(torch.equal(values.half().float(), values))


@dataclass
class TiledWeight:
    """An int8 or int4 weight in tile layout: `tiles` uint8 [rows / 16, groups * record bytes]."""

    tiles: torch.Tensor
    shape: tuple[int, int]
    bits: int
    group_size: int
    half: bool  # scales (and offsets) stored as float16, else float32

    @staticmethod
    def suits(weight: QuantizedWeight) -> bool:
        """Whether `weight` is best held as tiles here: int8 or int4 on the CPU, whole tiles, and a CPU with VNNI."""
        return (type(weight) in BITS and next(iter(weight.tensors().values())).device.type == "cpu"
                and weight.shape[1] % 32 == 0 and supports(weight.shape[0]))

    @property
    def _sizes(self) -> tuple[int, int, int, int]:
        """Tiles, groups per row, 32-column blocks per group, bytes of codes per block."""
        rows, cols = self.shape
        return rows // TILE_ROWS, cols // self.group_size, self.group_size // 32, self.bits * 64

    def _fields(self) -> list[str]:
        return ["scale", "offset"] if self.bits == 4 else ["scale"]

    @classmethod
    def from_weight(cls, weight: Int8Weight | Int4Weight) -> TiledWeight:
        fields = {name: tensor for name, tensor in weight.tensors().items() if name in ("scale", "offset")}
        half = all(_exact_in_half(values) for values in fields.values())
        bits = BITS[type(weight)]
        tiled = cls(torch.empty(0, dtype=torch.uint8), tuple(weight.shape), bits, weight.group_size, half)
        count, groups, blocks, code_bytes = tiled._sizes
        codes = weight.packed if bits == 4 else (weight.q.view(torch.uint8) ^ UNSIGNED)  # q + 128, as unsigned
        words = codes.contiguous().view(torch.int32)  # row n's bytes, four per word
        words = words.view(count, TILE_ROWS, groups, blocks, bits).permute(0, 2, 3, 4, 1)  # [tile, group, block, run, row]
        parts = [words.reshape(count, groups, blocks * code_bytes // 4).view(torch.uint8)]
        for name in tiled._fields():
            values = fields[name].half() if half else fields[name].float()
            parts.append(values.reshape(count, TILE_ROWS, groups).transpose(1, 2).contiguous().view(torch.uint8))
        tiled.tiles = torch.cat(parts, dim=-1).view(count, -1)
        return tiled

    def _records(self, tile_index: torch.Tensor | slice) -> torch.Tensor:
        groups = self._sizes[1]
        selected = self.tiles[tile_index]
        return selected.view(selected.shape[0], groups, -1)

    def _values(self, records: torch.Tensor, field: int) -> torch.Tensor:
        """Scales (field 0) or offsets (1) of the records, float32 [tiles, groups, 16]."""
        _, _, blocks, code_bytes = self._sizes
        width = 2 if self.half else 4
        start = blocks * code_bytes + field * TILE_ROWS * width
        values = records[..., start:start + TILE_ROWS * width].contiguous()
        return values.view(torch.float16 if self.half else torch.float32).float()

    def _weight(self, code_bytes: torch.Tensor, fields: list[torch.Tensor]) -> QuantizedWeight:
        """The format's weight from row-layout code bytes [n, cols * bits / 8] and per-row fields [n, groups]."""
        if self.bits == 4:
            return Int4Weight(code_bytes, *fields, self.group_size)
        return Int8Weight((code_bytes ^ UNSIGNED).view(torch.int8), *fields, self.group_size)

    def to_weight(self) -> QuantizedWeight:
        """The format's own tensors (row layout), a new copy."""
        rows, cols = self.shape
        count, groups, blocks, code_bytes = self._sizes
        records = self._records(slice(None))
        words = records[..., :blocks * code_bytes].contiguous().view(torch.int32)
        words = words.view(count, groups, blocks, self.bits, TILE_ROWS).permute(0, 4, 1, 2, 3)
        code_bytes = words.reshape(rows, cols * self.bits // 32).contiguous().view(torch.uint8)
        fields = [self._values(records, field).transpose(1, 2).reshape(rows, groups).contiguous()
                  for field in range(len(self._fields()))]
        return self._weight(code_bytes, fields)

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The weight of rows `index` only (a tied head's rows for token lookups), gathered from their tiles."""
        _, cols = self.shape
        _, groups, blocks, code_bytes = self._sizes
        records, lane, n = self._records(index // TILE_ROWS), index % TILE_ROWS, index.numel()
        words = records[..., :blocks * code_bytes].contiguous().view(torch.int32)
        words = words.view(n, groups, blocks, self.bits, TILE_ROWS)[torch.arange(n), ..., lane]  # [n, group, block, run]
        code_bytes = words.reshape(n, cols * self.bits // 32).contiguous().view(torch.uint8)
        fields = [self._values(records, field)[torch.arange(n), :, lane] for field in range(len(self._fields()))]
        return self._weight(code_bytes, fields)


@jit(inline=True)
def _load16(tiles, at, half):
    return avx512.load_halves16(tiles, at) if half else avx512.load_floats16(tiles, at)


@jit(inline=True)
def _group_scales(tiles, at, bits, half):
    """A group record's 16 scales and 16 offsets, starting at byte `at`, as float32 lanes. int8 records hold no
    offsets: theirs is -128 * scale, which takes the codes' stored +128 back out."""
    scales = _load16(tiles, at, half)
    if bits == 8:
        return scales, avx512.multiply_add(avx512.zero_floats16(), scales, np.float32(-UNSIGNED))
    return scales, _load16(tiles, at + (32 if half else 64), half)


@jit(inline=True)
def _block_codes(tiles, at, bits):
    """The 16 x 32 codes of the block stored at byte `at`, as unsigned bytes in `avx512.TileCodes` groups."""
    return avx512.unpack_int4_tile(tiles, at) if bits == 4 else avx512.load_int8_tile(tiles, at)


@jit(inline=True)
def _group_sum(x_sums, m, group, blocks):
    """Activation row m's sum of rounded values over one scale group (what the group's offsets multiply)."""
    total = np.float32(0)
    for block in range(group * blocks, (group + 1) * blocks):
        total += x_sums[m, block]
    return total


@jit(inline=True)
def _tile_block(acc, codes, scales, x, x_at, x_scale):
    """acc + the 16 rows' scale * x_scale * dot(codes, x[x_at : x_at+32]) for one tile block."""
    return avx512.scale_add(acc, avx512.tile_dot(codes, x, x_at), scales, x_scale)


@jit
def product(codes, x_scales, x_sums, tiles, bits, group_size, half, out, start, stop):
    """out[:, start:stop] = the int8-rounded activations (codes, x_scales, x_sums of `kernels._round_activations`)
    times the tiled weight's rows start..stop (multiples of 16) transposed."""
    # one copy of the loop per width, `bits` a constant in each: a run-time choice of how to load a block's codes
    # inside the loop made LLVM pass the 512-byte codes value through memory (the step ran at half speed)
    if bits == 4:
        _product(codes, x_scales, x_sums, tiles, 4, group_size, half, out, start, stop)
    else:
        _product(codes, x_scales, x_sums, tiles, 8, group_size, half, out, start, stop)


@jit(inline=True)
def _product(codes, x_scales, x_sums, tiles, bits, group_size, half, out, start, stop):
    """`product` for one code width. One to three activation rows go one at a time; from four on, each block's
    codes are loaded once for four rows (a last partial four repeats its final row)."""
    rows, groups = codes.shape[0], codes.shape[1] // group_size
    blocks, block_bytes = group_size // 32, bits * 64
    record = tiles.shape[1] // groups
    for tile in range(start // TILE_ROWS, stop // TILE_ROWS):
        for m in range(rows if rows < 4 else 0):
            acc, x = avx512.zero_floats16(), codes[m]
            for group in range(groups):
                at = tile * tiles.shape[1] + group * record
                scales, offsets = _group_scales(tiles, at + blocks * block_bytes, bits, half)
                for b in range(blocks):
                    block = group * blocks + b
                    acc = _tile_block(acc, _block_codes(tiles, at + b * block_bytes, bits), scales, x, block * 32,
                                      x_scales[m, block])
                acc = avx512.multiply_add(acc, offsets, _group_sum(x_sums, m, group, blocks))
            avx512.store_floats16(out[m], tile * TILE_ROWS, acc)
        for first in range(0, rows if rows >= 4 else 0, 4):
            m0, m1, m2, m3 = first, min(first + 1, rows - 1), min(first + 2, rows - 1), min(first + 3, rows - 1)
            a0, a1, a2, a3 = avx512.zero_floats16(), avx512.zero_floats16(), avx512.zero_floats16(), avx512.zero_floats16()
            x0, x1, x2, x3 = codes[m0], codes[m1], codes[m2], codes[m3]
            for group in range(groups):
                at = tile * tiles.shape[1] + group * record
                scales, offsets = _group_scales(tiles, at + blocks * block_bytes, bits, half)
                for b in range(blocks):
                    block = group * blocks + b
                    block_codes, x_at = _block_codes(tiles, at + b * block_bytes, bits), block * 32
                    a0 = _tile_block(a0, block_codes, scales, x0, x_at, x_scales[m0, block])
                    a1 = _tile_block(a1, block_codes, scales, x1, x_at, x_scales[m1, block])
                    a2 = _tile_block(a2, block_codes, scales, x2, x_at, x_scales[m2, block])
                    a3 = _tile_block(a3, block_codes, scales, x3, x_at, x_scales[m3, block])
                a0 = avx512.multiply_add(a0, offsets, _group_sum(x_sums, m0, group, blocks))
                a1 = avx512.multiply_add(a1, offsets, _group_sum(x_sums, m1, group, blocks))
                a2 = avx512.multiply_add(a2, offsets, _group_sum(x_sums, m2, group, blocks))
                a3 = avx512.multiply_add(a3, offsets, _group_sum(x_sums, m3, group, blocks))
            avx512.store_floats16(out[m0], tile * TILE_ROWS, a0)
            avx512.store_floats16(out[m1], tile * TILE_ROWS, a1)
            avx512.store_floats16(out[m2], tile * TILE_ROWS, a2)
            avx512.store_floats16(out[m3], tile * TILE_ROWS, a3)
