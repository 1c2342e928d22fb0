"""Integer SIMD dot products for the quantized kernels, spelled in LLVM vector instructions.

A float kernel multiplies a 4- or 8-bit weight by a float32 activation: every weight is widened to
float32 first, eight per instruction. llama.cpp's trick is to round the activations to int8 too
(one scale per 32 values, as its Q8_0 format) and multiply bytes by bytes: x86's `pmaddubsw`
multiplies 32 unsigned by 32 signed bytes and adds neighbours into 16-bit sums, `pmaddwd` adds
those pairs into eight 32-bit sums. One 32-weight block then costs a handful of instructions, and
4-bit codes (0..15) enter unwidened. LLVM does not find this pattern by itself in plain loops, so the
blocks below are numba intrinsics that emit those instructions directly (AVX2):

- `Lanes`: eight float32 partial sums held in one vector register across a loop (a numba type);
- `q8_block(acc, x, i, w, j, scale)`: acc + scale * the products of int8 x[i:i+32] and int8 w[j:j+32];
- `Codes`: 32 unpacked 4-bit codes in one vector register (a numba type);
- `nibble_codes(packed, j)`: the 32 codes in packed[j:j+16] (byte t holds code t in its low nibble and
  code t + 16 in its high one, see `quant.formats`), unpacked once — a kernel multiplying several
  activation rows reuses them;
- `codes_block(acc, x, i, codes, scale)`: acc + scale * the products of int8 x[i:i+32] and the codes;
- `lanes_sum(acc)`: the eight partial sums added up;
- `prefetch(array, byte)`: ask the CPU to start loading the cache line `byte` bytes into `array`,
  so rows a kernel reaches next arrive while it works on the current ones (the hardware's own
  prefetcher follows long runs well but not a kernel hopping between three arrays per row).

`pmaddubsw` saturates its 16-bit sums, so `q8_block` multiplies |x| (at most 127) by w carrying x's
sign: the largest pair sum is 2 * 127 * 127 < 32767, and nothing saturates. With 4-bit codes the
largest is 2 * 15 * 127. The integer sums are therefore exact; the only rounding is the activations'.

`available()` says whether this machine runs them (x86-64 with AVX2); elsewhere the quantized
kernels use their float loops.
"""

from __future__ import annotations

from lmforge.nn.kernels.jit import numba

if numba is not None:
    from llvmlite import binding, ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic, models, register_model

__all__ = ["available", "codes_block", "lanes_sum", "nibble_codes", "prefetch", "q8_block", "zero_lanes"]


def available() -> bool:
    """Whether the compiled kernels may use these instructions: numba compiling (not disabled) for this
    machine's CPU, and the CPU has AVX2."""
    if numba is None or numba.config.DISABLE_JIT or numba.config.CPU_NAME not in (None, "host"):
        return False
    return bool(binding.get_host_cpu_features().get("avx2", False))


