"""int4 weights held as 16-row tiles (AVX-512 VNNI): the layout converts back exactly, the tile product equals a
matmul of the int8-rounded activations and the dequantized weight (as the row-at-a-time kernels do), and a
QuantizedLinear holding tiles saves, loads, moves and fuses as one holding the format's own tensors."""

import numpy as np
import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.quant import Int4Weight, Int8Weight, QuantizedLinear, kernels, tiles

pytestmark = pytest.mark.skipif(not tiles.supports(16), reason="the tile product needs AVX-512 VNNI and numba")


def half_exact(weight):
    """The weight with scales (and offsets) rounded to float16 values, as GGUF's blocks hold them."""
    tensors = {name: tensor.half().float() if tensor.is_floating_point() else tensor
               for name, tensor in weight.tensors().items()}
    return type(weight)(**tensors, group_size=weight.group_size)


def float32_scales(weight):
    """The weight with scales (and offsets) that float16 cannot hold (moved by 2^-15 of themselves)."""
    tensors = {name: tensor * (1 + 2**-15) if tensor.is_floating_point() else tensor
               for name, tensor in weight.tensors().items()}
    return type(weight)(**tensors, group_size=weight.group_size)


def tile_product(x: torch.Tensor, tiled: tiles.TiledWeight, start: int, stop: int) -> torch.Tensor:
    codes, scales, sums = kernels._round_activations(x.numpy())
    out = np.zeros((x.shape[0], tiled.shape[0]), np.float32)
    tiles.product(codes, scales, sums, tiled.tiles.numpy(), tiled.bits, tiled.group_size, tiled.half, out, start, stop)
    return torch.from_numpy(out)


FORMATS = [(Int8Weight, 32), (Int8Weight, None), (Int4Weight, 32), (Int4Weight, 64), (Int4Weight, 128)]


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize(("fmt", "group_size"), FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 6, 9])  # 1-3: row by row; 6 and 9: fours, the last one partial
def test_tile_product_equals_a_matmul_of_rounded_activations(fmt, group_size, rows, half):
    weight = fmt.quantize(torch.randn(48, 384) * 0.05, group_size)
    weight = half_exact(weight) if half else float32_scales(weight)
    tiled = tiles.TiledWeight.from_weight(weight)
    assert tiled.half == half
    x = torch.randn(rows, 384) * torch.linspace(0.01, 3, 384)
    reference = kernels.round_activations(x) @ weight.dequantize().T
    out = tile_product(x, tiled, 16, 48)  # tiles 1 and 2 only
    assert torch.allclose(out[:, 16:], reference[:, 16:], atol=1e-4, rtol=1e-5)  # float sums in another order
    assert torch.equal(out[:, :16], torch.zeros(rows, 16))  # rows outside start..stop are not written


@pytest.mark.parametrize(("fmt", "group_size"), FORMATS)
def test_tiles_convert_back_to_the_same_tensors(fmt, group_size):
    weight = fmt.quantize(torch.randn(32, 256), group_size)
    for source in (float32_scales(weight), half_exact(weight)):
        tiled = tiles.TiledWeight.from_weight(source)
        back = tiled.to_weight()
        assert type(back) is fmt and back.group_size == source.group_size
        assert all(torch.equal(back.tensors()[name], tensor) for name, tensor in source.tensors().items())
        index = torch.tensor([17, 0, 31, 17])
        rows = tiled.select_rows(index)
        assert all(torch.equal(rows.tensors()[name], tensor[index]) for name, tensor in source.tensors().items())


