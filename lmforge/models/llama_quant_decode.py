"""A quantized Llama's whole decode step in one compiled call, on every core.

`llama_decode.decode_step` fuses the small operations but still calls each projection's module: for
a 4-bit model whose products take 10-100 µs each, the ~200 calls' Python and thread hand-overs
cost as much as the arithmetic. When every projection is an int8 or int4 `QuantizedLinear` whose
kernel rounds activations to int8 (the default where the CPU has integer SIMD), or an NF4 one on
AVX-512 table lookups, this module runs all layers of a step inside one numba function instead:

    per layer:  norm → q, k, v products → attention → o product → residual + norm
                → gate, up products and silu(gate) * up → down product → residual

Every thread runs that whole sequence (`threads.run_on_threads`): each computes its share of every
product's rows and of the attention heads, and the threads meet at a spin barrier before any
operation that reads all rows. Each thread keeps its own copy of the residual stream and of the
rounded activations (the same arithmetic on the same inputs, so the copies stay identical), which
leaves five barriers per layer and no locks. The result equals the module path's (same kernels,
same rounding) to float rounding.

The step is prepared once per KV cache (`plan_for`): the weights' arrays gathered into typed lists,
the norms stacked. The model is not expected to change while one cache is in use.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from lmforge.nn.kernels import cpu_decode, simd, threads
from lmforge.nn.kernels.jit import jit, numba
from lmforge.quant import kernels, tiles
from lmforge.quant.linear import QuantizedLinear

PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
Q, K, V, O, GATE, UP, DOWN = range(7)
NO_CONTEXT, NO_LENGTHS = np.zeros((0, 0), np.int64), np.zeros(0, np.int64)  # a contiguous cache: no paged context
INT8, INT4, NF4, TILES = 0, 1, 2, 3  # formats[matrix] = (kind, group size, tile bits, tile scales in fp16)


@jit(inline=True)
def _share(rows, rank, count):
    """Thread `rank`'s rows of a product with `rows` outputs: whole tiles of 16 rows where the rows allow (a tiled
    weight needs them), else single rows. The same rule for every format, so a thread's share of two products of
    one width (gate and up) is the same rows whatever their formats."""
    unit = tiles.TILE_ROWS if rows % tiles.TILE_ROWS == 0 else 1
    units = rows // unit
    return units * rank // count * unit, units * (rank + 1) // count * unit


@jit(inline=True)
def _product(x, rounded, weights, scales, offsets, formats, code, matrix, out, rank, count):
    """This thread's share of the rows of out = x @ weight.T for weight number `matrix`, x given as is (NF4
    multiplies float32 activations) and rounded to int8 (int8, int4)."""
    codes, x_scales, sums = rounded
    start, stop = _share(out.shape[1], rank, count)
    if formats[matrix, 0] == TILES:
        tiles.product(codes, x_scales, sums, weights[matrix], formats[matrix, 2], formats[matrix, 1],
                      formats[matrix, 3] == 1, out, start, stop)
    elif formats[matrix, 0] == INT8:
        kernels._int8_dot_matvec(codes, x_scales, weights[matrix], scales[matrix], formats[matrix, 1], out,
                                 start, stop)
    elif formats[matrix, 0] == NF4:
        kernels._nf4_table_matvec(x, weights[matrix], scales[matrix], code, out, start, stop)
    else:
        kernels._int4_dot_matvec(codes, x_scales, sums, weights[matrix], scales[matrix], offsets[matrix],
                                 formats[matrix, 1], out, start, stop)


@jit
def _layers_step(rank, count, sync, hidden, weights, scales, offsets, formats, code, norms, eps, cos, signed_sin,
                 keys, values, position, mask, context, lengths, attention_scale, num_heads, qkv, heads, delta, gate_up,
                 gated, out):
    """Thread `rank` of `count`: every layer for one new token per row, then the final norm into out [B, D]. The cache
    is contiguous (keys/values [B, H_kv, T, d], the new token at `position`, `mask` rows) or, when `context` has rows,
    paged (pools [blocks, block_size, H_kv, d], row b's context the slots context[b, :lengths[b]])."""
    stream = hidden.copy()  # this thread's residual stream
    normed = np.empty_like(stream)
    kv_heads, head_dim = keys[0].shape[2 if context.shape[0] else 1], keys[0].shape[3]  # pools: [.., .., H_kv, d]
    q_end, k_end = num_heads * head_dim, (num_heads + kv_heads) * head_dim
    kv_start, kv_stop = kv_heads * rank // count, kv_heads * (rank + 1) // count
    width = gated.shape[1]
    gate_start, gate_stop = _share(width, rank, count)
    passed = 0
    for layer in range(len(keys)):
        first = layer * 7
        cpu_decode.add_rms_norm(stream, delta[:0] if layer == 0 else delta, norms[2 * layer], eps, normed)
        rounded = kernels._round_activations(normed)
        _product(normed, rounded, weights, scales, offsets, formats, code, first + Q, qkv[:, :q_end], rank, count)
        _product(normed, rounded, weights, scales, offsets, formats, code, first + K, qkv[:, q_end:k_end], rank,
                 count)
        _product(normed, rounded, weights, scales, offsets, formats, code, first + V, qkv[:, k_end:], rank, count)
        passed = threads.barrier(sync, count, passed)
        if context.shape[0]:
            cpu_decode.paged_rotary_attention_heads(qkv, cos, signed_sin, keys[layer], values[layer], context, lengths,
                                                    attention_scale, num_heads, kv_start, kv_stop, heads)
        else:
            cpu_decode.rotary_attention_heads(qkv, cos, signed_sin, keys[layer], values[layer], position, mask,
                                              attention_scale, num_heads, kv_start, kv_stop, heads)
        passed = threads.barrier(sync, count, passed)
        rounded = kernels._round_activations(heads)
        _product(heads, rounded, weights, scales, offsets, formats, code, first + O, delta, rank, count)
        passed = threads.barrier(sync, count, passed)
        cpu_decode.add_rms_norm(stream, delta, norms[2 * layer + 1], eps, normed)
        rounded = kernels._round_activations(normed)
        _product(normed, rounded, weights, scales, offsets, formats, code, first + GATE, gate_up[:, :width], rank,
                 count)
        _product(normed, rounded, weights, scales, offsets, formats, code, first + UP, gate_up[:, width:], rank,
                 count)
        for row in range(gated.shape[0]):  # silu(gate) * up over the rows this thread computed
            for i in range(gate_start, gate_stop):
                gate = gate_up[row, i]
                gated[row, i] = gate / (np.float32(1) + np.exp(-gate)) * gate_up[row, width + i]
        passed = threads.barrier(sync, count, passed)
        rounded = kernels._round_activations(gated)
        _product(gated, rounded, weights, scales, offsets, formats, code, first + DOWN, delta, rank, count)
        passed = threads.barrier(sync, count, passed)
    if rank == 0:
        cpu_decode.add_rms_norm(stream, delta, norms[len(norms) - 1], eps, out)


@jit
def _compiled_typed_list(arrays):
    typed = numba.typed.List()
    for array in arrays:
        typed.append(array)
    return typed


def _typed_list(arrays: list):
    """A numba list of the arrays, built in compiled code so that its machinery comes from the disk cache: filling
    a `numba.typed.List` from Python compiled that machinery again in every process, ~0.4 s per kind of array
    (1.2 s of a first decode step). The Python list goes in as numba's "reflected" list (a tuple would compile
    once per length, unrolled: 24 s for SmolLM2's 210 matrices)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", numba.NumbaPendingDeprecationWarning)  # reflected lists: read only here
        return _compiled_typed_list(arrays)


class QuantizedStackPlan:
    """A model's arrays arranged for `_layers_step`, and buffers reused by every step of one cache."""

    def __init__(self, model, kv_cache):
        layers = model.layers
        modules = [getattr(getattr(layer, part), name) for layer in layers for part, name in PROJECTIONS]
        weights, scales, offsets, formats = [], [], [], []
        for module in modules:  # the numpy views each module's kernel already holds (see `_compiles`)
            if module.tiled:
                tiled, bits, group_size, half = module.cpu_kernel().arrays
                weights.append(tiled)
                scale = offset = np.zeros((0, 0), np.float32)
                offsets.append(offset)
                formats.append((TILES, group_size, bits, int(half)))
            elif module.method == "int8":
                q, scale, group_size = module.cpu_kernel().arrays
                weights.append(q.view(np.uint8))  # one list type for 8- and 4-bit bytes; the kernels read bytes
                offsets.append(np.zeros((0, 0), np.float32))
                formats.append((INT8, group_size, 0, 0))
            elif module.method == "nf4":
                packed, scale, self.code = module.cpu_kernel().arrays  # scale: each 64-weight block's absmax
                weights.append(packed)
                offsets.append(np.zeros((0, 0), np.float32))
                formats.append((NF4, 64, 0, 0))
            else:
                packed, scale, offset, group_size = module.cpu_kernel().arrays
                weights.append(packed)
                offsets.append(offset)
                formats.append((INT4, group_size, 0, 0))
            scales.append(scale)
        self.weights, self.scales, self.offsets = _typed_list(weights), _typed_list(scales), _typed_list(offsets)
        if not any(row[0] == NF4 for row in formats):
            self.code = np.zeros(16, np.float32)  # the NF4 code book, unused without NF4 layers
        self.formats = np.array(formats, np.int64)
        norms = [norm.weight.detach() for layer in layers for norm in (layer.attn_norm, layer.mlp_norm)]
        self.norms = torch.stack([*norms, model.norm.weight.detach()]).float().numpy()
        self.eps = np.float32(model.norm.eps)
        self.keys = _typed_list([keys.numpy() for keys in kv_cache.keys])
        self.values = _typed_list([values.numpy() for values in kv_cache.values])
        attention = layers[0].self_attn
        self.num_heads, self.scale = attention.num_heads, np.float32(attention.scale)
        self._widths = (sum(getattr(attention, name).out_features for name in ("q_proj", "k_proj", "v_proj")),
                        attention.num_heads * attention.head_dim, model.norm.weight.shape[0],
                        layers[0].mlp.down_proj.in_features)
        self._scratch: tuple[np.ndarray, ...] = ()

    def _buffers(self, batch: int) -> tuple[np.ndarray, ...]:
        """The step's intermediate arrays for `batch` rows (qkv, heads, delta, gate_up, gated), kept between steps."""
        if not self._scratch or self._scratch[0].shape[0] != batch:
            qkv, heads, dim, width = self._widths
            self._scratch = tuple(np.empty((batch, columns), np.float32)
                                  for columns in (qkv, heads, dim, 2 * width, width))
        return self._scratch

    def step(self, hidden, cos, signed_sin, mask_rows, position: int) -> torch.Tensor:
        """hidden [B, D] float32 → the final-normed hidden [B, D], every layer's key/value stored at `position` of the
        contiguous cache."""
        return self._run(hidden, cos, signed_sin, position, mask_rows, NO_CONTEXT, NO_LENGTHS)

    def paged_step(self, hidden, cos, signed_sin, context, lengths) -> torch.Tensor:
        """hidden [N, D] float32, one new token of each of N sequences in a paged cache (context: each row's token
        slots [N, L], lengths [N], the new token's slot the last) → the final-normed hidden [N, D]."""
        return self._run(hidden, cos, signed_sin, 0, cpu_decode.NO_ROWS, context, lengths)

    def _run(self, hidden, cos, signed_sin, position, mask_rows, context, lengths) -> torch.Tensor:
        out = torch.empty_like(hidden)
        threads.run_on_threads(_layers_step, torch.get_num_threads(), hidden.numpy(), self.weights, self.scales,
                               self.offsets, self.formats, self.code, self.norms, self.eps, cos, signed_sin, self.keys,
                               self.values, position, mask_rows, context, lengths, self.scale, self.num_heads,
                               *self._buffers(hidden.shape[0]), out.numpy())
        return out


def _compiles(module) -> bool:
    """Whether the step computes exactly what this projection module would: a QuantizedLinear (not a subclass or an
    adapter wrapper) without bias or hooks, on one of the kernels the step calls — int8/int4 on int8-rounded
    activations, NF4 on AVX-512 table lookups."""
    if type(module) is not QuantizedLinear or module.bias is not None or module._forward_hooks \
            or module._forward_pre_hooks:
        return False
    kernel = module.cpu_kernel()
    return kernel is not None and (kernel.inputs == "int8" and module.method in ("int8", "int4")
                                   or kernel.kernel is kernels._nf4_table_matvec)


def plan_for(model, kv_cache) -> QuantizedStackPlan | None:
    """The cache's compiled-step plan, built on its first decode step; None when some layer does not qualify
    (the caller then runs the per-module step)."""
    plan = getattr(kv_cache, "quantized_stack_plan", False)
    if plan is False:
        layers = model.layers
        eligible = (simd.available() and all(layer.attn_norm.eps == model.norm.eps == layer.mlp_norm.eps
                                             for layer in layers)
                    and all(_compiles(getattr(getattr(layer, part), name))
                            for layer in layers for part, name in PROJECTIONS))
        plan = QuantizedStackPlan(model, kv_cache) if eligible else None
        kv_cache.quantized_stack_plan = plan
    return plan
