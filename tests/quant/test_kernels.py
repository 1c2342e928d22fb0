"""The compiled CPU kernels against their plain-torch reference (dequantize, then matmul).

int8 and int4 kernels multiply int8-rounded activations where the CPU has integer SIMD (as llama.cpp
does); their reference then rounds x first (`kernels.round_activations`). With exact activations every
kernel equals the float reference."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from lmforge import hardware
from lmforge.nn.kernels import avx512, simd
from lmforge.quant import Int4Weight, Int8Weight, NF4Weight, QuantizedLinear, kernels

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


def integer_kernel(weight, exact_activations: bool = False) -> bool:
    return kernels.KernelWeight(weight, exact_activations).inputs == "int8"


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name", list(FORMATS))
def test_kernel_with_exact_activations_equals_a_matmul_on_the_dequantized_weight(name, rows):
    weight = FORMATS[name](torch.randn(81, 256) * 0.05)  # an odd row count: the last row pairs with itself
    x = torch.randn(rows, 256)
    reference = x @ weight.dequantize().T
    assert not integer_kernel(weight, exact_activations=True)
    assert torch.allclose(kernels.quantized_matmul(x, weight, exact_activations=True), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not simd.available(), reason="the integer kernels need x86-64 with AVX2")
@pytest.mark.parametrize("rows", [1, 3, 9])  # 9: int4 tiles of four rows, the last one partial
@pytest.mark.parametrize("name", [name for name in FORMATS if not name.startswith("nf4")])
def test_integer_kernel_equals_a_matmul_of_rounded_activations(name, rows):
    weight = FORMATS[name](torch.randn(81, 256) * 0.05)  # an odd row count: the last row pairs with itself
    x = torch.randn(rows, 256) * torch.linspace(0.01, 3, 256)  # blocks of very different magnitudes
    x[0, :32] = 0  # an all-zero block rounds to zeros
    assert integer_kernel(weight)
    rounded = kernels.round_activations(x)
    out = kernels.quantized_matmul(x, weight)
    assert torch.allclose(out, rounded @ weight.dequantize().T, atol=1e-5, rtol=1e-5)
    exact = x @ weight.dequantize().T  # the rounding's own effect is small but not float rounding
    assert 1e-6 < (out - exact).abs().max() / exact.abs().max() < 2e-2


def test_rounded_activations_are_int8_codes_times_a_block_scale():
    x = torch.tensor([[0.5, -1.27, 0.01, 0.0] * 8 + [0.0] * 32])
    rounded = kernels.round_activations(x)
    scale = 1.27 / 127  # max |x| of the first block over 127
    codes = torch.round(x[0, :32] / scale)
    assert torch.allclose(rounded[0, :32], codes * scale) and codes.abs().max() == 127
    assert torch.equal(rounded[0, 32:], torch.zeros(32))
    compiled_codes, scales, sums = kernels._round_activations(x.numpy())
    assert scales[0, 0] == pytest.approx(scale) and scales[0, 1] == 0
    assert torch.equal(torch.from_numpy(compiled_codes[0, :32]).float(), codes)
    assert torch.allclose(torch.from_numpy(sums[0]), rounded[0].view(2, 32).sum(-1))


def test_torch_rounding_is_the_kernel_rounding_bit_for_bit():
    # the reference and the many-row matmul path must round every value as the kernel does: a code one step off
    # moves an output by a whole activation step (torch's 127 / tensor, two roundings, did so in ~1 value in 10^5)
    x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0)) * torch.rand(4096, 1) * 10
    codes, scales, _ = kernels._round_activations(x.numpy())
    compiled = torch.from_numpy(codes).float() * torch.from_numpy(scales).repeat_interleave(32, dim=1)
    assert torch.equal(kernels.round_activations(x), compiled)


@pytest.mark.parametrize("exact", [True, False], ids=["exact-activations", "rounded-activations"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_take_the_kernel_and_match_the_reference_path(dtype, exact, monkeypatch):
    monkeypatch.setattr(hardware, "fast_batched_dtype", lambda device: torch.float32)  # prompts in fp32 (below)
    linear = nn.Linear(128, 64).requires_grad_(False)
    layer = QuantizedLinear.from_linear(linear, "int4", group_size=64).to(dtype)
    layer.exact_activations = exact
    x = torch.randn(2, 1, 128, dtype=dtype)
    integer = integer_kernel(layer.weight_format, exact)
    inputs = kernels.round_activations(x.float()) if integer else x.float()
    reference = nn.functional.linear(inputs, layer.weight_format.dequantize(), linear.bias).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 1, 64)
    assert torch.allclose(out.float(), reference.float(), atol=1e-5 if dtype == torch.float32 else 2e-2)
    # A prompt-sized input takes dequantize + matmul, on activations rounded as the kernel rounds them.
    many = x.expand(2, layer.cpu_kernel().max_rows + 1, 128)
    assert torch.allclose(layer(many)[:, :1].float(), out.float(), atol=1e-5 if dtype == torch.float32 else 2e-2)
    with torch.enable_grad():  # training sees exact activations (rounding has no gradient)
        x_grad = x.float().requires_grad_()
        layer = layer.float()
        exact = nn.functional.linear(x_grad, layer.weight_format.dequantize(), layer.bias)
        assert torch.allclose(layer(x_grad), exact, atol=1e-5)


@pytest.mark.parametrize("rows", [3, 6])  # 6: lookups shared by four rows, then a partial four
@pytest.mark.parametrize("table", [True, False], ids=["avx512-lookups", "scalar-lookups"])
def test_nf4_kernels_equal_a_matmul_on_the_dequantized_weight(table, rows, monkeypatch):
    if table and not avx512.available():
        pytest.skip("the 16-entry lookups need AVX-512")
    monkeypatch.setattr(avx512, "available", lambda: table)
    weight = NF4Weight.quantize(torch.randn(37, 320) * 0.05)  # an odd row count, five 64-weight blocks per row
    kernel = kernels.KernelWeight(weight)
    assert kernel.kernel is (kernels._nf4_table_matvec if table else kernels._nf4_matvec)
    assert kernel.max_rows == kernels.MAX_ROWS["nf4 table" if table else "nf4"]
    x = torch.randn(rows, 320)
    assert torch.allclose(kernel(x), x @ weight.dequantize().T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fast_dtype", [torch.bfloat16, torch.float32], ids=["bf16-fast", "fp32-fast"])
@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_prompts_multiply_in_bfloat16_where_the_cpu_does_it_fast(method, fast_dtype, monkeypatch):
    monkeypatch.setattr(hardware, "fast_batched_dtype", lambda device: fast_dtype)
    linear = nn.Linear(128, 64).requires_grad_(False)
    layer = QuantizedLinear.from_linear(linear, method)
    layer(torch.randn(1, 128))  # builds the kernel
    x = torch.randn(layer.cpu_kernel().max_rows + 1, 128)  # more rows than the kernel takes
    dequantized = layer.weight_format.dequantize()
    in_bf16 = nn.functional.linear(x.bfloat16(), dequantized.bfloat16()).float() + linear.bias
    in_fp32 = nn.functional.linear(kernels.round_activations(x) if layer.cpu_kernel().inputs == "int8" else x,
                                   dequantized, linear.bias)
    assert torch.equal(layer(x), in_bf16 if fast_dtype == torch.bfloat16 else in_fp32)
    layer.exact_activations = True  # exact: float32 throughout
    assert torch.allclose(layer(x), x @ dequantized.T + linear.bias, atol=1e-5)
    assert torch.allclose(in_bf16, in_fp32, atol=3e-2)  # bf16 keeps about the kernels' precision


def test_kernels_release_the_gil_cache_their_code_and_run_from_several_threads(monkeypatch):
    compiled = [kernels._int8_matvec, kernels._nibble_matvec, kernels._nf4_matvec, kernels._nf4_table_matvec,
                kernels._split_runs,
                kernels._round_activations, kernels._int8_dot_matvec, kernels._int4_dot_matvec]
    assert all(k.targetoptions["nogil"] for k in compiled)
    assert all(type(k._cache).__name__ == "FunctionCache" for k in compiled)  # machine code kept on disk
    monkeypatch.setattr(kernels, "SPLIT_MIN_WEIGHTS", 0)  # split even this small matrix across threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    weight = Int4Weight.quantize(torch.randn(512, 256))
    x = torch.randn(1, 256)
    reference = (kernels.round_activations(x) if integer_kernel(weight) else x) @ weight.dequantize().T
    assert torch.allclose(kernels.quantized_matmul(x, weight), reference, atol=1e-4)
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
        first = next(iter(fused._buffers))  # the format's first tensor, or its tiles where int4 is held as tiles
        assert getattr(attention.q_proj, first).data_ptr() == getattr(fused, first).data_ptr()  # a view, no copy
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
        save_quantized(model, tmp_path / "fused")  # the canonical per-layer tensors, as before fusing
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "fused")(ids).logits, before, atol=1e-5)
        unfuse_projections(model)
        assert getattr(attention.q_proj, first).data_ptr() != getattr(fused, first).data_ptr()
        assert torch.allclose(model(ids).logits, before, atol=1e-5)

