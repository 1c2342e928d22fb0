"""Generation against HF transformers: greedy parity on the real SmolLM2 and on tiny random models."""

import pytest
import torch
import transformers

from lmforge.errors import InputError
from lmforge.generation import SamplingParams, generate, stream
from tests.models.test_gpt2 import hf_gpt2
from tests.models.test_llama import hf_llama
from tests.parity import id_tokenizer, ours_from_hf

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a transformer model is in two sentences.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
]
NEW_TOKENS = 64


def first_near_tie(scores: list[torch.Tensor]) -> int:
    """The first step whose top-2 logit margin is below 1e-3 (fp32 summation order may flip it)."""
    for step, logits in enumerate(scores):
        top2 = logits.topk(2).values
        if float(top2[0] - top2[1]) < 1e-3:
            return step
    return len(scores)


@pytest.fixture(scope="module")
def hf_greedy(hf_smollm2, smollm2_tokenizer):
    """HF's greedy continuation and per-step raw logits for each chat prompt."""
    results = []
    for prompt in CHAT_PROMPTS:
        ids = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
        input_ids = torch.tensor([ids])
        out = hf_smollm2.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                  max_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
                                  pad_token_id=2)
        results.append((ids, out.sequences[0, len(ids):].tolist(), [s[0] for s in out.logits]))
    return results


def test_smollm2_greedy_matches_hf(smollm2, smollm2_tokenizer, hf_greedy):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    for prompt_ids, hf_tokens, hf_logits in hf_greedy:
        ours = generate(smollm2, smollm2_tokenizer, prompt_ids, params)[0].outputs[0].token_ids
        agree = min(first_near_tie(hf_logits), len(hf_tokens))
        assert ours[:agree] == hf_tokens[:agree]
        if agree == len(hf_tokens):
            assert ours == hf_tokens
        # Per-step logits: our model teacher-forced on HF's sequence, compared step by step.
        sequence = torch.tensor([prompt_ids + hf_tokens])
        with torch.inference_mode():
            logits = smollm2(sequence).logits[0, len(prompt_ids) - 1:-1]
        assert (logits - torch.stack(hf_logits)).abs().max() <= 1e-3


def test_batched_greedy_equals_one_at_a_time_on_smollm2(smollm2, smollm2_tokenizer):
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):"]
    params = SamplingParams(temperature=0, max_tokens=12)
    batched = [r.outputs[0].token_ids for r in generate(smollm2, smollm2_tokenizer, prompts, params)]
    alone = [generate(smollm2, smollm2_tokenizer, p, params)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("builder", [hf_llama, hf_gpt2], ids=["llama", "gpt2"])
def test_tiny_decoder_greedy_matches_hf_exactly(builder):
    hf = builder()
    ours = ours_from_hf(hf, "causal-lm")
    prompt = [5, 17, 3, 42, 8]
    expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, min_new_tokens=20,
                           pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    got = generate(ours, id_tokenizer(128), prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert got[0].outputs[0].token_ids == expected


def test_tiny_bart_greedy_matches_hf_exactly():
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=71, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                     decoder_ffn_dim=48, max_position_embeddings=64, dropout=0.0,
                                     forced_bos_token_id=None, forced_eos_token_id=None, eos_token_id=None)
    hf = transformers.BartForConditionalGeneration(config).eval()
    ours = ours_from_hf(hf, "seq2seq-lm")
    source = [0, 11, 23, 35, 47, 2]
    expected = hf.generate(torch.tensor([source]), do_sample=False, max_new_tokens=15, min_new_tokens=15,
                           num_beams=1, no_repeat_ngram_size=0)[0, 1:].tolist()  # drop decoder_start
    got = generate(ours, id_tokenizer(128), source, SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))
    assert got[0].outputs[0].token_ids == expected


