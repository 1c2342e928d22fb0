"""FlashAttention equals the textbook kernel, tile by tile, without ever holding a Tq x Tk matrix."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.errors import InputError
from lmforge.nn import build_attention_mask
from lmforge.nn.kernels import get_attention_kernel
from lmforge.nn.kernels.eager import eager_attention
from lmforge.nn.kernels.flash import flash_attention
from tests.models.test_llama import TINY, hf_llama
from tests.parity import max_abs_diff, ours_from_hf, padded_batch

CPU = torch.device("cpu")


def qkv(batch=2, heads=4, kv_heads=4, q_len=13, k_len=13, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=generator)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=generator)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=generator)
    return q, k, v


@pytest.mark.parametrize("block_size", [1, 4, 5, 13, 64])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_causal_matches_eager_for_any_block_size(block_size, kv_heads):
    q, k, v = qkv(kv_heads=kv_heads)
    mask = build_attention_mask(None, 13, 13, causal=True, dtype=torch.float32, device=CPU)
    expected = eager_attention(q, k, v, mask, 8 ** -0.5)
    assert max_abs_diff(flash_attention(q, k, v, mask, 8 ** -0.5, block_size=block_size), expected) <= 1e-5
    # the mask-free causal path must agree too, including its skipped future tiles
    assert max_abs_diff(flash_attention(q, k, v, None, 8 ** -0.5, block_size=block_size, causal=True),
                        expected) <= 1e-5


@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_padding_masks_match_eager(left, causal):
    q, k, v = qkv(kv_heads=2)
    _, padding = padded_batch(50, [13, 6], left=left)
    mask = build_attention_mask(padding, 13, 13, causal=causal, dtype=torch.float32, device=CPU)
    assert mask.shape[2] == (13 if causal else 1)  # bidirectional padding masks broadcast over queries
    assert max_abs_diff(flash_attention(q, k, v, mask, 0.3, block_size=4), eager_attention(q, k, v, mask, 0.3)) <= 1e-5


@pytest.mark.parametrize("q_len", [1, 3, 7])
def test_queries_at_the_end_of_the_keys_like_a_kv_cache(q_len):
    q, k, v = qkv(heads=6, kv_heads=2, q_len=q_len, k_len=19)
    mask = build_attention_mask(None, q_len, 19, causal=True, dtype=torch.float32, device=CPU)
    expected = eager_attention(q, k, v, mask, 0.25)
    assert max_abs_diff(flash_attention(q, k, v, mask, 0.25, block_size=4), expected) <= 1e-5
    assert max_abs_diff(flash_attention(q, k, v, None, 0.25, block_size=4, causal=True), expected) <= 1e-5


def test_fully_masked_rows_are_uniform_like_eager_and_never_nan():
    q, k, v = qkv(q_len=9, k_len=9)
    padding = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])  # left padding: first queries see nothing
    mask = build_attention_mask(padding, 9, 9, causal=True, dtype=torch.float32, device=CPU)
    out = flash_attention(q, k, v, mask, 0.35, block_size=2)
    assert not out.isnan().any()
    assert max_abs_diff(out, eager_attention(q, k, v, mask, 0.35)) <= 1e-5
    assert max_abs_diff(out[0, :, 0], v[0].mean(dim=1)) <= 1e-5  # uniform over all keys


def test_minus_infinity_masks_work_when_a_whole_tile_is_hidden():
    q, k, v = qkv(q_len=6, k_len=6)
    mask = torch.zeros(2, 1, 6, 6)
    mask[..., :4] = float("-inf")  # the first two tiles of 2 keys are entirely hidden
    out = flash_attention(q, k, v, mask, 0.35, block_size=2)
    assert max_abs_diff(out, eager_attention(q, k, v, mask, 0.35)) <= 1e-5


def test_half_precision_inputs_accumulate_in_float32():
    q, k, v = (t.bfloat16() for t in qkv())
    mask = build_attention_mask(None, 13, 13, causal=True, dtype=torch.bfloat16, device=CPU)
    out = flash_attention(q, k, v, mask, 8 ** -0.5, block_size=4)
    assert out.dtype == torch.bfloat16
    assert max_abs_diff(out, eager_attention(q.float(), k.float(), v.float(), mask.float(), 8 ** -0.5)) <= 2e-2


def test_dropout_is_unbiased():
    q, k, v = (t.expand(4000, -1, -1, -1) for t in qkv(batch=1, heads=1, kv_heads=1, q_len=4, k_len=4))
    exact = flash_attention(q[:1], k[:1], v[:1], None, 0.35)
    torch.manual_seed(0)
    samples = flash_attention(q, k, v, None, 0.35, dropout=0.5, block_size=2)  # 4000 independent draws
    assert max_abs_diff(samples.mean(dim=0, keepdim=True), exact) <= 0.1
    assert max_abs_diff(samples[:1], exact) > 0.1
    assert flash_attention(q, k, v, None, 0.35, dropout=1.0).abs().max() == 0


def test_rejects_inconsistent_shapes():
    q, k, v = qkv(heads=4, kv_heads=3)
    with pytest.raises(InputError, match="multiple of H_kv"):
        flash_attention(q, k, v, None, 1.0)
    q, k, v = qkv(q_len=5, k_len=3)
    with pytest.raises(InputError, match="at least as many keys"):
        flash_attention(q, k, v, None, 1.0, causal=True)
    with pytest.raises(InputError, match="block_size"):
        flash_attention(q, k, v, None, 1.0, block_size=0)


class LargestAllocation(TorchDispatchMode):
    """Records the element count of the biggest tensor any torch op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_never_materialises_the_score_matrix():
    length, block = 1024, 64
    q, k, v = qkv(batch=1, heads=2, kv_heads=1, q_len=length, k_len=length, dim=16)
    with LargestAllocation() as flash:
        flash_attention(q, k, v, None, 0.25, block_size=block, causal=True)
    with LargestAllocation() as eager:
        eager_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], None, 0.25)
    assert eager.largest >= 2 * 256 * 256  # the probe does see a score matrix when one exists
    assert flash.largest == q.numel()  # the biggest tensor is the output; score tiles are 2 x 64 x 64


