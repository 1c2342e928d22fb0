"""Quantized formats: error bounds, packing, QLoRA's NF4 code book, and QuantizedLinear's forward."""

import pytest
import torch
from torch import nn

from lmforge.errors import ConfigError, InputError
from lmforge.quant import Int4Weight, Int8Weight, NF4Weight, QuantizedLinear, kernels
from lmforge.quant.formats import NF4_CODE, pack_nibbles, unpack_nibbles

# bitsandbytes' NF4 table (the values QLoRA quantizes to), copied by hand.
BITSANDBYTES_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0]


def random_weight(rows=48, cols=128, seed=0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_nf4_code_book_is_qloras():
    assert torch.allclose(NF4_CODE, torch.tensor(BITSANDBYTES_NF4), atol=1e-6)


def test_nibble_packing_round_trips_in_llama_cpp_order():
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (3, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), codes)
    run = torch.zeros(32, dtype=torch.uint8)
    run[0], run[16], run[15], run[31] = 1, 2, 3, 4
    assert pack_nibbles(run).tolist() == [0x21] + [0] * 14 + [0x43]  # byte j: weight j low, weight j + 16 high
    with pytest.raises(InputError, match="runs of 32"):
        pack_nibbles(torch.zeros(3, 10, dtype=torch.uint8))


def test_int8_error_is_at_most_half_a_step_per_channel():
    w = random_weight()
    q = Int8Weight.quantize(w)
    step = w.abs().amax(1) / 127
    assert q.q.dtype == torch.int8 and q.shape == w.shape
    assert bool(((q.dequantize() - w).abs() <= step[:, None] / 2 + 1e-7).all())
    assert q.nbytes() == w.numel() + 4 * w.shape[0]


def test_int8_groups_of_32_are_llama_cpp_q8_0():
    w = random_weight()
    q = Int8Weight.quantize(w, group_size=32)
    groups = w.view(w.shape[0], -1, 32)
    assert q.scale.shape == (48, 4)
    assert torch.allclose(q.scale, groups.abs().amax(-1) / 127)  # Q8_0: d = absmax / 127
    error = (q.dequantize() - w).view_as(groups).abs()
    assert bool((error <= q.scale[..., None] / 2 + 1e-7).all())


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(group_size):
    w = random_weight()
    q = Int4Weight.quantize(w, group_size)
    groups = w.view(w.shape[0], -1, group_size)
    low, step = groups.amin(-1), (groups.amax(-1) - groups.amin(-1)) / 15
    error = (q.dequantize() - w).view_as(groups).abs()
    # half a step, plus what rounding the scale and the offset to float16 (Q4_1's precision) moves the grid
    assert bool((error <= (step / 2 + 16 * step * 2**-11 + low.abs() * 2**-11)[..., None] + 1e-6).all())
    assert torch.equal(q.scale.half().float(), q.scale) and torch.equal(q.offset.half().float(), q.offset)
    assert q.packed.shape == (w.shape[0], w.shape[1] // 2)


def test_int4_hand_computed_group():
    w = torch.tensor([[-2.0, 0.0, 2.0, 5.5] * 8])  # one group of 32: range [-2, 5.5]
    q = Int4Weight.quantize(w, 32)
    assert float(q.scale) == 0.5 and float(q.offset) == -2.0  # (max - min) / 15 and min, as Q4_1
    assert unpack_nibbles(q.packed)[0, :4].tolist() == [0, 4, 8, 15]
    assert torch.equal(q.dequantize(), w)  # every value sits exactly on the grid


def test_int4_of_q4_1_weights_gives_them_back():
    codes = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(0))
    codes[:, ::32] = 0  # each group uses its lowest and highest code, as Q4_1's own quantization does
    codes[:, 1::32] = 15
    scale = (torch.rand(8, 2) * 0.01).half().float()
    offset = (-torch.rand(8, 2) * 0.05).half().float()
    original = Int4Weight(pack_nibbles(codes), scale, offset, 32)
    again = Int4Weight.quantize(original.dequantize(), 32)
    assert torch.equal(again.packed, original.packed) and torch.equal(again.dequantize(), original.dequantize())


