"""The compiled CPU kernels against their plain-torch reference (dequantize, then matmul)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from lmforge.quant import Int4Weight, Int8Weight, NF4Weight, QuantizedLinear, kernels
from lmforge.quant.linear import KERNEL_MAX_ROWS

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")

FORMATS = {
    "int8 per channel": lambda w: Int8Weight.quantize(w),
    "int8 groups of 32 (Q8_0)": lambda w: Int8Weight.quantize(w, 32),
    "int8 groups of 64": lambda w: Int8Weight.quantize(w, 64),
    "int8 groups of 128": lambda w: Int8Weight.quantize(w, 128),
    "int4 groups of 32": lambda w: Int4Weight.quantize(w, 32),
    "int4 groups of 64": lambda w: Int4Weight.quantize(w, 64),
    "int4 groups of 128": lambda w: Int4Weight.quantize(w, 128),
    "nf4": lambda w: NF4Weight.quantize(w),
    "nf4 double quantized": lambda w: NF4Weight.quantize(w, double_quant=True),
}


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name", list(FORMATS))
def test_kernel_equals_a_matmul_on_the_dequantized_weight(name, rows):
    weight = FORMATS[name](torch.randn(80, 256) * 0.05)
    x = torch.randn(rows, 256)
    reference = x @ weight.dequantize().T
    assert torch.allclose(kernels.quantized_matmul(x, weight), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_take_the_kernel_and_match_the_reference_path(dtype):
    linear = nn.Linear(128, 64).requires_grad_(False)
    layer = QuantizedLinear.from_linear(linear, "int4", group_size=64).to(dtype)
    x = torch.randn(2, 1, 128, dtype=dtype)
    reference = nn.functional.linear(x.float(), layer.weight_format.dequantize(), linear.bias).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 1, 64)
    assert torch.allclose(out.float(), reference.float(), atol=1e-5 if dtype == torch.float32 else 2e-2)
    # A prompt-sized input takes dequantize + matmul; the two paths agree.
    many = x.expand(2, KERNEL_MAX_ROWS, 128)
    assert torch.allclose(layer(many)[:, :1].float(), out.float(), atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_kernels_release_the_gil_cache_their_code_and_run_from_several_threads(monkeypatch):
    compiled = [kernels._int8_matvec, kernels._nibble_matvec, kernels._nf4_matvec, kernels._split_runs]
    assert all(k.targetoptions["nogil"] for k in compiled)
    assert all(type(k._cache).__name__ == "FunctionCache" for k in compiled)  # machine code kept on disk
    monkeypatch.setattr(kernels, "SPLIT_MIN_WEIGHTS", 0)  # split even this small matrix across threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    weight = Int4Weight.quantize(torch.randn(512, 256))
    x = torch.randn(1, 256)
    assert torch.allclose(kernels.quantized_matmul(x, weight), x @ weight.dequantize().T, atol=1e-4)
    expected = kernels.quantized_matmul(x, weight)
    with ThreadPoolExecutor(4) as pool:  # the workqueue threading layer would abort here
        results = list(pool.map(lambda _: kernels.quantized_matmul(x, weight), range(16)))
    assert all(torch.equal(r, expected) for r in results)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_projections_fuse_exactly_into_views(method, tmp_path):
    from lmforge import AutoModelForCausalLM
    from lmforge.nn.fusion import fuse_projections, unfuse_projections
    from lmforge.quant import quantize_model
    from lmforge.quant.checkpoint import save_quantized
    from tests.models.test_llama import hf_llama
    from tests.parity import ours_from_hf

    model = ours_from_hf(hf_llama(hidden_size=64, intermediate_size=128, num_key_value_heads=2), "causal-lm")
    quantize_model(model, method)
    ids = torch.randint(0, 97, (1, 1))  # one token: the kernel path
    with torch.no_grad():
        before = model(ids).logits
        fuse_projections(model)
        attention = model.model.layers[0].self_attn
        fused = attention._fused_modules["qkv"]
        assert fused.out_features == sum(p.out_features for p in (attention.q_proj, attention.k_proj, attention.v_proj))
        first = fused._tensor_names[0]
        assert getattr(attention.q_proj, first).data_ptr() == getattr(fused, first).data_ptr()  # a view, no copy
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
        save_quantized(model, tmp_path / "fused")  # the canonical per-layer tensors, as before fusing
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "fused")(ids).logits, before, atol=1e-5)
        unfuse_projections(model)
        assert getattr(attention.q_proj, first).data_ptr() != getattr(fused, first).data_ptr()
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
