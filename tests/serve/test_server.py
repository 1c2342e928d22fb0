"""The OpenAI-compatible server, driven by the official `openai` client over loopback HTTP."""

import asyncio
import base64
import re

import httpx
import numpy as np
import openai
import pytest
import torch

from lmforge import SamplingParams, generate
from tests.generation.test_generate import first_near_tie
from tests.serve.conftest import MODEL, wait_for_free_blocks

CHAT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]


def test_chat_completion_matches_offline_generation_and_counts_usage(server, client, smollm2, smollm2_tokenizer):
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    prompt = smollm2_tokenizer.apply_chat_template(CHAT, tokenize=True)
    reference = generate(smollm2, smollm2_tokenizer, prompt, SamplingParams(temperature=0, max_tokens=12))[0]
    choice = response.choices[0]
    assert choice.message.content == reference.outputs[0].text and choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(prompt) and response.usage.completion_tokens == 12
    assert response.usage.total_tokens == len(prompt) + 12 and response.model == MODEL


def test_chat_streaming_adds_up_to_the_whole_answer(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stop_strings_n_seed_and_logprobs(client):
    stopped = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0, stop=["5"])
    assert stopped.choices[0].finish_reason == "stop" and "5" not in stopped.choices[0].message.content
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=2, seed=11, logprobs=2)
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len(first.choices) == 2 and first.choices[0].text != first.choices[1].text
    logprobs = first.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 8 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs) and first.usage.completion_tokens == 16
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(entry.top_logprobs) == 3 for entry in content)


def test_completions_echo_batches_and_token_prompts(client, smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("The capital of France is")
    batch = client.completions.create(model=MODEL, prompt=["The capital of France is", "Water boils at"],
                                      max_tokens=4, temperature=0, echo=True)
    tokens = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[1].text.startswith("Water boils at")
    assert batch.choices[0].text == tokens.choices[0].text and tokens.choices[0].text.startswith("The capital")
    assert tokens.usage.prompt_tokens == len(ids)


def test_embeddings_float_and_base64(server, client):
    texts = ["a cat sits on the mat", "a kitten rests on a rug", "the stock market fell sharply"]
    response = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    vectors = np.array([item.embedding for item in response.data])
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2  # similar meaning, closer vectors
    encoder = server.embedder.encoder
    batch = encoder.tokenizer(texts)
    expected = encoder.model.embed(batch["input_ids"], batch["attention_mask"])
    assert np.allclose(vectors, expected.detach().numpy(), atol=1e-6)
    assert response.usage.prompt_tokens == int(batch["attention_mask"].sum())
    packed = httpx.post(server.url + "/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-7)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="hi")


def test_metrics_report_traffic_latency_and_the_kv_cache(server, client, caplog):
    with caplog.at_level("INFO", logger="lmforge.serve"):
        reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    usage = reply.usage
    assert any(f": {usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens, first token after "
               in record.getMessage() for record in caplog.records)
    text = httpx.get(server.url + "/metrics").text
    assert 'lmforge_http_responses_total{route="/v1/chat/completions",status="200"}' in text
    for name in ("lmforge_time_to_first_token_seconds_count", "lmforge_inter_token_latency_seconds_count",
                 "lmforge_generation_tokens_total", "lmforge_prompt_tokens_total", "lmforge_kv_blocks_total",
                 "lmforge_kv_blocks_used", "lmforge_requests_waiting", "lmforge_sequences_running",
                 "lmforge_prefix_cache_hit_rate"):
        value = float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])
        assert value >= 0
    count = next(line for line in text.splitlines() if line.startswith("lmforge_time_to_first_token_seconds_count"))
    assert float(count.split()[-1]) >= 1


def test_models_tokenize_detokenize_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL, "all-minilm-l6-v2"]
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "Hello world"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_every_error_has_the_openai_shape_and_status(server, client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=-1)
    assert bad.value.body["param"] == "temperature" and "temperature" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[])
    assert bad.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL, prompt=" hello" * 600, max_tokens=4)
    assert long.value.body["code"] == "context_length_exceeded" and "512" in long.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=CHAT)
    assert missing.value.body["param"] == "model"
    route = httpx.get(server.url + "/v1/nowhere")
    assert route.status_code == 404 and route.json()["error"]["type"] == "not_found_error"
    bad_tokens = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]})
    assert bad_tokens.status_code == 400 and bad_tokens.json()["error"]["param"] == "tokens"
    for embedding_input, reason in (([[101, 10**9]], "token ids must be in [0, 30522)"),
                                     (" word" * 600, "longer than the 512 tokens")):
        with pytest.raises(openai.BadRequestError, match=re.escape(reason)):
            client.embeddings.create(model="all-minilm-l6-v2", input=embedding_input)

    server.api_key = "secret"
    try:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        keyed = openai.OpenAI(base_url=server.url + "/v1", api_key="secret", max_retries=0)
        assert keyed.models.list().data[0].id == MODEL
    finally:
        server.api_key = None

    server.max_queue = 0
    try:
        with pytest.raises(openai.RateLimitError) as full:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        assert full.value.response.headers["retry-after"] == "1"
    finally:
        server.max_queue = None

    server.draining = True
    try:
        assert httpx.get(server.url + "/health").status_code == 503
        with pytest.raises(openai.InternalServerError) as unavailable:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        assert unavailable.value.status_code == 503
    finally:
        server.draining = False


def test_a_client_leaving_mid_stream_frees_its_blocks(server):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.engine.stats.kv_blocks_used > 0
    wait_for_free_blocks(server)