def test_tile_layout_interleaves_sixteen_rows_four_bytes_at_a_time():
    weight = half_exact(Int4Weight.quantize(torch.randn(32, 128), 64))  # 2 tiles x 2 groups of 2 blocks
    tiled = tiles.TiledWeight.from_weight(weight)
    record_bytes = 2 * 256 + 2 * 16 * 2  # 2 blocks of 4 runs x 64 bytes of codes, 16 float16 scales and 16 offsets
    assert tiled.half and tiled.tiles.shape == (2, 2 * record_bytes)
    record = tiled.tiles[1, record_bytes:].numpy()  # tile 1 (rows 16..31), group 1 (columns 64..127)
    packed = weight.packed.numpy().view(np.uint32)  # row n's packed bytes, four per word: 16 per 32-column block
    for block in range(2):
        words = record[block * 256:(block + 1) * 256].view(np.uint32)
        for run in range(4):
            assert np.array_equal(words[run * 16:(run + 1) * 16], packed[16:32, 4 * (2 + block) + run])
    scales = record[2 * 256:].view(np.float16)
    assert np.array_equal(scales[:16], weight.scale.numpy()[16:32, 1])
    assert np.array_equal(scales[16:], weight.offset.numpy()[16:32, 1])


def test_int8_tiles_hold_codes_plus_128_and_the_scales():
    weight = half_exact(Int8Weight.quantize(torch.randn(16, 64), 32))  # 1 tile x 2 groups of 1 block
    tiled = tiles.TiledWeight.from_weight(weight)
    record_bytes = 8 * 64 + 16 * 2  # 8 runs of 16 rows x 4 bytes, 16 float16 scales: 34 bytes per 32 weights, as Q8_0
    assert tiled.tiles.shape == (1, 2 * record_bytes)
    record = tiled.tiles[0, record_bytes:].numpy()  # group 1: columns 32..63
    unsigned = (weight.q.numpy().astype(np.int16) + 128).astype(np.uint8)
    for run in range(8):
        lanes = record[run * 64:(run + 1) * 64].reshape(16, 4)
        assert np.array_equal(lanes, unsigned[:, 32 + 4 * run:36 + 4 * run])
    assert np.array_equal(record[512:].view(np.float16), weight.scale.numpy()[:, 1])


def test_scales_that_float16_would_round_stay_float32():
    weight = Int4Weight.quantize(torch.randn(16, 64), 32)  # Q4_1's rule: scales and offsets are float16 values
    assert not tiles.TiledWeight.from_weight(float32_scales(weight)).half
    tiled = tiles.TiledWeight.from_weight(half_exact(weight))
    assert tiled.half and tiled.tiles.shape[1] == 2 * (4 * 64 + 64)  # 20 bytes per 32 weights, as Q4_1


def test_int8_and_int4_layers_hold_tiles_where_whole_tiles_fit(monkeypatch):
    weight = Int4Weight.quantize(torch.randn(48, 64) * 0.05, 32)
    layer = QuantizedLinear(weight)
    assert layer.tiled and list(layer._buffers) == ["tiles"]  # one copy: the tiles
    assert layer.nbytes() == layer.tiles.numel() == 48 * 64 * 5 // 8  # float16 scales: 0.625 bytes per weight
    assert all(torch.equal(layer.weight_format.tensors()[name], tensor) for name, tensor in weight.tensors().items())
    assert not QuantizedLinear(Int4Weight.quantize(torch.randn(40, 64), 32)).tiled  # 40 rows: not whole tiles
    assert QuantizedLinear(Int8Weight.quantize(torch.randn(48, 64))).tiled
    monkeypatch.setattr(tiles.avx512, "vnni_available", lambda: False)
    assert not QuantizedLinear(weight).tiled  # no VNNI: the row kernels read the format's own tensors


@pytest.mark.parametrize("fmt", [Int8Weight, Int4Weight])
@pytest.mark.parametrize("rows", [1, 2, 9, 40])
def test_a_tiled_layer_multiplies_as_the_row_layout_does(rows, fmt):
    weight = fmt.quantize(torch.randn(48, 128) * 0.05, 32)
    tiled = QuantizedLinear(weight)
    x = torch.randn(rows, 128)
    with torch.no_grad():
        out = tiled(x)
        assert tiled.cpu_kernel().kernel is tiles.product
        assert torch.allclose(out, kernels.round_activations(x) @ weight.dequantize().T, atol=1e-4, rtol=1e-5)
        tiled.exact_activations = True  # float activations: a row-layout copy on the exact kernels
        assert torch.allclose(tiled(x), x @ weight.dequantize().T, atol=1e-4, rtol=1e-5)
        assert tiled.tiled and tiled.cpu_kernel().kernel is not tiles.product


