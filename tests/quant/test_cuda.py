"""Quantized layers on a CUDA device: the format's own tensors (tiles are a CPU layout), dequantized into one matmul.
Skipped where torch sees no CUDA device."""

import copy

import pytest
import torch

from lmforge.quant import (
    Int4Weight,
    Int8Weight,
    NF4Weight,
    QuantizedLinear,
    quantize_model,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

WEIGHTS = [(Int8Weight, {}), (Int8Weight, {"group_size": 32}), (Int4Weight, {"group_size": 32}),
           (NF4Weight, {"double_quant": True})]


@pytest.mark.parametrize(("fmt", "options"), WEIGHTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_layer_moves_to_cuda_and_back(fmt, options, dtype):
    weight = fmt.quantize(torch.randn(64, 128) * 0.05, **options)
    layer = QuantizedLinear(weight, torch.randn(64))
    moved = layer.to("cuda")
    assert not moved.tiled and all(t.device.type == "cuda" for t in moved.buffers())
    x = torch.randn(5, 128, device="cuda", dtype=dtype)
    with torch.no_grad():
        out = moved(x)
    reference = x.float() @ weight.dequantize().cuda().T + layer.bias.cuda()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    assert out.dtype == dtype and torch.allclose(out.float(), reference, atol=tolerance, rtol=tolerance)
    back = moved.to("cpu")
    assert all(torch.equal(back.weight_format.tensors()[name], tensor) for name, tensor in weight.tensors().items())


def test_a_quantized_model_computes_the_same_logits_on_cuda(smollm2, monkeypatch):
    model = copy.deepcopy(smollm2)
    quantize_model(model, "int4", group_size=32, tied_head=True)
    monkeypatch.setattr(QuantizedLinear, "exact_activations", True)  # the CPU reference in float32, as on CUDA
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253]])
    with torch.no_grad():
        expected = model(ids).logits
        got = model.to("cuda")(ids.cuda()).logits.cpu()
    assert torch.allclose(got, expected, atol=1e-2, rtol=1e-3)
