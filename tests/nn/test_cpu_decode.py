"""The fused one-token CPU kernels equal their torch references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.nn.kernels import cpu_decode
from lmforge.nn.kernels.sdpa import sdpa_attention
from lmforge.nn.positions import RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="numba is not installed")


@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_adds_the_residual_then_normalises(with_delta):
    residual, delta, weight = torch.randn(3, 48), torch.randn(3, 48), torch.randn(48)
    expected_stream = residual + delta if with_delta else residual.clone()
    expected = F.rms_norm(expected_stream, (48,), weight, 1e-5)
    normed = torch.empty(3, 48)
    cpu_decode.add_rms_norm(residual.numpy(), delta.numpy() if with_delta else cpu_decode.NO_ROWS,
                            weight.numpy(), 1e-5, normed.numpy())
    assert torch.allclose(residual, expected_stream)  # the stream is updated in place
    assert torch.allclose(normed, expected, atol=1e-5)


def test_silu_and_mul_gates_the_second_half_with_the_first():
    gate_up, out = torch.randn(2, 2 * 40) * 4, torch.empty(2, 40)
    cpu_decode.silu_and_mul(gate_up.numpy(), out.numpy())
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.allclose(out, F.silu(gate) * up, atol=1e-5)


@pytest.mark.parametrize("num_heads,kv_heads", [(6, 2), (4, 4), (3, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("masked", [False, True])
def test_rotary_attention_step_rotates_caches_and_attends(num_heads, kv_heads, masked):
    batch, dim, past, room = 2, 16, 5, 9
    rotary = RotaryEmbedding(dim, 64)
    qkv = torch.randn(batch, (num_heads + 2 * kv_heads) * dim)
    keys, values = torch.randn(batch, kv_heads, room, dim), torch.randn(batch, kv_heads, room, dim)
    cos, sin = rotary(torch.tensor([[past], [past - 2]]), torch.float32)  # rows at different positions
    mask = torch.zeros(batch, past + 1)
    if masked:
        mask[1, :2] = torch.finfo(torch.float32).min  # row 1 is left-padded by two positions
    expected_keys, expected_values = keys.clone(), values.clone()

    q, k, v = qkv.view(batch, 1, -1, dim).transpose(1, 2).split([num_heads, kv_heads, kv_heads], dim=1)
    expected_keys[:, :, past:past + 1] = apply_rotary(k, cos, sin)
    expected_values[:, :, past:past + 1] = v
    expected = sdpa_attention(apply_rotary(q, cos, sin), expected_keys[:, :, :past + 1],
                              expected_values[:, :, :past + 1], mask[:, None, None] if masked else None, dim ** -0.5)

    out = torch.empty(batch, num_heads * dim)
    cpu_decode.rotary_attention_step(qkv.numpy(), cos[:, 0].contiguous().numpy(), sin[:, 0].contiguous().numpy(),
                                     keys.numpy(), values.numpy(), past, mask.numpy() if masked else cpu_decode.NO_ROWS,
                                     dim ** -0.5, num_heads, out.numpy())
    assert torch.equal(keys[:, :, :past], expected_keys[:, :, :past])  # the past is untouched
    assert torch.allclose(keys[:, :, past], expected_keys[:, :, past], atol=1e-6)
    assert torch.equal(values, expected_values)
    assert torch.allclose(out, expected.transpose(1, 2).reshape(batch, -1), atol=1e-5)
    assert not np.isnan(out.numpy()).any()