def test_a_client_leaving_a_non_streamed_request_frees_its_blocks(server):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1.0)
    wait_for_free_blocks(server)


def test_32_concurrent_streaming_clients_all_finish_with_the_offline_answers(server, smollm2, smollm2_tokenizer):
    questions = [f"Give me a fact about the number {i}." for i in range(32)]
    async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    async def ask(question: str) -> str:
        stream = await async_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=6, temperature=0, stream=True)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    async def main():
        return await asyncio.gather(*(ask(q) for q in questions))

    answers = asyncio.run(main())
    assert len(answers) == 32
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2)
    for question, answer in zip(questions, answers):
        prompt = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True)
        reference = generate(smollm2, smollm2_tokenizer, prompt, params)[0].outputs[0]
        agree = first_near_tie([torch.tensor([lp.top[0][1], lp.top[1][1]]) for lp in reference.logprobs])
        if agree == len(reference.token_ids):
            assert answer == reference.text
        else:  # up to the near-tie the text is the reference's
            assert answer.startswith(smollm2_tokenizer.decode(reference.token_ids[:agree], skip_special_tokens=True))
    wait_for_free_blocks(server)


def test_a_context_strategy_sends_only_the_part_of_the_conversation_it_selects(server, client, smollm2_tokenizer):
    """lmforge's `context` extension: a window of the last exchange is the same prompt as sending only it."""
    earlier = [{"role": "user", "content": f"Fact {i}: the box number {i} is {'red' if i % 2 else 'blue'}."}
               for i in range(6)]
    messages = [{"role": "system", "content": "Be brief."}]
    for message in earlier:
        messages += [message, {"role": "assistant", "content": "Noted."}]
    messages.append({"role": "user", "content": "What colour is box 3?"})
    windowed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                              extra_body={"context": {"strategy": "window", "max_turns": 1}})
    alone = client.chat.completions.create(model=MODEL, messages=[messages[0], messages[-1]], max_tokens=4,
                                           temperature=0)
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert windowed.usage.prompt_tokens == alone.usage.prompt_tokens < full.usage.prompt_tokens
    assert windowed.choices[0].message.content == alone.choices[0].message.content
    for context, message in (({"strategy": "window"}, "needs max_turns"),
                             ({"strategy": "magic"}, "context.strategy"),
                             ({"strategy": "window", "max_turns": 1, "keep_turns": 1}, "keep_turns applies to"),
                             ({"strategy": "state", "max_tokens": 10}, "keep_turns applies to"),
                             ({"rag": True, "rag_top_k": 0}, "context.rag_top_k")):
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                           extra_body={"context": context})


@pytest.mark.parametrize("strategy", ["summarize", "state"])
def test_condensing_strategies_call_the_model_through_the_engine_once_per_exchange(server, client, strategy):
    """summarize/state condense older exchanges with model calls (billed in usage.context_tokens); the next
    request of the same conversation resumes from the cached result and pays only for what is new."""
    messages = [{"role": "system", "content": "Be brief."}]
    for fact in ("My cat is called Pixel.", "I live in Lyon.", "I was born in 1990.", "I work as a baker.",
                 "My sister is Ingrid.", "I drive a yellow tractor.", "My lucky number is 47.", "I play the cello."):
        messages += [{"role": "user", "content": fact}, {"role": "assistant", "content": "Noted, thank you."}]
    messages.append({"role": "user", "content": "What is my cat called?"})
    context = {"strategy": strategy, "keep_turns": 1}

    def ask(conversation):
        response = client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=300, temperature=0,
                                                  extra_body={"context": context})
        return response.usage.prompt_tokens, response.usage.model_extra["context_tokens"]

    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    sent, spent = ask(messages)
    assert sent < full.usage.prompt_tokens and spent["prompt_tokens"] > 0 and spent["completion_tokens"] > 0
    assert ask(messages) == (sent, {"prompt_tokens": 0, "completion_tokens": 0})  # cached: no model call
    longer = messages + [{"role": "assistant", "content": "Pixel."}, {"role": "user", "content": "And my job?"}]
    _, more = ask(longer)
    assert more["prompt_tokens"] < spent["prompt_tokens"]  # at most the newly older exchange is read
    assert (more["prompt_tokens"] > 0) == (strategy == "state")  # a summary is only rewritten when over budget
    wait_for_free_blocks(server)


def test_rag_puts_numbered_sources_from_the_index_into_the_prompt(server, client, minilm_encoder, tmp_path):
    from lmforge.context.rag import Retriever, build_index, load_documents
    from tests.context.rag_corpus import QUESTION, write_corpus

    messages = [{"role": "user", "content": QUESTION}]
    with pytest.raises(openai.BadRequestError, match="no document index"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                       extra_body={"context": {"rag": True}})
    index = build_index(load_documents(write_corpus(tmp_path)).documents, minilm_encoder)
    server.retriever = Retriever(index, minilm_encoder)
    try:
        response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                  extra_body={"context": {"rag": True, "rag_top_k": 2}})
        sources = response.model_extra["sources"]
        assert [s["number"] for s in sources] == [1, 2] and sources[0]["source"].endswith("village.txt")
        plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
        assert response.usage.prompt_tokens > plain.usage.prompt_tokens + 30  # the passages were sent
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                     stream=True, extra_body={"context": {"rag": True,
                                                                                          "rag_top_k": 2}}))
        assert chunks[0].model_extra["sources"] == sources
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == response.choices[0].message.content
    finally:
        server.retriever = None