def test_nf4_hand_computed_block_and_error():
    w = torch.zeros(1, 64)
    w[0, :4] = torch.tensor([2.0, -2.0, 1.0, 0.05])  # absmax 2 → 1, -1, 0.5, 0.025 of it
    q = NF4Weight.quantize(w)
    assert float(q.absmax) == 2.0
    expected = torch.zeros(64)
    expected[:4] = torch.tensor([1.0, -1.0, 0.44070982933044434, 0.0]) * 2  # nearest codes: 1, -1, 0.4407, 0
    assert torch.allclose(q.dequantize()[0], expected, atol=1e-6)
    w = random_weight()
    blocks = w.reshape(-1, 64)
    gaps = (NF4_CODE[1:] - NF4_CODE[:-1]).max()
    error = (NF4Weight.quantize(w).dequantize().reshape(-1, 64) - blocks).abs()
    assert bool((error <= blocks.abs().amax(-1, keepdim=True) * gaps / 2 + 1e-6).all())


def test_nf4_double_quantization_shrinks_the_scales_and_stays_close():
    w = random_weight(rows=96, cols=384)  # 576 blocks: two full groups of 256 and a partial one
    single, double = NF4Weight.quantize(w), NF4Weight.quantize(w, double_quant=True)
    assert double.absmax is None and double.absmax_q.dtype == torch.int8 and double.absmax_scale.numel() == 3
    step = (single.absmax - single.absmax.mean()).abs().max() / 127
    assert float((double.block_absmax() - single.absmax).abs().max()) <= float(step) / 2 + 1e-7
    assert double.nbytes() < single.nbytes()  # 8 instead of 32 bits per block scale
    assert float((double.dequantize() - single.dequantize()).norm() / single.dequantize().norm()) < 0.01


@pytest.mark.parametrize("method,options,relative_error", [("int8", {}, 0.01), ("int4", {"group_size": 32}, 0.15),
                                                           ("nf4", {}, 0.15), ("nf4", {"double_quant": True}, 0.15)])
def test_quantized_linear_equals_a_matmul_on_its_dequantized_weight(method, options, relative_error):
    linear = nn.Linear(128, 48).requires_grad_(False)
    quantized = QuantizedLinear.from_linear(linear, method, **options)
    x = torch.randn(3, 5, 128)
    reference = torch.nn.functional.linear(x, quantized.weight_format.dequantize(), linear.bias)
    quantized.exact_activations = True
    assert torch.allclose(quantized(x), reference, atol=1e-6)
    quantized.exact_activations = False  # the default: int8 and int4 round x as llama.cpp does, where the CPU can
    rounds = kernels.KernelWeight(quantized.weight_format).inputs == "int8"
    inputs = kernels.round_activations(x) if rounds else x
    reference = torch.nn.functional.linear(inputs, quantized.weight_format.dequantize(), linear.bias)
    assert torch.allclose(quantized(x), reference, atol=1e-5)
    original = linear(x)  # and close to the original layer
    assert float((quantized(x) - original).norm() / original.norm()) < relative_error
    state = quantized.state_dict()
    assert set(state) == set(quantized._tensor_names) | {"bias"}
    assert method in repr(quantized)


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match="group_size"):
        Int4Weight.quantize(random_weight(cols=96), 64)
    with pytest.raises(ConfigError, match="int8 group_size must be one of 32, 64, 128, 96 .* got 48"):
        Int8Weight.quantize(random_weight(cols=96), 48)
    with pytest.raises(ConfigError, match="multiple of 64"):
        NF4Weight.quantize(torch.randn(3, 7))
    with pytest.raises(InputError, match="floating-point"):
        Int8Weight.quantize(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ConfigError, match="unknown quantization method"):
        QuantizedLinear.from_linear(nn.Linear(4, 4), "int3")


@pytest.mark.parametrize("method, options", [("int8", {}), ("int8", {"group_size": 32}), ("int4", {"group_size": 64})])
def test_large_matrices_quantize_in_row_chunks_exactly(method, options, monkeypatch):
    from lmforge.quant import linear as linear_module

    layer = nn.Linear(128, 40)
    whole = QuantizedLinear.from_linear(layer, method, **options)
    monkeypatch.setattr(linear_module, "ROW_CHUNK", 16)  # 40 rows: chunks of 16, 16 and 8
    chunked = QuantizedLinear.from_linear(layer, method, **options)
    assert chunked._settings == whole._settings
    assert all(torch.equal(getattr(chunked, name), getattr(whole, name)) for name in whole._tensor_names)
    assert torch.equal(chunked.bias, whole.bias)
