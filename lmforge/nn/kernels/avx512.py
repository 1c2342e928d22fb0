"""AVX-512 building blocks for the quantized kernels, spelled in LLVM vector instructions (numba intrinsics).

**16-row tiles with VNNI.**

`simd` multiplies one weight row at a time: every 32-weight block ends in a vector of partial sums
that must be scaled, and every row in a horizontal sum. AVX-512 VNNI's `vpdpbusd` multiplies 64
unsigned by 64 signed bytes and adds each four neighbouring products into one of 16 int32 lanes, in
one instruction. Let lane r hold row r of a 16-row tile, and its four bytes four consecutive columns of
that row: one 4-byte group of activations, broadcast to all lanes, then meets 16 rows at once, and a
block's 16 sums come out in the lanes, ready to be scaled by the 16 rows' scales and stored without a
horizontal sum. This is how llama.cpp's CPU backend multiplies its repacked weights.

A tile block is 16 rows x 32 columns, held as 8 vectors ("groups") of 16 lanes x 4 bytes, group g
holding columns 4g..4g+3 (see `quant.tiles` for the byte layout in memory):

- `TileCodes`: a tile block's codes unpacked into the 8 groups (a numba type, eight vector registers),
  reused for every activation row a kernel multiplies;
- `unpack_int4_tile(tiles, at)`: the 4-bit codes (0..15) of the block stored at byte `at`;
- `load_int8_tile(tiles, at)`: the 8-bit codes (stored plus 128, unsigned) of the block stored at byte `at`;
- `tile_dot(codes, x, x_at)`: the 16 rows' integer dot products with int8 x[x_at : x_at+32];
- `Floats16`, `zero_floats16()`, `load_floats16(tiles, at)`, `store_floats16(out, i, acc)`: 16 float32 lanes;
- `load_halves16(tiles, at)`: 16 float16 values widened to float32 lanes (exact);
- `scale_add(acc, sums, scales, x_scale)`: acc + float(sums) * scales * x_scale;
- `multiply_add(acc, values, factor)`: acc + values * factor.

**NF4 table lookups.** NF4 codes index a 16-entry table of floats; AVX-512's `vpermps` looks up 16
indices in a 16-float register at once, so an NF4 weight costs a permute instead of a scalar load:

- `NF4Weights`, `nf4_weights(packed, at, table)`: the 32 weights whose codes are the 16 bytes at
  packed[at] (low nibbles: the first 16, high: the next 16), looked up in `table` (a Floats16 holding
  the code book) — once, for every activation row a kernel multiplies;
- `nf4_dot(acc, weights, x, x_at)`: acc + the products of float32 x[x_at : x_at+32] and those weights;
- `sum_floats16(acc)`: the 16 lanes added up.

`available()` says whether numba compiles for this CPU and it has AVX-512 F and BW (the table lookups);
`vnni_available()` whether it also has VNNI (the tiles). Elsewhere the kernels of `simd` and the plain
loops run.
"""

from __future__ import annotations

from lmforge.nn.kernels import simd
from lmforge.nn.kernels.jit import numba

if numba is not None:
    from llvmlite import binding, ir
    from numba import types
    from numba.extending import intrinsic

__all__ = ["available", "load_floats16", "load_halves16", "load_int8_tile", "multiply_add", "nf4_dot", "nf4_weights",
           "scale_add", "store_floats16", "sum_floats16", "tile_dot", "unpack_int4_tile", "vnni_available",
           "zero_floats16"]

TILE_ROWS = 16
GROUPS = 8  # 4-column groups per 32-column block


def _has(*features: str) -> bool:
    if not simd.available():
        return False
    host = binding.get_host_cpu_features()
    return all(host.get(name, False) for name in features)


def available() -> bool:
    """Whether the 512-bit table lookups run here: `simd.available()` and the CPU has AVX-512 F and BW."""
    return _has("avx512f", "avx512bw")


def vnni_available() -> bool:
    """Whether the tile kernels run here: `available()` and the CPU has AVX-512 VNNI."""
    return _has("avx512f", "avx512bw", "avx512vnni")


