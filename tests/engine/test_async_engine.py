"""AsyncLLMEngine: concurrent streams whose deltas add up to the offline outputs, aborts, stats."""

import asyncio
import time

import pytest

from lmforge import LLM, EngineConfig, LLMEngine, SamplingParams
from lmforge.engine.async_engine import AsyncLLMEngine
from lmforge.errors import InputError
from tests.engine.test_llm_engine import assert_no_leaks, random_prompts


def make_engine(tiny, **config) -> AsyncLLMEngine:
    model, tokenizer = tiny
    return AsyncLLMEngine(LLMEngine(model, tokenizer, EngineConfig(kv_cache_tokens=1024, block_size=4, **config)))


def wait_until_idle(engine: AsyncLLMEngine, timeout: float = 10.0) -> None:
    """Aborts take effect between engine steps: wait for the engine thread to carry them out."""
    deadline = time.time() + timeout
    while engine.engine.has_unfinished_requests() and time.time() < deadline:
        time.sleep(0.01)


async def collect(stream) -> tuple[dict[int, str], dict[int, list[int]], list]:
    texts, tokens, deltas = {}, {}, []
    async for delta in stream:
        deltas.append(delta)
        for completion in delta.outputs:
            texts[completion.index] = texts.get(completion.index, "") + completion.text
            tokens[completion.index] = tokens.get(completion.index, []) + completion.token_ids
    return texts, tokens, deltas


def test_concurrent_streams_add_up_to_the_offline_outputs(tiny):
    prompts = random_prompts(6, seed=8)
    params = [SamplingParams(temperature=0, max_tokens=8 + i, ignore_eos=True, n=1 + i % 2, seed=i) for i in range(6)]
    expected = LLM(*tiny, kv_cache_tokens=1024, block_size=4).generate(prompts, params, use_tqdm=False)
    engine = make_engine(tiny, max_num_seqs=4)

    async def main():
        streams = [engine.add_request(f"r{i}", p, q) for i, (p, q) in enumerate(zip(prompts, params))]
        return await asyncio.gather(*(collect(s) for s in streams))

    try:
        results = asyncio.run(main())
        for (texts, tokens, deltas), reference in zip(results, expected):
            assert [tokens[c.index] for c in reference.outputs] == [c.token_ids for c in reference.outputs]
            assert [texts[c.index] for c in reference.outputs] == [c.text for c in reference.outputs]
            assert len(deltas) > 1 and deltas[-1].finished and not any(d.finished for d in deltas[:-1])
        assert_no_leaks(engine.engine)
    finally:
        engine.shutdown()


def test_abort_ends_the_stream_and_frees_blocks(tiny):
    engine = make_engine(tiny)

    async def main():
        stream = engine.add_request("long", [1, 2, 3], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        first = await stream.__anext__()
        engine.abort("long")
        engine.abort("long")  # twice, and unknown ids, are harmless
        engine.abort("nobody")
        rest = [delta async for delta in stream]
        return first, rest

    try:
        first, rest = asyncio.run(main())
        assert first.outputs[0].token_ids and rest[-1].finished
        assert rest[-1].outputs[0].finish_reason == "abort"
        assert_no_leaks(engine.engine)
    finally:
        engine.shutdown()


def test_bad_input_raises_at_once_and_stats_are_live(tiny):
    engine = make_engine(tiny, max_num_seqs=1)

    async def main():
        with pytest.raises(InputError, match="max_num_seqs"):
            engine.add_request("bad", [1, 2], SamplingParams(n=2))
        streams = [engine.add_request(str(i), [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
                   for i in range(3)]
        await streams[0].__anext__()
        stats = engine.stats
        for stream in streams:
            await stream.aclose()  # leaving early aborts
        return stats

    try:
        stats = asyncio.run(main())
        assert stats.num_running == 1 and stats.num_waiting == 2 and stats.kv_blocks_used > 0
        wait_until_idle(engine)
        assert_no_leaks(engine.engine)
    finally:
        engine.shutdown()
