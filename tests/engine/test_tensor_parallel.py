"""The engine with its model split over processes: `LLM(..., tensor_parallel_size=N)` starts N - 1
workers, gives the same greedy tokens as one process, stops them cleanly, and fails fast when one dies.

SmolLM2-135M-Instruct in 3 processes (9 query heads, 3 key/value heads, FFN 1536, vocabulary 49152)
matches one process up to the first near-tie, rank 0 holding a third of the weights.
"""

import multiprocessing
import threading
import time

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.config import LlamaConfig
from lmforge.errors import ConfigError, DistributedError, InputError, UnsupportedError
from lmforge.models.llama import LlamaForCausalLM
from tests.distributed.tensor_parallel_worker import TINY_LLAMA, randomized
from tests.generation.test_generate import first_near_tie
from tests.parity import id_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 17, 33, 2], [60, 1], [9, 9, 41, 7, 12, 30, 3], [44], [5, 17, 33, 2, 8], [1] * 20]
ENGINE = {"dtype": torch.float32, "kv_cache_tokens": 256, "block_size": 4, "max_num_batched_tokens": 16}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    randomized(LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))).save_pretrained(folder)
    return folder


def tokens(outputs) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in outputs]


def test_two_processes_give_the_same_greedy_tokens_and_stop_cleanly(tiny_folder):
    tokenizer = id_tokenizer(64)
    alone = tokens(LLM(tiny_folder, tokenizer, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False))
    llm = LLM(tiny_folder, tokenizer, tensor_parallel_size=2, **ENGINE)
    workers = llm.engine.runner.workers.processes
    assert len(workers) == 1 and workers[0].is_alive()
    assert llm.engine.model.model.layers[0].self_attn.num_kv_heads == 1  # its half of the KV cache
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == alone
    llm.shutdown()
    assert [worker.exitcode for worker in workers] == [0]
    with pytest.raises(DistributedError, match="shut down"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)


def test_a_worker_that_dies_makes_generation_fail_fast(tiny_folder):
    llm = LLM(tiny_folder, id_tokenizer(64), tensor_parallel_size=2, **ENGINE)
    worker = llm.engine.runner.workers.processes[0]
    killer = threading.Timer(0.5, worker.kill)
    killer.start()
    start = time.perf_counter()
    with pytest.raises(DistributedError, match="worker rank 1"):
        llm.generate(PROMPTS * 40, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert time.perf_counter() - start < 30
    killer.join()
    assert worker.exitcode is not None and not multiprocessing.active_children()


def test_bad_tensor_parallel_requests_fail_before_any_worker_starts(tiny_folder):
    tokenizer = id_tokenizer(64)
    with pytest.raises(ConfigError, match="4 attention heads.*use one of: 1, 2, 4"):
        LLM(tiny_folder, tokenizer, tensor_parallel_size=3, **ENGINE)
    with pytest.raises(UnsupportedError, match="drop quantization"):
        LLM(tiny_folder, tokenizer, quantization="int8", tensor_parallel_size=2, **ENGINE)
    with pytest.raises(InputError, match="not a loaded model"):
        LLM(LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)), tokenizer, tensor_parallel_size=2, **ENGINE)
    assert not multiprocessing.active_children()


def test_smollm2_in_three_processes_matches_one_up_to_the_first_near_tie(smollm2, smollm2_tokenizer):
    prompts = [smollm2_tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
               for text in ("What is the capital of France?", "Write a haiku about the sea.")]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
    engine = {"kv_cache_tokens": 512, "max_model_len": 512}
    alone = LLM(smollm2, smollm2_tokenizer, **engine).generate(prompts, params, use_tqdm=False)
    llm = LLM("smollm2-135m-instruct", dtype=torch.float32, tensor_parallel_size=3, **engine)
    try:
        split = llm.generate(prompts, params, use_tqdm=False)
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    finally:
        llm.shutdown()
    assert weight_bytes < 0.35 * smollm2.num_parameters() * 4
    for ours, reference in zip(split, alone):
        ours, reference = ours.outputs[0], reference.outputs[0]
        agree = first_near_tie([torch.tensor([step.top[0][1], step.top[1][1]]) for step in reference.logprobs])
        assert agree >= 3
        assert ours.token_ids[:agree + 1] == reference.token_ids[:agree + 1]
        for step, reference_step in zip(ours.logprobs[:agree + 1], reference.logprobs):
            assert step.logprob == pytest.approx(reference_step.logprob, abs=1e-3)


def test_torchrun_misuse_is_refused_before_any_process_group_forms(tiny_folder, monkeypatch):
    from lmforge.engine import run_tensor_parallel_worker

    with pytest.raises(InputError, match="run_tensor_parallel_worker\\(\\) is for ranks 1..N-1"):
        run_tensor_parallel_worker()  # not under torchrun: this process is rank 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="torchrun started 2 processes but tensor_parallel_size is 4"):
        LLM(tiny_folder, id_tokenizer(64), tensor_parallel_size=4, **ENGINE)
