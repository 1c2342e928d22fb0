"""The engine against the single-sequence generation path: identical greedy tokens under continuous
batching, chunked prefill, preemption and prefix caching; n > 1, aborts, stats and bad input."""

import random

import pytest
import torch

from lmforge import LLM, EngineConfig, LLMEngine, SamplingParams, generate
from lmforge.errors import ConfigError, InputError, UnsupportedError, ValidationError
from tests.generation.test_generate import first_near_tie
from tests.models.test_gpt2 import hf_gpt2
from tests.models.test_llama import hf_llama
from tests.parity import id_tokenizer, ours_from_hf

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def random_prompts(count: int, max_len: int = 40, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 97) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


def alone(model, tokenizer, prompts, params=GREEDY) -> list[list[int]]:
    return [generate(model, tokenizer, p, params)[0].outputs[0].token_ids for p in prompts]


def engine_tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def assert_no_leaks(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_used_blocks == 0 and all(block.ref_count == 0 for block in bm.blocks)
    assert not engine.requests and not engine.scheduler.has_unfinished()


def test_64_mixed_prompts_equal_generating_each_alone(tiny):
    model, tokenizer = tiny
    prompts = random_prompts(64)
    params = [SamplingParams(temperature=0, max_tokens=random.Random(i).randint(1, 16), ignore_eos=True)
              for i in range(64)]
    llm = LLM(model, tokenizer, kv_cache_tokens=2048, block_size=4, max_num_seqs=16, max_num_batched_tokens=48)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert engine_tokens(outputs) == [alone(model, tokenizer, [p], q)[0] for p, q in zip(prompts, params)]
    assert all(out.finished and out.outputs[0].finish_reason == "length" for out in outputs)
    assert_no_leaks(llm.engine)


def test_a_pool_too_small_for_everyone_preempts_and_still_matches(tiny):
    model, tokenizer = tiny
    prompts = random_prompts(24, max_len=30, seed=1)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm = LLM(model, tokenizer, kv_cache_tokens=96, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
              max_model_len=64)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.stats.num_preemptions > 0
    assert engine_tokens(outputs) == alone(model, tokenizer, prompts, params)
    assert_no_leaks(llm.engine)


def test_prefix_cache_hits_give_the_outputs_of_misses(tiny):
    model, tokenizer = tiny
    system = list(range(10, 42))  # a 32-token shared prefix
    prompts = [system + tail for tail in random_prompts(12, max_len=10, seed=3)]
    results = {}
    for caching in (True, False):
        llm = LLM(model, tokenizer, kv_cache_tokens=1024, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
                  enable_prefix_caching=caching)
        results[caching] = (engine_tokens(llm.generate(prompts, GREEDY, use_tqdm=False)), llm.engine.stats)
        assert_no_leaks(llm.engine)
    (hit_tokens, hit_stats), (miss_tokens, miss_stats) = results[True], results[False]
    assert hit_tokens == miss_tokens == alone(model, tokenizer, prompts)
    assert hit_stats.prefix_cache_hit_rate > 0.5 and miss_stats.prefix_cache_hit_rate == 0
    assert hit_stats.prompt_tokens_computed < miss_stats.prompt_tokens_computed / 2


def test_parallel_sampling_shares_the_prompt_and_matches_generate(tiny):
    model, tokenizer = tiny
    prompt = random_prompts(1, max_len=30, seed=4)[0] + [5] * 10
    params = SamplingParams(n=3, temperature=1.0, top_k=20, seed=7, max_tokens=10, ignore_eos=True)
    llm = LLM(model, tokenizer, kv_cache_tokens=512, block_size=4, max_num_seqs=4)
    [output] = llm.generate([prompt], params, use_tqdm=False)
    expected = generate(model, tokenizer, prompt, params)[0]
    assert [c.token_ids for c in output.outputs] == [c.token_ids for c in expected.outputs]
    assert len({tuple(c.token_ids) for c in output.outputs}) == 3
    assert llm.engine.stats.prompt_tokens_computed == len(prompt)  # computed once for all three
    assert_no_leaks(llm.engine)


def test_parallel_samples_survive_preemption(tiny):
    model, tokenizer = tiny
    prompts = random_prompts(8, max_len=20, seed=9)
    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=16, ignore_eos=True)
    llm = LLM(model, tokenizer, kv_cache_tokens=96, block_size=4, max_num_seqs=6, max_num_batched_tokens=32,
              max_model_len=64)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.stats.num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        expected = generate(model, tokenizer, prompt, params)[0]
        assert [c.token_ids for c in output.outputs] == [c.token_ids for c in expected.outputs]
    assert_no_leaks(llm.engine)