def test_tiny_batch_with_padding_equals_single_and_rows_finish_early():
    ours = ours_from_hf(hf_llama(num_key_value_heads=2), "causal-lm")
    prompts = [[5, 17, 3, 42, 8, 9, 10], [7, 7], [11, 2, 33]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = [generate(ours, id_tokenizer(128), p, params)[0].outputs[0].token_ids for p in prompts]
    batched = [r.outputs[0].token_ids for r in generate(ours, id_tokenizer(128), prompts, params)]
    assert batched == alone
    # A stop token that one row hits early: that row ends, the others go on unchanged.
    stop = alone[1][2]
    early = generate(ours, id_tokenizer(128), prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                                  stop_token_ids=[stop]))
    assert early[1].outputs[0].finish_reason == "stop" and len(early[1].outputs[0].token_ids) <= 3
    for request, tokens in zip(early, alone):
        produced = request.outputs[0].token_ids
        assert produced == tokens[:len(produced)]


def test_seeded_sampling_is_reproducible(smollm2, smollm2_tokenizer):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, n=2)
    first = generate(smollm2, smollm2_tokenizer, "Tell me a joke.", params)[0]
    second = generate(smollm2, smollm2_tokenizer, "Tell me a joke.", params)[0]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
    assert first.outputs[0].token_ids != first.outputs[1].token_ids  # n completions use different streams


def test_stop_string_across_tokens_streaming_and_not(smollm2, smollm2_tokenizer):
    prompt = "The capital of France is"
    full = generate(smollm2, smollm2_tokenizer, prompt, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0]
    assert full.text.startswith(" Paris")
    params = SamplingParams(temperature=0, max_tokens=6, stop=["aris"])  # " Paris" is one token: cut inside it
    result = generate(smollm2, smollm2_tokenizer, prompt, params)[0].outputs[0]
    deltas = list(stream(smollm2, smollm2_tokenizer, prompt, params))
    assert result.text == "".join(deltas) == " P"
    assert result.finish_reason == "stop" and result.stop_reason == "aris"


def test_streaming_concatenates_to_the_full_text_with_emoji_and_cjk(smollm2, smollm2_tokenizer):
    prompt = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reply with three emoji and the Japanese word for cat."}])
    params = SamplingParams(temperature=0, max_tokens=24)
    full = generate(smollm2, smollm2_tokenizer, prompt, params)[0].outputs[0].text
    deltas = list(stream(smollm2, smollm2_tokenizer, prompt, params))
    assert "".join(deltas) == full
    assert any(ord(ch) > 0x2000 for ch in full)  # the emoji really were generated
    # Mid-stream no delta holds a half character; only a length cut inside an emoji may end in U+FFFD.
    assert all("\ufffd" not in delta for delta in deltas[:-1])


def test_logprobs_are_returned(smollm2, smollm2_tokenizer):
    result = generate(smollm2, smollm2_tokenizer, "The capital of France is",
                      SamplingParams(temperature=0, max_tokens=2, logprobs=3))[0].outputs[0]
    first = result.logprobs[0]
    assert first.token_id == result.token_ids[0] and len(first.top) == 3
    assert first.top[0][0] == first.token_id and first.logprob == pytest.approx(first.top[0][1])


def test_empty_prompt_starts_from_bos(smollm2, smollm2_tokenizer):
    result = generate(smollm2, smollm2_tokenizer, "", SamplingParams(temperature=0, max_tokens=3))[0]
    assert result.prompt_token_ids == [smollm2_tokenizer.bos_token_id]
    with pytest.raises(InputError, match="no BOS token"):
        generate(ours_from_hf(hf_llama(), "causal-lm"), id_tokenizer(128), "", SamplingParams(max_tokens=2))


def test_prompt_longer_than_context_is_a_clear_error():
    ours = ours_from_hf(hf_llama(), "causal-lm")  # 64 positions
    with pytest.raises(InputError, match="context window is 64"):
        generate(ours, id_tokenizer(128), list(range(1, 65)), SamplingParams(max_tokens=2))


def test_max_tokens_none_fills_the_context():
    ours = ours_from_hf(hf_llama(), "causal-lm")
    result = generate(ours, id_tokenizer(128), list(range(1, 61)), SamplingParams(temperature=0, max_tokens=None,
                                                                            ignore_eos=True))[0].outputs[0]
    assert len(result.token_ids) == 4 and result.finish_reason == "length"
