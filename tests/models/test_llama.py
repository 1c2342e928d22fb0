"""Llama parity with HF transformers on tiny random models (MHA, GQA, MQA, padding, heads)."""

import pytest
import torch
import transformers

from lmforge.config import LlamaConfig
from lmforge.errors import ConfigError, InputError
from lmforge.models.llama import LlamaForCausalLM
from tests.parity import max_abs_diff, ours_from_hf, padded_batch, random_hf_model

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0)


def hf_llama(cls_name="LlamaForCausalLM", **overrides):
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    return random_hf_model(cls_name, config, lambda name: "norm" in name)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_causal_lm_matches_hf(kv_heads, implementation):
    hf = hf_llama(num_key_value_heads=kv_heads, attention_bias=kv_heads == 2)
    ours = ours_from_hf(hf, "causal-lm", implementation)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, hf(ids).logits) <= 1e-4


@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
def test_padded_batch_matches_hf(left):
    hf = hf_llama(num_key_value_heads=2)
    ours = ours_from_hf(hf, "causal-lm")
    ids, mask = padded_batch(TINY["vocab_size"], [9, 5, 7], left=left)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()  # logits at padding positions are meaningless
    assert max_abs_diff(got[real], expected[real]) <= 1e-4


def test_padding_does_not_change_real_tokens():
    hf = hf_llama(num_key_value_heads=2)
    ours = ours_from_hf(hf, "causal-lm")
    ids, mask = padded_batch(TINY["vocab_size"], [9, 4], left=True)
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask).logits[1, -4:]
        alone = ours(ids[1:, -4:]).logits[0]
    assert max_abs_diff(batched, alone) <= 1e-5


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])
def test_rope_scaling_matches_hf(scaling):
    hf = hf_llama(num_key_value_heads=2, rope_parameters={"rope_theta": 500.0, **scaling})
    ours = ours_from_hf(hf, "causal-lm")
    ids = torch.randint(0, TINY["vocab_size"], (1, 40))
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, hf(ids).logits) <= 1e-4


def test_tied_embeddings_share_storage():
    hf = hf_llama(num_key_value_heads=2, tie_word_embeddings=True)
    ours = ours_from_hf(hf, "causal-lm")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, TINY["vocab_size"], (1, 6))
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, hf(ids).logits) <= 1e-4


@pytest.mark.parametrize("task,cls_name", [("sequence-classification", "LlamaForSequenceClassification"),
                                           ("token-classification", "LlamaForTokenClassification"),
                                           ("base", "LlamaModel")])
def test_heads_match_hf(task, cls_name):
    hf = hf_llama(cls_name, num_key_value_heads=2, num_labels=3)
    ours = ours_from_hf(hf, task)
    ids, mask = padded_batch(TINY["vocab_size"], [8, 5], left=False)
    with torch.no_grad():
        out = hf(ids, attention_mask=mask)
        got = ours(ids, attention_mask=mask)
    if task == "base":
        real = mask.bool()
        assert max_abs_diff(got.last_hidden_state[real], out.last_hidden_state[real]) <= 1e-4
    elif task == "token-classification":
        real = mask.bool()
        assert max_abs_diff(got.logits[real], out.logits[real]) <= 1e-4
    else:
        assert max_abs_diff(got.logits, out.logits) <= 1e-4


def test_inconsistent_config_is_rejected():
    with pytest.raises(ConfigError, match="num_attention_heads"):
        LlamaConfig(**{**TINY, "hidden_size": 66})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        LlamaConfig(**{**TINY, "num_key_value_heads": 3})


def test_too_long_input_is_a_clear_error():
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "max_position_embeddings": 8}))
    with pytest.raises(InputError, match="at most 8 positions"):
        model(torch.zeros(1, 9, dtype=torch.long))
