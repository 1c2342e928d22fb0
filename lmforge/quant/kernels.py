"""CPU kernels for quantized matrix–vector products, JIT-compiled with numba.

Decoding one token multiplies every weight matrix by a single activation vector, so its speed is
the speed of reading the weights: 8- or 4-bit weights are 4-8x fewer bytes than fp32. torch has no
fast CPU matrix–vector product for these layouts, so the hot loop is written here once per format,
in plain loops numba compiles to vectorised machine code:

- each output row is one independent dot product over the input;
- a 4-bit row is read one 32-weight run at a time: byte j holds weights j and j + 16 (see
  `formats.pack_nibbles`), so 16 bytes pair with 16 contiguous activations;
- inner loops run over 64 weights (one or two scale groups side by side) into per-lane partial sums
  that are added up once per row: LLVM does not vectorise a loop as short as one group of 32, and a
  vector reduced to one number per group costs more than the group's arithmetic;
- int4's offset (w = q * scale + offset) costs one multiply per group:
  sum(x * w) = scale * sum(x * q) + offset * sum(x), with sum(x) per group computed once per call.

Threads: the kernels themselves are serial, release the GIL (`nogil`) and cache their machine code
on disk (`cache`: compiled once per machine, not per process). A large matrix is split by rows
between the calling thread and one pool thread per extra torch thread; small ones run in the caller,
where a hand-over would cost more than it saves. numba's own parallel loops were measured and
rejected: their thread pool (OpenMP, or the workqueue) competes with torch's OpenMP pool for the
same cores and small products slowed down 10-100x, and the workqueue layer aborts when two
threads call a kernel at once (the server and a benchmark can). Activations are float32; the
caller converts. Each kernel has a plain-torch reference, `QuantizedWeight.dequantize()` followed by
a matmul, which the tests compare against.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from lmforge.nn.kernels import avx512, simd
from lmforge.nn.kernels.jit import as_array, available, jit

SPLIT_MIN_WEIGHTS = 2 << 20
"""int8 matrices with at least this many weights (~150 µs of one core's work) are split across threads;
smaller ones finish before a hand-over to a pool thread (~30 µs each way) pays. Grouped and 4-bit kernels
do about twice the work per weight, so they split from half this size."""


MAX_ROWS = {"int8": 24, "int4": 40, "float": 8, "nf4": 2, "nf4 table": 64, "int8 tiles": 512, "int4 tiles": 512}
"""Rows (tokens) up to which each kind of kernel beats dequantizing the weight once and one matmul: a kernel
redoes each weight's arithmetic for every row. Measured on SmolLM2 (2 cores, whole forward): int8, 16 rows
99-105 ms by kernel vs 193-209 dequantizing, 24 rows 140-151 vs 167-208; GGUF 4-bit blocks (int4 kernels
unpack each block once for four rows), 24 rows 196-205 vs 297-340, 39 rows 244-255 vs 321-337, 48 a tie. The
float kernels take about twice as long per row, NF4's scalar loop ~125 ms per row for the whole model; with
AVX-512's 16-entry lookups, shared by four rows, 6 ms (whole model, 8 rows 58 ms vs 286 dequantizing, 39 rows
238 vs 337, 64 rows 380 vs 401, 96 rows 645 vs 408). With VNNI, int4 layers hold 16-row tiles (`tiles`), which
each block unpacked once per four rows keeps ahead of dequantizing + bf16 matmul (AMX) far longer: whole SmolLM2
GGUF prompt, 2 threads, interleaved, 128 tokens 224 vs 383 ms, 256 tokens 376 vs 498, 512 tokens 746 vs 791,
768 tokens 1091 vs 1073."""


def supports(weight) -> bool:
    """Whether a kernel reads this weight: the kernels step through the input 64 columns at a time."""
    return available() and weight.shape[1] % 64 == 0


@jit(inline=True)
def _chunk_scales(scale, n, chunk, group_size):
    """Row n's scales for the two 32-column halves of 64-column chunk `chunk` (groups of 32, 64 or 128).
    Spelled out per group size: an integer division by a run-time group size here kept LLVM from
    vectorising the loop around it (int8 groups of 32 ran at half speed)."""
    if group_size == 32:
        return scale[n, 2 * chunk], scale[n, 2 * chunk + 1]
    if group_size == 64:
        return scale[n, chunk], scale[n, chunk]
    return scale[n, chunk >> 1], scale[n, chunk >> 1]


@jit
def _int8_matvec(x, q, scale, group_size, out, start, stop):
    """out[m, n] = sum_k x[m, k] * q[n, k] * scale[n, k // group_size], for rows start <= n < stop."""
    cols = q.shape[1]
    if group_size == cols:  # one scale per row: a single long dot product
        for n in range(start, stop):
            for m in range(x.shape[0]):
                dot = np.float32(0.0)
                for k in range(cols):
                    dot += x[m, k] * np.float32(q[n, k])
                out[m, n] = dot * scale[n, 0]
        return
    lanes = np.empty(32, np.float32)  # per-lane partial sums, added up once per row (see `_nibble_matvec`)
    for n in range(start, stop):  # groups: 64 columns per step, the two 32-column halves side by side
        for m in range(x.shape[0]):
            lanes[:] = 0
            for chunk in range(cols // 64):
                first, second = _chunk_scales(scale, n, chunk, group_size)
                k = chunk * 64
                for j in range(32):
                    lanes[j] += (x[m, k + j] * np.float32(q[n, k + j]) * first
                                 + x[m, k + 32 + j] * np.float32(q[n, k + 32 + j]) * second)
            out[m, n] = lanes.sum()


@jit
def _split_runs(x, group_size):
    """Per 32-weight run: x_low (the 16 activations paired with low nibbles), x_diff = x_high - 16 * x_low,
    and the sum of x per group. With b = low + 16 * high, x_low * low + x_high * high = x_low * b + x_diff * high,
    so a kernel needs one float per byte and its high nibble, and no low-nibble mask."""
    rows, cols = x.shape
    low = np.empty((rows, cols // 2), np.float32)
    diff = np.empty((rows, cols // 2), np.float32)
    sums = np.zeros((rows, cols // group_size), np.float32)
    for m in range(rows):
        for j in range(cols // 2):
            a, b = x[m, j // 16 * 32 + j % 16], x[m, j // 16 * 32 + 16 + j % 16]
            low[m, j], diff[m, j] = a, b - np.float32(16.0) * a
        for k in range(cols):
            sums[m, k // group_size] += x[m, k]
    return low, diff, sums


@jit
def _nibble_matvec(low, diff, sums, packed, scale, offset, group_size, out, start, stop):
    """int4 rows start <= n < stop: sum over weights of x * (code * scale + offset), codes in 32-weight runs
    (see `_split_runs`). Each step reads 32 bytes = 64 weights = one or two scale groups, the two 16-byte
    halves side by side, into 16 per-lane partial sums that are added up once per row: a loop over one
    group is too short to vectorise, and reducing a vector to one number per group costs more than the
    group's arithmetic."""
    half = packed.shape[1]
    lanes = np.empty(16, np.float32)
    for n in range(start, stop):
        for m in range(low.shape[0]):
            lanes[:] = 0
            for chunk in range(half // 32):
                first, second = _chunk_scales(scale, n, chunk, group_size)
                b = chunk * 32
                for j in range(16):
                    byte, byte2 = np.float32(packed[n, b + j]), np.float32(packed[n, b + 16 + j])
                    high, high2 = np.floor(byte * np.float32(0.0625)), np.floor(byte2 * np.float32(0.0625))
                    lanes[j] += ((low[m, b + j] * byte + diff[m, b + j] * high) * first
                                 + (low[m, b + 16 + j] * byte2 + diff[m, b + 16 + j] * high2) * second)
            total = lanes.sum()
            for g in range(offset.shape[1]):
                total += offset[n, g] * sums[m, g]
            out[m, n] = total


@jit
def _nf4_matvec(x, packed, absmax, code, out, start, stop):
    """NF4: each code indexes QLoRA's 16-value table; one absmax per 64 consecutive weights. packed [out, in / 2]
    and absmax [out, in / 64] are views of the format's flat tensors (a row's blocks never straddle rows)."""
    cols = x.shape[1]
    for n in range(start, stop):
        for m in range(x.shape[0]):
            total = np.float32(0.0)
            for block in range(cols // 64):
                dot = np.float32(0.0)
                for j in range(32):
                    byte = packed[n, block * 32 + j]
                    k = block * 64 + j // 16 * 32 + j % 16
                    dot += x[m, k] * code[byte & 15] + x[m, k + 16] * code[byte >> 4]
                total += dot * absmax[n, block]
            out[m, n] = total


@jit(inline=True)
def _nf4_block(acc, first_run, second_run, x, at, absmax):
    """acc + absmax * (float32 x[at : at+64] times one block's 64 looked-up NF4 weights, its two 32-weight runs)."""
    run = avx512.nf4_dot(avx512.nf4_dot(avx512.zero_floats16(), first_run, x, at), second_run, x, at + 32)
    return avx512.multiply_add(acc, run, absmax)


@jit
def _nf4_table_matvec(x, packed, absmax, code, out, start, stop):
    """`_nf4_matvec` with the code book looked up 16 codes per instruction (`avx512.nf4_weights`), from four
    activation rows on once per four rows (a last partial four repeats its final row); 64-weight blocks are summed
    in 16 lanes and scaled by their absmax in one multiply-add."""
    table, rows = avx512.load_floats16(code, 0), x.shape[0]
    for n in range(start, stop):
        weights = packed[n]
        for m in range(rows if rows < 4 else 0):  # a row or three: no fours to share the lookups
            acc = avx512.zero_floats16()
            for block in range(x.shape[1] // 64):
                acc = _nf4_block(acc, avx512.nf4_weights(weights, block * 32, table),
                                 avx512.nf4_weights(weights, block * 32 + 16, table), x[m], block * 64, absmax[n, block])
            out[m, n] = avx512.sum_floats16(acc)
        for first in range(0, rows if rows >= 4 else 0, 4):
            m0, m1, m2, m3 = first, min(first + 1, rows - 1), min(first + 2, rows - 1), min(first + 3, rows - 1)
            x0, x1, x2, x3 = x[m0], x[m1], x[m2], x[m3]
            a0, a1 = avx512.zero_floats16(), avx512.zero_floats16()
            a2, a3 = avx512.zero_floats16(), avx512.zero_floats16()
            for block in range(x.shape[1] // 64):
                first_run = avx512.nf4_weights(weights, block * 32, table)
                second_run = avx512.nf4_weights(weights, block * 32 + 16, table)
                at, scale = block * 64, absmax[n, block]
                a0 = _nf4_block(a0, first_run, second_run, x0, at, scale)
                a1 = _nf4_block(a1, first_run, second_run, x1, at, scale)
                a2 = _nf4_block(a2, first_run, second_run, x2, at, scale)
                a3 = _nf4_block(a3, first_run, second_run, x3, at, scale)
            out[m0, n], out[m1, n] = avx512.sum_floats16(a0), avx512.sum_floats16(a1)
            out[m2, n], out[m3, n] = avx512.sum_floats16(a2), avx512.sum_floats16(a3)


@jit
def _round_activations(x):
    """x [M, K] rounded as llama.cpp's Q8_0 rounds it: per 32 values, scale = max |x| / 127 and
    codes = round(x / scale) in int8. Returns the codes, the scales and each block's sum of rounded values
    (for int4's offsets)."""
    rows, cols = x.shape
    codes = np.empty((rows, cols), np.int8)
    scales = np.empty((rows, cols // 32), np.float32)
    sums = np.empty((rows, cols // 32), np.float32)
    for m in range(rows):
        for block in range(cols // 32):
            top, total = np.float32(0), 0
            for k in range(block * 32, block * 32 + 32):
                top = max(top, abs(x[m, k]))
            inverse = np.float32(127) / top if top > 0 else np.float32(0)
            for k in range(block * 32, block * 32 + 32):
                codes[m, k] = np.int8(np.round(x[m, k] * inverse))
                total += codes[m, k]
            scales[m, block] = top / np.float32(127)
            sums[m, block] = np.float32(total) * scales[m, block]
    return codes, scales, sums


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """The values the integer kernels multiply instead of x [..., K]: x rounded to int8 per 32 values. The
    many-row matmul path of int8/int4 layers multiplies these, and the tests use it as the reference of
    `_round_activations`."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    top = blocks.abs().amax(dim=-1, keepdim=True)
    # bit for bit the kernel's arithmetic: 127 / top divided once (torch computes 127 / tensor as 127 * (1 / tensor)),
    # and the scale as top times 1/127 (the kernel's fastmath turns its division by a constant into that)
    inverse = torch.where(top > 0, torch.full_like(top, 127) / top, torch.zeros_like(top))
    return (torch.round(blocks * inverse) * (top * (1 / 127))).reshape(x.shape)


@jit(inline=True)
def _block_scale(scale, n, block, group_size, cols):
    """Row n's weight scale for 32-column block `block` (groups of 32, 64, 128 or one per row), spelled out
    per group size for the reason given in `_chunk_scales`."""
    if group_size == 32:
        return scale[n, block]
    if group_size == 64:
        return scale[n, block >> 1]
    if group_size == 128:
        return scale[n, block >> 2]
    return scale[n, 0]


PREFETCH_ROWS = 8
"""How far ahead the integer kernels ask for the rows they will read (`simd.prefetch`, the weights' bytes and
the first line of their scales): a sweep over SmolLM2's 210 Q4_1 matrices from L3 on one core took 10.5-11.1 ms
without, 9.3 with 4 rows ahead, 8.6-9.0 with 8."""


@jit
def _int8_dot_matvec(codes, x_scales, q, scale, group_size, out, start, stop):
    """`_int8_matvec` over int8-rounded activations: byte products summed per 32-column block (simd.q8_block).
    Rows go two at a time (the last one paired with itself when odd): two independent sums hide each other's
    latency (~20% faster than one row at a time)."""
    cols = q.shape[1]
    for n in range(start, stop, 2):
        n2 = min(n + 1, stop - 1)
        ahead = min(n + PREFETCH_ROWS, stop - 1)  # rows ahead and ahead + 1 (read past the end: harmless)
        for byte in range(0, 2 * cols, 64):
            simd.prefetch(q[ahead], byte)
        simd.prefetch(scale[ahead], 0)
        first, second = q[n], q[n2]
        for m in range(codes.shape[0]):
            acc, acc2, x = simd.zero_lanes(), simd.zero_lanes(), codes[m]
            for block in range(cols // 32):
                x_scale, at = x_scales[m, block], block * 32
                acc = simd.q8_block(acc, x, at, first, at, _block_scale(scale, n, block, group_size, cols) * x_scale)
                acc2 = simd.q8_block(acc2, x, at, second, at, _block_scale(scale, n2, block, group_size, cols) * x_scale)
            out[m, n], out[m, n2] = simd.lanes_sum(acc), simd.lanes_sum(acc2)


@jit
def _int4_dot_matvec(codes, x_scales, x_sums, packed, scale, offset, group_size, out, start, stop):
    """`_nibble_matvec` over int8-rounded activations: sum(x * (code * scale + offset)) is
    scale * x_scale * sum(x_code * code) per block (simd.nibble_codes, simd.codes_block) plus offset * x_scale * sum(x_code).
    Two rows at a time, as `_int8_dot_matvec`."""
    if codes.shape[0] >= 4:
        _int4_dot_tiles(codes, x_scales, x_sums, packed, scale, offset, group_size, out, start, stop)
        return
    cols = packed.shape[1] * 2
    for n in range(start, stop, 2):
        n2 = min(n + 1, stop - 1)
        ahead = min(n + PREFETCH_ROWS, stop - 1)  # as in `_int8_dot_matvec`
        for byte in range(0, 2 * packed.shape[1], 64):
            simd.prefetch(packed[ahead], byte)
        simd.prefetch(scale[ahead], 0)
        simd.prefetch(offset[ahead], 0)
        first, second = packed[n], packed[n2]
        for m in range(codes.shape[0]):
            acc, acc2, x = simd.zero_lanes(), simd.zero_lanes(), codes[m]
            offsets, offsets2 = np.float32(0), np.float32(0)
            for block in range(cols // 32):
                x_scale, at = x_scales[m, block], block * 32
                acc = simd.codes_block(acc, x, at, simd.nibble_codes(first, block * 16),
                                       _block_scale(scale, n, block, group_size, cols) * x_scale)
                acc2 = simd.codes_block(acc2, x, at, simd.nibble_codes(second, block * 16),
                                        _block_scale(scale, n2, block, group_size, cols) * x_scale)
                offsets += _block_scale(offset, n, block, group_size, cols) * x_sums[m, block]
                offsets2 += _block_scale(offset, n2, block, group_size, cols) * x_sums[m, block]
            out[m, n], out[m, n2] = simd.lanes_sum(acc) + offsets, simd.lanes_sum(acc2) + offsets2


@jit
def _int4_dot_tiles(codes, x_scales, x_sums, packed, scale, offset, group_size, out, start, stop):
    """`_int4_dot_matvec` for many activation rows (a prompt): each weight row's block is unpacked once and
    multiplied with four activation rows (`simd.nibble_codes`, `simd.codes_block`); a last partial tile
    repeats its final row."""
    cols, rows = packed.shape[1] * 2, codes.shape[0]
    for n in range(start, stop):
        weights = packed[n]
        for first in range(0, rows, 4):
            m0, m1, m2, m3 = first, min(first + 1, rows - 1), min(first + 2, rows - 1), min(first + 3, rows - 1)
            a0, a1, a2, a3 = simd.zero_lanes(), simd.zero_lanes(), simd.zero_lanes(), simd.zero_lanes()
            x0, x1, x2, x3 = codes[m0], codes[m1], codes[m2], codes[m3]
            for block in range(cols // 32):
                unpacked, at = simd.nibble_codes(weights, block * 16), block * 32
                step = _block_scale(scale, n, block, group_size, cols)
                a0 = simd.codes_block(a0, x0, at, unpacked, step * x_scales[m0, block])
                a1 = simd.codes_block(a1, x1, at, unpacked, step * x_scales[m1, block])
                a2 = simd.codes_block(a2, x2, at, unpacked, step * x_scales[m2, block])
                a3 = simd.codes_block(a3, x3, at, unpacked, step * x_scales[m3, block])
            out[m0, n], out[m1, n] = simd.lanes_sum(a0), simd.lanes_sum(a1)
            out[m2, n], out[m3, n] = simd.lanes_sum(a2), simd.lanes_sum(a3)
        for m in range(rows):  # the offsets: offset * x_scale * sum(x_code) per block
            total = np.float32(0)
            for block in range(cols // 32):
                total += _block_scale(offset, n, block, group_size, cols) * x_sums[m, block]
            out[m, n] += total


_pool: ThreadPoolExecutor | None = None


def _over_rows(kernel, rows: int, work: int, *args, granule: int = 1) -> None:
    """Run `kernel(*args, start, stop)` over rows [0, rows), split across torch's thread count when large, in
    multiples of `granule` rows."""
    global _pool
    threads = min(torch.get_num_threads(), rows // granule)
    if threads < 2 or work < SPLIT_MIN_WEIGHTS:
        kernel(*args, 0, rows)
        return
    if _pool is None or _pool._max_workers < threads - 1:
        _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="lmforge-kernel")
    bounds = [rows // granule * i // threads * granule for i in range(threads + 1)]
    helpers = [_pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    kernel(*args, bounds[0], bounds[1])
    for helper in helpers:
        helper.result()


class KernelWeight:
    """A quantized weight ready for its kernel: the arrays as numpy views, resolved once (converting them on
    every call costs more than a small matrix's product). Views share memory with the weight's tensors.

    int8 and int4 weights (and their tiles, `tiles.TiledWeight`) multiply int8-rounded activations with integer SIMD
    products where the CPU has them (`simd.available()`), as llama.cpp does; `exact_activations=True` keeps the float32 activations
    (slower; the product then equals a matmul on the dequantized weight to float rounding)."""

    def __init__(self, weight, exact_activations: bool = False):
        from lmforge.quant import tiles
        from lmforge.quant.formats import NF4_CODE, Int4Weight, Int8Weight, NF4Weight

        self.rows, cols = weight.shape
        self.work = self.rows * cols  # per row of x, in int8-per-channel weights: other kernels cost more per weight
        self.exact_activations = exact_activations
        integer = simd.available() and not exact_activations
        self.granule = 1  # the kernel's rows are split between threads in multiples of this
        self.inputs = "float"  # how the kernel takes x: as is, split into 4-bit runs, or rounded to int8
        self.max_rows = MAX_ROWS["float"]  # beyond: dequantize and one matmul
        if isinstance(weight, Int8Weight):
            self.kernel = _int8_dot_matvec if integer else _int8_matvec
            self.arrays = (as_array(weight.q), as_array(weight.scale), weight.group_size)
            self.work *= 1 if weight.group_size == cols or integer else 2
            self.inputs = "int8" if integer else "float"
            self.max_rows = MAX_ROWS["int8"] if integer else self.max_rows
        elif isinstance(weight, tiles.TiledWeight):
            if exact_activations:
                raise TypeError("tiles multiply int8-rounded activations; for exact ones pass the row-layout weight "
                                "(TiledWeight.to_weight()).")
            self.kernel, self.granule = tiles.product, tiles.TILE_ROWS
            self.arrays = (as_array(weight.tiles), weight.bits, weight.group_size, weight.half)
            self.inputs, self.max_rows = "int8", MAX_ROWS[f"int{weight.bits} tiles"]
        elif isinstance(weight, Int4Weight):
            self.kernel = _int4_dot_matvec if integer else _nibble_matvec
            self.arrays = (as_array(weight.packed), as_array(weight.scale), as_array(weight.offset), weight.group_size)
            self.work = self.work if integer else 2 * self.work
            self.inputs = "int8" if integer else ("runs", weight.group_size)
            self.max_rows = MAX_ROWS["int4"] if integer else self.max_rows
        elif isinstance(weight, NF4Weight):
            table = avx512.available()
            self.kernel = _nf4_table_matvec if table else _nf4_matvec
            self.work, self.max_rows = (1 if table else 4) * self.work, MAX_ROWS["nf4 table" if table else "nf4"]
            self.arrays = (as_array(weight.packed).reshape(self.rows, cols // 2),
                           as_array(weight.block_absmax()).reshape(self.rows, cols // 64), as_array(NF4_CODE))
        else:
            raise TypeError(f"no CPU kernel for {type(weight).__name__}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] float32 on the CPU times the weight transposed → [M, out] float32."""
        xs = x.contiguous().numpy()
        if self.inputs == "int8":
            codes, scales, sums = _round_activations(xs)
            inputs = (codes, scales) if self.kernel is _int8_dot_matvec else (codes, scales, sums)
        elif self.inputs == "float":
            inputs = (xs,)
        else:
            inputs = _split_runs(xs, self.inputs[1])
        out = torch.empty(x.shape[0], self.rows, dtype=torch.float32)
        _over_rows(self.kernel, self.rows, self.work * x.shape[0], *inputs, *self.arrays, out.numpy(),
                   granule=self.granule)
        return out


def quantized_matmul(x: torch.Tensor, weight, exact_activations: bool = False) -> torch.Tensor:
    """x [M, in] float32 on the CPU times the quantized [out, in] weight transposed → [M, out] float32."""
    return KernelWeight(weight, exact_activations)(x)