def test_prompt_rows_split_across_threads_in_whole_tiles(monkeypatch):
    layer = QuantizedLinear(Int4Weight.quantize(torch.randn(48, 640) * 0.05, 32))
    x = torch.randn(96, 640)  # enough work to split: 48 weight rows → tiles [0, 16) and [16, 48)
    assert 48 * 640 * 96 >= kernels.SPLIT_MIN_WEIGHTS and 96 <= kernels.MAX_ROWS["int4 tiles"]
    calls, product = [], tiles.product

    def spy(*args):
        calls.append(args[-2:])
        return product(*args)

    monkeypatch.setattr(tiles, "product", spy)
    layer._kernel_weight = None
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            out = layer(x)
    finally:
        torch.set_num_threads(previous)
    assert sorted(calls) == [(0, 16), (16, 48)]
    assert torch.allclose(out, kernels.round_activations(x) @ layer.weight_format.dequantize().T, atol=1e-4, rtol=1e-5)


def test_a_tiled_layer_saves_and_loads_the_format_tensors():
    weight = Int4Weight.quantize(torch.randn(32, 64), 32)
    layer = QuantizedLinear(weight, torch.randn(32))
    state = layer.state_dict()
    assert set(state) == {"packed", "scale", "offset", "bias"}  # a checkpoint does not depend on the CPU
    assert all(torch.equal(state[name], tensor) for name, tensor in weight.tensors().items())
    other = QuantizedLinear(Int4Weight.quantize(torch.randn(32, 64), 32))
    other.bias = torch.nn.Parameter(torch.zeros(32), requires_grad=False)
    for assign in (False, True):
        other.load_state_dict(state, assign=assign)
        assert other.tiled and torch.equal(other.tiles, layer.tiles) and torch.equal(other.bias, layer.bias)


def test_moving_off_the_cpu_converts_the_tiles_back():
    weight = Int4Weight.quantize(torch.randn(32, 64), 32)
    layer = QuantizedLinear(weight).to("meta")  # any other device: tiles are a CPU layout
    assert not layer.tiled and layer.weight_format.packed.device.type == "meta"
    layer = layer.to_empty(device="cpu")  # memory that holds nothing yet: tiled once a checkpoint fills it
    assert not layer.tiled
    layer.load_state_dict(QuantizedLinear(weight).state_dict())
    assert layer.tiled and torch.equal(layer.weight_format.packed, weight.packed)


def test_replace_weight_takes_the_same_format_only():
    layer = QuantizedLinear(Int4Weight.quantize(torch.randn(32, 64), 32))
    new = Int4Weight.quantize(torch.randn(32, 64), 32)
    layer.replace_weight(new)
    assert layer.tiled and torch.equal(layer.weight_format.packed, new.packed)
    with pytest.raises(ConfigError, match="cannot replace"):
        layer.replace_weight(Int4Weight.quantize(torch.randn(32, 64), 64))


def test_fused_layers_share_the_stacked_tiles():
    layers = [QuantizedLinear(Int4Weight.quantize(torch.randn(rows, 64), 32)) for rows in (32, 16, 16)]
    weights = [layer.weight_format for layer in layers]
    fused = QuantizedLinear.concatenate(layers)
    assert fused.tiled and fused.tiles.shape[0] == 4
    assert [layer.tiles.data_ptr() for layer in layers] == [fused.tiles[i].data_ptr() for i in (0, 2, 3)]
    for layer, weight in zip(layers, weights):
        assert torch.equal(layer.weight_format.packed, weight.packed)
    mixed = [QuantizedLinear(Int4Weight.quantize(torch.randn(rows, 64), 32)) for rows in (24, 8)]
    assert QuantizedLinear.concatenate(mixed) is None  # 24 + 8 rows would tile, the layers themselves do not
