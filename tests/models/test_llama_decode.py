"""Llama's fused one-token CPU step computes what the modules compute, and steps aside when it cannot."""

import pytest
import torch

from lmforge.errors import InputError
from lmforge.generation.session import open_session
from lmforge.models import llama_decode
from lmforge.nn.fusion import fuse_projections
from lmforge.nn.kernels import cpu_decode
from lmforge.peft.lora import LoraConfig, add_lora
from lmforge.quant.apply import quantize_model
from tests.models.test_llama import TINY, hf_llama
from tests.parity import max_abs_diff, ours_from_hf

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="numba is not installed")

PROMPTS = [[5, 9, 13, 2, 7, 11], [4, 8], [3, 6, 1, 12]]  # left-padded in a batch: masks and per-row positions


@pytest.fixture
def counted_steps(monkeypatch):
    """How many times the fused step ran."""
    calls = []
    original = llama_decode.decode_step

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(llama_decode, "decode_step", counting)
    return calls


def decode_logits(model, fast: bool, steps: int = 6) -> list[torch.Tensor]:
    """Greedy-decode PROMPTS for `steps` tokens; every step's logits."""
    model.model.fast_decode = fast
    with torch.inference_mode():
        session = open_session(model, PROMPTS, steps)
        logits = [session.prefill()]
        for _ in range(steps - 1):
            logits.append(session.step(logits[-1].argmax(-1)))
    return logits


def assert_same_decode(model, counted_steps, tolerance=1e-5):
    reference = decode_logits(model, fast=False)
    assert not counted_steps
    fused = decode_logits(model, fast=True)
    assert len(counted_steps) == len(fused) - 1  # every step after the prefill took the fused path
    for expected, got in zip(reference, fused):
        assert max_abs_diff(got, expected) <= tolerance


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-projections", "separate-projections"])
def test_fused_step_matches_the_modules(kv_heads, fused, counted_steps):
    model = ours_from_hf(hf_llama(num_key_value_heads=kv_heads, attention_bias=kv_heads == 2), "causal-lm").eval()
    if fused:
        fuse_projections(model)
    assert_same_decode(model, counted_steps)


def test_fused_step_runs_adapters_and_quantized_layers(counted_steps):
    model = ours_from_hf(hf_llama(num_key_value_heads=2), "causal-lm").eval()
    quantize_model(model, "int8")
    add_lora(model, LoraConfig(r=2, target_modules=["o_proj", "down_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a trained adapter, so skipping it would change the logits
    model.eval()
    assert_same_decode(model, counted_steps, tolerance=1e-4)


def test_hooks_eager_attention_gradients_and_training_take_the_module_path(counted_steps):
    model = ours_from_hf(hf_llama(num_key_value_heads=2), "causal-lm").eval()
    seen = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *args: seen.append(1))
    decode_logits(model, fast=True, steps=3)
    assert seen and not counted_steps  # the hook ran at every step, so the fused step did not
    handle.remove()

    model.set_attention_implementation("eager")
    decode_logits(model, fast=True, steps=3)
    assert not counted_steps
    model.set_attention_implementation("sdpa")

    hidden = torch.zeros(1, 1, TINY["hidden_size"])
    cache = open_session(model, [[1]], 1).cache
    with torch.inference_mode():
        assert llama_decode.applies(model.model, hidden, cache)
        model.train()
        assert not llama_decode.applies(model.model, hidden, cache)
    model.eval()
    assert not llama_decode.applies(model.model, hidden, cache)  # gradients on


def test_a_full_cache_is_a_clear_error():
    model = ours_from_hf(hf_llama(num_key_value_heads=2), "causal-lm").eval()
    with torch.inference_mode():
        session = open_session(model, [[1, 2]], 1)
        tokens = session.prefill().argmax(-1)
        session.step(tokens)
        with pytest.raises(InputError, match="KV cache holds 3 positions"):
            session.step(tokens)
