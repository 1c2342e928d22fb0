"""KV cache: decoding token by token with a cache gives the logits of one full forward pass."""

import pytest
import torch
import transformers

from lmforge.errors import InputError
from lmforge.nn.kv_cache import KVCache
from tests.models.test_gpt2 import hf_gpt2
from tests.models.test_llama import hf_llama
from tests.parity import max_abs_diff, ours_from_hf, padded_batch


def decode_step_by_step(model, ids, mask, prefill):
    """Prefill `prefill` tokens, then feed the rest one at a time; return the logits of every position."""
    cache = KVCache.for_model(model, ids.shape[0], ids.shape[1])
    logits = [model(ids[:, :prefill], mask[:, :prefill], kv_cache=cache).logits]
    for t in range(prefill, ids.shape[1]):
        logits.append(model(ids[:, t:t + 1], mask[:, :t + 1], kv_cache=cache).logits)
    assert cache.length == ids.shape[1]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("builder,kv_heads", [(hf_llama, 2), (hf_llama, 1), (hf_gpt2, None)],
                         ids=["llama-gqa", "llama-mqa", "gpt2"])
def test_cached_decoding_equals_full_forward_with_left_padding(builder, kv_heads):
    hf = builder(num_key_value_heads=kv_heads) if kv_heads else builder()
    model = ours_from_hf(hf, "causal-lm")
    ids, mask = padded_batch(hf.config.vocab_size, [12, 7, 10], left=True)
    with torch.no_grad():
        full = model(ids, mask).logits
        stepped = decode_step_by_step(model, ids, mask, prefill=5)
    real = mask.bool()
    assert max_abs_diff(stepped[real], full[real]) <= 1e-5


def test_logits_to_keep_computes_only_the_last_positions():
    model = ours_from_hf(hf_llama(num_key_value_heads=2), "causal-lm")
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full, last = model(ids).logits, model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    assert max_abs_diff(last[:, 0], full[:, -1]) <= 1e-6


def test_bart_cached_decoder_equals_full_decoder():
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=71, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                     decoder_ffn_dim=48, max_position_embeddings=32, dropout=0.0)
    model = ours_from_hf(transformers.BartForConditionalGeneration(config).eval(), "seq2seq-lm")
    source, source_mask = padded_batch(71, [9, 6], left=False)
    target = torch.randint(3, 71, (2, 7))
    target_mask = torch.ones_like(target)
    with torch.no_grad():
        encoded = model.model.encode(source, source_mask)
        full = model(attention_mask=source_mask, decoder_input_ids=target, encoder_hidden_states=encoded).logits
        cache = KVCache.for_model(model, 2, 7)
        steps = [model(attention_mask=source_mask, decoder_input_ids=target[:, t:t + 1],
                       decoder_attention_mask=target_mask[:, :t + 1], encoder_hidden_states=encoded,
                       kv_cache=cache).logits for t in range(7)]
    assert max_abs_diff(torch.cat(steps, dim=1), full) <= 1e-5


def test_cache_overflow_is_a_clear_error():
    cache = KVCache(1, 1, 2, 4, max_length=3)
    cache.update(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    cache.advance(3)
    with pytest.raises(InputError, match="holds 3 positions"):
        cache.update(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))


def test_select_keeps_and_reorders_rows():
    cache = KVCache(2, 3, 1, 2, max_length=4)
    cache.update(0, torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 1, 2), torch.zeros(3, 1, 1, 2))
    cache.select(torch.tensor([2, 0]))
    assert cache.batch_size == 2 and cache.keys[0][:, 0, 0, 0].tolist() == [2.0, 0.0]
