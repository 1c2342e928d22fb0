"""A quantized Llama's whole decode step in one compiled call equals the per-module step, on any thread count."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lmforge.models import llama_quant_decode
from lmforge.nn.kernels import avx512, simd
from lmforge.peft.lora import LoraConfig, add_lora
from lmforge.quant.apply import quantize_model
from lmforge.quant.linear import QuantizedLinear
from tests.models.test_llama import hf_llama
from tests.models.test_llama_decode import decode_logits
from tests.parity import max_abs_diff, ours_from_hf

pytestmark = pytest.mark.skipif(not simd.available(), reason="the compiled step needs x86-64 with AVX2 and numba")

SHAPE = {"hidden_size": 64, "intermediate_size": 128}  # the kernels read 64 columns at a time


@pytest.fixture
def compiled_steps(monkeypatch):
    """How many decode steps ran as one compiled call."""
    calls = []
    original = llama_quant_decode.QuantizedStackPlan.step

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(llama_quant_decode.QuantizedStackPlan, "step", counting)
    return calls


def per_module_logits(model, monkeypatch) -> list[torch.Tensor]:
    with monkeypatch.context() as patch:
        patch.setattr(llama_quant_decode, "plan_for", lambda model, cache: None)
        return decode_logits(model, fast=True)


def quantized_llama(method: str, kv_heads: int = 2, **options):
    model = ours_from_hf(hf_llama(num_key_value_heads=kv_heads, **SHAPE), "causal-lm").eval()
    quantize_model(model, method, **options)
    return model


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("method, options", [
    ("int8", {}), ("int8", {"group_size": 32}), ("int4", {"group_size": 32}), ("int4", {"group_size": 64}),
    pytest.param("nf4", {}, marks=pytest.mark.skipif(not avx512.available(), reason="NF4 lookups need AVX-512")),
], ids=["int8", "int8-g32", "int4-g32", "int4-g64", "nf4"])
def test_compiled_step_equals_the_per_module_step(method, options, kv_heads, compiled_steps, monkeypatch):
    model = quantized_llama(method, kv_heads, **options)
    reference = per_module_logits(model, monkeypatch)
    assert not compiled_steps
    compiled = decode_logits(model, fast=True)  # a left-padded batch of 3: masks and per-row positions
    assert len(compiled_steps) == len(compiled) - 1  # every step after the prefill
    for expected, got in zip(reference, compiled):
        assert max_abs_diff(got, expected) <= 1e-4


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count_computes_the_same_step(threads, compiled_steps, monkeypatch):
    model = quantized_llama("int4", group_size=32)
    reference = per_module_logits(model, monkeypatch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # 3 threads on fewer cores still meet
    for expected, got in zip(reference, decode_logits(model, fast=True)):
        assert max_abs_diff(got, expected) <= 1e-4
    assert compiled_steps


def test_two_threads_decoding_at_once_share_the_helper_pool(compiled_steps, monkeypatch):
    models = [quantized_llama("int8"), quantized_llama("int4", group_size=32)]
    expected = [per_module_logits(model, monkeypatch) for model in models]
    with ThreadPoolExecutor(2) as pool:  # each step's helper may queue behind the other's: slower, never stuck
        results = list(pool.map(lambda model: decode_logits(model, fast=True), models))
    for reference, got in zip(expected, results):
        assert all(max_abs_diff(a, b) <= 1e-4 for a, b in zip(reference, got))
    assert len(compiled_steps) == 2 * (len(results[0]) - 1)


def test_layers_it_cannot_run_take_the_per_module_step(compiled_steps, monkeypatch):
    model = quantized_llama("int8")
    add_lora(model, LoraConfig(r=2, target_modules=["o_proj"]))  # the step would skip the adapter
    model.eval()
    decode_logits(model, fast=True)
    assert not compiled_steps

    model = quantized_llama("int8")
    monkeypatch.setattr(QuantizedLinear, "exact_activations", True)  # float activations: the float kernels
    decode_logits(model, fast=True)
    assert not compiled_steps
    monkeypatch.undo()

    seen = []
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda *args: seen.append(1))
    decode_logits(model, fast=True)
    assert seen and not compiled_steps

    monkeypatch.setattr(avx512, "available", lambda: False)  # NF4's scalar lookups: not in the step
    model = quantized_llama("nf4")
    decode_logits(model, fast=True)
    assert not compiled_steps


def test_the_plan_is_built_once_per_cache(monkeypatch):
    model = quantized_llama("int8")
    built = []
    original = llama_quant_decode.QuantizedStackPlan.__init__

    def counting(self, *args):
        built.append(1)
        original(self, *args)

    monkeypatch.setattr(llama_quant_decode.QuantizedStackPlan, "__init__", counting)
    decode_logits(model, fast=True, steps=4)
    assert built == [1]


def paged_decode_logits(model, prompts: list[list[int]], steps: int = 5) -> list[torch.Tensor]:
    """The serving engine's way: prompts prefilled in one packed step of a paged cache (blocks of 4 slots, handed
    out in a scrambled order), then `steps` steps that decode one token of every sequence; each step's logits."""
    from lmforge.nn.paged_kv_cache import PagedKVCache, Span

    cache = PagedKVCache.for_model(model, num_blocks=48, block_size=4)
    blocks = iter(torch.randperm(48, generator=torch.Generator().manual_seed(0)).tolist())
    tables = [[next(blocks) for _ in range(4)] for _ in prompts]  # 16 slots per sequence
    spans = [Span(table, 0, len(prompt)) for table, prompt in zip(tables, prompts)]
    ids = [token for prompt in prompts for token in prompt]
    lengths, logits = [len(prompt) for prompt in prompts], []
    with torch.inference_mode():
        for _ in range(steps + 1):
            positions = cache.prepare(spans)
            out = model(torch.tensor([ids]), position_ids=positions[None], kv_cache=cache).logits[0]
            last = torch.tensor(lengths).cumsum(0) - 1 if not logits else torch.arange(len(prompts))
            logits.append(out[last])
            ids = logits[-1].argmax(-1).tolist()
            spans = [Span(table, start, 1) for table, start in zip(tables, lengths)]
            lengths = [length + 1 for length in lengths]
    return logits


@pytest.mark.parametrize("method, options", [("int8", {}), ("int4", {"group_size": 32})], ids=["int8", "int4-g32"])
def test_paged_compiled_step_equals_the_per_module_step(method, options, monkeypatch):
    model = quantized_llama(method, kv_heads=2, **options)
    prompts = [[5, 17, 3, 9, 60], [7, 2], [11, 42, 8, 1, 30, 22, 13, 4, 9]]  # contexts of different lengths
    with monkeypatch.context() as patch:
        patch.setattr(llama_quant_decode, "plan_for", lambda model, cache: None)
        reference = paged_decode_logits(model, prompts)
    rows, paged_step = [], llama_quant_decode.QuantizedStackPlan.paged_step
    monkeypatch.setattr(llama_quant_decode.QuantizedStackPlan, "paged_step",
                        lambda self, hidden, *args: rows.append(hidden.shape[0]) or paged_step(self, hidden, *args))
    compiled = paged_decode_logits(model, prompts)
    assert rows == [3] * 5  # every step after the prefill, all three sequences in one call
    for expected, got in zip(reference, compiled):
        assert max_abs_diff(got, expected) <= 1e-4
