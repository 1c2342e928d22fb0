"""GPT-2 parity with HF transformers on tiny random models, incl. the Conv1D/fused-QKV conversion."""

import pytest
import torch
import transformers

from lmforge import AutoModelForCausalLM
from tests.parity import max_abs_diff, ours_from_hf, padded_batch, random_hf_model

TINY = dict(vocab_size=101, n_embd=48, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def hf_gpt2(cls_name="GPT2LMHeadModel", **overrides):
    config = transformers.GPT2Config(**{**TINY, **overrides})
    return random_hf_model(cls_name, config, lambda name: ".ln_" in name and name.endswith("weight"))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_lm_logits_match_hf(implementation):
    hf = hf_gpt2()
    ours = ours_from_hf(hf, "causal-lm", implementation)
    ids = torch.randint(0, TINY["vocab_size"], (2, 13))
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, hf(ids).logits) <= 1e-4
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
def test_padded_batch_matches_hf(left):
    hf = hf_gpt2()
    ours = ours_from_hf(hf, "causal-lm")
    ids, mask = padded_batch(TINY["vocab_size"], [10, 4, 7], left=left)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF's generate() passes for padded prompts
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_abs_diff(got[real], expected[real]) <= 1e-4


@pytest.mark.parametrize("task,cls_name", [("sequence-classification", "GPT2ForSequenceClassification"),
                                           ("token-classification", "GPT2ForTokenClassification"),
                                           ("base", "GPT2Model")])
def test_heads_match_hf(task, cls_name):
    hf = hf_gpt2(cls_name, num_labels=3)
    ours = ours_from_hf(hf, task)
    ids, mask = padded_batch(TINY["vocab_size"], [9, 6], left=False)
    with torch.no_grad():
        expected, got = hf(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    real = mask.bool()
    if task == "base":
        assert max_abs_diff(got.last_hidden_state[real], expected.last_hidden_state[real]) <= 1e-4
    elif task == "token-classification":
        assert max_abs_diff(got.logits[real], expected.logits[real]) <= 1e-4
    else:
        assert max_abs_diff(got.logits, expected.logits) <= 1e-4


def test_save_loads_in_hf_with_same_logits(tmp_path):
    hf = hf_gpt2()
    ours = ours_from_hf(hf, "causal-lm")
    ours.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():
        assert max_abs_diff(reloaded(ids).logits, ours(ids).logits) <= 1e-5
    assert set(ours.hf_state_dict()) == set(hf.state_dict()) - {"lm_head.weight"}
    ours_again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ours_again.state_dict().values()))