def test_whole_model_logits_match_with_flash():
    hf = hf_llama(num_key_value_heads=2)
    ids, mask = padded_batch(TINY["vocab_size"], [11, 6, 9], left=True)
    ours = ours_from_hf(hf, "causal-lm", "eager")
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask).logits
        ours.set_attention_implementation("flash")
        assert get_attention_kernel("flash") is flash_attention
        got = ours(ids, attention_mask=mask).logits
    assert max_abs_diff(got, expected) <= 1e-5


def test_the_causal_marker_equals_its_mask_in_every_kernel_and_stands_only_for_plain_causal_attention():
    """Decoders pass CAUSAL for an unpadded sequence attending over itself; SDPA then skips the future with
    is_causal, flash with its key tiles, eager builds the tensor: all three equal the explicit mask."""
    from lmforge.nn.kernels import ATTENTION_KERNELS
    from lmforge.nn.masks import CAUSAL, causal_self_attention_mask

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 13, 8), torch.randn(2, 2, 13, 8), torch.randn(2, 2, 13, 8)
    explicit = build_attention_mask(None, 13, 13, causal=True, dtype=torch.float32, device=CPU)
    for name, kernel in ATTENTION_KERNELS.items():
        torch.testing.assert_close(kernel(q, k, v, CAUSAL, 0.35), kernel(q, k, v, explicit, 0.35), msg=name)
    assert causal_self_attention_mask(None, 13, 13, torch.float32, CPU) is CAUSAL
    assert causal_self_attention_mask(torch.ones(2, 13), 13, 13, torch.float32, CPU) is CAUSAL
    padded = torch.ones(2, 13, dtype=torch.long)
    padded[0, 0] = 0
    packed = torch.tensor([[1] * 6 + [2] * 7] * 2)
    for padding_mask, queries in ((padded, 13), (packed, 13), (None, 5)):
        mask = causal_self_attention_mask(padding_mask, queries, 13, torch.float32, CPU)
        assert isinstance(mask, torch.Tensor)
        torch.testing.assert_close(mask, build_attention_mask(padding_mask, queries, 13, causal=True,
                                                              dtype=torch.float32, device=CPU))
    assert causal_self_attention_mask(None, 1, 1, torch.float32, CPU) is None  # one token sees itself
