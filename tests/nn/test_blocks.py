"""Building blocks checked against their definitions and against each other."""

import math

import pytest
import torch

from lmforge.errors import InputError, UnsupportedError
from lmforge.nn import (
    Attention,
    GatedMLP,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    build_attention_mask,
)
from lmforge.nn.feedforward import gelu_tanh
from lmforge.nn.heads import pool, sentence_embedding
from lmforge.nn.kernels import get_attention_kernel
from lmforge.nn.kernels.eager import eager_attention
from lmforge.nn.kernels.sdpa import sdpa_attention
from lmforge.nn.positions import apply_rotary, rotary_inverse_frequencies


def test_sinusoidal_matches_the_formula():
    table = SinusoidalPositionalEmbedding(50, 8)(torch.arange(50))
    p, i = 17, 2
    assert table[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 8)), abs=1e-6)
    assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 8)), abs=1e-6)
    with pytest.raises(InputError, match="at most 50 positions"):
        SinusoidalPositionalEmbedding(50, 8)(torch.tensor([50]))


def test_rotary_scores_depend_only_on_relative_distance():
    rotary = RotaryEmbedding(16, 128, base=100.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(qpos, kpos):
        cq, sq = rotary(torch.tensor([[qpos]]), torch.float32)
        ck, sk = rotary(torch.tensor([[kpos]]), torch.float32)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    assert score(10, 3) == pytest.approx(score(57, 50), abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 9), abs=1e-4)


def test_rotary_scaling_variants():
    base = rotary_inverse_frequencies(16, 10000.0, None)
    assert torch.allclose(rotary_inverse_frequencies(16, 10000.0, {"rope_type": "linear", "factor": 4.0}), base / 4)
    with pytest.raises(UnsupportedError, match="default, linear, llama3"):
        rotary_inverse_frequencies(16, 10000.0, {"rope_type": "mystery", "factor": 2.0})


def test_causal_and_padding_mask():
    mask = build_attention_mask(torch.tensor([[0, 1, 1]]), 3, 3, causal=True, dtype=torch.float32,
                                device=torch.device("cpu"))
    allowed = mask[0, 0] == 0
    assert allowed.tolist() == [[False, False, False], [False, True, False], [False, True, True]]
    assert build_attention_mask(torch.ones(2, 4), 4, 4, causal=False, dtype=torch.float32,
                                device=torch.device("cpu")) is None
    # one new query over 5 cached keys sees all of them
    assert build_attention_mask(None, 1, 5, causal=True, dtype=torch.float32, device=torch.device("cpu")) is None


@pytest.mark.parametrize("with_mask", [False, True])
def test_eager_and_sdpa_kernels_agree(with_mask):
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    mask = build_attention_mask(torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]), 6, 6, causal=True,
                                dtype=torch.float32, device=torch.device("cpu")) if with_mask else None
    assert torch.allclose(eager_attention(q, k, v, mask, 8 ** -0.5), sdpa_attention(q, k, v, mask, 8 ** -0.5),
                          atol=1e-5)
    with pytest.raises(UnsupportedError, match="eager, sdpa"):
        get_attention_kernel("flash-v9")


def test_gqa_equals_mha_with_repeated_kv_weights():
    torch.manual_seed(0)
    gqa = Attention(32, num_heads=4, num_kv_heads=2)
    mha = Attention(32, num_heads=4, num_kv_heads=4)
    with torch.no_grad():
        for name in ("q_proj", "o_proj"):
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight)
        for name in ("k_proj", "v_proj"):  # each KV head serves two query heads
            w = getattr(gqa, name).weight.view(2, 8, 32)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(32, 32))
    x = torch.randn(2, 5, 32)
    assert torch.allclose(gqa(x), mha(x), atol=1e-6)


def test_rmsnorm_gives_unit_root_mean_square():
    y = RMSNorm(64, eps=0.0)(torch.randn(3, 64) * 7)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3), atol=1e-4)


def test_gelu_tanh_and_swiglu():
    x = torch.linspace(-4, 4, 101)
    assert torch.allclose(gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"), atol=1e-6)
    mlp = GatedMLP(8, 16)
    h = torch.randn(2, 8)
    expected = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
    assert torch.allclose(mlp(h), expected)


def test_pooling_strategies():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "first"), hidden[:, 0])
    assert torch.equal(pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    assert torch.allclose(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    assert torch.allclose(sentence_embedding(hidden, mask).norm(dim=-1), torch.ones(2))
