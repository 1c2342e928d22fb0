"""The 4-bit tile product (AVX-512 VNNI) against its reference: a matmul of the int8-rounded activations
and the dequantized weight, as for the row-at-a-time kernels."""

import numpy as np
import pytest
import torch

from lmforge.nn.kernels import avx512
from lmforge.quant import Int4Weight, QuantizedLinear, kernels, tiles

pytestmark = pytest.mark.skipif(not tiles.supports(16), reason="the tile product needs AVX-512 VNNI and numba")


def tile_product(x: torch.Tensor, weight: Int4Weight, start: int, stop: int) -> torch.Tensor:
    codes, scales, sums = kernels._round_activations(x.numpy())
    out = np.zeros((x.shape[0], weight.shape[0]), np.float32)
    tiles.int4_product(codes, scales, sums, weight.packed.numpy(), weight.scale.numpy(), weight.offset.numpy(),
                       weight.group_size, out, start, stop)
    return torch.from_numpy(out)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 6, 9])  # 6 and 9: the last four activation rows partial
def test_tile_product_equals_a_matmul_of_rounded_activations(group_size, rows):
    weight = Int4Weight.quantize(torch.randn(48, 384) * 0.05, group_size)
    x = torch.randn(rows, 384) * torch.linspace(0.01, 3, 384)
    reference = kernels.round_activations(x) @ weight.dequantize().T
    out = tile_product(x, weight, 16, 48)  # tiles 1 and 2 only
    assert torch.allclose(out[:, 16:], reference[:, 16:], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, :16], torch.zeros(rows, 16))  # rows outside start..stop are not written


def test_tile_layout_interleaves_sixteen_rows_four_bytes_at_a_time():
    weight = Int4Weight.quantize(torch.randn(32, 64), 32)
    words = tiles._int4_tiles(weight.packed.numpy(), weight.scale.numpy(), weight.offset.numpy(), 32, 16, 32)
    packed = weight.packed.numpy().view(np.uint32)  # row n's packed bytes, four per word
    block = 1  # the second 32-column block of the second tile (rows 16..31)
    record = words[block * tiles.WORDS:(block + 1) * tiles.WORDS]
    for group in range(4):
        assert np.array_equal(record[group * 16:(group + 1) * 16], packed[16:32, 4 * block + group])
    assert np.array_equal(record[64:80].view(np.float32), weight.scale.numpy()[16:32, block])
    assert np.array_equal(record[80:96].view(np.float32), weight.offset.numpy()[16:32, block])


def test_prompt_rows_take_the_tiles_split_across_threads_in_whole_tiles(monkeypatch):
    layer = QuantizedLinear(Int4Weight.quantize(torch.randn(48, 640) * 0.05, 32))
    x = torch.randn(96, 640)  # enough work to split: 48 weight rows → tiles [0, 16) and [16, 48)
    assert 48 * 640 * 96 >= kernels.SPLIT_MIN_WEIGHTS and 96 <= kernels.MAX_ROWS["int4 tiles"]
    calls, product = [], tiles.int4_product

    def spy(*args):
        calls.append(args[-2:])
        return product(*args)

    monkeypatch.setattr(tiles, "int4_product", spy)
    layer._kernel_weight = None
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            out = layer(x)
    finally:
        torch.set_num_threads(previous)
    assert sorted(calls) == [(0, 16), (16, 48)]
    assert torch.allclose(out, kernels.round_activations(x) @ layer.weight_format.dequantize().T, atol=1e-5, rtol=1e-5)


def test_few_rows_and_partial_tiles_keep_the_row_kernels():
    layer = QuantizedLinear(Int4Weight.quantize(torch.randn(40, 64) * 0.05, 32))  # 40 rows: not whole tiles
    with torch.no_grad():
        layer(torch.randn(kernels.TILE_MIN_ROWS, 64))
    assert layer.cpu_kernel().tiled is None
    tiled = QuantizedLinear(Int4Weight.quantize(torch.randn(32, 64) * 0.05, 32))
    with torch.no_grad():
        tiled(torch.randn(1, 64))
    assert tiled.cpu_kernel().tiled is tiles.int4_product and avx512.TILE_ROWS == 16