def test_a_step_of_prompt_chunks_only_samples_nothing(tiny):
    model, tokenizer = tiny
    llm = LLM(model, tokenizer, kv_cache_tokens=512, block_size=4, max_num_batched_tokens=16)
    prompt = list(range(1, 41))  # longer than two steps' budget: the first two steps sample nothing
    assert engine_tokens(llm.generate([prompt], GREEDY, use_tqdm=False)) == alone(model, tokenizer, [prompt])


def test_a_quantized_model_through_the_engine():
    from tests.models.test_llama import hf_llama
    from tests.parity import id_tokenizer, ours_from_hf

    model, tokenizer = ours_from_hf(hf_llama(num_key_value_heads=2), "causal-lm"), id_tokenizer(128)
    llm = LLM(model, tokenizer, quantization="int4", kv_cache_tokens=512, block_size=4, max_num_batched_tokens=32)
    prompts = random_prompts(6, seed=10)
    assert engine_tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == alone(model, tokenizer, prompts)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_decode_steps_run_in_one_compiled_call(method, monkeypatch):
    from lmforge.models import llama_quant_decode
    from lmforge.nn.kernels import simd

    if not simd.available():
        pytest.skip("the compiled step needs x86-64 with AVX2 and numba")
    model = ours_from_hf(hf_llama(num_key_value_heads=2, intermediate_size=128), "causal-lm")  # kernel-sized widths
    llm = LLM(model, id_tokenizer(128), quantization=method, kv_cache_tokens=1024, block_size=4, max_num_seqs=8,
              max_num_batched_tokens=32)
    batches, paged_step = [], llama_quant_decode.QuantizedStackPlan.paged_step

    def counting(self, hidden, *args):
        batches.append(hidden.shape[0])
        return paged_step(self, hidden, *args)

    monkeypatch.setattr(llama_quant_decode.QuantizedStackPlan, "paged_step", counting)
    prompts, params = random_prompts(16, seed=11), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    compiled = engine_tokens(llm.generate(prompts, params, use_tqdm=False))
    assert max(batches) == 8 and min(batches) < 8  # steps of decodes only, several sequences, of varying sizes
    monkeypatch.setattr(llama_quant_decode, "plan_for", lambda model, cache: None)  # per module, batched attention
    assert compiled == engine_tokens(llm.generate(prompts, params, use_tqdm=False))
    assert_no_leaks(llm.engine)


def test_gpt2_through_the_engine(tiny):
    model, tokenizer = ours_from_hf(hf_gpt2(), "causal-lm"), id_tokenizer(128)
    prompts = random_prompts(6, max_len=18, seed=5)
    llm = LLM(model, tokenizer, kv_cache_tokens=512, block_size=4, max_num_batched_tokens=32)
    assert engine_tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == alone(model, tokenizer, prompts)


