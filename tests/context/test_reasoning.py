"""Reasoning budget: the template switch turns thinking off, a budget forces </think> after N thinking tokens
(in generate and the engine alike), and a model without a thinking mode says so."""

import copy

import pytest

from lmforge.context.reasoning import ThinkingMode, reasoning_template_vars
from lmforge.engine.llm import LLM
from lmforge.errors import UnsupportedError, ValidationError
from lmforge.generation.chat import ChatHistory
from lmforge.generation.generate import generate
from lmforge.generation.processors import LogitsPipeline
from lmforge.generation.sampling_params import SamplingParams
from tests.models.test_llama import hf_llama
from tests.parity import ours_from_hf

# A thinking template in the style of DeepSeek-R1 / Qwen3: thinking opens in the prompt, or is skipped when off.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}")


@pytest.fixture(scope="module")
def thinker(smollm2_tokenizer):
    """SmolLM2's tokenizer with think tags and a thinking template, and a tiny random model over its vocabulary."""
    tokenizer = copy.copy(smollm2_tokenizer)
    tokenizer.backend = copy.deepcopy(smollm2_tokenizer.backend)
    tokenizer.backend.add_special_tokens(["<think>", "</think>"])
    tokenizer.chat_template = THINKING_TEMPLATE
    model = ours_from_hf(hf_llama(vocab_size=tokenizer.vocab_size, max_position_embeddings=256), "causal-lm")
    return model, tokenizer


def test_a_budget_forces_the_end_of_the_thought_after_that_many_tokens(thinker):
    model, tokenizer = thinker
    mode = ThinkingMode.of(tokenizer)
    history = ChatHistory(None, [{"role": "user", "content": "What is 2 + 2?"}])
    prompt = history.to_prompt(tokenizer, **reasoning_template_vars(tokenizer, 5))
    assert prompt.endswith("<think>\n")
    for budget in (0, 5, 12):
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, reasoning_budget=budget)
        tokens = generate(model, tokenizer, prompt, params)[0].outputs[0].token_ids
        assert mode.end_id in tokens and tokens.index(mode.end_id) == budget, tokens
        assert mode.start_id not in tokens[:budget]
    unlimited = generate(model, tokenizer, prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert mode.end_id not in unlimited[0].outputs[0].token_ids  # the random model never closes a thought itself

    llm = LLM(model, tokenizer, kv_cache_tokens=512, block_size=4, max_num_seqs=4)
    params = SamplingParams(temperature=1.0, seed=1, n=2, max_tokens=12, ignore_eos=True, reasoning_budget=3)
    for completion in llm.generate([prompt], params, use_tqdm=False)[0].outputs:
        assert completion.token_ids.index(mode.end_id) == 3


def test_reasoning_off_flips_the_template_switch(thinker):
    _, tokenizer = thinker
    history = ChatHistory(None, [{"role": "user", "content": "Hi"}])
    assert history.to_prompt(tokenizer, **reasoning_template_vars(tokenizer, "off")).endswith("<think>\n\n</think>\n\n")
    assert reasoning_template_vars(tokenizer, None) == {}


def test_a_model_without_thinking_and_bad_budgets_are_clear_errors(smollm2_tokenizer):
    with pytest.raises(UnsupportedError, match="no thinking mode"):
        reasoning_template_vars(smollm2_tokenizer, "off")
    with pytest.raises(UnsupportedError, match="no thinking mode"):
        LogitsPipeline.from_params(SamplingParams(reasoning_budget=10), [2], smollm2_tokenizer)
    for bad in ("lots", -1, True):
        with pytest.raises(ValidationError, match="reasoning"):
            reasoning_template_vars(smollm2_tokenizer, bad)
    with pytest.raises(ValidationError, match="reasoning_budget"):
        SamplingParams(reasoning_budget=-3)
