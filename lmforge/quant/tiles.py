"""Many-row products (a prompt) of 4-bit weights on 16-row tiles, with AVX-512 VNNI.

The row-at-a-time kernels of `kernels` read every weight once per activation row and spend most of
their instructions on per-row bookkeeping. Where the CPU has AVX-512 VNNI (`nn.kernels.avx512`), a product of
several activation rows instead rearranges each 16-row slice of the weight into tiles — the
arithmetic then handles 16 rows per instruction — and multiplies every tile block, unpacked once, by
four activation rows in turn. The rearranged copy is made per call (it costs about one read of the
weight) and dropped afterwards, so the model keeps a single copy of its weights.

Tile layout, per 16 rows (a tile) and 32 columns (a block), as 96 32-bit words: 4 groups of 16 words,
word r of group j holding row r's bytes 4j..4j+3 of the block's 16 packed bytes (columns 4j..4j+3 in
the low nibbles, 16+4j..19+4j in the high ones, the order of `formats.pack_nibbles`); then the 16 rows'
scales and their 16 offsets, float32.

int8 weights stay on the row-at-a-time kernels: the same tiles for them (codes stored plus 128, VNNI
multiplying unsigned by signed bytes) were measured no faster for a whole SmolLM2 prompt — rearranging
twice the bytes per call ate the gain (8 tokens 119 vs 76 ms, 39 tokens 206 vs 203).

Results equal the row-at-a-time kernels' (the same int8-rounded activations, exact integer sums) up to
the order of float additions.
"""

from __future__ import annotations

import numpy as np

from lmforge.nn.kernels import avx512
from lmforge.nn.kernels.jit import jit
from lmforge.quant.kernels import _block_scale

TILE_ROWS = avx512.TILE_ROWS
WORDS = 96  # 32-bit words per tile block: codes, then scales and offsets


def supports(rows: int) -> bool:
    """Whether a weight with `rows` output rows can be tiled here: VNNI present and whole tiles."""
    return avx512.vnni_available() and rows % TILE_ROWS == 0


@jit
def _int4_tiles(packed, scale, offset, group_size, start, stop):
    """Rows start..stop (whole tiles) of a 4-bit weight in tile layout, as uint32 words."""
    blocks, cols = packed.shape[1] // 16, packed.shape[1] * 2
    words = packed.view(np.uint32)  # row n's bytes 4w..4w+3 = words[n, w]
    tiles = np.empty((stop - start) // TILE_ROWS * blocks * WORDS, np.uint32)
    floats = tiles.view(np.float32)
    for tile in range((stop - start) // TILE_ROWS):
        for block in range(blocks):
            at = (tile * blocks + block) * WORDS
            for r in range(TILE_ROWS):
                n = start + tile * TILE_ROWS + r
                for j in range(4):
                    tiles[at + j * TILE_ROWS + r] = words[n, 4 * block + j]
                floats[at + 64 + r] = _block_scale(scale, n, block, group_size, cols)
                floats[at + 80 + r] = _block_scale(offset, n, block, group_size, cols)
    return tiles


@jit(inline=True)
def _tile_block(acc, unpacked, scales, offsets, x, x_at, x_scale, x_sum):
    """acc + the 16 rows' scale * x_scale * dot(codes, x block) + offset * x_sum, for one tile block."""
    return avx512.multiply_add(avx512.scale_add(acc, avx512.tile_dot(unpacked, x, x_at), scales, x_scale), offsets,
                               x_sum)


@jit
def int4_product(codes, x_scales, x_sums, packed, scale, offset, group_size, out, start, stop):
    """out[:, start:stop] for a 4-bit weight (as `kernels._int4_dot_matvec`), on tiles: each tile block is
    unpacked once per four activation rows (a last partial four repeats its final row)."""
    blocks, rows = packed.shape[1] // 16, codes.shape[0]
    tiles = _int4_tiles(packed, scale, offset, group_size, start, stop)
    for tile in range((stop - start) // TILE_ROWS):
        first_row = start + tile * TILE_ROWS
        for first in range(0, rows, 4):
            m0, m1, m2, m3 = first, min(first + 1, rows - 1), min(first + 2, rows - 1), min(first + 3, rows - 1)
            a0, a1, a2, a3 = avx512.zero_floats16(), avx512.zero_floats16(), avx512.zero_floats16(), avx512.zero_floats16()
            x0, x1, x2, x3 = codes[m0], codes[m1], codes[m2], codes[m3]
            for block in range(blocks):
                at, x_at = (tile * blocks + block) * WORDS * 4, block * 32
                unpacked = avx512.unpack_int4_tile(tiles, at)
                scales, offsets = avx512.load_floats16(tiles, at + 256), avx512.load_floats16(tiles, at + 320)
                a0 = _tile_block(a0, unpacked, scales, offsets, x0, x_at, x_scales[m0, block], x_sums[m0, block])
                a1 = _tile_block(a1, unpacked, scales, offsets, x1, x_at, x_scales[m1, block], x_sums[m1, block])
                a2 = _tile_block(a2, unpacked, scales, offsets, x2, x_at, x_scales[m2, block], x_sums[m2, block])
                a3 = _tile_block(a3, unpacked, scales, offsets, x3, x_at, x_scales[m3, block], x_sums[m3, block])
            avx512.store_floats16(out[m0], first_row, a0)
            avx512.store_floats16(out[m1], first_row, a1)
            avx512.store_floats16(out[m2], first_row, a2)
            avx512.store_floats16(out[m3], first_row, a3)