def test_abort_frees_everything_and_unknown_ids_are_harmless(tiny):
    model, tokenizer = tiny
    engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_tokens=512, block_size=4, max_num_seqs=2))
    for i, prompt in enumerate(random_prompts(4, seed=6)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    engine.step()
    engine.step()
    running = engine.abort_request("0")
    waiting = engine.abort_request("3")
    assert running.finished and running.outputs[0].finish_reason == "abort" and running.outputs[0].token_ids
    assert waiting.outputs[0].finish_reason == "abort" and waiting.outputs[0].token_ids == []
    assert engine.abort_request("0") is None and engine.abort_request("nobody") is None
    finished = []
    while engine.has_unfinished_requests():
        finished += [out.request_id for out in engine.step() if out.finished]
    assert sorted(finished) == ["1", "2"]
    assert_no_leaks(engine)


def test_outputs_carry_timings_and_stats_count_work(tiny):
    model, tokenizer = tiny
    llm = LLM(model, tokenizer, kv_cache_tokens=512, block_size=4)
    [output] = llm.generate([[1, 2, 3, 4, 5]], GREEDY, use_tqdm=False)
    metrics = output.metrics
    assert 0 < metrics.time_to_first_token <= metrics.finished_time - metrics.arrival_time
    assert metrics.time_per_output_token > 0 and metrics.num_output_tokens == 12
    stats = llm.engine.stats
    assert (stats.prompt_tokens_computed, stats.output_tokens) == (5, 12) and stats.tokens_per_second > 0


def test_bad_input_fails_before_queueing(tiny):
    model, tokenizer = tiny
    engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_tokens=256, block_size=4, max_num_seqs=2,
                                                      max_model_len=32))
    with pytest.raises(InputError, match="max_model_len"):
        engine.add_request("long", list(range(1, 40)))
    with pytest.raises(InputError, match="max_num_seqs"):
        engine.add_request("n", [1, 2], SamplingParams(n=3))
    with pytest.raises(UnsupportedError, match="beam"):
        engine.add_request("beam", [1, 2], SamplingParams(num_beams=2))
    engine.add_request("ok", [1, 2])
    with pytest.raises(InputError, match="already in use"):
        engine.add_request("ok", [3])
    assert list(engine.requests) == ["ok"] and len(engine.scheduler.waiting) == 1
    with pytest.raises(ConfigError, match="kv_cache_tokens"):
        LLMEngine(model, tokenizer, EngineConfig(kv_cache_tokens=16, max_model_len=64))
    with pytest.raises(InputError, match="tokenizer"):
        LLM(model)


@pytest.mark.parametrize("field,value", [("max_num_seqs", 0), ("block_size", 2.5), ("kv_cache_tokens", -1),
                                         ("max_model_len", True), ("kv_cache_memory_fraction", 1.5)])
def test_engine_config_errors_name_the_field(field, value):
    with pytest.raises(ValidationError, match=f"EngineConfig.{field}"):
        EngineConfig(**{field: value})


def test_smollm2_engine_matches_generate_up_to_a_near_tie(smollm2, smollm2_tokenizer):
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):", "List three colors:",
               "Water boils at", "The quick brown fox", "import numpy as np\n", "Translate 'hello' to French:"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    llm = LLM(smollm2, smollm2_tokenizer, kv_cache_tokens=2048, max_model_len=512, max_num_batched_tokens=32)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    compared = 0
    for prompt, output in zip(prompts, outputs):
        reference = generate(smollm2, smollm2_tokenizer, prompt, params)[0].outputs[0]
        margins = [torch.tensor([lp.top[0][1], lp.top[1][1]]) for lp in reference.logprobs]
        agree = first_near_tie(margins)
        assert output.outputs[0].token_ids[:agree] == reference.token_ids[:agree]
        compared += agree
    assert compared >= 0.75 * 8 * 24  # near-ties are rare: most tokens are compared


def test_smollm2_chat_and_stop_strings(smollm2, smollm2_tokenizer):
    llm = LLM(smollm2, smollm2_tokenizer, kv_cache_tokens=1024, max_model_len=512)
    conversation = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    params = SamplingParams(temperature=0, max_tokens=40, stop=["5"])
    [output] = llm.chat(conversation, params, use_tqdm=False)
    prompt = smollm2_tokenizer.apply_chat_template(conversation, tokenize=True)
    reference = generate(smollm2, smollm2_tokenizer, prompt, params)[0].outputs[0]
    assert output.outputs[0].text == reference.text and "5" not in output.outputs[0].text
    assert output.outputs[0].finish_reason == "stop" and output.outputs[0].stop_reason == "5"