if numba is not None:
    INT32 = ir.IntType(32)
    INT64 = ir.IntType(64)
    INTS = ir.VectorType(INT32, TILE_ROWS)
    FLOATS = ir.VectorType(ir.FloatType(), TILE_ROWS)
    GROUP_INTS = ir.VectorType(INT32, TILE_ROWS * GROUPS)

    floats16 = simd._vector_type("Floats16", FLOATS, "16 float32 lanes, one per row of a tile.")
    ints16 = simd._vector_type("Ints16", INTS, "16 int32 lanes, one per row of a tile.")
    tile_codes = simd._vector_type("TileCodes", GROUP_INTS, "A 16 x 32 tile block's codes as 8 groups of 16 x 4 bytes.")
    nf4_type = simd._vector_type("NF4Weights", ir.VectorType(ir.FloatType(), 32), "32 looked-up NF4 weights.")

    def _at(builder, base, offset: int):
        return builder.add(base, ir.Constant(INT64, offset)) if offset else base

    def _load_bytes_as(context, builder, array_type, array, byte, vector):
        """The `vector`-typed value stored `byte` bytes into `array` (any element type, any alignment)."""
        data = context.make_array(array_type)(context, builder, array).data
        pointer = builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [byte])
        return builder.load(builder.bitcast(pointer, vector.as_pointer()), align=1)

    def _broadcast(builder, scalar, vector):
        lanes = builder.insert_element(ir.Constant(vector, None), scalar, ir.Constant(INT32, 0))
        return builder.shuffle_vector(lanes, lanes, ir.Constant(INTS, [0] * TILE_ROWS))

    def _groups(builder, vectors):
        """Eight 16-lane vectors joined into one TileCodes value (LLVM keeps it in eight registers)."""
        while len(vectors) > 1:
            width = 2 * vectors[0].type.count
            vectors = [builder.shuffle_vector(vectors[i], vectors[i + 1],
                                              ir.Constant(ir.VectorType(INT32, width), list(range(width))))
                       for i in range(0, len(vectors), 2)]
        return vectors[0]

    @intrinsic
    def zero_floats16(typingctx):
        """16 zero lanes."""
        return floats16(), lambda context, builder, signature, args: ir.Constant(FLOATS, None)

    @intrinsic
    def load_floats16(typingctx, tiles, at):
        """The 16 float32 values stored at byte `at` of `tiles`."""

        def codegen(context, builder, signature, args):
            return _load_bytes_as(context, builder, signature.args[0], args[0], args[1], FLOATS)

        return floats16(tiles, types.intp), codegen

    @intrinsic
    def load_halves16(typingctx, tiles, at):
        """The 16 float16 values stored at byte `at` of `tiles`, widened to float32 (exact)."""

        def codegen(context, builder, signature, args):
            halves = _load_bytes_as(context, builder, signature.args[0], args[0], args[1],
                                    ir.VectorType(ir.HalfType(), TILE_ROWS))
            return builder.fpext(halves, FLOATS)

        return floats16(tiles, types.intp), codegen

    @intrinsic
    def store_floats16(typingctx, out, index, acc):
        """out[index : index+16] = acc (out: float32, 1-D)."""

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            builder.store(args[2], builder.bitcast(builder.gep(data, [args[1]]), FLOATS.as_pointer()), align=1)
            return context.get_dummy_value()

        return types.none(out, types.intp, floats16), codegen

    @intrinsic
    def unpack_int4_tile(typingctx, tiles, at):
        """A 4-bit tile block: 4 x 64 bytes at `at`, each byte holding the code of column c (low nibble) and of
        column c + 16 (high nibble); groups 0-3 are the low nibbles, 4-7 the high ones."""

        def codegen(context, builder, signature, args):
            mask = ir.Constant(INTS, [0x0F0F0F0F] * TILE_ROWS)
            packed = [_load_bytes_as(context, builder, signature.args[0], args[0], _at(builder, args[1], 64 * j), INTS)
                      for j in range(4)]
            low = [builder.and_(bytes_, mask) for bytes_ in packed]
            high = [builder.and_(builder.lshr(bytes_, ir.Constant(INTS, [4] * TILE_ROWS)), mask) for bytes_ in packed]
            return _groups(builder, low + high)

        return tile_codes(tiles, types.intp), codegen

    @intrinsic
    def load_int8_tile(typingctx, tiles, at):
        """An 8-bit tile block: 8 x 64 bytes at `at`, group g holding columns 4g..4g+3 of the 16 rows (codes plus 128:
        `vpdpbusd` multiplies unsigned weight bytes by signed activation bytes)."""

        def codegen(context, builder, signature, args):
            return _load_bytes_as(context, builder, signature.args[0], args[0], args[1], GROUP_INTS)

        return tile_codes(tiles, types.intp), codegen

    @intrinsic
    def tile_dot(typingctx, codes, x, x_at):
        """Per row of the tile: the sum over the block's 32 columns of code * x[x_at + column] (x: int8)."""

        def codegen(context, builder, signature, args):
            codes_value, x_array, x_index = args
            dot = simd._function(builder, "llvm.x86.avx512.vpdpbusd.512", INTS, [INTS, INTS, INTS])
            # two running sums (even and odd groups): each vpdpbusd waits for the previous one on its sum
            sums = [ir.Constant(INTS, None), ir.Constant(INTS, None)]
            for g in range(GROUPS):
                group = builder.shuffle_vector(codes_value, codes_value, ir.Constant(
                    INTS, list(range(g * TILE_ROWS, (g + 1) * TILE_ROWS))))
                four = _load_bytes_as(context, builder, signature.args[1], x_array, _at(builder, x_index, 4 * g), INT32)
                sums[g % 2] = builder.call(dot, [sums[g % 2], group, _broadcast(builder, four, INTS)])
            return builder.add(sums[0], sums[1])

        return ints16(tile_codes, x, types.intp), codegen

    def _fma(builder, a, b, c):
        return builder.call(simd._function(builder, "llvm.fma.v16f32", FLOATS, [FLOATS] * 3), [a, b, c])

    @intrinsic
    def scale_add(typingctx, acc, sums, scales, x_scale):
        """acc + float(sums) * scales * x_scale."""

        def codegen(context, builder, signature, args):
            acc_value, sums_value, scales_value, x_scale_value = args
            factor = builder.fmul(scales_value, _broadcast(builder, x_scale_value, FLOATS))
            return _fma(builder, builder.sitofp(sums_value, FLOATS), factor, acc_value)

        return floats16(floats16, ints16, floats16, types.float32), codegen

    @intrinsic
    def multiply_add(typingctx, acc, values, factor):
        """acc + values * factor."""

        def codegen(context, builder, signature, args):
            return _fma(builder, args[1], _broadcast(builder, args[2], FLOATS), args[0])

        return floats16(floats16, floats16, types.float32), codegen

    @intrinsic
    def nf4_weights(typingctx, packed, at, table):
        """The 32 NF4 weights coded in the 16 bytes packed[at : at+16] (low nibbles: the first 16, high nibbles:
        the next 16), looked up in `table` (a Floats16 holding the code book)."""

        def codegen(context, builder, signature, args):
            packed_array, packed_index, table_value = args
            bytes_ = _load_bytes_as(context, builder, signature.args[0], packed_array, packed_index,
                                    ir.VectorType(ir.IntType(8), TILE_ROWS))  # packed: bytes, so index = byte
            indices = builder.zext(bytes_, INTS)
            lookup = simd._function(builder, "llvm.x86.avx512.permvar.sf.512", FLOATS, [FLOATS, INTS])
            low = builder.call(lookup, [table_value, builder.and_(indices, ir.Constant(INTS, [15] * TILE_ROWS))])
            high = builder.call(lookup, [table_value, builder.lshr(indices, ir.Constant(INTS, [4] * TILE_ROWS))])
            return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(INT32, 32), list(range(32))))

        return nf4_type(packed, types.intp, floats16), codegen

    @intrinsic
    def nf4_dot(typingctx, acc, weights, x, x_at):
        """acc + float32 x[x_at : x_at+32] times 32 looked-up NF4 weights, in 16 lanes."""

        def codegen(context, builder, signature, args):
            acc_value, weights_value, x_array, x_index = args
            halves = [builder.shuffle_vector(weights_value, weights_value,
                                             ir.Constant(INTS, list(range(h * TILE_ROWS, (h + 1) * TILE_ROWS))))
                      for h in range(2)]
            for h, half in enumerate(halves):
                x_part = _load_bytes_as(context, builder, signature.args[2], x_array,
                                        builder.mul(_at(builder, x_index, 16 * h), ir.Constant(INT64, 4)), FLOATS)
                acc_value = _fma(builder, half, x_part, acc_value)
            return acc_value

        return floats16(floats16, nf4_type, x, types.intp), codegen

    @intrinsic
    def sum_floats16(typingctx, acc):
        """The 16 lanes added up (float32), as a tree."""
        return types.float32(floats16), lambda context, builder, signature, args: simd._tree_sum(builder, args[0])