if numba is not None:
    FLOATS = ir.VectorType(ir.FloatType(), 8)
    BYTES = ir.VectorType(ir.IntType(8), 32)
    HALF_BYTES = ir.VectorType(ir.IntType(8), 16)
    SHORTS = ir.VectorType(ir.IntType(16), 16)
    INTS = ir.VectorType(ir.IntType(32), 8)

    def _vector_type(name: str, vector, doc: str):
        """A numba type whose values are one LLVM vector (held in a register), e.g. eight float32 partial sums."""
        kind = type(name, (types.Type,), {"__doc__": doc, "__init__": lambda self: types.Type.__init__(self, name)})
        register_model(kind)(type(name + "Model", (models.PrimitiveModel,), {
            "__init__": lambda self, dmm, fe_type: models.PrimitiveModel.__init__(self, dmm, fe_type, vector)}))
        return kind()

    lanes = _vector_type("Lanes", FLOATS, "Eight float32 partial sums in one vector register.")
    codes_type = _vector_type("Codes", BYTES, "32 unpacked 4-bit codes (0..15), reused for several activation rows.")

    def _tree_sum(builder, vector):
        """The lanes of a float vector added up as a tree, as a vector reduction does it."""
        parts = [builder.extract_element(vector, ir.Constant(ir.IntType(32), i)) for i in range(vector.type.count)]
        while len(parts) > 1:
            parts = [builder.fadd(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
        return parts[0]

    def _function(builder, name, result, arguments):
        return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, arguments), name)

    def _load(context, builder, array_type, array, index, vector):
        """The `vector`-typed value stored at array[index] (any alignment)."""
        data = context.make_array(array_type)(context, builder, array).data
        return builder.load(builder.bitcast(builder.gep(data, [index]), vector.as_pointer()), align=1)

    def _byte_dot(builder, unsigned, signed):
        """Eight int32 sums, each of four neighbouring products of unsigned and signed bytes."""
        pairs = builder.call(_function(builder, "llvm.x86.avx2.pmadd.ub.sw", SHORTS, [BYTES, BYTES]),
                             [unsigned, signed])
        ones = ir.Constant(SHORTS, [1] * 16)
        return builder.call(_function(builder, "llvm.x86.avx2.pmadd.wd", INTS, [SHORTS, SHORTS]), [pairs, ones])

    def _scaled_add(builder, acc, sums, scale):
        """acc + float(sums) * scale, one fused multiply-add."""
        broadcast = builder.insert_element(ir.Constant(FLOATS, None), scale, ir.Constant(ir.IntType(32), 0))
        broadcast = builder.shuffle_vector(broadcast, broadcast, ir.Constant(INTS, [0] * 8))
        fma = _function(builder, "llvm.fma.v8f32", FLOATS, [FLOATS, FLOATS, FLOATS])
        return builder.call(fma, [builder.sitofp(sums, FLOATS), broadcast, acc])

    @intrinsic
    def zero_lanes(typingctx):
        """Eight zero partial sums."""
        return lanes(), lambda context, builder, signature, args: ir.Constant(FLOATS, None)

    @intrinsic
    def lanes_sum(typingctx, acc):
        """The eight partial sums added up (float32)."""
        return types.float32(lanes), lambda context, builder, signature, args: _tree_sum(builder, args[0])

    @intrinsic
    def q8_block(typingctx, acc, x, x_at, w, w_at, scale):
        """acc + scale * (int8 x[x_at : x_at+32] times int8 w[w_at : w_at+32]), summed four by four into the lanes:
        |x| times w carrying x's sign, the same products with the unsigned operand pmaddubsw wants."""

        def codegen(context, builder, signature, args):
            acc_value, x_array, x_index, w_array, w_index, scale_value = args
            x_bytes = _load(context, builder, signature.args[1], x_array, x_index, BYTES)
            w_bytes = _load(context, builder, signature.args[3], w_array, w_index, BYTES)
            magnitude = builder.call(_function(builder, "llvm.abs.v32i8", BYTES, [BYTES, ir.IntType(1)]),
                                     [x_bytes, ir.Constant(ir.IntType(1), 0)])
            signed_w = builder.call(_function(builder, "llvm.x86.avx2.psign.b", BYTES, [BYTES, BYTES]),
                                    [w_bytes, x_bytes])
            return _scaled_add(builder, acc_value, _byte_dot(builder, magnitude, signed_w), scale_value)

        return lanes(lanes, x, types.intp, w, types.intp, types.float32), codegen

    @intrinsic
    def nibble_codes(typingctx, packed, packed_at):
        """The 32 4-bit codes in packed[packed_at : packed_at+16], unpacked once for `codes_block` calls."""

        def codegen(context, builder, signature, args):
            packed_bytes = _load(context, builder, signature.args[0], args[0], args[1], HALF_BYTES)
            low = builder.and_(packed_bytes, ir.Constant(HALF_BYTES, [15] * 16))
            high = builder.lshr(packed_bytes, ir.Constant(HALF_BYTES, [4] * 16))
            return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))

        return codes_type(packed, types.intp), codegen

    @intrinsic
    def codes_block(typingctx, acc, x, x_at, codes, scale):
        """acc + scale * (int8 x[x_at : x_at+32] times 32 unpacked 4-bit codes)."""

        def codegen(context, builder, signature, args):
            acc_value, x_array, x_index, codes_value, scale_value = args
            x_bytes = _load(context, builder, signature.args[1], x_array, x_index, BYTES)
            return _scaled_add(builder, acc_value, _byte_dot(builder, codes_value, x_bytes), scale_value)

        return lanes(lanes, x, types.intp, codes_type, types.float32), codegen

    @intrinsic
    def prefetch(typingctx, array, byte):
        """Start loading the cache line `byte` bytes past the start of `array` (a hint: no fault, no result)."""

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            pointer = builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [args[1]])
            int32 = ir.IntType(32)
            hint = _function(builder, "llvm.prefetch.p0", ir.VoidType(), [pointer.type, int32, int32, int32])
            builder.call(hint, [pointer, ir.Constant(int32, 0), ir.Constant(int32, 3), ir.Constant(int32, 1)])
            return context.get_dummy_value()

        return types.none(array, types.intp), codegen
